"""Warren's configuration: TOML in, validated frozen objects out.

``load_config(path)`` / ``parse_config(text, path)`` return a
:class:`~proxy.config.model.Config` or raise :class:`ConfigError`, whose
``problems`` list every mistake in the file with its key path and line.
"""

from .durations import format_duration, parse_duration
from .load import ConfigError, Problem, load_config, parse_config
from .model import (
    AmqpCheck,
    Backend,
    BackendTimeouts,
    Balance,
    BindAddress,
    CheckKind,
    Config,
    Frontend,
    FrontendTimeouts,
    Global,
    Health,
    HttpCheck,
    InitState,
    LogFormat,
    OnError,
    OnMarkedDown,
    OnMarkedUp,
    RelayPath,
    Resolvers,
    SendProxy,
    Server,
    Stats,
)

__all__ = [
    "AmqpCheck",
    "Backend",
    "BackendTimeouts",
    "Balance",
    "BindAddress",
    "CheckKind",
    "Config",
    "ConfigError",
    "Frontend",
    "FrontendTimeouts",
    "Global",
    "Health",
    "HttpCheck",
    "InitState",
    "LogFormat",
    "OnError",
    "OnMarkedDown",
    "OnMarkedUp",
    "RelayPath",
    "Problem",
    "Resolvers",
    "SendProxy",
    "Server",
    "Stats",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
]
