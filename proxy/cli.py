"""The `warren` command: run, check, version.

Exit status: 0 success, 1 invalid configuration or start-up failure, 2 usage.
Errors are one line per problem on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

import trio

from . import __version__, logs
from .config import ConfigError, load_config
from .config.model import Config


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
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(command=lambda args: print(f"warren {__version__}") or 0)
    return parser


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(_line(problem), file=sys.stderr)
        return None


def _line(problem) -> str:
    return str(problem)


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        print(f"{args.config}: configuration is NOT valid", file=sys.stderr)
        return 1
    servers = sum(len(b.servers) for b in config.backends)
    print(
        f"{args.config}: configuration is valid "
        f"({len(config.frontends)} frontend(s), {len(config.backends)} backend(s), {servers} server(s))"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from .app import App, StartupError

    config = _load(args.config)
    if config is None:
        return 1
    logs.configure(config.global_.log_format, config.global_.log_level)
    app = App(config, splice=False if args.no_splice else None)
    try:
        trio.run(app.serve)
    except StartupError as error:
        for problem in error.problems:
            print(f"warren: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    return 0
