"""Migration traps: values that are valid but almost certainly not what the operator meant.

Each check reports a ``suspicious`` entry with the line; the value is still
translated as written (the importer never guesses a fix silently).
"""

from __future__ import annotations

from .context import HaproxyContext, duration_text, seconds
from .haproxy import Line, Section

AMQP_HEARTBEAT = 60.0  # RabbitMQ's default heartbeat, in seconds
_LONG_CHECK_INTERVAL = 300.0  # 5 minutes between checks is no health check at all
_FAR_BELOW = 0.5  # a frontend maxconn under half of its servers' total capacity


def check_interval_unit(ctx: HaproxyContext, line: Line, word: str, value: str) -> None:
    """``inter 2000s``: a number of milliseconds written with an ``s`` (33 minutes between checks)."""
    digits = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        interval = seconds(value)
    except ValueError:
        return
    if value.endswith(("s", "m")) and not value.endswith("ms") and digits.isdigit() and int(digits) >= 100:
        ctx.notes.suspicious(line.number, line.words, f"{word} {value} is {duration_text(interval)} between "
                             f"checks; {digits} milliseconds ({word} {digits}) was probably meant")
    elif interval >= _LONG_CHECK_INTERVAL:
        ctx.notes.suspicious(line.number, line.words, f"{word} {value} is {duration_text(interval)} between "
                             "checks: a dead broker would go unnoticed that long")


def check_idle_timeouts(ctx: HaproxyContext, section: Section) -> None:
    """An idle timeout shorter than the AMQP heartbeat cuts quiet, healthy AMQP connections."""
    tunnel = section.last("timeout", "tunnel")
    lines = [tunnel] if tunnel is not None else [section.last("timeout", "client"), section.last("timeout", "server")]
    for line in lines:
        if line is None or len(line.words) < 3:
            continue
        try:
            value = seconds(line.words[2])
        except ValueError:
            continue
        if 0 < value < AMQP_HEARTBEAT:
            ctx.notes.suspicious(line.number, line.words, f"idle AMQP connections are cut after "
                                 f"{duration_text(value)}, before RabbitMQ's default heartbeat "
                                 f"({duration_text(AMQP_HEARTBEAT)}); use a few heartbeats (\"3m\") or none")


def check_frontend_maxconn(ctx: HaproxyContext, frontend: Section, maxconn: int, backend: Section) -> None:
    """A frontend limit far below what its servers accept turns clients away while brokers idle."""
    limits = []
    for line in backend.find("server"):
        words = list(line.args)
        if "backup" in words:
            continue
        if "maxconn" not in words[:-1]:
            return  # a server without a limit: the total is unbounded
        value = words[words.index("maxconn") + 1]
        if not value.isdigit():
            return
        limits.append(int(value))
    total = sum(limits)
    if limits and maxconn < total * _FAR_BELOW:
        line = frontend.last("maxconn")
        number, words = (line.number, line.words) if line is not None else (frontend.line, ("maxconn",))
        ctx.notes.suspicious(number, words, f"frontend maxconn {maxconn} is far below its servers' total "
                             f"maxconn {total}: clients wait in the backlog while the brokers have room")
