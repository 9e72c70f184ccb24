"""The compiled connection path (proxy/_native.py): the suite runs on it, and
a source checkout never runs extensions that no longer match the source."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import proxy.app  # noqa: F401  (imports every compiled module)
from proxy import _native

REPO = Path(__file__).resolve().parents[2]
SUFFIX = EXTENSION_SUFFIXES[0]  # .cpython-311-x86_64-linux-gnu.so here


def test_every_listed_module_runs_compiled():
    # `make` builds them in place; a build that silently fell back to the
    # source would leave the tests measuring something users do not run.
    assert _native.compiled() == list(_native.MODULES)


def test_the_makefile_gets_the_listed_sources():
    printed = subprocess.run([sys.executable, str(REPO / "proxy/_native.py")], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    assert printed == _native.sources() and all((REPO / path).is_file() for path in printed)


def _tree(tmp_path: Path) -> Path:
    for source in _native.sources():
        path = tmp_path / source
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        extension = path.with_name(path.stem + SUFFIX)
        extension.write_bytes(b"")
        os.utime(path, (1_000, 1_000))
        os.utime(extension, (2_000, 2_000))
    return tmp_path


def test_extensions_built_after_their_source_are_current(tmp_path):
    assert _native.stale(str(_tree(tmp_path))) == []


def test_a_source_edited_after_the_build_is_stale(tmp_path):
    root = _tree(tmp_path)
    edited = _native.sources()[2]
    os.utime(root / edited, (3_000, 3_000))
    assert _native.stale(str(root)) == [edited]


def test_an_extension_of_a_module_no_longer_listed_is_stale(tmp_path):
    root = _tree(tmp_path)
    (root / "proxy/io/kernel_relay.py").write_text("")
    (root / ("proxy/io/kernel_relay" + SUFFIX)).write_bytes(b"")
    assert _native.stale(str(root)) == ["proxy/io/kernel_relay.py"]


def test_a_checkout_with_a_stale_extension_refuses_to_import(tmp_path):
    root = _tree(tmp_path)
    (root / "setup.py").write_text("")
    (root / "proxy/__init__.py").write_text((REPO / "proxy/__init__.py").read_text())
    (root / "proxy/_native.py").write_text((REPO / "proxy/_native.py").read_text())
    os.utime(root / "proxy/io/relay.py", (3_000, 3_000))
    done = subprocess.run([sys.executable, "-c", "import proxy"], cwd=root, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 1
    assert "compiled modules do not match their source (proxy/io/relay.py)" in done.stderr
