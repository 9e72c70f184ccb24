"""Warren: a high-availability TCP load-balancing proxy for AMQP brokers."""

__version__ = "0.1.0"
