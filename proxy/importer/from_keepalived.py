"""keepalived's ``vrrp_instance`` blocks into Warren's ``[vip.<name>]`` sections.

A ``track_script`` whose script only checks that HAProxy runs (``killall -0
haproxy``, ``pidof haproxy``, a request to its stats page...) becomes
Warren's built-in ``track`` of the backend behind the VIP: Warren knows
whether it can reach a broker, which is what the script approximated. Other
scripts cannot run in Warren and are reported.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config.durations import format_duration

from .context import FrontendFacts, UniqueNames, name_note, taken_note, warren_name
from .draft import Draft
from .keepalived import Node
from .report import Notes

KEEPALIVED_DEFAULT_PRIORITY = 100
# killall -0 haproxy, pidof haproxy, systemctl is-active haproxy, check_haproxy.sh, a curl of the stats page
_HAPROXY_CHECK = re.compile(r"haproxy|curl\b.*(stats|:8404|:1936)")
_GARP = {  # keepalived (instance; global_defs adds a vrrp_ prefix) -> (garp key, kind)
    "garp_master_delay": ("repeat_after", "seconds"),
    "garp_master_repeat": ("burst", "int"),
    "garp_master_refresh": ("refresh", "seconds"),
    "garp_master_refresh_repeat": ("refresh_burst", "int"),
    "garp_interval": ("burst_delay", "seconds"),
}
_IGNORED = {
    "state": "the priority decides: every Warren host starts as backup and the highest priority becomes master",
    "dont_track_primary": "Warren always tracks its own interface (fault state)",
    "use_vmac": "Warren answers with the interface's own MAC address",
    "vmac_xmit_base": "Warren answers with the interface's own MAC address",
    "native_ipv6": "an instance's family follows its addresses",
    "smtp_alert": "use alert rules on Warren's metrics (dashboards/warren-alerts.yml)",
    "debug": "Warren's log level is global.log_level",
    "strict_mode": "Warren follows RFC 5798 (with a faster handover, docs/vip.md)",
    "skip_check_adv_addr": "Warren does not compare advertised addresses",
    "accept": "the VIP is an ordinary local address on the Warren host",
    "no_accept": "the VIP is an ordinary local address on the Warren host",
    "notify_stop": "Warren runs no hook on stop",
    "lvs_sync_daemon_interface": "no LVS in Warren",
    "garp_lower_prio_delay": "not supported",
    "garp_lower_prio_repeat": "not supported",
    "track_process": "Warren tracks its own backends (track =), not processes",
    "track_file": "Warren tracks its own backends (track =), not files",
    "track_bfd": "no BFD in Warren",
    "version": "Warren speaks VRRPv3; keepalived peers need vrrp_version 3",
}
_TOP_IGNORED = {
    "global_defs": "keepalived's process settings (router_id, e-mail, scripts)",
    "virtual_server": "LVS load balancing: Warren's frontends and backends do this; translate it by hand",
    "virtual_server_group": "LVS load balancing: Warren's frontends and backends do this",
    "vrrp_sync_group": "Warren's instances are independent; each tracks the backend it serves",
    "static_ipaddress": "configure static addresses with the system's network configuration",
    "static_routes": "configure static routes with the system's network configuration",
    "include": "included files are not read: import their content separately",
}


@dataclass
class _Facts:
    frontends: Sequence[FrontendFacts]
    backends: Sequence[str]
    vrrp_version: int
    garp_defaults: dict[str, tuple[object, Node]]
    scripts: dict[str, Node]
    names: UniqueNames


def translate_keepalived(nodes: Sequence[Node], path: str, notes: Notes, draft: Draft,
                         frontends: Sequence[FrontendFacts], backends: Sequence[str]) -> None:
    instances = [node.args[0] for node in nodes if node.keyword == "vrrp_instance" and node.args]
    facts = _Facts(frontends, backends, 2, {}, {n.args[0]: n for n in nodes if n.keyword == "vrrp_script" and n.args},
                   UniqueNames(instances))
    for node in nodes:
        if node.keyword == "global_defs":
            _global_defs(node, notes, facts)
    used_scripts: set[str] = set()
    for node in nodes:
        if node.keyword == "vrrp_instance":
            used_scripts |= _instance(node, path, notes, draft, facts)
        elif node.keyword == "vrrp_script":
            continue
        elif node.keyword in _TOP_IGNORED and node.keyword != "global_defs":
            notes.ignored(node.line, node.words, _TOP_IGNORED[node.keyword])
        elif node.keyword != "global_defs":
            notes.ignored(node.line, node.words, "not known to the importer; Warren has no equivalent")
    for name, script in facts.scripts.items():
        if name not in used_scripts:
            notes.ignored(script.line, script.words, "no vrrp_instance tracks this script")
        for line in script.children or ():
            if line.line not in notes.lines:
                notes.ignored(line.line, line.words, "part of a script Warren does not run")


def _global_defs(node: Node, notes: Notes, facts: _Facts) -> None:
    notes.translated(node.line, node.words, "read for vrrp_version and the vrrp_garp_* defaults")
    for child in node.children or ():
        keyword = child.keyword
        if keyword == "vrrp_version" and child.args[:1] in (("2",), ("3",)):
            facts.vrrp_version = int(child.args[0])
            notes.translated(child.line, child.words, "Warren speaks VRRPv3" if facts.vrrp_version == 3 else
                             "Warren speaks VRRPv3 only: set vrrp_version 3 on keepalived hosts that run beside it")
        elif keyword.startswith("vrrp_garp_") and keyword[5:] in _GARP:
            facts.garp_defaults[keyword[5:]] = (child.args[0] if child.args else "", child)
        else:
            notes.ignored(child.line, child.words, _TOP_IGNORED["global_defs"])


def _instance(node: Node, path: str, notes: Notes, draft: Draft, facts: _Facts) -> set[str]:
    raw = node.args[0] if node.args else "vip"
    name = facts.names.own(raw)
    table = draft.new(("vip", name), f"{path}:{node.line}: vrrp_instance {' '.join(node.args)}")
    values = table.values
    note = "; ".join([f"[vip.{name}]", *filter(None, [name_note(raw, warren_name(raw)),
                                                     taken_note(warren_name(raw), name)])])
    if facts.vrrp_version != 3:
        note += "; keepalived speaks VRRPv2 unless vrrp_version 3: set it on keepalived hosts that run beside Warren"
    (notes.translated if facts.vrrp_version == 3 else notes.approximated)(node.line, node.words, note)
    garp: dict = {}
    seen_garp: set[str] = set()
    used: set[str] = set()
    for child in node.children or ():
        handler = _HANDLERS.get(child.keyword)
        if handler is not None:
            handler(child, values, notes)
        elif child.keyword in _GARP:
            seen_garp.add(child.keyword)
            _garp(child.keyword, child.args[0] if child.args else "", child, garp, notes)
        elif child.keyword == "track_script":
            used |= _track_scripts(child, node, values, notes, facts)
        elif child.keyword == "track_interface":
            _track_interfaces(child, values, notes)
        elif child.keyword in ("notify_master", "notify_backup", "notify_fault", "notify"):
            _notify(child, values, notes)
        elif child.keyword == "authentication":
            _authentication(child, notes)
        elif child.keyword in _IGNORED:
            notes.ignored(child.line, child.words, _IGNORED[child.keyword])
        else:
            notes.ignored(child.line, child.words, "not known to the importer; Warren has no equivalent")
    for keyword, (value, where) in facts.garp_defaults.items():
        if keyword not in seen_garp:
            _garp(keyword, str(value), where, garp, notes)
    if garp:
        values["garp"] = garp
    _track_weight_trap(node, values, notes, facts)
    return used


def _int(key: str, low: int, high: int):
    def handle(child: Node, values: dict, notes: Notes) -> None:
        text = child.args[0] if child.args else ""
        if text.isdigit() and low <= int(text) <= high:
            values[key] = int(text)
            notes.translated(child.line, child.words, f"{key} = {text}")
        else:
            notes.ignored(child.line, child.words, f"expected {low}-{high}; left out")
    return handle


def _interface(child: Node, values: dict, notes: Notes) -> None:
    values["interface"] = child.args[0] if child.args else ""
    notes.translated(child.line, child.words, "interface")


def _advert_int(child: Node, values: dict, notes: Notes) -> None:
    try:
        seconds = float(child.args[0])
    except (IndexError, ValueError):
        notes.ignored(child.line, child.words, "expected seconds; left out")
        return
    centiseconds = max(1, min(4095, round(seconds * 100)))
    values["advert_interval"] = format_duration(centiseconds / 100)
    if abs(centiseconds / 100 - seconds) > 1e-9:
        notes.approximated(child.line, child.words, f"advert_interval = \"{values['advert_interval']}\" "
                           "(VRRPv3 counts 10 ms steps from 10 ms to 40.95 s)")
    else:
        notes.translated(child.line, child.words, f"advert_interval = \"{values['advert_interval']}\"")


def _nopreempt(child: Node, values: dict, notes: Notes) -> None:
    values["preempt"] = False
    notes.translated(child.line, child.words, "preempt = false")


def _preempt_delay(child: Node, values: dict, notes: Notes) -> None:
    try:
        values["preempt_delay"] = format_duration(float(child.args[0]))
        notes.translated(child.line, child.words, "preempt_delay")
    except (IndexError, ValueError):
        notes.ignored(child.line, child.words, "expected seconds; left out")


def _source(child: Node, values: dict, notes: Notes) -> None:
    values["source"] = child.args[0] if child.args else ""
    notes.translated(child.line, child.words, "source: the address adverts are sent from")


def _peers(child: Node, values: dict, notes: Notes) -> None:
    peers = [peer.words[0] for peer in child.children or () if peer.words]
    values["peers"] = peers
    notes.translated(child.line, child.words, "peers: unicast adverts to these hosts")
    for peer in child.children or ():
        if len(peer.words) > 1:
            notes.ignored(peer.line, peer.words, "per-peer options (min_ttl, max_ttl) are not supported")
        else:
            notes.translated(peer.line, peer.words, "a peer")


def _addresses(child: Node, values: dict, notes: Notes) -> None:
    addresses: list[str] = values.setdefault("addresses", [])
    family = None
    for entry in child.children or ():
        text = entry.words[0] if entry.words else ""
        try:
            address = ipaddress.ip_interface(text)
        except ValueError:
            notes.ignored(entry.line, entry.words, f'"{text}" is not an address')
            continue
        family = family or address.version
        if address.version != family:
            notes.ignored(entry.line, entry.words, "one Warren instance carries one IP family: "
                          "add a second [vip] section for this address")
            continue
        addresses.append(text)
        extra = entry.words[1:]
        if child.keyword == "virtual_ipaddress_excluded":
            notes.approximated(entry.line, entry.words, "added to addresses (and to adverts)")
        elif extra:
            notes.approximated(entry.line, entry.words, f"addresses: {text}; {' '.join(extra)} not kept (Warren puts "
                               "the address on the instance's interface)")
        else:
            notes.translated(entry.line, entry.words, f"addresses: {text}")
    notes.translated(child.line, child.words, "addresses")


_HANDLERS = {
    "interface": _interface,
    "virtual_router_id": _int("vrid", 1, 255),
    "priority": _int("priority", 1, 255),
    "advert_int": _advert_int,
    "nopreempt": _nopreempt,
    "preempt_delay": _preempt_delay,
    "unicast_src_ip": _source,
    "mcast_src_ip": _source,
    "unicast_peer": _peers,
    "virtual_ipaddress": _addresses,
    "virtual_ipaddress_excluded": _addresses,
}


def _garp(keyword: str, text: str, where: Node, garp: dict, notes: Notes) -> None:
    key, kind = _GARP[keyword]
    try:
        number = float(text)
    except ValueError:
        notes.ignored(where.line, where.words, "expected a number; left out")
        return
    if kind == "int":
        garp[key] = max(1, min(100, int(number)))
    else:
        garp[key] = format_duration(number) if number > 0 else 0
    notes.translated(where.line, where.words, f"garp.{key}")


def _track_scripts(child: Node, instance: Node, values: dict, notes: Notes, facts: _Facts) -> set[str]:
    notes.translated(child.line, child.words, "each script below")
    used = set()
    for entry in child.children or ():
        name = entry.words[0] if entry.words else ""
        script = facts.scripts.get(name)
        used.add(name)
        if script is None:
            notes.ignored(entry.line, entry.words, f'no vrrp_script "{name}" is defined')
            continue
        command = " ".join(script.first("script").args) if script.first("script") else ""
        if not _HAPROXY_CHECK.search(command):
            notes.ignored(entry.line, entry.words, "Warren cannot run track scripts: it tracks its own backends; "
                          "run this check elsewhere or drop it")
            notes.ignored(script.line, script.words, "a script Warren cannot run")
            continue
        weight = _effective_weight(entry, script)
        backend = _tracked_backend(values, facts)
        if backend is None:
            notes.ignored(entry.line, entry.words, "no backend to track")
            continue
        values["track"] = backend
        if weight:
            values["weight"] = max(1, min(254, abs(weight)))
        how = (f'track = "{backend}": Warren watches its own health checks of that backend instead of '
               f'running "{command}"; with no server available it resigns at once '
               "(resign_on_track_failure)")
        notes.translated(entry.line, entry.words, how)
        notes.translated(script.line, script.words, f'replaced by track = "{backend}"')
        for line in script.children or ():
            notes.translated(line.line, line.words, "replaced by Warren's own health checks")
    return used


def _effective_weight(entry: Node, script: Node | None) -> int:
    """keepalived: a weight in track_script overrides the vrrp_script's own."""
    weight = _weight(entry)
    if weight is None and script is not None:
        weight = _weight(script)
    return weight or 0


