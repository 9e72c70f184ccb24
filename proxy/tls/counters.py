"""Per-frontend TLS counters, owned by the frontend's runtime; readers get snapshots."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

RECENT_SUBJECTS = 10


@dataclass(frozen=True, slots=True)
class TlsStatistics:
    """A frontend's TLS activity since start (``in_use``: live connections by version)."""

    handshakes: int
    reused: int
    failures: tuple[tuple[str, int], ...]  # (reason, count), most frequent first
    versions: tuple[tuple[str, int], ...]  # completed handshakes by protocol version
    in_use: tuple[tuple[str, int], ...]
    client_certificates: int  # handshakes with a verified client certificate
    recent_subjects: tuple[str, ...]  # verified client subjects, newest first

    @property
    def failed(self) -> int:
        return sum(count for _, count in self.failures)


class TlsCounters:
    __slots__ = ("handshakes", "reused", "failures", "versions", "in_use", "client_certificates", "recent")

    def __init__(self) -> None:
        self.handshakes = 0
        self.reused = 0
        self.failures: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.in_use: Counter[str] = Counter()
        self.client_certificates = 0
        self.recent: deque[str] = deque(maxlen=RECENT_SUBJECTS)

    def established(self, version: str, reused: bool, subject: str | None) -> None:
        self.handshakes += 1
        self.reused += reused
        self.versions[version] += 1
        self.in_use[version] += 1
        if subject is not None:
            self.client_certificates += 1
            self.recent.appendleft(subject)

    def closed(self, version: str) -> None:
        self.in_use[version] -= 1
        if not self.in_use[version]:
            del self.in_use[version]

    def failed(self, reason: str) -> None:
        self.failures[reason] += 1

    def statistics(self) -> TlsStatistics:
        return TlsStatistics(
            handshakes=self.handshakes,
            reused=self.reused,
            failures=tuple(self.failures.most_common()),
            versions=tuple(sorted(self.versions.items())),
            in_use=tuple(sorted(self.in_use.items())),
            client_certificates=self.client_certificates,
            recent_subjects=tuple(self.recent),
        )
