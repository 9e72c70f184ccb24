"""The `warren ctl` command language, sans-I/O: a line in, text out.

Modelled on HAProxy's runtime API so operators keep their muscle memory:

    show stat                          the CSV export (HAProxy 2.6 columns)
    show info                          version, pid, uptime, totals
    show servers state [BACKEND]       one line per server
    show vip                           the floating-IP instances
    show sessions [B[/S]] [sort K]     established connections: client, AMQP identity, age, idle, bytes
    set server B/S state ready|drain|maint
    set server B/S weight N            0..256
    shutdown sessions server B/S       closes the server's connections now
    rebalance backend B [dry-run]      close connections over their share (dry-run: only say which)
    help

Several commands may share a line separated by ";" (at most MAX_COMMANDS, on
a line of at most MAX_LINE characters). Every answer ends with an empty
line, as HAProxy's do. A command that fails answers one line that starts
with "error: " (which is how `warren ctl` chooses its exit status).

A line costs bounded work: :func:`split_line` refuses an overlong line or
too many commands before anything runs, and the shell runs the commands
one by one (:func:`run_command`), letting the rest of Warren run between
them, so no line stalls the event loop for longer than its costliest
command.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

import structlog

from . import admin, connections, view
from .render_csv import render_csv

HELP = """\
Commands:
  help                                   this list
  show stat                              statistics as CSV (HAProxy 2.6 column names)
  show info                              version, pid, uptime, session totals, relay path
  show servers state [<backend>]         one line per server: state, admin, weight, last check
  show vip                               floating-IP instances and their VRRP state
  show sessions [<b>[/<s>]] [sort <key>] connections (at most 1000, oldest first; keys: age idle
                                         bytes_in bytes_out client name user vhost heartbeat)
  set server <b>/<s> state ready|drain|maint
  set server <b>/<s> weight <0-256>
  shutdown sessions server <b>/<s>       close the server's connections now
  rebalance backend <b> [dry-run]        spread connections by weight again (at the backend's
                                         close rate, oldest first); dry-run says what would move
Several commands may be separated by ';'.
"""

MAX_LINE = 4096
MAX_COMMANDS = 16  # per line: a script sets a handful of servers at once

log = structlog.get_logger("warren.ctl")


class CommandError(Exception):
    """Becomes the "error: ..." answer."""


def execute(line: str, runtime: Any, now: float, *, user: str = "ctl") -> tuple[str, bool]:
    """Runs every ';'-separated command of `line`; returns (answer, all succeeded).

    `now` is on the runtime's clock (time.monotonic), for admin changes.
    """
    try:
        commands = split_line(line)
    except CommandError as error:
        return f"error: {error}\n\n", False
    results = [run_command(command, runtime, now, user=user) for command in commands]
    return join_answers(results)


def split_line(line: str) -> list[str]:
    """The non-empty commands of `line`; CommandError if the line is too long or holds too many."""
    if len(line) > MAX_LINE:
        raise CommandError("command line too long")
    commands = [command for command in line.split(";") if command.strip()]
    if len(commands) > MAX_COMMANDS:
        raise CommandError(f"at most {MAX_COMMANDS} commands per line")
    return commands


def run_command(command: str, runtime: Any, now: float, *, user: str = "ctl") -> tuple[str, bool]:
    """One command's answer (ending with a newline) and whether it succeeded; never raises."""
    try:
        return _run(command, runtime, now, user), True
    except CommandError as error:
        return f"error: {error}\n", False
    except Exception:  # a bug: this command fails, the control socket and the proxy go on
        log.exception("ctl.command_failed", command=command[:200])
        return "error: internal error (logged as ctl.command_failed)\n", False


def join_answers(results: list[tuple[str, bool]]) -> tuple[str, bool]:
    """The whole answer: each command's followed by an empty line (a lone one if there were none)."""
    return "".join(answer + "\n" for answer, _ in results) or "\n", all(ok for _, ok in results)


