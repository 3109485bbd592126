"""The allowlist decision: may the guest reach ``host:port``?

Pure functions, no I/O but name resolution passed in, so every rule is
unit-tested without sending a packet. A connection is allowed only when

1. the name the guest asked for matches an entry (``example.com``,
   ``*.example.com`` for subdomains, or an IP literal), on a port the entry
   allows (the entry's port, or 80 and 443 when it names none); and
2. every address the name resolves to is public, or explicitly listed: an
   IP-literal entry lists its address for its port, a CIDR entry
   (``10.0.0.0/8``) lists a range. Loopback, link-local, private, shared,
   multicast and reserved addresses are refused otherwise, so a public name
   that resolves to an internal address (DNS rebinding) gets nowhere.

The proxy connects to the address checked here, never resolving again.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_PORTS = (80, 443)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Entry:
    host: str  # lower-case name, "*.suffix", or an IP literal
    ports: tuple[int, ...]
    explicit_port: bool = False  # the entry named its port (CONNECT may then tunnel to it)

    def matches(self, host: str, port: int) -> bool:
        if port not in self.ports:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and host != self.host[2:]
        return host == self.host


@dataclass(frozen=True)
class Allowlist:
    entries: tuple[Entry, ...]
    ranges: tuple[Network, ...]

    @classmethod
    def parse(cls, items: tuple[str, ...] | list[str]) -> Allowlist:
        entries, ranges = [], []
        for raw in items:
            item = raw.strip().lower()
            if not item:
                continue
            if "/" in item:
                try:
                    ranges.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ConfigError(f"allowlist entry {raw!r} is not a CIDR range") from None
                continue
            host, port = _split(item, raw)
            if not host or any(c in host for c in " \t/@") or ("*" in host and not host.startswith("*.")):
                raise ConfigError(f"allowlist entry {raw!r} is not HOST[:PORT], *.DOMAIN[:PORT] or a CIDR range")
            entries.append(Entry(host, (port,) if port else DEFAULT_PORTS, port is not None))
        return cls(tuple(entries), tuple(ranges))


def _split(item: str, raw: str) -> tuple[str, int | None]:
    if item.startswith("["):  # [v6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    elif item.count(":") == 1:
        host, _, port = item.partition(":")
    else:
        host, port = item, ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"allowlist entry {raw!r} has a bad port")
    return host, int(port) if port else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    address: str | None = None  # the checked address to connect to


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_public(addr: Address) -> bool:
    return addr.is_global and not (addr.is_multicast or addr.is_reserved)


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def decide_name(policy: Allowlist, host: str, port: int) -> Decision:
    """The name rule alone (checked before any lookup): a well-formed host
    name or IP literal that the allowlist names, on a port it allows."""
    host = host.strip().lower().rstrip(".")
    if _literal(host) is None and not _HOSTNAME.match(host):
        return Decision(False, f"{host!r} is not a valid host name")
    if not any(e.matches(host, port) for e in policy.entries):
        return Decision(False, f"{host}:{port} is not on the allowlist")
    return Decision(True, "allowed (name only: resolved by the upstream proxy)")


def decide(policy: Allowlist, host: str, port: int, resolved: list[str]) -> Decision:
    host = host.strip().lower().rstrip(".")
    named = decide_name(policy, host, port)
    if not named.allowed:
        return named
    if not resolved:
        return Decision(False, f"{host} does not resolve")
    listed = {(_literal(e.host), p) for e in policy.entries for p in e.ports if _literal(e.host) is not None}
    for text in resolved:
        addr = ipaddress.ip_address(text)
        if is_public(addr) or (addr, port) in listed or any(addr in net for net in policy.ranges):
            continue
        kind = ("loopback" if addr.is_loopback else "link-local" if addr.is_link_local
                else "private" if addr.is_private else "non-public")  # fmt: skip
        return Decision(False, f"{host} resolves to {kind} address {addr}, which is not listed")
    return Decision(True, "allowed", resolved[0])
