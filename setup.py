"""Builds Warren, compiling proxy/_native.py's modules to C with mypyc.

Everything else about the package is in pyproject.toml. WARREN_NATIVE=0
builds a pure-Python package (the same behaviour, slower per connection).
"""

import os
import runpy
from pathlib import Path

from setuptools import setup

ext_modules = []
if os.environ.get("WARREN_NATIVE", "1") != "0":
    from mypyc.build import mypycify

    root = Path(__file__).resolve().parent
    native = runpy.run_path(str(root / "proxy" / "_native.py"))
    ext_modules = mypycify(native["sources"](), opt_level="3")  # mypy's settings: pyproject.toml

setup(ext_modules=ext_modules)
