"""QEMU ``microvm``: the backend that runs everywhere (KVM or TCG).

The whole QEMU command line is built in ``command_line`` and nowhere else.
The guest gets: the PVH ``vmlinux``; the read-only root image on
virtio-blk; the agent channel on a virtio-serial port backed by a Unix
socket; virtio-rng; the workspace on virtio-9p when one is given; no
network device. ``acpi=off`` makes QEMU append the virtio-mmio device list
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
from dataclasses import dataclass
from pathlib import Path

from ...errors import BootError, ConfigError
from ...models import AccelChoice, BootConfig
from ..accel import host_tsc_khz
from ..process import die_with_parent
from .base import Backend, Machine, ProcessMachine, RuntimeDir, check_vm_artifacts, console_tail

QEMU = "qemu-system-x86_64"
WORKSPACE_TAG = "workspace"


AGENT_VSOCK_PORT = 1024
# User-mode networking (no root, no bridge, nothing changed on the host).
# The guest's side, set up by the agent from terminai_net= (no DHCP).
GUEST_ADDRESS, GATEWAY, RESOLVER = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"
PROXY_ADDRESS, PROXY_PORT = "10.0.2.100", 3128  # allowlist: the only place the guest can connect to
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
        return (
            f"terminai_channel=vsock:{AGENT_VSOCK_PORT}"
            if self.kind == "vsock"
            else "terminai_channel=virtio-serial:agent"
        )


def _opt(path: object) -> str:
    """A path inside a QEMU option string: commas are doubled, or they would
    end the value and start another option."""
    return str(path).replace(",", ",,")


def kernel_cmdline(config: BootConfig, accel: AccelChoice, channel: Channel = Channel()) -> str:
    args = [
        "console=ttyS0",
        "reboot=t",
        "panic=-1",
        "quiet",
        "root=/dev/vda",
        "ro",
        f"rootfstype={config.rootfs_format}",
        "init=/usr/lib/terminai/init",
        channel.kernel_arg,
    ]
    if accel.accel == "tcg":
        khz = host_tsc_khz()
        if khz:  # TSC calibration against the PIT fails at random under TCG
            args.append(f"tsc_early_khz={khz}")
        if config.cpus == 1:
            # Calibrating the local APIC timer waits 0.2 s of real time on
            # every boot; with one CPU the PIT drives the tick instead. And a
            # one-CPU kernel patches every LOCK prefix out of its text, one
            # page-table switch (a TCG TLB flush) each: 0.1 s; keep them.
            args += ["noapictimer", "noreplace-smp"]
    mode = config.network.mode
    if mode != "none":
        args.append(f"terminai_net={GUEST_ADDRESS},{GATEWAY},{RESOLVER if mode == 'open' else 'none'}")
    if mode == "allowlist":
        args.append(f"terminai_proxy=http://{PROXY_ADDRESS}:{PROXY_PORT}")
    args.extend(config.kernel_args)
    return " ".join(args)


def network_args(config: BootConfig, runtime: RuntimeDir) -> list[str]:
    """``open``: QEMU's user networking, NAT to whatever the host reaches.
    ``allowlist``: the same, restricted (``restrict=on``: the guest reaches
    nothing, not even DNS) except one forward: every connection to the proxy
    address spawns the session's allowlist proxy on the host, which decides."""
    mode = config.network.mode
    if mode == "none":
        return []
    netdev = f"user,id=net0,net=10.0.2.0/24,host={GATEWAY},dns={RESOLVER},ipv6=off"
    if mode == "allowlist":
        proxy = shlex.join([sys.executable, "-m", "terminai_shim._internal.netproxy", "--inetd",
                            str(runtime.proxy_config)])  # fmt: skip
        netdev += f",restrict=on,guestfwd=tcp:{PROXY_ADDRESS}:{PROXY_PORT}-cmd:{_opt(proxy)}"
    elif mode != "open":
        raise ConfigError(f"unknown network mode {mode!r}", hint="use none, allowlist or open")
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"]


