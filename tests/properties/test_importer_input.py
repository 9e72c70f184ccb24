"""Properties of `warren import` as a whole (proxy/importer/): whatever text an
operator's haproxy.cfg and keepalived.conf hold, the import gives a report
and an exit status, or names the file and line it cannot read; never a
traceback.

The parsers alone have their properties in tests/unit/test_importer.py; here
the whole pipeline (parse, translate, render, validate) reads the realistic
files of tests/data/import damaged line by line and word by word, so every
translator sees values, orders and combinations no example holds.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.config import parse_config
from proxy.importer import ImportParseError, import_configs
from proxy.passwords import hash_password

DATA = Path(__file__).resolve().parents[1] / "data" / "import"
HAPROXY = [(DATA / name).read_text() for name in ("production-haproxy.cfg", "clean-haproxy.cfg",
                                                  "suspicious-haproxy.cfg")]
KEEPALIVED = [(DATA / name).read_text() for name in ("production-keepalived.conf", "clean-keepalived.conf",
                                                     "suspicious-keepalived.conf")]
# Words a real file holds in the wrong place, or values at and past every edge.
WORDS = ["0", "-1", "1", "65535", "65536", "99999999999", "1e3", "0x10", "1.5", "10s", "100ms", "0s", "5m", "1d",
         "abc", ":", "*", "*:0", "*:5670", ":::5670", "[::1]:5672", "10.0.0.1", "10.0.0.1:", "10.0.0.1:0",
         "10.0.0.1:70000", "host.example:5672", "/run/x.sock", "unix@/x", "ipv4@10.0.0.1:1", "ssl", "check",
         "backup", "disabled", "inter", "rise", "fall", "weight", "maxconn", "crt", "crt-list", "verify", "none",
         "required", "{", "}", "#", '"', "'", "\\", "X-tls", "fe-tls", "be", "fe", "default_backend", "use_backend",
         "balance", "roundrobin", "leastconn", "source", "priority", "state", "MASTER", "BACKUP",
         "virtual_ipaddress", "auth_pass", "interface", "eth0", "lo", "255", "256", "10.0.0.100/24", "é", ""]


def fake_hash(password: str) -> str:
    return hash_password(password, n=16, r=1, p=1, salt=b"importer-test-16")


@st.composite
def damaged(draw, texts: list[str]) -> str:
    lines = draw(st.sampled_from(texts)).splitlines()
    others = [line for text in texts for line in text.splitlines()]
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(lines) - 1)))
        how = draw(st.sampled_from(["drop", "repeat", "swap", "word", "insert", "noise"]))
        if not lines or how == "insert":
            lines.insert(at, draw(st.sampled_from(others)))
        elif how == "drop":
            del lines[at]
        elif how == "repeat":
            lines.insert(at, lines[at])
        elif how == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif how == "word":
            words = lines[at].split(" ")
            place = draw(st.integers(0, len(words)))
            word = draw(st.sampled_from(WORDS))
            if draw(st.booleans()) and place < len(words):
                words[place] = word
            else:
                words.insert(place, word)
            lines[at] = " ".join(words)
        else:
            lines[at] += draw(st.text(max_size=12))
    return "\n".join(lines) + "\n"


def imported(haproxy: str, keepalived: str | None):
    try:
        return import_configs((haproxy, "haproxy.cfg"),
                              (keepalived, "keepalived.conf") if keepalived is not None else None,
                              hash_password=fake_hash, runtime_dir="/run/test")
    except ImportParseError as error:
        assert error.path in ("haproxy.cfg", "keepalived.conf") and error.message
        return None


def check_result(result) -> None:
    """A report, an exit status that matches it, and an output Warren loads unless it said why not."""
    assert result.exit_status in (0, 1, 2)
    assert all(entry.note for entry in result.entries)
    tomllib.loads(result.toml)
    if result.problems:
        assert result.exit_status == 1
    else:
        parse_config(result.toml, "warren.toml", runnable=True)


# Found by this property: a control character in a section's line broke the TOML comment naming it.
@example("frontend fe\n    bind *:5670\n    default_backend be\nbackend be\x08\n    server s 10.0.0.1:5672\n", None)
@given(damaged(HAPROXY), st.none() | damaged(KEEPALIVED))
def test_any_damaged_configuration_imports_or_names_its_line(haproxy, keepalived):
    result = imported(haproxy, keepalived)
    if result is not None:
        check_result(result)


@given(st.text(max_size=300), st.none() | st.text(max_size=300))
def test_any_text_imports_or_names_its_line(haproxy, keepalived):
    result = imported(haproxy, keepalived)
    if result is not None:
        check_result(result)
