"""Who QEMU runs as, under which filters, with which environment, and
which programs it may start: the VMM process's own confinement.

Why a module of its own: a bug in QEMU's device emulation is reached by the
guest first, so what QEMU could do on the host after one is decided here,
in one place: never root with root's powers (``vmm_identity``), QEMU's own
seccomp filter (``sandbox_arg``), a fixed environment, the parent-death
signal and ``no_new_privs`` set in the child before the exec, and, for the
allowlist, the one program QEMU starts per guest connection, taken only
from where neither the guest nor another user could have written it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ...models import BootConfig
from ..process import die_with_parent, keep_only_capabilities, no_new_privileges

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
NOBODY = (65534, 65534)


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


def vmm_environment() -> dict[str, str]:
    """QEMU, and what it starts, get a fixed environment: nothing of ours
    (PYTHONPATH, LD_PRELOAD, proxy credentials) reaches them."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


def vmm_preexec(identity: VmmIdentity, install_guard: Callable[[], None] | None = None) -> Callable[[], None]:
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
        return runs_as is None or can_run(path, *runs_as)

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


def can_run(program: Path, uid: int, gid: int) -> bool:
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


__all__ = [
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "NOBODY",
    "VmmIdentity",
    "can_run",
    "connector_command",
    "sandbox_arg",
    "vmm_environment",
    "vmm_identity",
    "vmm_preexec",
]