def _weight(node: Node) -> int | None:
    words = list(node.words) + [w for child in node.children or () for w in child.words]
    if "weight" in words[:-1]:
        try:
            return int(words[words.index("weight") + 1])
        except ValueError:
            return None
    return None


def _tracked_backend(values: dict, facts: _Facts) -> str | None:
    """The backend behind the frontend bound to this VIP; else the only (or first) one."""
    vips = {str(ipaddress.ip_interface(a).ip) for a in values.get("addresses", [])}
    for frontend in facts.frontends:
        if vips & set(frontend.hosts):
            return frontend.backend
    for frontend in facts.frontends:
        if {"0.0.0.0", "::"} & set(frontend.hosts):
            return frontend.backend
    return facts.backends[0] if facts.backends else None


def _track_weight_trap(instance: Node, values: dict, notes: Notes, facts: _Facts) -> None:
    """A weight smaller than the gap to a default-priority peer never moves the VIP in keepalived."""
    priority = values.get("priority", KEEPALIVED_DEFAULT_PRIORITY)
    for child in instance.find("track_script"):
        for entry in child.children or ():
            weight = _effective_weight(entry, facts.scripts.get(entry.keyword))
            if weight and priority > KEEPALIVED_DEFAULT_PRIORITY and priority - abs(weight) >= KEEPALIVED_DEFAULT_PRIORITY:
                notes.suspicious(entry.line, entry.words, f"priority {priority} - weight {abs(weight)} = "
                                 f"{priority - abs(weight)} stays at or above a default-priority peer "
                                 f"({KEEPALIVED_DEFAULT_PRIORITY}): in keepalived a failing check never moved "
                                 "the VIP (Warren resigns on track failure, so it will move now)")


