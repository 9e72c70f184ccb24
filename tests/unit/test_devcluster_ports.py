"""proxy.devcluster's port picker keeps away from the demo cluster's ports."""

from __future__ import annotations

import pytest

from proxy.devcluster import _system
from proxy.devcluster.__main__ import demo_specs, parse_args

pytestmark = pytest.mark.timeout(10)


def test_the_demo_clusters_distribution_ports_are_reserved() -> None:
    args = parse_args([])
    specs = demo_specs(args.nodes, args.base_port, args.mgmt_base_port, args.dist_base_port, args.name_prefix)
    assert all(spec.dist_port in _system.DEMO_PORTS for spec in specs)


def test_free_ports_skips_a_reserved_port(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter([_system.DEMO_PORTS[9], *range(*_system.PORT_RANGE)])  # a reserved port first
    monkeypatch.setattr(_system.random, "randrange", lambda *_: next(drawn))
    monkeypatch.setattr(_system, "_port_is_free", lambda port: True)
    port = _system.free_ports(1)[0]
    assert port not in _system.DEMO_PORTS
