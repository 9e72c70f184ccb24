"""The bounded load history and the SVG charts drawn from it."""

import xml.etree.ElementTree as ET
from types import SimpleNamespace

from proxy.stats_ui.charts import Series, line_chart, nice_ceiling
from proxy.stats_ui.history import History


def snapshot(**backends):
    """backends: name -> (current sessions, bytes in, bytes out)."""
    return SimpleNamespace(backends=[
        SimpleNamespace(name=name, current_sessions=s, bytes_in=i, bytes_out=o)
        for name, (s, i, o) in backends.items()
    ])


def test_rates_come_from_consecutive_totals():
    history = History()
    history.record(snapshot(rabbit=(1, 0, 0)), 0.0)
    history.record(snapshot(rabbit=(3, 2000, 500)), 2.0)
    first, second = history.samples("rabbit")
    assert (first.sessions, first.bytes_in_rate, first.bytes_out_rate) == (1, 0.0, 0.0)
    assert (second.sessions, second.bytes_in_rate, second.bytes_out_rate) == (3, 1000.0, 250.0)


def test_shrinking_totals_after_a_reload_never_give_negative_rates():
    history = History()
    history.record(snapshot(rabbit=(1, 5000, 5000)), 0.0)
    history.record(snapshot(rabbit=(1, 100, 100)), 2.0)
    assert history.samples("rabbit")[-1].bytes_in_rate == 0.0


def test_history_is_bounded_per_backend():
    history = History(capacity=5)
    for t in range(20):
        history.record(snapshot(rabbit=(t, 0, 0)), float(t))
    assert [s.sessions for s in history.samples("rabbit")] == [15, 16, 17, 18, 19]


def test_removed_backends_are_forgotten():
    history = History()
    history.record(snapshot(a=(1, 0, 0), b=(1, 0, 0)), 0.0)
    history.record(snapshot(a=(1, 0, 0)), 2.0)
    assert history.samples("b") == ()
    assert len(history.samples("a")) == 2


def test_nice_ceiling():
    assert [nice_ceiling(v) for v in (0, 0.5, 1, 3, 7, 10, 11, 4000, 60000)] == [1, 1, 1, 5, 10, 10, 20, 5000, 100000]


def test_chart_is_well_formed_svg_with_escaped_text():
    svg = line_chart('<b>"x"</b>', [Series("in&out", [0, 5, 10], "s-in")], capacity=10, span="20s")
    root = ET.fromstring(svg)  # well-formed XML, text escaped
    assert root.tag == "svg"
    assert "<b>" not in svg
    points = root.find("polyline").get("points").split()
    assert len(points) == 3
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert xs[-1] == float(root.get("width"))  # newest sample at the right edge
    assert ys[0] > ys[1] > ys[2]  # larger values are drawn higher
    assert "max 10" in svg


def test_empty_and_single_sample_charts_render():
    assert "<polyline" not in line_chart("t", [Series("a", [], "c")], capacity=10, span="1m")
    single = ET.fromstring(line_chart("t", [Series("a", [3], "c")], capacity=10, span="1m"))
    assert len(single.find("polyline").get("points").split()) == 2
