"""Test-suite wiring: the real-RabbitMQ fixtures live in tests/rabbit.py, the
test PKI in tests/tlsca.py; the network-namespace lab and the polling helper
in the top-level `lab` package."""

from __future__ import annotations

from typing import Iterator

import pytest

from lab import NetLab, netns_missing

pytest_plugins = ["tests.rabbit", "tests.tlsca"]


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
