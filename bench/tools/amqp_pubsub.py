"""Publisher (with confirms) or consumer of persistent messages, with pika.

Usage:
  python -m bench.tools.amqp_pubsub consume HOST PORT QUEUE COUNT
  python -m bench.tools.amqp_pubsub publish HOST PORT QUEUE COUNT [--size BYTES]

Both declare QUEUE (durable classic queue). The consumer prints
{"event": "ready"} once it consumes, then {"event": "done", "first": T,
"last": T, "count": N} after COUNT messages (acking each) and deletes the
queue. The publisher turns on publisher confirms and publishes COUNT
persistent messages (delivery_mode 2), each basic_publish returning only once
the broker confirmed it (pika's BlockingChannel), then prints
{"event": "done", "start": T, "end": T, "p50": S, "p90": S, "p99": S}: times
are time.monotonic(), pNN the percentiles of one publish's round trip (from
basic_publish to its confirm) in seconds.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time

import pika

DEADLINE = 300.0  # no run may hang: the consumer gives up after this long


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def connect(host: str, port: int, tls: bool = False) -> pika.BlockingConnection:
    ssl_options = None
    if tls:  # AMQPS; the proxy's certificate is not verified (the bench measures, it does not trust)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        ssl_options = pika.SSLOptions(context)
    params = pika.ConnectionParameters(
        host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=0, blocked_connection_timeout=60, socket_timeout=10, connection_attempts=3,
        retry_delay=0.5, ssl_options=ssl_options,
    )
    return pika.BlockingConnection(params)


def consume(args: argparse.Namespace) -> int:
    connection = connect(args.host, args.port, args.tls)
    channel = connection.channel()
    channel.queue_declare(args.queue, durable=True)
    channel.basic_qos(prefetch_count=200)
    seen = {"count": 0, "first": None, "last": None}

    def on_message(ch, method, properties, body) -> None:
        now = time.monotonic()
        seen["first"] = seen["first"] or now
        seen["last"] = now
        seen["count"] += 1
        ch.basic_ack(method.delivery_tag)
        if seen["count"] >= args.count:
            ch.stop_consuming()

    channel.basic_consume(args.queue, on_message)
    emit("ready")
    deadline = time.monotonic() + DEADLINE
    while seen["count"] < args.count and time.monotonic() < deadline:
        connection.process_data_events(time_limit=1)
    if seen["count"] < args.count:
        emit("error", message=f"consumed {seen['count']} of {args.count} messages")
        return 1
    channel.queue_delete(args.queue)
    connection.close()
    emit("done", **seen)
    return 0


def publish(args: argparse.Namespace) -> int:
    connection = connect(args.host, args.port, args.tls)
    channel = connection.channel()
    channel.queue_declare(args.queue, durable=True)
    channel.confirm_delivery()
    body = b"x" * args.size
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    latencies = []
    clock = time.perf_counter
    start = time.monotonic()
    for _ in range(args.count):
        sent = clock()
        channel.basic_publish("", args.queue, body, properties, mandatory=True)
        latencies.append(clock() - sent)
    end = time.monotonic()
    connection.close()
    latencies.sort()
    emit("done", start=start, end=end, count=args.count,
         **{f"p{q}": latencies[min(len(latencies) - 1, len(latencies) * q // 100)] for q in (50, 90, 99)})
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="amqp_pubsub")
    parser.add_argument("role", choices=["publish", "consume"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("queue")
    parser.add_argument("count", type=int)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tls", action="store_true", help="AMQPS")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    try:
        sys.exit(publish(arguments) if arguments.role == "publish" else consume(arguments))
    except Exception as error:  # one line for the driver, not a traceback it cannot read
        emit("error", message=f"{arguments.role}: {error!r}")
        sys.exit(1)
