"""The I/O shell of ``warren import``: read the files, hash passwords, write the TOML, print the report.

Exit status: 0 everything translated; 1 an input cannot be read or parsed
(file and line on stderr), or the translation is not a valid Warren
configuration; 2 the output is valid but some directives were approximated,
ignored or look suspicious (the report says which and why), or `warren
check` would refuse it on this host.

The output then gets the checks of `warren check` that are about the
configuration: the TLS files it names are loaded here as Warren would
(they exist, parse, keys match, not expired), and its warnings are printed.
The privilege checks (binding privileged ports, the VIP's capabilities, the
descriptor limit) are not run: they judge the process that runs Warren, and
the importing one is rarely it (another user, often another host); run
`warren check` where Warren runs.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from proxy.config import parse_config
from proxy.config.load import locate_problems
from proxy.stats_ui.auth import hash_password
from proxy.tls import TlsConfigError, build_material

from . import DEFAULT_RUNTIME_DIR, ImportParseError, import_configs, summary


def import_main(haproxy_path: str, keepalived_path: str | None, output: str | None,
                runtime_dir: str = DEFAULT_RUNTIME_DIR, *, stdout: TextIO | None = None,
                stderr: TextIO | None = None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        haproxy = (_read(haproxy_path), haproxy_path)
        keepalived = (_read(keepalived_path), keepalived_path) if keepalived_path else None
        result = import_configs(haproxy, keepalived, hash_password=hash_password, runtime_dir=runtime_dir,
                                output_name=output or "<output>")
    except ImportParseError as error:
        print(f"warren import: {error}", file=stderr)
        return 1
    for entry in result.entries:
        print(entry, file=stderr)
    if result.problems:
        for problem in result.problems:
            print(f"warren import: the translation is not a valid configuration: {problem}", file=stderr)
        print("warren import: nothing written", file=stderr)
        return 1
    found = check_output(result.toml, output or "<output>")
    for line in found:
        print(f"warren import: check: {line}", file=stderr)
    if output:
        _write(output, result.toml)
    else:
        stdout.write(result.toml)
    print(f"warren import: {summary(result.entries)}; "
          f"{'wrote ' + output if output else 'configuration on stdout'}", file=stderr)
    return max(result.exit_status, 2 if found else 0)


def check_output(text: str, name: str) -> list[str]:
    """What `warren check` would report of a valid imported configuration: its
    TLS files' problems (read on this host) and its warnings; see the module docstring."""
    config = parse_config(text, name, runnable=True)
    found = list(config.warnings)
    try:
        build_material(config)
    except TlsConfigError as error:
        found += [str(problem) for problem in locate_problems(name, error.issues, text)]
    return found


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="strict") as file:
            return file.read()
    except OSError as error:
        raise ImportParseError(path, None, f"cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ImportParseError(path, None, f"cannot read: not UTF-8 text (offset {error.start})") from None


def _write(path: str, text: str) -> None:
    """Atomically, readable by owner and group only: the file holds password hashes."""
    temporary = f"{path}.tmp{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)
