"""A pytest plugin for `make fuzz`: runs only the properties of a file, counts their examples.

Loaded with `-p tests.properties.counting`; writes `{nodeid: {"examples": n,
"passed": bool}}` as JSON to the path in FUZZ_COUNTS when the session ends.
Counting wraps hypothesis's `inner_test` (the hook pytest-trio uses too), so
every example hypothesis runs, shrinking included, is one call.

The tests of a file that are not properties are deselected (the campaign
also runs the properties that live among unit tests), and with FUZZ_EXAMPLES
set every property runs that many examples, also one whose ``@settings``
names its own ``max_examples`` for `make test`.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from hypothesis import settings

_examples: Counter[str] = Counter()
_passed: dict[str, bool] = {}


def pytest_collection_modifyitems(config, items) -> None:
    examples = int(os.environ.get("FUZZ_EXAMPLES", "0"))
    kept, dropped = [], []
    for item in items:
        test = getattr(item, "obj", None)
        handle = getattr(test, "hypothesis", None)
        if handle is None:
            dropped.append(item)
            continue
        kept.append(item)
        handle.inner_test = _counted(item.nodeid, handle.inner_test)
        if examples:  # hypothesis reads these settings when the test is called
            test._hypothesis_internal_use_settings = settings(test._hypothesis_internal_use_settings,
                                                              max_examples=examples)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _counted(nodeid: str, inner):
    def counted(*args, **kwargs):
        _examples[nodeid] += 1
        return inner(*args, **kwargs)

    return counted


def pytest_runtest_logreport(report) -> None:
    if report.when == "call":
        _passed[report.nodeid] = report.passed


def pytest_sessionfinish(session) -> None:
    path = os.environ.get("FUZZ_COUNTS")
    if path:
        result = {nodeid: {"examples": _examples[nodeid], "passed": _passed.get(nodeid, False)}
                  for nodeid in _examples}
        with open(path, "w") as file:
            json.dump(result, file)
