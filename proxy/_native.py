"""The modules compiled to C with mypyc: the connection path, one place.

Every proxied connection runs through these modules some hundreds of times
in Python calls; compiled, each call skips CPython's evaluation loop
(bench/OPTIMISATIONS.md, session 9: ~29 % fewer user-space instructions per
AMQP connection). The Python source stays the only source: setup.py
compiles it when Warren is built or installed (``make`` does), and without a
compiled module Python imports the source as before, with the same behaviour
(the test suite runs on the compiled modules).

The list holds only modules whose classes no other code patches at run
time: mypyc makes their classes native (fixed attributes, no
monkey-patching), and enforces their type annotations at run time. A
native class that Python code subclasses says so (``mypyc_attr(
allow_interpreted_subclasses=True)``: ``Handover``, ``Link``,
``Direction``); a native method takes only its own class's instances (no
borrowing it for another). docs/architecture.md, "The compiled connection
path", says what else compiling asks of these modules.

Run as a script, prints the source paths (for the Makefile's dependencies).
This file imports nothing: setup.py reads it before Warren's dependencies
are installed.
"""

MODULES = (
    "proxy.io.directions",
    "proxy.io.poller",
    "proxy.io.relay",
    "proxy.frontends.listener",
    "proxy.frontends.session",
    "proxy.backends.connect",
    "proxy.backends.dispatch",
    "proxy.backends.lb",
    "proxy.runtime",
    "proxy.amqp.admission",
    "proxy.amqp.inspect",
    "proxy.amqp.tap",
    "proxy.amqp.closing",
)


def sources() -> list[str]:
    """The modules' source files, relative to the project's root."""
    return [name.replace(".", "/") + ".py" for name in MODULES]


def stale(root: str) -> list[str]:
    """In a source checkout at `root`: the compiled extensions Python would
    import in place of the source as it is now: a listed module's, older
    than its source (edited or checked out since the build), or one of a
    module no longer listed (left by an earlier build)."""
    import glob
    import os

    listed = set(sources())
    found = []
    for extension in glob.glob(os.path.join(root, "proxy", "**", "*.so"), recursive=True):
        source = os.path.relpath(extension, root).split(".", 1)[0] + ".py"
        if source not in listed or os.path.getmtime(extension) < os.path.getmtime(os.path.join(root, source)):
            found.append(source)
    return sorted(found)


def compiled() -> list[str]:
    """The listed modules that were imported from a compiled extension."""
    import sys

    return [name for name in MODULES
            if name in sys.modules and not (sys.modules[name].__file__ or "").endswith(".py")]


if __name__ == "__main__":
    print(" ".join(sources()))
