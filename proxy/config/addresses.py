"""Addresses in the configuration: listening addresses, nameservers, servers.

Listening addresses are literal IPs (no DNS at bind time: a name that resolves
differently after a reboot would silently move a listener). ``*`` means all
IPv4 addresses and ``[::]`` all IPv6 addresses; a bare ``:port`` is refused
because HAProxy reads it as "all IPv4" while other tools read it as dual-stack.
"""

from __future__ import annotations

import ipaddress
import re

from .model import BindAddress
from .schema import Invalid

DNS_PORT = 53

# RFC 1123 section 2.1: labels of letters, digits and hyphens, not starting or
# ending with a hyphen; RFC 3696 section 2: a top-level label is never all-numeric,
# which is what tells "10.0.0.300" (a typo) from a name.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_bind(text: str) -> BindAddress:
    """Parse ``"127.0.0.1:5670"``, ``"[::1]:5670"``, ``"*:5670"`` or ``"[::]:5670"``.

    The port is required; 0 asks the kernel for a free port (useful in tests).
    Raises Invalid.
    """
    host, port = _split_host_port(text)
    if port is None and ":" in host:
        raise Invalid(f'write IPv6 listening addresses in brackets with a port, e.g. "[{host}]:5670"')
    if port is None:
        raise Invalid(f'missing port in "{text}": write e.g. "{text}:5670"')
    return BindAddress(_literal_ip(host, text), _port_number(port, text, lowest=0))


def parse_nameserver(text: str) -> BindAddress:
    """Parse ``"10.0.0.2"``, ``"10.0.0.2:5353"``, ``"::1"`` or ``"[::1]:53"`` (port defaults to 53).

    Raises Invalid.
    """
    host, port = _split_host_port(text)
    number = DNS_PORT if port is None else _port_number(port, text, lowest=1)
    return BindAddress(_literal_ip(host, text), number)


def check_server_address(text: str) -> str:
    """Return ``text`` if it is an IPv4/IPv6 literal or a valid DNS hostname; raise Invalid otherwise."""
    if text.startswith("[") and text.endswith("]"):
        raise Invalid(f'write IPv6 addresses without brackets: "{text[1:-1]}"')
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if is_hostname(text):
        return text
    if text.count(":") == 1 and is_hostname(text.split(":")[0]):
        raise Invalid(f'"{text}" contains a port: put the port in "port"')
    raise Invalid(f'"{text}" is neither an IP address nor a valid DNS hostname')


def is_hostname(text: str) -> bool:
    """True for a syntactically valid DNS hostname (RFC 1123), with or without a final dot."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise Invalid(f'missing "]" in "{text}"')
        rest = text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise Invalid(f'unexpected "{rest}" after "]" in "{text}"')
        host = text[1:close]
        if ":" not in host:
            raise Invalid(f'brackets are for IPv6 addresses only, got "{text}"')
        return host, (rest[1:] if rest else None)
    if text.count(":") > 1:
        return text, None  # a bare IPv6 literal; a port would need brackets
    host, colon, port = text.partition(":")
    if colon and not host:
        raise Invalid(
            f'"{text}" is ambiguous: write "*{text}" for all IPv4 addresses '
            f'or "[::]{text}" for all IPv6 addresses'
        )
    return ("0.0.0.0" if host == "*" else host), (port if colon else None)


def _literal_ip(host: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        where = "" if host == text else f' in "{text}"'
        raise Invalid(f'"{host}"{where} is not an IP address (names are not allowed here)') from None


def _port_number(port: str, text: str, *, lowest: int) -> int:
    if not port.isdigit() or not port.isascii():
        raise Invalid(f'invalid port "{port}" in "{text}"')
    number = int(port)
    if not lowest <= number <= 65535:
        raise Invalid(f'expected port {lowest}-65535 in "{text}", got {number}')
    return number
