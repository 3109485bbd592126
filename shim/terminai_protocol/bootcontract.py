"""The guest boot contract: what the host and the guest agree on before the
agent speaks its protocol.

Where the init lives, which kernel command line parameters carry the
agent's settings, where the agent listens (virtio-serial port, vsock port,
Unix socket in the container tier) and the 9p tags the workspace arrives
under. The agent, every shim backend and the image builds import this one
module (as they share ``protocol.py``), so a name changes in one place.

Standard library only, and cheap: the agent imports it at boot.
"""

from __future__ import annotations

# The agent as init (VM) or entry point (container): installed by the root image.
INIT = "/usr/lib/terminai/init"
CONSOLE = "ttyS0"

# Settings ride on the kernel command line as ``terminai_<key>=<value>``:
# plain words, because dotted ``a.b=`` parameters are taken for module options.
PARAM_PREFIX = "terminai_"
# In the container tier (no command line) the same keys come from the
# environment as ``TERMINAI_<KEY>``.
ENV_PREFIX = "TERMINAI_"

# Where the agent serves.
VIRTIO_PORT = "agent"  # a QEMU virtserialport by this name
VSOCK_PORT = 1024  # AF_VSOCK (vhost-vsock, Firecracker)
CONTAINER_AGENT_DIR = "/run/terminai"  # bind-mounted from the host's runtime directory
CONTAINER_AGENT_SOCKET = "agent.sock"

# The workspace appears in the guest at the same absolute path as on the
# host (so the CLI's host paths work unchanged), and always at this alias.
# A host path inside one of the guest's own system directories cannot be
# used that way: the workspace is then at the alias only.
WORKSPACE_ALIAS = "/workspace"
GUEST_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/sys", "/dev",
                     "/run", "/boot", "/var")  # fmt: skip


def workspace_target(host_path: str) -> str:
    """Where a workspace at ``host_path`` on the host is mounted in the guest."""
    if host_path == "/" or any(host_path == d or host_path.startswith(d + "/") for d in GUEST_SYSTEM_DIRS):
        return WORKSPACE_ALIAS
    return host_path


# 9p tags the shim exports and the agent mounts on request.
WORKSPACE_TAG = "workspace"
GIT_TAG = "workspace-git"  # the workspace's .git, exported read-only

# How the agent mounts them. ``cache=mmap`` gives shared writable mmap
# (SQLite in WAL mode, which fails with "disk I/O error" on ``cache=none``)
# at the same write speed; ``cache=loose`` also works but writes at a sixth
# of it, and virtio-fs blocks QEMU 7.2's migration, so warm start (the
# measurements: docs/architecture.md, "Workspace paths and terminals").
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap"


# Optional root filesystem layers: read-only disks on one virtio-scsi
# controller (QEMU's microvm has eight virtio-mmio transports, too few for a
# disk each), the layer at position N (bottom first) at SCSI target N, LUN 0;
# the ``layers`` setting names them in that order. PID 1 mounts each and
# makes them the overlay's lower directories above the root image before
# anything runs. Addresses, not device names: disks enumerate in the order
# they are probed, not the command line's.
LAYER_SCSI_ID = "scsi-id"  # the scsi-hd property the position goes in
LAYER_FSTYPE = "squashfs"
MAX_LAYERS = 8


def layers_setting(names: list[str] | tuple[str, ...]) -> str:
    return ",".join(names)


def layer_names(setting: str) -> list[str]:
    return [n for n in setting.split(",") if n][:MAX_LAYERS]


def virtio_channel(name: str = VIRTIO_PORT) -> str:
    return f"virtio-serial:{name}"


def vsock_channel(port: int = VSOCK_PORT) -> str:
    return f"vsock:{port}"


def container_channel() -> str:
    return f"unix:{CONTAINER_AGENT_DIR}/{CONTAINER_AGENT_SOCKET}"


DEFAULT_CHANNEL = virtio_channel()


def param(key: str, value: str) -> str:
    """One agent setting as a kernel command line word."""
    return f"{PARAM_PREFIX}{key}={value}"


def params_from_cmdline(words: list[str]) -> dict[str, str]:
    """The agent's settings from the kernel command line's words."""
    pairs = (w.split("=", 1) for w in words if "=" in w)
    return {k[len(PARAM_PREFIX) :]: v for k, v in pairs if k.startswith(PARAM_PREFIX)}


def params_from_environ(environ: dict[str, str]) -> dict[str, str]:
    """The same settings from ``TERMINAI_*`` variables (the container tier, tests)."""
    return {k[len(ENV_PREFIX) :].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def container_environment() -> tuple[str, ...]:
    """What the container image's configuration sets for the agent."""
    return (f"{ENV_PREFIX}CONTAINER=1", f"{ENV_PREFIX}CHANNEL={container_channel()}")
