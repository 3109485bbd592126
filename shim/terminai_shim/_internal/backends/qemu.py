"""QEMU ``microvm``: the backend that runs everywhere (KVM or TCG).

The whole QEMU command line is built in ``command_line`` and nowhere else.
The guest gets: the PVH ``vmlinux``; the read-only root image on
virtio-blk; the agent channel on a virtio-serial port backed by a Unix
socket; virtio-rng; the workspace on virtio-9p (owners and modes mapped
into extended attributes: nothing the guest does makes a setuid file or a
foreign owner on the host); a second, read-only 9p share for the
workspace's ``.git``; no network device unless asked for.

QEMU itself runs confined: seccomp (``-sandbox``), and never as root with
root's powers (``vmm_identity``). Its console goes through a pipe the shim
caps (``ConsoleCapture``). ``acpi=off`` makes QEMU append the virtio-mmio device list
to the kernel command line, so every init parameter is a ``key=value``
kernel parameter rather than something after ``--``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_protocol import bootcontract as boot

from ...errors import BootError, ConfigError
from ...models import AccelChoice, BootConfig
from ..diskfloor import DiskFloor, disk_floor
from ..fsutil import fd_digest, others_can_write, sealed_copy
from ..netpolicy import (
    GATEWAY,
    PROXY_ADDRESS,
    PROXY_PORT,
    RESOLVER,
    OpenPolicy,
    host_resolvers,
    open_mode_allows,
)
from ..notifyfilter import Arch, filter_program, host_arch, installer, receive_listener
from ..process import die_with_parent, keep_only_capabilities, no_new_privileges, peer_pid
from ..vmmguard import VmmGuard
from ..wspolicy import WorkspacePolicy, hooks_paths
from . import cmdline
from .base import Backend, ConsoleCapture, Machine, ProcessMachine, RuntimeDir, check_vm_artifacts, git_share

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..netproxy import ProxyServer

QEMU = "qemu-system-x86_64"
WORKSPACE_TAG, GIT_TAG = boot.WORKSPACE_TAG, boot.GIT_TAG
CONSOLE_FDSET = 1
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
NOBODY = (65534, 65534)

# Under TCG: every feature QEMU can emulate, less those it emulates slowly.
# ERMS/FSRM make the guest kernel and glibc copy and clear memory with
# `rep movsb`/`rep stosb`, which TCG runs one byte per iteration; AVX/AVX2
# make glibc pick string functions TCG runs through out-of-line helpers.
# Without them the same code picks loops TCG translates into fast host code
# (measured: boot-to-ready -0.1 s, first commands after boot -0.4 s).
TCG_CPU = "max,erms=off,fsrm=off,avx=off,avx2=off"


@dataclass(frozen=True)
class Channel:
    """How the host reaches the agent: a virtio-serial port backed by a Unix
    socket, or vhost-vsock (CID, port) where the host has /dev/vhost-vsock."""

    kind: str = "virtio-serial"
    cid: int = 0

    @classmethod
    def choose(cls, requested: str = "auto") -> Channel:
        if requested == "vsock" or (requested == "auto" and os.path.exists("/dev/vhost-vsock")):
            return cls("vsock", random.randrange(3, 0xFFFF_FFF0))
        return cls("virtio-serial")

    @property
    def kernel_arg(self) -> str:
        return boot.param("channel", boot.vsock_channel() if self.kind == "vsock" else boot.virtio_channel())


def _opt(path: object) -> str:
    """A path inside a QEMU option string: commas are doubled, or they would
    end the value and start another option."""
    return str(path).replace(",", ",,")


# QEMU's own part of the kernel command line: a triple fault resets (and
# QEMU exits on reset), a panic reboots at once, the root image is vda.
QEMU_KERNEL_ARGS = ("reboot=t", "panic=-1", "root=/dev/vda", "ro")


def kernel_cmdline(config: BootConfig, accel: AccelChoice, channel: Channel = Channel()) -> str:
    return cmdline.kernel_cmdline(config, accel, channel.kernel_arg, QEMU_KERNEL_ARGS)


def connector_command(workspace: Path | None, runs_as: tuple[int, int] | None = None) -> tuple[str, ...]:
    """What QEMU starts for each allowlisted guest connection, less the
    socket it hands the connection to: an interpreter in isolated mode with
    the connector inline, or the standalone shim itself (``--proxy-connector``:
    no Python needed on the host). The standalone shim is used when QEMU's user
    (``runs_as``; None: this one) can run it; else the system's python3.
    Taken by its real path, and never one the guest or another user could have written."""
    from ..netproxy import CONNECTOR, PROXY_CONNECTOR_FLAG

    frozen = bool(getattr(sys, "frozen", False))
    own = Path(os.path.realpath(sys.executable))

    def runnable(path: Path) -> bool:
        return runs_as is None or _can_run(path, *runs_as)

    if frozen and runnable(own):
        return (str(_trusted_program(own, workspace)), PROXY_CONNECTOR_FLAG)
    # An interpreter QEMU's user can run: this one, else the system's (a python3
    # found on PATH may be a user's shim script in a private home).
    found = shutil.which("python3")
    candidates = [] if frozen else [own]
    candidates += [Path(os.path.realpath(p)) for p in (found, "/usr/bin/python3", "/usr/local/bin/python3") if p]
    python = next((c for c in candidates if c.is_file() and runnable(c)), None)
    if python is None:
        who = f"uid {runs_as[0] if runs_as else os.geteuid()}"
        raise ConfigError(f"network allowlist: QEMU runs as {who}, which can run neither the shim at {own} nor a "
                          "python3 on this host to connect the guest's connections to the proxy",
                          hint="install the shim where every user can read it, or install python3")  # fmt: skip
    return (str(_trusted_program(python, workspace)), "-I", "-S", "-c", CONNECTOR.replace("\n", ";"))


def _trusted_program(path: Path, workspace: Path | None) -> Path:
    if workspace is not None and path.is_relative_to(workspace.resolve()):
        raise ConfigError(f"{path} is inside the workspace, which the guest can write",
                          hint="install the shim (and its Python) outside the workspace")  # fmt: skip
    for part in (path, *path.parents):
        st = part.stat()
        if st.st_mode & 0o022 and not (part.is_dir() and st.st_mode & 0o1000):
            raise ConfigError(f"{part} is writable by other users: it cannot serve the allowlist proxy",
                              hint="install the shim in a directory only root or you can write")  # fmt: skip
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"{part} belongs to uid {st.st_uid}: it cannot serve the allowlist proxy")
    return path


def _can_run(program: Path, uid: int, gid: int) -> bool:
    """Whether that user may run a standalone shim: search every directory
    above it, read and run the program, read its ``_internal`` folder."""

    def allows(st: os.stat_result, bits: int) -> bool:
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        return uid == 0 or (st.st_mode >> shift) & bits == bits

    try:
        internal = program.parent / "_internal"
        return all(allows(part.stat(), 0o1) for part in program.parents) and allows(program.stat(), 0o5) and (
            not internal.is_dir() or allows(internal.stat(), 0o5))  # fmt: skip
    except OSError:
        return False


def network_args(config: BootConfig, runtime: RuntimeDir, connector: tuple[str, ...] = ()) -> list[str]:
    """``open``: QEMU's user networking, NAT to whatever the host reaches
    (less the host's loopback and link-local, see ``OPEN_MODE_BLOCKS``).
    ``allowlist``: the same, restricted (``restrict=on``: the guest reaches
    nothing, not even DNS) except one forward: every connection to the proxy
    address is handed to the session's proxy server in the shim, by a
    connector (``connector_command``)."""
    mode = config.network.mode
    if mode == "none":
        return []
    netdev = f"user,id=net0,net=10.0.2.0/24,host={GATEWAY},dns={RESOLVER},ipv6=off"
    if mode == "allowlist":
        if not connector:
            raise ConfigError("network allowlist needs the proxy connector's command (connector_command)")
        command = shlex.join([*connector, str(runtime.proxy_socket)])
        netdev += f",restrict=on,guestfwd=tcp:{PROXY_ADDRESS}:{PROXY_PORT}-cmd:{_opt(command)}"
    elif mode == "open":
        open_mode_allows(config.network.allow)
    else:
        raise ConfigError(f"unknown network mode {mode!r}", hint="use none, allowlist or open")
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"]


@dataclass(frozen=True)
class VmmIdentity:
    """Who QEMU runs as. Never root with root's powers: a bug in QEMU's
    device emulation must not be root on the host.

    Started by a user: that user. Started as root: the workspace's owner,
    or nobody when there is no workspace (``switch_to``): QEMU is started
    as that user outright, with the kernel and root image handed over as
    descriptors the shim opened (``/proc/self/fd/N``), its sockets in the
    one subdirectory of the runtime directory it may write (``vmm/``), and
    ``no_new_privs``. When root owns the
    workspace, QEMU keeps uid 0 (it must read and write root's files) but
    only the capabilities file access needs (``keep_caps``: its bounding set),
    and ``no_new_privs``."""

    switch_to: tuple[int, int] | None
    keep_caps: tuple[int, ...] | None
    reason: str


def vmm_identity(workspace: Path | None) -> VmmIdentity:
    if os.geteuid() != 0:
        return VmmIdentity(None, None, f"the invoking user (uid {os.geteuid()})")
    if workspace is None:
        return VmmIdentity(NOBODY, None, "nobody (started as root, no workspace)")
    st = os.stat(workspace)
    if st.st_uid != 0:
        return VmmIdentity((st.st_uid, st.st_gid), None, f"uid {st.st_uid}, the workspace's owner (started as root)")
    return VmmIdentity(None, (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER),
                       "uid 0 with file-access capabilities only (the workspace belongs to root)")  # fmt: skip


def sandbox_arg(config: BootConfig) -> str:
    """QEMU's seccomp filter. ``spawn`` and ``elevateprivileges`` stay
    allowed only for an allowlist: QEMU starts the connector, whose set-up
    calls ``setsid``. QEMU holds no capability a set*id call could use."""
    allow = "allow" if config.network.mode == "allowlist" else "deny"
    return f"on,obsolete=deny,elevateprivileges={allow},spawn={allow},resourcecontrol=deny"


def command_line(
    config: BootConfig,
    accel: AccelChoice,
    runtime: RuntimeDir,
    qemu: str = QEMU,
    channel: Channel = Channel(),
    incoming_fd: int | None = None,
    console_fd: int = 3,
    connector: tuple[str, ...] = (),
) -> list[str]:
    """The whole QEMU command line.

    Both 9p devices are always there (backed by an empty, read-only
    directory when there is nothing to share) and are mounted by the agent
    on request, after boot: so the device layout is the same with or
    without a workspace, and a VM saved before any mount can be restored
    for any workspace.
    """
    argv = [
        qemu,
        "-accel", accel.accel,
        "-cpu", "host" if accel.accel == "kvm" else TCG_CPU,
        "-M", f"microvm,acpi={'on' if config.acpi else 'off'},pit=on,pic=on,rtc=on",
        "-m", str(config.memory_mib),
        "-smp", str(config.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-sandbox", sandbox_arg(config),
        "-add-fd", f"fd={console_fd},set={CONSOLE_FDSET}",
        "-chardev", f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on",
        "-serial", "chardev:console",
        "-kernel", str(config.kernel),
        "-append", kernel_cmdline(config, accel, channel),
        *(["-initrd", str(config.initrd)] if config.initrd else []),
        "-drive", f"id=root,file={_opt(config.rootfs)},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        *layer_args(config),
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng",
        "-qmp", f"unix:{_opt(runtime.control_socket)},server=on,wait=off",
    ]  # fmt: skip
    if channel.kind == "vsock":
        argv += ["-device", f"vhost-vsock-device,guest-cid={channel.cid}"]
    else:
        argv += [
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={_opt(runtime.agent_socket)},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={boot.VIRTIO_PORT}",
        ]  # fmt: skip
    # mapped-xattr: the guest's owners, modes and special files live in
    # extended attributes; on the host every file it makes is a plain file
    # of QEMU's user (no setuid bit, no foreign owner, no device or FIFO).
    share = config.workspace if config.workspace is not None else runtime.empty_share
    git = git_share(config.workspace) if not config.writable_git else None
    argv += [
        "-fsdev", f"local,id=ws,path={_opt(share)},security_model=mapped-xattr"
        + (",readonly=on" if config.workspace is None else ""),
        "-device", f"virtio-9p-device,fsdev=ws,mount_tag={WORKSPACE_TAG}",
        "-fsdev", f"local,id=git,path={_opt(git or runtime.empty_share)},security_model=mapped-xattr,readonly=on",
        "-device", f"virtio-9p-device,fsdev=git,mount_tag={GIT_TAG}",
    ]  # fmt: skip
    argv += network_args(config, runtime, connector)
    if incoming_fd is not None:  # QEMU reads the saved state straight from the open file
        argv += ["-incoming", f"fd:{incoming_fd}"]
    return argv


def layer_args(config: BootConfig) -> list[str]:
    """The layers as read-only disks on one virtio-scsi controller, each at
    its position's SCSI target, where the guest looks for it."""
    if len(config.layers) > boot.MAX_LAYERS:
        raise ConfigError(f"{len(config.layers)} root filesystem layers; at most {boot.MAX_LAYERS} are mounted")
    if not config.layers:
        return []
    argv = ["-device", "virtio-scsi-device,id=layers"]
    for i, layer in enumerate(config.layers):
        argv += [
            "-drive", f"id=layer{i},file={_opt(layer.path)},format=raw,if=none,readonly=on",
            "-device", f"scsi-hd,drive=layer{i},bus=layers.0,channel=0,{boot.LAYER_SCSI_ID}={i},lun=0",
        ]  # fmt: skip
    return argv


def device_layout(config: BootConfig, accel: AccelChoice, channel: Channel = Channel()) -> list[str]:
    """The command line with every host path replaced: what a saved VM state
    depends on, independent of where this session keeps its files."""
    layers = tuple(dataclasses.replace(layer, path=Path(f"LAYER{i}")) for i, layer in enumerate(config.layers))
    neutral = dataclasses.replace(config, kernel=Path("KERNEL"), rootfs=Path("ROOTFS"), workspace=None, layers=layers)
    return command_line(neutral, accel, RuntimeDir(Path("RUNTIME")), "qemu", channel, connector=("CONNECTOR",))


class QemuMachine(ProcessMachine):
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        runtime: RuntimeDir,
        channel: Channel = Channel(),
        console: ConsoleCapture | None = None,
        proxy: ProxyServer | None = None,
        guard: VmmGuard | None = None,
    ) -> None:
        super().__init__(proc, runtime, console)
        self.channel = channel
        self.proxy = proxy
        self.guard = guard

    def watch(self, stop: Callable[[str], None]) -> None:
        if self.guard is not None:
            self.guard.on_violation(stop)

    def kill(self) -> None:
        super().kill()
        if self.proxy is not None:
            self.proxy.close()
        if self.guard is not None:
            self.guard.close()

    def connect_agent(self, deadline: float) -> socket.socket:
        if self.channel.kind == "vsock":
            return self._connect_vsock(deadline)
        path = str(self.runtime.agent_socket)
        while True:
            if not self.alive():
                raise BootError(f"QEMU exited with code {self.proc.returncode} before the agent channel opened: "
                                + self.diagnostics())  # fmt: skip
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            else:
                if peer_pid(sock) != self.proc.pid:  # a socket put there by someone else
                    sock.close()
                    raise BootError(f"{path} is not QEMU's: the runtime directory was tampered with")
                return sock
            if time.monotonic() > deadline:
                raise BootError("QEMU did not open the agent socket in time", hint="run `terminai-shim doctor`")
            time.sleep(0.005)

    def _connect_vsock(self, deadline: float) -> socket.socket:
        """The guest listens only once the agent runs: retry until then."""
        while True:
            if not self.alive():
                raise BootError("QEMU exited before the agent listened: " + self.diagnostics())
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.connect((self.channel.cid, boot.VSOCK_PORT))
                return sock
            except OSError:
                sock.close()
            if time.monotonic() > deadline:
                raise BootError("the guest agent did not accept a vsock connection in time")
            time.sleep(0.01)


class QemuBackend(Backend):
    name = "qemu"
    snapshots = True
    guards_workspace = True

    def check(self, config: BootConfig) -> None:
        check_vm_artifacts(config)

    def __init__(self, qemu: str | None = None) -> None:
        self.qemu = qemu or os.environ.get("TERMINAI_QEMU") or QEMU

    def available(self) -> bool:
        return shutil.which(self.qemu) is not None

    def snapshot_description(self, config: BootConfig, accel: AccelChoice) -> dict[str, Any] | None:
        """A saved VM depends on the QEMU binary and its device layout; a
        vsock channel cannot be saved (its host end does not survive)."""
        if Channel.choose(config.channel).kind != "virtio-serial":
            return None
        from ..snapshot import describe

        return describe(config, accel, self.qemu, device_layout(config, accel))

    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        if not self.available():
            raise BootError(f"{self.qemu} is not installed", hint="apt-get install qemu-system-x86")
        channel = Channel.choose(config.channel)
        workspace = config.workspace  # the path, before it is handed over as a descriptor
        identity = vmm_identity(workspace)
        runtime.empty_share.mkdir(mode=0o555, exist_ok=True)
        runtime.vmm_dir.mkdir(mode=0o700, exist_ok=True)
        held: list[int] = []  # descriptors QEMU inherits; closed here once it has them
        proxy = None
        console: ConsoleCapture | None = None
        log_fd = -1
        guarded = _guard_plan(config)
        install, guard_end = installer(guarded.arch, guarded.program) if guarded.arch else (None, None)
        try:
            proxy = _start_proxy(config, runtime, identity)  # before QEMU's user can touch anything
            if identity.switch_to:  # QEMU runs as that user from the start
                os.chown(runtime.vmm_dir, *identity.switch_to, follow_symlinks=False)
                os.chmod(runtime.path, 0o711)
                os.chmod(runtime.path.parent, 0o711)
            config = _by_descriptor(config, held, share_workspace=identity.switch_to is not None)
            state = os.open(incoming, os.O_RDONLY | os.O_CLOEXEC) if incoming is not None else None
            if state is not None:
                held.append(state)
            console = ConsoleCapture(runtime.console_log)
            allowlist = config.network.mode == "allowlist"
            connector = connector_command(workspace, identity.switch_to) if allowlist else ()
            argv = command_line(config, accel, runtime, self.qemu, channel, state, console.write_fd, connector)
            log_fd = os.open(runtime.path / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                preexec_fn=_vmm_preexec(identity, install),
                close_fds=True,
                pass_fds=(console.write_fd, *held),
                cwd=runtime.path,  # what QEMU starts (the connector) starts here, never in the workspace
                env=vmm_environment(),
                user=identity.switch_to[0] if identity.switch_to else None,
                group=identity.switch_to[1] if identity.switch_to else None,
                extra_groups=[] if identity.switch_to else None,
            )
            guard = guarded.start(guard_end, proc) if guard_end is not None else None
        except BaseException:
            if console is not None:
                console.finish(0)
            if proxy is not None:
                proxy.close()
            if guard_end is not None:
                guard_end.close()
            if "proc" in locals() and proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            if log_fd >= 0:
                os.close(log_fd)
            for fd in held:
                os.close(fd)
        console.child_started()
        return QemuMachine(proc, runtime, channel, console, proxy, guard)


@dataclass(frozen=True)
class _GuardPlan:
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


def _guard_plan(config: BootConfig) -> _GuardPlan:
    files = config.workspace is not None
    network = config.network.mode == "open"
    spawns = config.network.mode == "allowlist"  # QEMU starts a connector per guest connection
    if not files and not network and not spawns:
        return _GuardPlan()
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
    return _GuardPlan(arch, program, workspace, floor, net)


def _by_descriptor(config: BootConfig, held: list[int], share_workspace: bool) -> BootConfig:
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


def _start_proxy(config: BootConfig, runtime: RuntimeDir, identity: VmmIdentity) -> ProxyServer | None:
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


def vmm_environment() -> dict[str, str]:
    """QEMU, and what it starts, get a fixed environment: nothing of ours
    (PYTHONPATH, LD_PRELOAD, proxy credentials) reaches them."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


def _vmm_preexec(identity: VmmIdentity, install_guard: Callable[[], None] | None = None) -> Callable[[], None]:
    """Runs in the child after the user switch (so the parent-death signal,
    which a credential change clears, is set for good). The guard's filter
    goes on last, under ``no_new_privs``, right before QEMU's exec."""
    die = die_with_parent()
    keep = identity.keep_caps

    def preexec() -> None:
        die()
        if keep is not None:
            keep_only_capabilities(keep)
        elif identity.switch_to or install_guard is not None:
            no_new_privileges()
        if install_guard is not None:
            install_guard()

    return preexec
