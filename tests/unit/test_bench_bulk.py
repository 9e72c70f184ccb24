"""The bulk benchmark's iperf3 runs: a run the server turned away is tried again, nothing else is."""

from __future__ import annotations

import json

import pytest

from bench.procs import ProcessFailed
from bench.suites import bulk
from bench.suites.base import MeasureError

GOOD = json.dumps({"end": {"sum_received": {"bits_per_second": 8e9}}})


class Calls(list):
    def __init__(self):
        super().__init__()
        self.pauses = []


def scripted(monkeypatch, outputs):
    """run_tool answers `outputs` in turn (an exception is raised); returns the
    calls, and the pauses between them in `calls.pauses`."""
    calls = Calls()
    monkeypatch.setattr(bulk, "_pause", calls.pauses.append)

    def run_tool(argv, timeout):
        calls.append(argv)
        output = outputs[len(calls) - 1]
        if isinstance(output, Exception):
            raise output
        return output

    monkeypatch.setattr(bulk, "run_tool", run_tool)
    return calls


@pytest.mark.parametrize("turned_away", [
    json.dumps({"error": "unable to receive control message: Connection reset by peer"}),
    ProcessFailed("iperf3 -c 127.0.0.1 exited 1: the server is busy running a test. try again later"),
])  # fmt: skip
def test_a_run_the_busy_server_turned_away_is_tried_again(monkeypatch, turned_away):
    calls = scripted(monkeypatch, [turned_away, turned_away, GOOD])
    assert bulk.run_iperf3(["iperf3"], timeout=5) == 1.0
    assert len(calls) == 3
    assert calls.pauses == [0.5, 1.0]  # longer each time: the server may still finish a test


def test_a_server_that_keeps_turning_runs_away_fails_the_measure(monkeypatch):
    busy = json.dumps({"error": "unable to receive control message: Connection reset by peer"})
    calls = scripted(monkeypatch, [busy] * 10)
    with pytest.raises(MeasureError, match="control message"):
        bulk.run_iperf3(["iperf3"], timeout=5)
    assert len(calls) == 6
    assert calls.pauses == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_any_other_failure_is_the_contenders_at_once(monkeypatch):
    calls = scripted(monkeypatch, [json.dumps({"error": "unable to connect to server"}), GOOD])
    with pytest.raises(MeasureError, match="unable to connect"):
        bulk.run_iperf3(["iperf3"], timeout=5)
    assert (len(calls), calls.pauses) == (1, [])
