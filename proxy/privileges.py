"""What a configuration needs from the operating system, and whether this process has it.

The core is pure: :func:`needed_capabilities` reads a Config and says which
Linux capabilities it needs and why (a ``[vip]`` adds addresses and opens raw
and packet sockets: CAP_NET_ADMIN and CAP_NET_RAW; a port below
``net.ipv4.ip_unprivileged_port_start``: CAP_NET_BIND_SERVICE);
:func:`descriptors_needed` estimates the file descriptors ``maxconn`` implies.
The thin shell (:func:`capability_problems`, :func:`raise_descriptor_limit`)
reads ``/proc`` and the rlimit. ``warren check`` and ``warren run`` refuse a
configuration whose capabilities are missing, naming each capability and the
systemd setting that grants it, before anything is bound.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from .config.model import Config, RelayPath

CAPABILITY_BITS = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21,
                   "CAP_BPF": 39}
# Before Linux 5.8 loading BPF programs and maps took CAP_SYS_ADMIN, which still grants it.
_STANDS_IN = {"CAP_BPF": "CAP_SYS_ADMIN"}
# The kernel relay (relay = "kernel"): BPF programs and maps, and socket maps.
KERNEL_RELAY_NEEDS = ("CAP_BPF", "CAP_NET_ADMIN")
DEFAULT_UNPRIVILEGED_PORT_START = 1024
DESCRIPTORS_PER_CONNECTION = 2  # the client's socket and the server's (splice pipes come from a bounded pool)
DESCRIPTORS_BASE = 256  # listeners, checks, watch connections, pipes, the VIP's sockets, logs


@dataclass(frozen=True, slots=True)
class Need:
    capability: str
    what: str  # "vip.front", "frontends.amqp"
    why: str


def needed_capabilities(config: Config, unprivileged_port_start: int = DEFAULT_UNPRIVILEGED_PORT_START) -> list[Need]:
    needs: list[Need] = []
    for vip in config.vip:
        needs.append(Need("CAP_NET_ADMIN", f"vip.{vip.name}", "adds and removes the floating address"))
        needs.append(Need("CAP_NET_RAW", f"vip.{vip.name}", "sends VRRP adverts and gratuitous ARP on raw sockets"))
    if config.global_.relay is RelayPath.KERNEL:  # "auto" falls back to splice without them
        needs.append(Need("CAP_BPF", "global.relay", "loads the kernel relay's BPF program and socket map"))
        needs.append(Need("CAP_NET_ADMIN", "global.relay", "puts sockets in the kernel relay's socket map"))
    listeners = [(f"frontends.{f.name}", f.binds) for f in config.frontends]
    if config.stats is not None:
        listeners.append(("stats", config.stats.binds))
    for what, binds in listeners:
        low = sorted({b.port for b in binds if 0 < b.port < unprivileged_port_start})
        if low:
            ports = ", ".join(map(str, low))
            needs.append(Need("CAP_NET_BIND_SERVICE", what, f"listens on port {ports} (below {unprivileged_port_start})"))
    return needs


def has(capability: str, effective: set[str]) -> bool:
    return capability in effective or _STANDS_IN.get(capability) in effective


def missing(needs: list[Need], effective: set[str]) -> list[Need]:
    return [need for need in needs if not has(need.capability, effective)]


def explain(need: Need) -> str:
    return (f"{need.what}: needs {need.capability} ({need.why}), which this process does not have; run as root "
            f"or grant it, with systemd: AmbientCapabilities={need.capability} (and CapabilityBoundingSet=), "
            f"with setpriv: --ambient-caps +{need.capability.removeprefix('CAP_').lower()}")


def descriptors_needed(config: Config) -> int:
    return DESCRIPTORS_BASE + DESCRIPTORS_PER_CONNECTION * sum(f.maxconn for f in config.frontends)


# --- the thin shell: this process ----------------------------------------------------------------


def effective_capabilities(status_path: str = "/proc/self/status") -> set[str]:
    try:
        with open(status_path) as status:
            return parse_effective(status.read())
    except OSError:
        return set()


def parse_effective(status: str) -> set[str]:
    """The capabilities Warren cares about in the ``CapEff:`` line of a /proc/<pid>/status text."""
    mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")), 0)
    return {name for name, bit in CAPABILITY_BITS.items() if mask & (1 << bit)}


def unprivileged_port_start(path: str = "/proc/sys/net/ipv4/ip_unprivileged_port_start") -> int:
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return DEFAULT_UNPRIVILEGED_PORT_START


def capability_problems(config: Config) -> list[str]:
    """One line per capability the configuration needs and this process lacks."""
    needs = needed_capabilities(config, unprivileged_port_start())
    return [explain(need) for need in missing(needs, effective_capabilities())]


def raise_descriptor_limit(config: Config) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE toward what maxconn needs (up to the hard limit).

    Returns ``(needed, soft limit now)``; the caller warns when the limit is short.
    """
    needed = descriptors_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return needed, soft
