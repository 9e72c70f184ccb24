"""`python -m bench.run --baseline DIR`: another checkout's Warren measured beside this one."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import contenders as C
from bench.lab import Lab, Mode
from bench.run import with_baseline
from bench.suites import ALL


def test_the_baseline_joins_the_benchmarks_that_know_how_to_start_it(tmp_path, monkeypatch):
    checkout = tmp_path / "base"
    (checkout / "proxy").mkdir(parents=True)
    (checkout / "proxy" / "__main__.py").write_text("")
    monkeypatch.setattr(C, "BASELINE", None)
    lab = Lab(Mode("smoke"), tmp_path / "work")
    try:
        benches = [cls(lab) for cls in ALL]
        with_baseline(benches, checkout)
    finally:
        lab.close(keep_workdir=False)
    with_it = {b.name for b in benches if "baseline" in b.contenders}
    assert with_it == {"requests", "connrate", "bulk", "amqp_connrate", "amqp", "tls_amqp", "storm", "storm_limited",
                       "failover"}
    assert all(b.contenders[-1] == "baseline" for b in benches if b.name in with_it)
    assert C.BASELINE == checkout.resolve()


def test_a_baseline_that_is_no_warren_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a Warren checkout"):
        with_baseline([], Path(tmp_path))
