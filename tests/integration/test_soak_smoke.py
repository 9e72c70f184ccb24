"""`make soak` works: its short variant (bench/soak.py, Settings.smoke()) runs
on the session's RabbitMQ cluster, kills and restarts brokers, reloads
Warren, churns and holds connections, and reports what the full soak
reports: no confirmed message lost, no service crash, Warren alive and
stopping cleanly, every fault applied. The figures of a 24-second run mean
nothing; the full run's are in bench/SOAK.md."""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = [pytest.mark.rabbit, pytest.mark.timeout(300)]


def test_the_soak_smoke_run_loses_nothing_and_crashes_nothing(healthy_cluster, tmp_path):
    settings = soak.Settings.smoke()
    report = soak.run(settings, tmp_path, nodes=healthy_cluster.nodes, say=print)

    assert report["canary"]["confirmed"] > 0 and report["canary"]["lost"] == 0, report["canary"]
    assert report["crashes"]["service_crashed"] == 0 and report["crashes"]["non_json_lines"] == 0, report["crashes"]
    assert report["warren_alive_at_end"] and report["warren_exit_status"] == 0
    assert report["kills"] and not report["restart_errors"]  # a kill is skipped while a restart is under way
    assert report["reloads_sent"] >= 5 and report["reloads_seen_in_stats"] >= 3  # each reload applied
    assert report["churn"]["churned"] > settings.churn * settings.minutes * 60 / 2
    assert report["held"]["max"] == settings.held
    assert report["slopes"]["rss_kb_per_hour"] is not None and report["slopes"]["fds_per_hour"] is not None
    text = soak.markdown(report, "python -m bench.soak --smoke", "now")
    assert "confirmed messages lost** | **0**" in text
