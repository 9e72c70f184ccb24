"""The `warren` command: run, check, ctl, import, hash-password, version.

Exit status: 0 success, 1 invalid configuration, missing capability or
start-up failure, 2 usage (`warren import`: 2 when directives were not all
translated as such).
Errors are one line per problem on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import structlog
import trio

from . import __version__, logs, privileges
from .config import ConfigError, load_config
from .config.model import Config
from .errors import StartupError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    return args.command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warren", description="High-availability TCP load balancer for AMQP brokers."
    )
    sub = parser.add_subparsers(metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy with a configuration file")
    run.add_argument("config", help="path to the TOML configuration")
    run.add_argument("--no-splice", action="store_true", help="use the portable copy relay")
    run.set_defaults(command=_run)
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("config")
    check.set_defaults(command=_check)
    ctl = sub.add_parser("ctl", help="talk to a running Warren over its control socket")
    ctl.add_argument("--socket", default=None, help="control socket path (default: from --config)")
    ctl.add_argument("--config", default="conf/warren.toml", help="read global.control_socket from here")
    ctl.add_argument("words", nargs=argparse.REMAINDER, help='e.g. show stat | set server rabbit/rmq-a state drain')
    ctl.set_defaults(command=_ctl)
    imp = sub.add_parser("import", help="translate a haproxy.cfg (and keepalived.conf) into Warren's TOML")
    imp.add_argument("haproxy", help="path to haproxy.cfg")
    imp.add_argument("--keepalived", default=None, help="path to keepalived.conf")
    imp.add_argument("-o", "--output", default=None, help="write the TOML here (default: stdout)")
    imp.add_argument("--runtime-dir", default="/run/warren", help="directory of the control socket")
    imp.set_defaults(command=_import)
    hash_pw = sub.add_parser("hash-password", help="print a salted scrypt hash for [stats] users")
    hash_pw.set_defaults(command=_hash_password)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(command=lambda args: print(f"warren {__version__}") or 0)
    return parser


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None or not _check_tls(config):
        print(f"{args.config}: configuration is NOT valid", file=sys.stderr)
        return 1
    if not _privileged_enough(config):
        print(f"{args.config}: configuration is valid but this process cannot run it", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    needed, limit = privileges.descriptors_needed(config), privileges.raise_descriptor_limit(config)[1]
    if limit < needed:
        print(f"warning: maxconn needs about {needed} file descriptors, the limit is {limit} "
              f"(systemd: LimitNOFILE={needed} or more)", file=sys.stderr)
    servers = sum(len(b.servers) for b in config.backends)
    print(
        f"{args.config}: configuration is valid "
        f"({len(config.frontends)} frontend(s), {len(config.backends)} backend(s), {servers} server(s))"
    )
    return 0


def _check_tls(config: Config) -> bool:
    """Loads every certificate, key, CA bundle and CRL as `run` would; prints problems and warnings."""
    from .config.load import locate_problems
    from .tls import EXPIRY_WARNING_DAYS, TlsConfigError, build_material

    try:
        material = build_material(config)
    except TlsConfigError as error:
        for problem in locate_problems(config.path, error.issues):
            print(problem, file=sys.stderr)
        return False
    for use in material.expiring():
        days = use.info.seconds_left() / 86400
        print(f"{config.path}: warning: {use.where}: {use.info.path}: certificate \"{use.info.subject}\" "
              f"expires in {days:.0f} days (on {use.info.not_after:%Y-%m-%d}; warned under "
              f"{EXPIRY_WARNING_DAYS} days)", file=sys.stderr)
    for server in material.unverified:
        print(f"{config.path}: warning: server {server}: broker certificates are not verified (verify = \"none\")",
              file=sys.stderr)
    return True


def _ctl(args: argparse.Namespace) -> int:
    from .stats_ui import ctl_main

    path = args.socket
    if path is None:
        config = _load(args.config)
        if config is None:
            return 1
        path = config.global_.control_socket
        if path is None:
            print(f"warren: {args.config} sets no global.control_socket; give --socket", file=sys.stderr)
            return 2
    return ctl_main(path, args.words)


def _import(args: argparse.Namespace) -> int:
    from .importer.command import import_main

    return import_main(args.haproxy, args.keepalived, args.output, args.runtime_dir)


def _hash_password(args: argparse.Namespace) -> int:
    from .stats_ui import hash_password_main

    return hash_password_main()


def _run(args: argparse.Namespace) -> int:
    from .app import App

    config = _load(args.config)
    if config is None:
        return 1
    if not _privileged_enough(config):
        return 1
    logs.configure(config.global_.log_format, config.global_.log_level)
    logs.config_warnings(config)
    needed, limit = privileges.raise_descriptor_limit(config)
    if limit < needed:
        structlog.get_logger("warren.app").warning("warren.descriptor_limit_low", needed=needed, limit=limit,
                                                   hint=f"systemd: LimitNOFILE={needed} or more")
    try:
        app = App(config, splice=False if args.no_splice else None, freeze_start_up=True)
        trio.run(app.serve)
    except (StartupError, BaseExceptionGroup) as error:
        problems = _startup_problems(error)
        if problems is None:
            raise
        for problem in problems:
            print(f"warren: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    return 0


def _privileged_enough(config: Config) -> bool:
    """Refuses, one line per missing capability, before anything is bound."""
    problems = privileges.capability_problems(config)
    for problem in problems:
        print(f"warren: {problem}", file=sys.stderr)
    return not problems


def _startup_problems(error: BaseException) -> list[str] | None:
    """The operator-facing lines of a start-up failure (a service's failure
    arrives inside an exception group); None if it is anything else."""
    if isinstance(error, StartupError):
        return error.problems
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(StartupError)
        if matched is not None and rest is None:
            return [p for e in _leaves(matched) for p in e.problems]
    return None


def _leaves(group: BaseException):
    if isinstance(group, BaseExceptionGroup):
        for inner in group.exceptions:
            yield from _leaves(inner)
    else:
        yield group
