"""Real AMQP clients for the tests: pika connections and a publish-confirm-consume round trip."""

from __future__ import annotations

import ssl
import uuid

import pika


def pika_connect(address: tuple[str, int], tls: ssl.SSLContext | None = None) -> pika.BlockingConnection:
    """A blocking pika connection; AMQPS with `tls` (the name checked is "localhost")."""
    host, port = address
    params = pika.ConnectionParameters(
        host=host, port=port, heartbeat=30, blocked_connection_timeout=30,
        connection_attempts=1, socket_timeout=10,
        ssl_options=pika.SSLOptions(tls, server_hostname="localhost") if tls is not None else None,
    )
    return pika.BlockingConnection(params)


def round_trip(address, body: bytes, queue: str | None = None, tls: ssl.SSLContext | None = None) -> bytes:
    """Publishes `body` with confirms and consumes it back, via `address`."""
    connection = pika_connect(address, tls)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = queue or f"warren-test-{uuid.uuid4().hex}"
        channel.queue_declare(queue, auto_delete=True)
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
        for method, _, received in channel.consume(queue, auto_ack=True, inactivity_timeout=20):
            assert method is not None, "message not delivered in 20 s"
            return received
    finally:
        connection.close()
