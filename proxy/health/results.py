"""What one health check found, in HAProxy's vocabulary.

Operators read check outcomes as HAProxy's stats page shows them ("L7OK in
3ms", "L4CON in 0ms", "L7STS/503 in 2ms"); Warren keeps the same codes so a
stats page, a log line or an alert rule reads the same as before.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.config.model import CheckKind


class CheckCode(enum.StrEnum):
    """HAProxy's check status codes (the `check_status` column of its stats).

    Layer 4 is TCP, layer 6 the session layer (here: AMQP framing and the
    protocol header), layer 7 the application (AMQP methods, HTTP status).
    """

    SOCKERR = "SOCKERR"  # socket error: could not create a socket, reset mid-check
    L4OK = "L4OK"  # TCP connect succeeded (a TCP-only check passes here)
    L4TOUT = "L4TOUT"  # TCP connect timed out
    L4CON = "L4CON"  # TCP connect failed (refused, unreachable) or connection lost
    L6OK = "L6OK"  # session layer succeeded (unused by Warren's checks today)
    L6TOUT = "L6TOUT"  # no first protocol answer in time (AMQP: no Connection.Start)
    L6RSP = "L6RSP"  # not the protocol expected (foreign bytes, bad frames, wrong version)
    L7OK = "L7OK"  # application check passed
    L7OKC = "L7OKC"  # passed conditionally (HAProxy: 404 with http-check disable-on-404)
    L7TOUT = "L7TOUT"  # application answered too slowly (or stopped answering)
    L7RSP = "L7RSP"  # application answered out of protocol (wrong method, bad HTTP)
    L7STS = "L7STS"  # application answered with a failing status (HTTP 503, AMQP 403)

    @property
    def passed(self) -> bool:
        """True for the codes that count as a successful check."""
        return self in _PASSING

    @property
    def info(self) -> str:
        """HAProxy's one-line meaning of the code, for tooltips and logs."""
        return _INFO[self]


_PASSING = frozenset({CheckCode.L4OK, CheckCode.L6OK, CheckCode.L7OK, CheckCode.L7OKC})

_INFO = {
    CheckCode.SOCKERR: "Socket error",
    CheckCode.L4OK: "Layer4 check passed",
    CheckCode.L4TOUT: "Layer4 timeout",
    CheckCode.L4CON: "Layer4 connection problem",
    CheckCode.L6OK: "Layer6 check passed",
    CheckCode.L6TOUT: "Layer6 timeout",
    CheckCode.L6RSP: "Layer6 invalid response",
    CheckCode.L7OK: "Layer7 check passed",
    CheckCode.L7OKC: "Layer7 check conditionally passed",
    CheckCode.L7TOUT: "Layer7 timeout",
    CheckCode.L7RSP: "Layer7 invalid response",
    CheckCode.L7STS: "Layer7 wrong status",
}


def _frozen_mapping(details: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(details))


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check against one address.

    `duration` is in seconds, from the start of the TCP connect to the
    verdict. `details` carries what the check learned (AMQP server
    properties, the HTTP status); it is copied into a read-only mapping.
    `details["status"]`, when present, is the application status
    (HTTP status, AMQP reply code) that HAProxy appends to the code.
    """

    code: CheckCode
    duration: float
    description: str
    kind: CheckKind
    details: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", _frozen_mapping(self.details))

    @property
    def passed(self) -> bool:
        return self.code.passed

    def short(self) -> str:
        """The stats page form: "L7OK in 3ms", "L7STS/503 in 2ms"."""
        status = self.details.get("status")
        code = f"{self.code}/{status}" if status else str(self.code)
        return f"{code} in {round(self.duration * 1000)}ms"


class CheckFailed(Exception):
    """Raised inside a check's I/O shell to stop at the first failure.

    Carries the code and description the check will report; the shell
    turns it into a :class:`CheckResult` and never lets it escape.
    """

    def __init__(self, code: CheckCode, description: str, details: Mapping[str, str] | None = None):
        super().__init__(code, description)
        self.code = code
        self.description = description
        self.details: Mapping[str, str] = dict(details or {})
