"""Test-suite wiring: the real-RabbitMQ fixtures live in tests/rabbit.py."""

pytest_plugins = ["tests.rabbit"]
