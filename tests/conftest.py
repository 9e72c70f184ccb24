"""Test-suite wiring: the real-RabbitMQ fixtures live in tests/rabbit.py, the
test PKI in tests/tlsca.py; the network-namespace lab and the polling helper
in the top-level `lab` package; hypothesis profiles.

Property tests (tests/properties/, and those beside unit tests) run under a
hypothesis settings profile chosen by HYPOTHESIS_PROFILE (or pytest's
--hypothesis-profile):

- "ci" (the default): a bounded, derandomized number of examples, so `make
  test` stays fast and a failure reproduces on every machine;
- "fuzz": what `make fuzz` runs, many random examples per property
  (FUZZ_EXAMPLES, default 5000) in rounds with fresh seeds.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

from lab import NetLab, netns_missing

pytest_plugins = ["tests.rabbit", "tests.tlsca"]

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")), deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """A NetLab for one test (skipped where namespaces cannot be made); whatever
    the test built or started in it is removed afterwards, even on failure."""
    if reason := netns_missing():
        pytest.skip(reason)
    made = NetLab()
    try:
        yield made
    finally:
        made.destroy()
