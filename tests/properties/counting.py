"""A pytest plugin for `make fuzz`: counts the examples each property ran.

Loaded with `-p tests.properties.counting`; writes `{nodeid: {"examples": n,
"passed": bool}}` as JSON to the path in FUZZ_COUNTS when the session ends.
Counting wraps hypothesis's `inner_test` (the hook pytest-trio uses too), so
every example hypothesis runs, shrinking included, is one call.
"""

from __future__ import annotations

import json
import os
from collections import Counter

_examples: Counter[str] = Counter()
_passed: dict[str, bool] = {}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if handle is not None:
            handle.inner_test = _counted(item.nodeid, handle.inner_test)


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