def command_line(
    config: BootConfig,
    accel: AccelChoice,
    runtime: RuntimeDir,
    qemu: str = QEMU,
    channel: Channel = Channel(),
    incoming_fd: int | None = None,
) -> list[str]:
    """The whole QEMU command line.

    The 9p device is always there (backed by an empty directory when there
    is no workspace) and is mounted by the agent on request, after boot: so
    the device layout is the same with or without a workspace, and a VM
    saved before any mount can be restored for any workspace.
    """
    argv = [
        qemu,
        "-accel", accel.accel,
        "-cpu", "host" if accel.accel == "kvm" else TCG_CPU,
        "-M", f"microvm,acpi={'on' if config.acpi else 'off'},pit=on,pic=on,rtc=on",
        "-m", str(config.memory_mib),
        "-smp", str(config.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{_opt(runtime.console_log)}",
        "-kernel", str(config.kernel),
        "-append", kernel_cmdline(config, accel, channel),
        *(["-initrd", str(config.initrd)] if config.initrd else []),
        "-drive", f"id=root,file={_opt(config.rootfs)},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
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
            "-device", "virtserialport,chardev=agent,name=agent",
        ]  # fmt: skip
    share = config.workspace if config.workspace is not None else runtime.empty_share
    argv += [
        "-fsdev", f"local,id=ws,path={_opt(share)},security_model=none",
        "-device", f"virtio-9p-device,fsdev=ws,mount_tag={WORKSPACE_TAG}",
    ]  # fmt: skip
    argv += network_args(config, runtime)
    if incoming_fd is not None:  # QEMU reads the saved state straight from the open file
        argv += ["-incoming", f"fd:{incoming_fd}"]
    return argv


def device_layout(config: BootConfig, accel: AccelChoice, channel: Channel = Channel()) -> list[str]:
    """The command line with every host path replaced: what a saved VM state
    depends on, independent of where this session keeps its files."""
    neutral = dataclasses.replace(config, kernel=Path("KERNEL"), rootfs=Path("ROOTFS"), workspace=None)
    return command_line(neutral, accel, RuntimeDir(Path("RUNTIME")), "qemu", channel)


class QemuMachine(ProcessMachine):
    def __init__(self, proc: subprocess.Popen[bytes], runtime: RuntimeDir, channel: Channel = Channel()) -> None:
        super().__init__(proc, runtime)
        self.channel = channel

    def connect_agent(self, deadline: float) -> socket.socket:
        if self.channel.kind == "vsock":
            return self._connect_vsock(deadline)
        path = str(self.runtime.agent_socket)
        while True:
            if not self.alive():
                raise BootError(f"QEMU exited with code {self.proc.returncode} before the agent channel opened: "
                                + console_tail(self.runtime.console_log))  # fmt: skip
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise BootError("QEMU did not open the agent socket in time", hint="run `terminai-shim doctor`")
            time.sleep(0.005)

    def _connect_vsock(self, deadline: float) -> socket.socket:
        """The guest listens only once the agent runs: retry until then."""
        while True:
            if not self.alive():
                raise BootError("QEMU exited before the agent listened: " + console_tail(self.runtime.console_log))
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            try:
                sock.connect((self.channel.cid, AGENT_VSOCK_PORT))
                return sock
            except OSError:
                sock.close()
            if time.monotonic() > deadline:
                raise BootError("the guest agent did not accept a vsock connection in time")
            time.sleep(0.01)


class QemuBackend(Backend):
    name = "qemu"
    snapshots = True

    def check(self, config: BootConfig) -> None:
        check_vm_artifacts(config)

    def __init__(self, qemu: str | None = None) -> None:
        self.qemu = qemu or os.environ.get("TERMINAI_QEMU") or QEMU

    def available(self) -> bool:
        return shutil.which(self.qemu) is not None

    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        if not self.available():
            raise BootError(f"{self.qemu} is not installed", hint="apt-get install qemu-system-x86")
        channel = Channel.choose(config.channel)
        runtime.empty_share.mkdir(exist_ok=True)
        state = os.open(incoming, os.O_RDONLY) if incoming is not None else None
        argv = command_line(config, accel, runtime, self.qemu, channel, state)
        log = (runtime.path / "qemu.log").open("wb")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
                close_fds=True,
                pass_fds=(state,) if state is not None else (),
            )
        finally:
            log.close()
            if state is not None:
                os.close(state)
        return QemuMachine(proc, runtime, channel)