def _track_interfaces(child: Node, values: dict, notes: Notes) -> None:
    for entry in child.children or ():
        if entry.words and entry.words[0] == values.get("interface"):
            notes.translated(entry.line, entry.words, "built in: the instance's interface going down is a fault")
        else:
            notes.ignored(entry.line, entry.words, "Warren tracks the instance's own interface only")
    notes.translated(child.line, child.words, "track_interface")


def _notify(child: Node, values: dict, notes: Notes) -> None:
    command = " ".join(child.args)
    notify = values.setdefault("notify", {})
    if child.keyword == "notify":
        for state in ("master", "backup", "fault"):
            notify.setdefault(state, command)
        notes.approximated(child.line, child.words, "notify.master/backup/fault: Warren runs it with "
                           "<instance> <state> <priority> appended (keepalived: INSTANCE <name> <state> <priority>)")
        return
    state = child.keyword.removeprefix("notify_")
    notify[state] = command
    argv = shlex.split(command) if command else []
    note = f"notify.{state}: Warren appends <instance> <state> <priority> to the command"
    if len(argv) > 1 and argv[0] in ("sh", "bash", "/bin/sh", "/bin/bash"):
        note += "; it is not run through a shell"
    notes.approximated(child.line, child.words, note)


def _authentication(child: Node, notes: Notes) -> None:
    for entry in child.children or ():
        if entry.keyword == "auth_pass":
            notes.suspicious(entry.line, entry.words, "a clear-text password on the wire (8 bytes, readable by "
                             "anyone on the segment); not translated: Warren's auth is an HMAC only Warren peers "
                             "speak (docs/vip.md, authentication)")
        else:
            notes.ignored(entry.line, entry.words, "VRRPv2 authentication is not part of VRRPv3")
    notes.ignored(child.line, child.words, "not translated; see auth_pass")
