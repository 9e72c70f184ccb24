"""`warren ctl`: the runtime API on a UNIX stream socket, server and client.

The socket lives at `[global] control_socket`. It is created under a
temporary name, restricted to its owner (0600) and only then renamed into
place, so no client ever sees it with looser permissions; a peer whose
SO_PEERCRED uid is neither ours nor root is refused even if the mode is
later loosened by hand. A stale socket file left by a dead process is
replaced; a live one (another Warren answers on it) is an error, as is a
path that is not a socket.

One exchange per connection, as in HAProxy's non-interactive mode: the
client sends one line (commands separated by ";"), reads the answer until
the server closes. The language is in :mod:`.commands`.

An idle client cannot lock operators out: the line must arrive within
LINE_TIMEOUT of connecting, and when MAX_CONNECTIONS are open the one that
has waited longest for its line is closed to make room (see
:mod:`.admission`); `warren ctl` sends its line at once, so it is never the
one. The commands of a line run one by one with the event loop free in
between.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
import time
from typing import Any

import structlog
import trio

from ..config.model import Config
from ..errors import StartupError
from ..lograte import Rate, RateLimitedLog
from .admission import Refused, Slots
from .commands import MAX_LINE, CommandError, join_answers, run_command, split_line

log = structlog.get_logger("warren.ctl")

LINE_TIMEOUT = 2.0  # connect -> whole command line; `warren ctl` sends it at once
SEND_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
LOG_RATES = {
    "ctl.connection_limit": Rate(burst=1, interval=10.0),
    "ctl.peer_refused": Rate(burst=5, interval=10.0),
    "ctl.line_timeout": Rate(burst=5, interval=10.0),
    # One line per command line; state changes are also logged, never summed up, as stats.admin_action.
    "ctl.command": Rate(burst=10, interval=10.0),
}
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlSocketError(StartupError):
    """The control socket path cannot be used; the message says why."""


class ControlService:
    """A :class:`proxy.supervisor.Service`: `warren ctl` on `[global] control_socket`
    (nothing when it is unset)."""

    name = "control"

    def __init__(self, config: Config):
        self.path = config.global_.control_socket
        self._slots = Slots(MAX_CONNECTIONS)
        self.log = RateLimitedLog(log, LOG_RATES)
        self._runtime: Any = None

    async def run(self, runtime: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._runtime = runtime
        if self.path is None:
            task_status.started()
            await trio.sleep_forever()
        listener, inode = bind_control_socket(self.path)
        log.info("ctl.listening", path=self.path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sum_up_logs)
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve, stream)
        finally:
            listener.socket.close()
            _remove_if_ours(self.path, inode)

    def reconfigure(self, config: Config) -> None:
        if config.global_.control_socket != self.path:
            log.warning("ctl.socket_change_needs_restart", path=self.path,
                        configured=config.global_.control_socket)

    @property
    def open_connections(self) -> int:
        return len(self._slots)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            peer = _peer_allowed(stream, self.log)
            if peer is None:
                return
            with trio.CancelScope() as scope:
                slot, evicted = self._slots.admit("local", scope.cancel)
                for _ in evicted:
                    self.log.warning("ctl.connection_limit", reason="evicted", limit=MAX_CONNECTIONS)
                if isinstance(slot, Refused):
                    self.log.warning("ctl.connection_limit", reason=slot.reason, limit=MAX_CONNECTIONS)
                    return
                try:
                    await self._exchange(stream, slot, peer)
                    await self._finish(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                except Exception:  # a bug ends this exchange, never the control socket
                    log.exception("ctl.connection_failed")
                finally:
                    slot.release()

    async def _exchange(self, stream: trio.SocketStream, slot: Any, peer: str) -> None:
        line = None
        with trio.move_on_after(LINE_TIMEOUT) as scope:
            line = await _read_line(stream)
        if scope.cancelled_caught:
            self.log.info("ctl.line_timeout", timeout=LINE_TIMEOUT)
            await self._send(stream, f"error: no command line within {LINE_TIMEOUT:g}s\n\n")
            return
        if line is None:
            return
        slot.busy()
        answer, ok = await self._execute(line)
        self.log.info("ctl.command", command=line[:200], ok=ok, client=peer)
        await self._send(stream, answer)

    async def _execute(self, line: str) -> tuple[str, bool]:
        try:
            commands = split_line(line)
        except CommandError as error:
            return f"error: {error}\n\n", False
        results = []
        for command in commands:
            results.append(run_command(command, self._runtime, time.monotonic()))
            await trio.lowlevel.checkpoint()  # the proxy runs between two commands
        return join_answers(results)

    async def _send(self, stream: trio.SocketStream, answer: str) -> None:
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(answer.encode())

    async def _sum_up_logs(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.log.flush()

    async def _finish(self, stream: trio.SocketStream) -> None:
        # Closing with unread input resets the connection, which can destroy
        # the answer in flight: half-close, then drain briefly.
        with trio.move_on_after(1.0):
            await stream.send_eof()
            drained = 0
            while drained < 1 << 16 and (chunk := await stream.receive_some(4096)):
                drained += len(chunk)


async def _read_line(stream: trio.SocketStream) -> str | None:
    """One command line (without its newline), or None on overflow or bad UTF-8 (answered)."""
    data = b""
    while b"\n" not in data and len(data) <= MAX_LINE:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0]
    if len(line) > MAX_LINE:
        await stream.send_all(b"error: command line too long\n\n")
        return None
    try:
        return line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        await stream.send_all(b"error: command is not UTF-8\n\n")
        return None


def _peer_allowed(stream: trio.SocketStream, logger: Any) -> str | None:
    """``"pid <pid> uid <uid>"`` of an allowed peer (root or our own user), None for any other."""
    try:
        pid, uid, _ = _PEERCRED.unpack(stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                _PEERCRED.size))
    except OSError:
        return None
    if uid in (0, os.getuid()):
        return f"pid {pid} uid {uid}"
    logger.warning("ctl.peer_refused", uid=uid)
    return None


# --- the socket file ------------------------------------------------------------------


def bind_control_socket(path: str) -> tuple[trio.SocketListener, tuple[int, int]]:
    """Listens on `path` (mode 0600); returns the listener and the file's (dev, inode).

    Raises ControlSocketError if another process answers on `path` or it is
    not a socket.
    """
    _clear_stale(path)
    temporary = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        sock.listen(16)
        os.rename(temporary, path)  # atomic: clients only ever see the 0600 file
        sock.setblocking(False)
        info = os.stat(path)
    except OSError as error:
        sock.close()
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise ControlSocketError(f"control socket {path}: {error.strerror or error}") from None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), (info.st_dev, info.st_ino)


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"control socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlSocketError(f"control socket {path}: {error.strerror}") from None
        os.unlink(path)  # nobody listens: left by a process that died
        log.info("ctl.stale_socket_removed", path=path)
        return
    finally:
        probe.close()
    raise ControlSocketError(f"control socket {path}: another process is listening on it")


def _remove_if_ours(path: str, inode: tuple[int, int]) -> None:
    # A successor may already have replaced the file; only remove our own.
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == inode:
            os.unlink(path)
    except OSError:
        pass


# --- the client -----------------------------------------------------------------------


def ctl_main(socket_path: str, command: list[str], *, stdout=None, stderr=None, timeout: float = 30.0) -> int:
    """Sends `command` to a running Warren and prints the answer.

    Exit status: 0 success, 1 a command failed or Warren is unreachable,
    2 usage (no command, or a word with a newline).
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if not command or any("\n" in word or "\r" in word for word in command):
        print("usage: warren ctl [--socket PATH] COMMAND... (try: warren ctl help)", file=stderr)
        return 2
    line = " ".join(command)
    try:
        answer = _exchange(socket_path, line, timeout)
    except OSError as error:
        print(f"warren: cannot talk to {socket_path}: {error.strerror or error}", file=stderr)
        return 1
    if not answer:  # every answer ends with an empty line: nothing at all is a failure
        print(f"warren: no answer from {socket_path} (see Warren's log)", file=stderr)
        return 1
    text = answer.decode("utf-8", "replace")
    stdout.write(text.rstrip("\n") + "\n" if text.strip() else "")
    failed = any(row.startswith("error: ") for row in text.splitlines())
    return 1 if failed else 0


def _exchange(socket_path: str, line: str, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)