def _run(command: str, runtime: Any, now: float, user: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise CommandError(f"cannot parse command: {error}") from None
    for length in (4, 3, 2, 1):
        handler = _COMMANDS.get(tuple(words[:length]))
        if handler is not None:
            return handler(words[length:], runtime, now, user)
    raise CommandError(f'unknown command "{" ".join(words[:3])}"; try "help"')


def _help(args, runtime, now, user) -> str:
    return HELP


def _show_stat(args, runtime, now, user) -> str:
    return render_csv(runtime.statistics())


def _show_info(args, runtime, now, user) -> str:
    stats = runtime.statistics()
    servers = [s for b in stats.backends for s in b.servers]
    fields = [
        ("Name", "warren"), ("Version", stats.version), ("Pid", stats.pid),
        ("Uptime", view.human_duration(stats.uptime)), ("Uptime_sec", int(stats.uptime)),
        ("CurrConns", sum(f.current_sessions for f in stats.frontends)),
        ("CumConns", sum(f.total_sessions for f in stats.frontends)),
        ("Frontends", len(stats.frontends)), ("Backends", len(stats.backends)),
        ("Servers", len(servers)),
        ("ServersUsable", sum(1 for s in servers if view.server_state_label(s) == "UP")),
        ("Relay", stats.relay),
    ]
    return "".join(f"{name}: {value}\n" for name, value in fields)


SERVERS_STATE_HEADER = (
    "# be_name srv_name srv_addr srv_port srv_op_state srv_admin_state srv_uweight "
    "srv_time_since_last_change srv_check_status\n"
)


def _show_servers_state(args, runtime, now, user) -> str:
    stats = runtime.statistics()
    backends = stats.backends
    if args:
        backends = [b for b in backends if b.name == args[0]]
        if not backends:
            raise CommandError(f'no backend "{args[0]}"')
    lines = [SERVERS_STATE_HEADER]
    for backend in backends:
        for server in backend.servers:
            health = "UP" if server.up else "DOWN"
            lines.append(
                f"{backend.name} {server.name} {server.address} {server.port} {health} {server.admin} "
                f"{server.weight} {int(server.last_change)} {view.check_code(server) or '-'}\n"
            )
    return "".join(lines)


def _show_vip(args, runtime, now, user) -> str:
    instances = view.vip_instances(runtime.statistics())
    if not instances:
        return "no floating-IP instance configured\n"
    lines = ["# name state priority vrid interface addresses master since_s\n"]
    for instance in instances:
        last = view.vip_field(instance, "last_transition", None)
        lines.append(" ".join(str(x) for x in (
            view.vip_field(instance, "name"), view.vip_field(instance, "state"),
            view.vip_field(instance, "priority", "-"), view.vip_field(instance, "vrid", "-"),
            view.vip_field(instance, "interface", "-") or "-",
            ",".join(view.vip_addresses(instance)) or "-",
            view.vip_field(instance, "master", None) or "-",
            "-" if last is None else int(last),
        )) + "\n")
    return "".join(lines)


def _set_server(args, runtime, now, user) -> str:
    if len(args) != 3 or args[1] not in ("state", "weight"):
        raise CommandError("usage: set server <b>/<s> state ready|drain|maint | weight <0-256>")
    backend, server = _target(args[0])
    if args[1] == "state":
        try:
            action = admin.Action(args[2].lower())
        except ValueError:
            action = None
        if action not in (admin.Action.READY, admin.Action.DRAIN, admin.Action.MAINT):
            raise CommandError('state must be "ready", "drain" or "maint"')
        request = admin.AdminRequest(backend, server, action)
    else:
        try:
            weight = admin.parse_weight(args[2])
        except admin.BadRequest as error:
            raise CommandError(str(error)) from None
        request = admin.AdminRequest(backend, server, admin.Action.WEIGHT, weight)
    return _apply(runtime, request, now, user)


def _shutdown_sessions(args, runtime, now, user) -> str:
    if len(args) != 1:
        raise CommandError("usage: shutdown sessions server <b>/<s>")
    backend, server = _target(args[0])
    return _apply(runtime, admin.AdminRequest(backend, server, admin.Action.KILL), now, user)


def _apply(runtime: Any, request: admin.AdminRequest, now: float, user: str) -> str:
    try:
        return admin.apply_request(runtime, request, now, user=user, source="ctl") + "\n"
    except KeyError:
        raise CommandError(f"no server {request.target}") from None


def _target(text: str) -> tuple[str, str]:
    backend, slash, server = text.partition("/")
    if not slash or not backend or not server:
        raise CommandError(f'expected <backend>/<server>, got "{text}"')
    return backend, server


def _show_sessions(args, runtime, now, user) -> str:
    """`show sessions [backend[/server]] [sort KEY]`: bounded, like the page."""
    where, sort = None, "age"
    words = list(args)
    if len(words) >= 2 and words[-2] == "sort":
        sort = words[-1]
        words = words[:-2]
    if len(words) > 1:
        raise CommandError("usage: show sessions [<backend>[/<server>]] [sort <key>]")
    if words:
        where = words[0]
    backend, _, server = (where or "").partition("/")
    try:
        query = connections.ConnectionQuery.from_params(
            {"backend": [backend], "server": [server], "sort": [sort]})
    except connections.BadQuery as error:
        raise CommandError(str(error)) from None
    if backend and backend not in runtime.backends:
        raise CommandError(f"no backend {backend}")
    return connections.render_text(connections.select(runtime, query, page_size=connections.TEXT_LIMIT))


def _rebalance_backend(args, runtime, now, user) -> str:
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] != "dry-run"):
        raise CommandError("usage: rebalance backend <backend> [dry-run]")
    action = admin.Action.REBALANCE_DRY_RUN if len(args) == 2 else admin.Action.REBALANCE
    try:
        return admin.apply_request(runtime, admin.AdminRequest(args[0], "", action), now, user=user,
                                   source="ctl") + "\n"
    except KeyError as error:
        raise CommandError(error.args[0]) from None


_COMMANDS: dict[tuple[str, ...], Callable[[list[str], Any, float, str], str]] = {
    ("help",): _help,
    ("show", "stat"): _show_stat,
    ("show", "info"): _show_info,
    ("show", "servers", "state"): _show_servers_state,
    ("show", "vip"): _show_vip,
    ("show", "sessions"): _show_sessions,
    ("rebalance", "backend"): _rebalance_backend,
    ("set", "server"): _set_server,
    ("shutdown", "sessions", "server"): _shutdown_sessions,
}
