"""QEMU ``microvm``: the backend that runs everywhere (KVM or TCG).

The whole QEMU command line is built in ``command_line`` and nowhere else.
The guest gets: the PVH ``vmlinux``; the read-only root image on
virtio-blk; the agent channel on a virtio-serial port backed by a Unix
socket; virtio-rng; the workspace on virtio-9p (owners and modes mapped
into extended attributes: nothing the guest does makes a setuid file or a
foreign owner on the host); a second, read-only 9p share for the
workspace's ``.git``; no network device unless asked for.

QEMU itself runs confined: seccomp (``-sandbox``), and never as root with
root's powers (``vmmprocess``); it is handed the verified files as
descriptors and runs under the host's guard (``handover``). Its console
goes through a pipe the shim caps (``ConsoleCapture``). ``acpi=off`` makes QEMU append the virtio-mmio device list
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_protocol import bootcontract as boot

from ...errors import BootError, ConfigError
from ...models import AccelChoice, BootConfig
from ..netpolicy import (
    GATEWAY,
    PROXY_ADDRESS,
    PROXY_PORT,
    RESOLVER,
    open_mode_allows,
)
from ..notifyfilter import installer
from ..process import peer_pid
from ..vmmguard import VmmGuard
from . import cmdline
from .base import Backend, ConsoleCapture, Machine, ProcessMachine, RuntimeDir, check_vm_artifacts, git_share
from .handover import by_descriptor, guard_plan, start_proxy
from .vmmprocess import connector_command, sandbox_arg, vmm_environment, vmm_identity, vmm_preexec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..netproxy import ProxyServer

QEMU = "qemu-system-x86_64"
WORKSPACE_TAG, GIT_TAG = boot.WORKSPACE_TAG, boot.GIT_TAG
CONSOLE_FDSET = 1

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
        guarded = guard_plan(config)
        install, guard_end = installer(guarded.arch, guarded.program) if guarded.arch else (None, None)
        try:
            proxy = start_proxy(config, runtime, identity)  # before QEMU's user can touch anything
            if identity.switch_to:  # QEMU runs as that user from the start
                os.chown(runtime.vmm_dir, *identity.switch_to, follow_symlinks=False)
                os.chmod(runtime.path, 0o711)
                os.chmod(runtime.path.parent, 0o711)
            config = by_descriptor(config, held, share_workspace=identity.switch_to is not None)
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
                preexec_fn=vmm_preexec(identity, install),
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
