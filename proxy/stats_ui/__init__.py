"""Show and control: the stats page, its exports, and `warren ctl`.

Public surface (see docs/stats.md):

- :class:`StatsService` — the `[stats]` HTTP page, CSV/JSON/Prometheus
  exports and admin forms, as an App service;
- :class:`ControlService` — the `warren ctl` UNIX socket, as an App service;
- :func:`ctl_main` and :func:`hash_password_main` — the CLI commands;
- :func:`hash_password` / :func:`verify_password` — the scrypt hashes users
  put in `[stats] users`.

Layout: sans-I/O cores (auth, admin, commands, view, history, the
renderers) under thin trio shells (server, site, service, control).
"""

from .auth import hash_password, hash_password_main, verify_password
from .control import ControlService, ControlSocketError, ctl_main
from .service import StatsBindError, StatsService

__all__ = [
    "ControlService", "ControlSocketError", "StatsBindError", "StatsService",
    "ctl_main", "hash_password", "hash_password_main", "verify_password",
]
