"""Configuration and results exchanged with the shim's callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from terminai_protocol.bootcontract import WORKSPACE_ALIAS

from .options import GUEST_USERS as GUEST_USERS  # spelled once, with the options

# A VM's size when neither the caller nor the release says: the one place
# these numbers live (a release's manifest carries its own, the caller's win).
DEFAULT_MEMORY_MIB = 512
DEFAULT_CPUS = 1


@dataclass(frozen=True)
class NetworkPolicy:
    """What the guest may reach. ``none``: no network device at all (the
    default). ``allowlist``: only through the host-side proxy, only to the
    entries in ``allow`` (``HOST[:PORT]``, ``*.DOMAIN[:PORT]``, IP literals,
    and CIDR ranges that permit non-public addresses). ``open``: everything
    the host can reach, an explicit and logged choice."""

    mode: str = "none"
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class RootLayer:
    """One optional layer of the root filesystem: a read-only squashfs the
    guest mounts over the root image. ``sha256``: what a verified manifest
    says it is, checked again on the descriptor QEMU is handed (None: a
    developer's own build, nothing to bind it to)."""

    name: str
    path: Path
    sha256: str | None = None


@dataclass(frozen=True)
class BootConfig:
    """Everything needed to start one isolation tier from verified local artifacts:
    a kernel and root image for a microVM, an OCI image archive for a container."""

    kernel: Path | None = None
    rootfs: Path | None = None
    rootfs_format: str = "squashfs"
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    workspace: Path | None = None
    # Where the guest sees it: the host's own path by default (``launch``), so
    # host paths work unchanged; and always at WORKSPACE_ALIAS as well.
    workspace_mount: str = WORKSPACE_ALIAS
    accel: str = "auto"  # auto | kvm | tcg
    backend: str = "auto"  # auto | qemu | firecracker | container
    # The root image as an OCI archive, for the container backend, and the
    # sha256 it must have (from a verified manifest or its build record).
    image: Path | None = None
    image_sha256: str | None = None
    # What a verified manifest says the kernel and root image are: checked
    # again on the very descriptors QEMU is handed (None: a developer's own
    # artifacts, nothing to bind them to).
    kernel_sha256: str | None = None
    rootfs_sha256: str | None = None
    # The root filesystem's layers over the root image, bottom first (VM
    # tiers), and the profile they make, if one was named (which image of a
    # container archive runs, in the container tier).
    layers: tuple[RootLayer, ...] = ()
    profile: str | None = None
    channel: str = "auto"  # auto | virtio-serial | vsock
    # auto: restore a matching saved VM, or boot cold and save one; off: always cold.
    snapshots: str = "auto"
    kernel_args: tuple[str, ...] = ()
    network: NetworkPolicy = NetworkPolicy()
    boot_timeout: float = 60.0
    # An initramfs instead of the agent image's init (kernel bring-up tests).
    initrd: Path | None = None
    # ACPI describes the devices instead of the kernel command line: for
    # kernels without VIRTIO_MMIO_CMDLINE_DEVICES (Debian's stock kernels).
    acpi: bool = False
    # The workspace's .git is read-only to the guest unless this is set: a
    # writable .git lets guest code plant hooks or core.fsmonitor that the
    # host's next `git status` runs.
    writable_git: bool = False
    # Who commands run as in the guest by default: "user" (uid 0 without
    # capabilities: it can write what root owns, but not reach PID 1, the
    # kernel or the network setup) or "root" (every capability, on request).
    user: str = "user"
    # Refuse any tier weaker than a microVM (the container tier shares the host's kernel).
    require_microvm: bool = False

    @property
    def workspace_alias(self) -> str | None:
        """The second place the workspace appears in the guest, if any: none when
        it is already there, or mounted inside it (a bind over /workspace
        would hide that mount and show the workspace's own subdirectory
        under the host path instead)."""
        if self.workspace is None or (self.workspace_mount + "/").startswith(WORKSPACE_ALIAS + "/"):
            return None
        return WORKSPACE_ALIAS

    @property
    def workspace_paths(self) -> tuple[str, ...]:
        """Every guest path the workspace is at."""
        if self.workspace is None:
            return ()
        return (self.workspace_mount,) + ((self.workspace_alias,) if self.workspace_alias else ())


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # kvm | tcg
    reason: str


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    truncated: list[str] = field(default_factory=list)
    signal: int | None = None


__all__ = [
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY_MIB",
    "GUEST_USERS",
    "AccelChoice",
    "BootConfig",
    "ExecResult",
    "NetworkPolicy",
    "RootLayer",
]
