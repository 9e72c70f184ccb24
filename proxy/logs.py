"""structlog set-up: one event per line, JSON or console, to stderr."""

from __future__ import annotations

import logging
import sys

import structlog

from .config.model import Config, LogFormat

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(log_format: LogFormat = LogFormat.CONSOLE, level: str = "info", stream=None) -> None:
    """(Re)configures every `warren.*` logger; safe to call again on reload."""
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def config_warnings(config: Config) -> None:
    """Logs what is valid in `config` but worth a warning (`config.warning`), at start and on reload."""
    log = structlog.get_logger("warren.config")
    for warning in config.warnings:
        log.warning("config.warning", path=config.path, warning=warning)
