"""Warren: a high-availability TCP load-balancing proxy for AMQP brokers."""

__version__ = "0.1.0"


def _refuse_stale_build() -> None:
    """In a source checkout (setup.py beside the package), an extension
    compiled before its source last changed (or of a module no longer
    compiled) would run old code: refuse to start rather than run something
    other than the source (proxy/_native.py)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "setup.py")):
        return  # an installed package: built from its own sources
    from proxy._native import stale

    changed = stale(root)
    if changed:
        raise ImportError(
            f"compiled modules do not match their source ({', '.join(changed)}): "
            "rebuild them with `make venv` (or `pip install -e .`), or delete the *.so files to run the source")


_refuse_stale_build()
