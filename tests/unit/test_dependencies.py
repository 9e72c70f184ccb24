"""pyproject's dependencies are exactly what proxy/ imports: no more, no less.

A module the code imports directly is a direct dependency even when another
dependency happens to bring it along (outcome with trio, pycares with aiodns).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in ("proxy", "__future__")}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_declared_dependencies_are_exactly_the_imported_distributions():
    declared = {normalise(re.split(r"[<>=!~ ;\[]", requirement)[0])
                for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    providers = packages_distributions()
    imported = {normalise(providers[module][0]) for module in imported_top_level_modules()}
    assert imported == declared
