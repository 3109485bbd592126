"""Transports the agent serves on, chosen by the host.

``virtio-serial:NAME`` (a QEMU virtserialport; what works everywhere),
``vsock:PORT`` (AF_VSOCK, for vhost-vsock and Firecracker), ``unix:PATH``
(the container tier; a socket in a directory the host bind-mounts).
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # not typing's: importing typing costs ~15 ms at boot
if TYPE_CHECKING:
    import socket


class ChannelSpec:
    __slots__ = ("address", "kind")

    def __init__(self, kind: str, address: str) -> None:
        self.kind = kind
        self.address = address

    @classmethod
    def parse(cls, text: str) -> ChannelSpec:
        kind, _, address = text.partition(":")
        if kind not in ("virtio-serial", "vsock", "unix") or not address:
            raise ValueError(f"bad channel {text!r}: use virtio-serial:NAME, vsock:PORT or unix:PATH")
        if kind == "vsock" and not address.isdigit():
            raise ValueError(f"bad vsock port {address!r}")
        return cls(kind, address)


def find_virtio_port(name: str, wait: float = 10.0) -> str:
    """The /dev node of the virtio-serial port called ``name``.

    Ports are announced by the host after the driver loads, which can be a
    moment after init starts: poll briefly rather than fail.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            for entry in sorted(os.listdir("/sys/class/virtio-ports")):
                try:
                    with open(f"/sys/class/virtio-ports/{entry}/name") as f:
                        if f.read().strip() == name and os.path.exists(f"/dev/{entry}"):
                            return f"/dev/{entry}"
                except OSError:
                    continue
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"no virtio-serial port named {name!r}")
        time.sleep(0.005)


def open_virtio_port(name: str) -> int:
    return os.open(find_virtio_port(name), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def listen(spec: ChannelSpec) -> socket.socket:
    import socket  # only the socket transports pay for this import

    if spec.kind == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, int(spec.address)))
    elif spec.kind == "unix":
        # Bound and listening under a temporary name, then renamed into
        # place: whoever sees the path can connect (no refusal between bind
        # and listen).
        staging = f"{spec.address}.{os.getpid()}.tmp"
        for stale in (spec.address, staging):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(staging)
        os.chmod(staging, 0o600)
        sock.listen(16)
        os.rename(staging, spec.address)
        sock.setblocking(False)
        return sock
    else:
        raise ValueError(f"{spec.kind} is not a listening channel")
    sock.listen(16)
    sock.setblocking(False)
    return sock


VMADDR_CID_HOST = 2
SO_PEERCRED = 17


def from_host(client: socket.socket, peer: object, container: bool) -> bool:
    """Whether an accepted connection comes from the host, not from a command
    in this guest: a vsock peer must be the host's CID (a command can reach
    the agent's port through vsock loopback); in a container, a Unix-socket
    peer must be outside the container's PID namespace (the kernel reports
    its pid as 0), since commands run as the uid that owns the socket."""
    import socket
    import struct

    if client.family == socket.AF_VSOCK:
        return isinstance(peer, tuple) and peer[0] == VMADDR_CID_HOST
    if container and client.family == socket.AF_UNIX:
        pid, _uid, _gid = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, 12))
        return pid == 0
    return True
