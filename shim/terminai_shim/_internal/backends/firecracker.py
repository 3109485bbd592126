"""Firecracker: written against its published configuration and vsock
documentation, used when a ``firecracker`` binary is configured and KVM is
really usable. It is not booted in CI (no usable KVM there, and Firecracker
is not packaged in the registries CI can reach); its configuration and the
hybrid-vsock handshake are tested against a local Unix-socket peer.

Firecracker has no shared folders, so a workspace is refused: files travel
through the agent's file operations instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from terminai_protocol import bootcontract as boot

from ...errors import BootError, ConfigError
from ...models import AccelChoice, BootConfig
from ..process import die_with_parent
from .base import Backend, Machine, ProcessMachine, RuntimeDir, check_vm_artifacts, console_tail
from .cmdline import kernel_cmdline

GUEST_CID = 3


# Firecracker's own part: reboot through the keyboard controller (its only
# reset), a panic reboots after a second, no PCI bus to probe; it names the
# root device itself.
FIRECRACKER_KERNEL_ARGS = ("reboot=k", "panic=1", "pci=off")
KVM = AccelChoice("kvm", "Firecracker runs only with KVM")


def kernel_args(config: BootConfig) -> str:
    return kernel_cmdline(config, KVM, boot.param("channel", boot.vsock_channel()), FIRECRACKER_KERNEL_ARGS)


def vm_config(config: BootConfig, runtime: RuntimeDir) -> dict[str, Any]:
    """The ``--config-file`` document (boot source, drives, machine, vsock)."""
    if config.workspace is not None:
        raise ConfigError(
            "Firecracker has no shared folders, so a workspace cannot be mounted",
            hint="use the QEMU backend for a workspace, or copy files with the file operations",
        )
    if config.layers:
        raise ConfigError(
            "Firecracker has no SCSI controller to carry the root filesystem's layers",
            hint="use the QEMU backend for a profile with layers, or the minimal profile",
        )
    return {
        "boot-source": {"kernel_image_path": str(config.kernel), "boot_args": kernel_args(config)},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": str(config.rootfs), "is_root_device": True, "is_read_only": True}
        ],
        "machine-config": {"vcpu_count": config.cpus, "mem_size_mib": config.memory_mib, "smt": False},
        "vsock": {"guest_cid": GUEST_CID, "uds_path": str(runtime.path / "vsock.sock")},
        "network-interfaces": [],
    }


def hybrid_vsock_connect(uds_path: str, port: int, deadline: float) -> socket.socket:
    """Firecracker's host-initiated vsock: ``CONNECT <port>\\n`` -> ``OK <hostport>\\n``.

    Until the guest listens, Firecracker accepts and then closes the
    connection: retry until the deadline.
    """
    last = "no attempt"
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            sock.connect(uds_path)
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < 64:
                chunk = sock.recv(1)
                if not chunk:
                    break
                reply += chunk
            if reply.startswith(b"OK ") and reply.endswith(b"\n"):
                sock.settimeout(None)
                return sock
            last = f"unexpected reply {reply!r}" if reply else "closed before the guest listened"
            if reply and not reply.startswith(b"OK"):
                raise BootError(f"Firecracker vsock handshake failed: {last}")
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError, OSError) as exc:
            if isinstance(exc, BootError):
                raise
            last = str(exc)
        sock.close()
        time.sleep(0.01)
    raise BootError(f"the guest agent did not accept a vsock connection on port {port}: {last}")


def snapshot_create_requests(runtime: RuntimeDir) -> list[tuple[str, str, dict[str, Any]]]:
    """API calls that save a running VM (Firecracker must pause it first)."""
    return [
        ("PATCH", "/vm", {"state": "Paused"}),
        (
            "PUT",
            "/snapshot/create",
            {
                "snapshot_type": "Full",
                "snapshot_path": str(runtime.path / "vm.snap"),
                "mem_file_path": str(runtime.path / "vm.mem"),
            },
        ),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]


def snapshot_load_request(snapshot: Path, memory: Path) -> tuple[str, str, dict[str, Any]]:
    """The API call that restores a saved VM and resumes it at once."""
    return (
        "PUT",
        "/snapshot/load",
        {
            "snapshot_path": str(snapshot),
            "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
            "enable_diff_snapshots": False,
            "resume_vm": True,
        },
    )


class FirecrackerMachine(ProcessMachine):
    def connect_agent(self, deadline: float) -> socket.socket:
        if not self.alive():
            raise BootError("Firecracker exited before the agent answered: " + console_tail(self.runtime.console_log))
        return hybrid_vsock_connect(str(self.runtime.path / "vsock.sock"), boot.VSOCK_PORT, deadline)


class FirecrackerBackend(Backend):
    name = "firecracker"

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or os.environ.get("TERMINAI_FIRECRACKER") or shutil.which("firecracker")

    def available(self) -> bool:
        return bool(self.binary) and os.access(str(self.binary), os.X_OK)

    def check(self, config: BootConfig) -> None:
        check_vm_artifacts(config)
        if config.network.mode != "none":
            raise ConfigError("the Firecracker backend has no network policy support here",
                              hint="use --backend qemu for allowlist or open networking")  # fmt: skip

    def describe(self, accel: AccelChoice) -> str:
        return "MicroVM (Firecracker)"

    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        if incoming is not None:
            raise ConfigError("restoring Firecracker snapshots goes through its API (snapshot_load_params)")
        if accel.accel != "kvm":
            raise ConfigError(f"Firecracker needs KVM: {accel.reason}", hint="use the QEMU backend (TCG)")
        if not self.available():
            raise ConfigError("no firecracker binary configured", hint="set TERMINAI_FIRECRACKER")
        cfg = runtime.path / "firecracker.json"
        cfg.write_text(json.dumps(vm_config(config, runtime), indent=2))
        with runtime.console_log.open("wb") as console:
            proc = subprocess.Popen(
                [str(self.binary), "--api-sock", str(runtime.path / "api.sock"), "--config-file", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(), close_fds=True,
            )  # fmt: skip
        return FirecrackerMachine(proc, runtime)
