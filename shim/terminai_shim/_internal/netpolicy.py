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
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_PORTS = (80, 443)

# The guest's network under QEMU's user-mode networking (no root, no bridge, nothing changed on the host).
# The guest's side, set up by the agent from terminai_net= (no DHCP).
GUEST_ADDRESS, GATEWAY, RESOLVER = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"
PROXY_ADDRESS, PROXY_PORT = "10.0.2.100", 3128  # allowlist: the only place the guest can connect to
# The host's loopback as the guest sees it (QEMU's user networking maps the
# gateway to 127.0.0.1) and link-local (cloud metadata services): refused in
# ``open`` mode unless listed, by reject routes PID 1 installs and commands
# (without CAP_NET_ADMIN) cannot remove.
OPEN_MODE_BLOCKS = {"127.0.0.1": "10.0.2.2/32", "169.254.0.0/16": "169.254.0.0/16"}


def open_mode_allows(allow: tuple[str, ...]) -> None:
    """``open`` lifts its blocks by address only (routes know no ports)."""
    for entry in allow:
        if entry not in OPEN_MODE_BLOCKS:
            raise ConfigError(f"--allow {entry!r} does not apply to network open",
                              hint="open mode reaches everything public; it lifts only its blocks: --allow 127.0.0.1 "
                              "(the host's loopback, as 10.0.2.2) or --allow 169.254.0.0/16 (link-local)")  # fmt: skip


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


# -- network open: every public destination, none of the host's own ------------------------------------
# What ``--allow`` may lift in open mode, and what each lifts: the host's
# loopback (the guest reaches it as 10.0.2.2) and link-local (metadata services).
OPEN_MODE_LIFTS: dict[str, tuple[str, ...]] = {
    "127.0.0.1": ("127.0.0.1/32", "::1/128"),
    "169.254.0.0/16": ("169.254.0.0/16", "fe80::/10"),
}


@dataclass(frozen=True)
class OpenPolicy:
    """Where QEMU's user networking may connect for an ``open`` guest.

    Checked on the host, on QEMU's own ``connect``/``sendto`` (``vmmguard``):
    the guest controls its routing table and can bind to any device, so a
    rule inside it holds nothing. A destination is allowed when it is a
    public address that is not one of this host's own (``is_local``: a
    service bound to all addresses is reached through those too), or when
    ``--allow`` lifted its block, or when it is a resolver of this host on
    port 53 (QEMU forwards the guest's DNS there)."""

    lifted: tuple[Network, ...] = ()
    resolvers: tuple[Address, ...] = ()

    @classmethod
    def from_allow(cls, allow: tuple[str, ...], resolvers: tuple[str, ...] = ()) -> OpenPolicy:
        lifted = tuple(ipaddress.ip_network(n) for a in allow for n in OPEN_MODE_LIFTS.get(a, ()))
        found = []
        for text in resolvers:
            addr = _literal(text.split("%", 1)[0])
            if addr is not None:
                found.append(addr)
        return cls(lifted, tuple(found))

    def decide(self, addr: Address, port: int, is_local: Callable[[Address], bool]) -> Decision:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.lifted):
            return Decision(True, "lifted by --allow", str(addr))
        if port == 53 and addr in self.resolvers:
            return Decision(True, "this host's resolver", str(addr))
        if not is_public(addr):
            kind = ("loopback" if addr.is_loopback else "link-local" if addr.is_link_local
                    else "private" if addr.is_private else "non-public")  # fmt: skip
            return Decision(False, f"{kind} address {addr} is not reachable in network open")
        if is_local(addr):
            return Decision(False, f"{addr} is this host's own address")
        return Decision(True, "public", str(addr))


def host_resolvers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """The name servers QEMU forwards the guest's DNS to (it reads the same file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return ()
    return tuple(parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2 and parts[0] == "nameserver")
