"""bench.lab.Lab: the RabbitMQ nodes the benchmarks share."""

from __future__ import annotations

import io
from types import SimpleNamespace

from bench import lab as bench_lab
from bench.lab import Lab, Mode
from bench.progress import Progress


def test_nodes_whose_background_start_failed_are_started_again_when_asked_for(tmp_path, monkeypatch):
    # The background start only overlaps the nodes' start-up with other benchmarks;
    # its failure (once, under load: "release unlocked lock") must not cost the run its nodes.
    cluster = SimpleNamespace(nodes=["a", "b"], heal=lambda: None, close=lambda: None)
    outcomes = [RuntimeError("release unlocked lock"), cluster]

    def start_nodes(*args, **kwargs):
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(bench_lab, "start_nodes", start_nodes)
    monkeypatch.setattr(Lab, "rabbit_missing", staticmethod(lambda: None))
    out = io.StringIO()
    with Lab(Mode("smoke"), tmp_path / "work", Progress(stream=out)) as lab:
        lab.start_rabbit_in_background()
        assert lab.rabbit_nodes() == ["a", "b"]
    assert outcomes == []
    assert "release unlocked lock" in out.getvalue()  # said, with its traceback
