"""The benchmarks, in the order a run performs them (AMQP last: the RabbitMQ
nodes they need are started only then, so they do not disturb the others)."""

from __future__ import annotations

from .amqp_connrate import AmqpConnRate
from .amqp_publish import AmqpPublish
from .rebalance import Rebalance
from .base import Benchmark, MeasureError
from .bulk import Bulk
from .connrate import ConnRate
from .failover import Failover
from .detection import Detection
from .idle import Idle
from .keepalive import KeepAlive
from .storm import Storm, StormLimited
from .stats import Stats
from .tls import TlsAmqp, TlsBulk, TlsConnRate, TlsIdle, TlsKeepAlive

ALL: tuple[type[Benchmark], ...] = (
    Bulk, KeepAlive, ConnRate, Idle, TlsBulk, TlsKeepAlive, TlsConnRate, TlsIdle,
    AmqpPublish, TlsAmqp, AmqpConnRate, Storm, StormLimited, Rebalance, Stats, Detection, Failover,
)
NAMES = tuple(b.name for b in ALL)

__all__ = ["ALL", "NAMES", "Benchmark", "MeasureError"]
