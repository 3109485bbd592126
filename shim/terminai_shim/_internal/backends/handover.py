"""What QEMU is handed when it starts: the verified files as descriptors,
the guard over its own system calls, and the allowlist proxy's socket.

Why a module of its own: these are where "what was verified is exactly
what boots" and "the host decides every change to the workspace" are kept.
The boot files are opened here and checked on the very descriptors QEMU
inherits (``by_descriptor``); the guard's filter and listener are planned
before QEMU starts (``guard_plan``), so a session the guard cannot hold
never starts; the proxy listens before the guest can connect.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...errors import BootError
from ...models import BootConfig
from ..diskfloor import DiskFloor, disk_floor
from ..fsutil import fd_digest, others_can_write, sealed_copy
from ..netpolicy import OpenPolicy, host_resolvers
from ..notifyfilter import Arch, filter_program, host_arch, receive_listener
from ..vmmguard import VmmGuard
from ..wspolicy import WorkspacePolicy, hooks_paths
from .base import RuntimeDir
from .vmmprocess import VmmIdentity

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..netproxy import ProxyServer


@dataclass(frozen=True)
class GuardPlan:
    """What the host checks of QEMU's own system calls (``vmmguard``): the
    workspace's names, its disk floor and, in ``open`` mode, where QEMU's
    user networking connects. Decided before QEMU starts, so a session the
    guard cannot hold never starts."""

    arch: Arch | None = None
    program: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    workspace: WorkspacePolicy | None = None
    floor: DiskFloor | None = None
    network: OpenPolicy | None = None

    def start(self, end: socket.socket, proc: subprocess.Popen[bytes]) -> VmmGuard:
        assert self.arch is not None
        listener = receive_listener(end)
        try:  # the guard reads the names QEMU passes from its memory: without that it could decide nothing
            os.close(os.open(f"/proc/{proc.pid}/mem", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            os.close(listener)
            raise BootError(f"the shim cannot read QEMU's memory to check its calls on the workspace ({exc.strerror})",
                            hint="run the shim as root, or allow tracing one's own children "
                            "(sysctl kernel.yama.ptrace_scope=1)") from None  # fmt: skip
        return VmmGuard(listener, proc.pid, self.arch, self.workspace, self.floor, self.network)


def guard_plan(config: BootConfig) -> GuardPlan:
    files = config.workspace is not None
    network = config.network.mode == "open"
    spawns = config.network.mode == "allowlist"  # QEMU starts a connector per guest connection
    if not files and not network and not spawns:
        return GuardPlan()
    arch = host_arch()
    if arch is None:
        raise BootError(f"the workspace and network boundary needs Linux on x86_64 or aarch64, not "
                        f"{os.uname().sysname} {os.uname().machine}", hint="use the container tier here")  # fmt: skip
    workspace = floor = None
    if files:
        assert config.workspace is not None
        root = os.path.realpath(config.workspace)
        protect = not config.writable_git
        workspace = WorkspacePolicy(root, protect, hooks_paths(root) if protect else ())
        floor = disk_floor(root)
    net = OpenPolicy.from_allow(config.network.allow, host_resolvers()) if network else None
    program = filter_program(arch, files=files, network=network, spawns=spawns)
    return GuardPlan(arch, program, workspace, floor, net)


def by_descriptor(config: BootConfig, held: list[int], share_workspace: bool) -> BootConfig:
    """The boot files (and, for QEMU running as another user, the workspace)
    as ``/proc/self/fd/N`` of descriptors opened here, the same numbers in
    QEMU, which inherits them. QEMU gets exactly the files opened here: the
    link reopens the open file, not the path (so no later rename can swap
    it, and no directory above needs to be reachable by QEMU's user). What
    a verified manifest says they are is checked on these descriptors; a
    verified file that someone else could still write in place is handed as
    a sealed private copy, whose digest is the one checked."""

    def handed(path: Path | None, expected: str | None = None, flags: int = 0) -> Path | None:
        return None if path is None else hand(path, expected, flags)

    def hand(path: Path, expected: str | None = None, flags: int = 0) -> Path:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
        held.append(fd)
        got = None
        if expected is not None and others_can_write(fd):
            fd, got = sealed_copy(fd, path.name)
            held.append(fd)
        elif expected is not None:
            got = fd_digest(fd)
        if got != expected:
            raise BootError(
                f"{path} is not the file that was verified (sha256 {got}, the manifest says {expected})",
                hint="it changed after verification; fetch or verify the release again",
            )
        return Path(f"/proc/self/fd/{fd}")

    return dataclasses.replace(
        config,
        kernel=handed(config.kernel, config.kernel_sha256),
        rootfs=handed(config.rootfs, config.rootfs_sha256),
        layers=tuple(dataclasses.replace(layer, path=hand(layer.path, layer.sha256)) for layer in config.layers),
        initrd=handed(config.initrd),
        workspace=handed(config.workspace, flags=os.O_DIRECTORY) if share_workspace else config.workspace,
    )


def start_proxy(config: BootConfig, runtime: RuntimeDir, identity: VmmIdentity) -> ProxyServer | None:
    """The allowlist proxy, listening before the guest can connect."""
    if config.network.mode != "allowlist":
        return None
    from ..netpolicy import Allowlist
    from ..netproxy import ProxyConfig, ProxyServer, upstream_from_env

    proxy = ProxyServer(ProxyConfig("starting", Allowlist.parse(config.network.allow), None,
                                    upstream_from_env(dict(os.environ))))  # fmt: skip
    proxy.listen_unix(str(runtime.proxy_socket))  # in the shim's own directory: nobody else can swap it
    os.chmod(runtime.proxy_socket, 0o600)  # QEMU's connectors, as QEMU's user, only
    if identity.switch_to:
        os.chown(runtime.proxy_socket, *identity.switch_to, follow_symlinks=False)
    return proxy


__all__ = [
    "GuardPlan",
    "by_descriptor",
    "guard_plan",
    "start_proxy",
]
