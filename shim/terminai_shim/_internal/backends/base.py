"""The interface every backend implements: VMMs (qemu, firecracker) and the container engine."""

from __future__ import annotations

import abc
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...models import AccelChoice, BootConfig


@dataclass(frozen=True)
class RuntimeDir:
    """Per-VM scratch: sockets, console log. Removed when the VM stops."""

    path: Path

    @property
    def vmm_dir(self) -> Path:
        """The one place the VMM may write: its sockets. The rest of the
        directory (console, logs, the proxy's socket) stays the shim's, so a
        VMM running as another user cannot swap what the shim opens."""
        return self.path / "vmm"

    @property
    def agent_socket(self) -> Path:
        return self.vmm_dir / "agent.sock"

    @property
    def control_socket(self) -> Path:
        return self.vmm_dir / "control.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def empty_share(self) -> Path:
        """What a 9p device exports when there is nothing to share (read-only)."""
        return self.path / "no-workspace"

    @property
    def proxy_socket(self) -> Path:
        """Where the allowlist proxy takes guest connections from QEMU's connectors."""
        return self.path / "proxy.sock"


class ConsoleCapture:
    """The guest's serial console, kept within bounds.

    The guest writes its console as fast as it likes; a file QEMU writes
    directly would grow without limit (in XDG_RUNTIME_DIR: memory). QEMU
    writes into a pipe instead; a thread keeps the first ``head`` bytes in
    ``console.log`` (boot messages, a panic) and the last ``tail`` bytes,
    appended when the guest stops, with a line saying how much was dropped."""

    def __init__(self, path: Path, head: int = 1 << 20, tail: int = 64 << 10) -> None:
        self.path = path
        self.head = head
        self.tail = tail
        self.dropped = 0
        read_end, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="console", daemon=True)
        self._thread.start()

    def child_started(self) -> None:
        """The VMM holds the write end now: drop ours, so its exit ends the pump."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def _pump(self, read_end: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        written = 0
        ring = bytearray()
        try:
            while data := os.read(read_end, 65536):
                if written < self.head:
                    part = data[: self.head - written]
                    os.write(fd, part)
                    written += len(part)
                    data = data[len(part) :]
                if data:
                    self.dropped += len(data)
                    ring += data
                    del ring[: -self.tail]
            if self.dropped:
                kept = len(ring)
                note = f"\n[terminai: {self.dropped - kept} bytes of console output dropped; the last {kept} follow]\n"
                os.write(fd, note.encode() + bytes(ring))
        except OSError:
            pass
        finally:
            os.close(fd)
            os.close(read_end)

    def finish(self, timeout: float = 2.0) -> None:
        """Wait until everything the VMM wrote is in the file (it has exited)."""
        self.child_started()
        self._thread.join(timeout)


class Machine(abc.ABC):
    """A started isolation tier (a VM, or a container) and the way to reach its agent."""

    runtime: RuntimeDir
    # Where the backend does not guard the workspace: whether it made the git
    # metadata the workspace had at the start read-only.
    read_only_git: bool = False

    @abc.abstractmethod
    def connect_agent(self, deadline: float) -> socket.socket:
        """A stream connected to the guest agent's channel."""

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """The host process whose death ends the machine (VMM, or the container's init)."""

    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop now, with everything inside; safe to call twice."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout``."""

    def watch(self, stop: Callable[[str], None]) -> None:
        """Let the host's own checks of this machine (the disk floor) stop the
        session through ``stop(reason)``; machines without such checks ignore it."""
        return None

    def diagnostics(self) -> str:
        """What to show when the agent never answered: the guest console's tail."""
        return console_tail(self.runtime.console_log)


class ProcessMachine(Machine):
    """A VMM child process."""

    def __init__(
        self, proc: subprocess.Popen[bytes], runtime: RuntimeDir, console: ConsoleCapture | None = None
    ) -> None:
        self.proc = proc
        self.runtime = runtime
        self.console = console

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.console is not None:
            self.console.finish()

    def diagnostics(self) -> str:
        """The console's tail, and what the VMM itself said when it failed."""
        if self.console is not None and self.proc.poll() is not None:
            self.console.finish()
        said = ""
        try:
            fd = os.open(self.runtime.path / "qemu.log", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                f.seek(max(0, os.fstat(fd).st_size - 600))
                said = f.read().decode(errors="replace").strip()
        except OSError:
            pass
        return super().diagnostics() + (f"\nthe VMM said: {said}" if said else "")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


class Backend(abc.ABC):
    name: str
    isolation: str = "microvm"  # the CLI's descriptor `type`
    snapshots: bool = False  # can save a started machine and restore it later
    shares_workspace_at_start: bool = False  # the workspace is in place before the agent starts
    # The host decides every change the guest makes to the workspace (vmmguard): git metadata
    # at any depth is read-only. Otherwise only the top-level .git directory is covered.
    guards_workspace: bool = False

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this host has what the backend runs (its VMM's program, an engine that answers)."""

    @abc.abstractmethod
    def check(self, config: BootConfig) -> None:
        """Refuse a config this backend cannot start, naming what is missing."""

    @abc.abstractmethod
    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        """Start; with ``incoming``, resume the saved state in that file instead of booting."""

    def snapshot_description(self, config: BootConfig, accel: AccelChoice) -> dict[str, Any] | None:
        """Everything a saved machine of ``config`` depends on (its key is the
        digest of this), or None when this backend cannot save this one."""
        return None

    def describe(self, accel: AccelChoice) -> str:
        return f"MicroVM (QEMU {accel.accel.upper()})"


def check_vm_artifacts(config: BootConfig) -> None:
    from ...errors import ConfigError

    for path, what in ((config.kernel, "kernel"), (config.rootfs, "root image")):
        if path is None or not Path(path).is_file():
            raise ConfigError(
                f"{what} {path} does not exist", hint="build it with `inv kernel rootfs` or fetch a release"
            )


def console_tail(path: Path, lines: int = 12) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            text = f.read(4 << 20).decode(errors="replace")
    except OSError:
        return "(no console output)"
    all_lines = [line for line in text.splitlines() if line.strip()]
    tail = all_lines[-lines:]
    panic = next((line.strip() for line in all_lines if "Kernel panic" in line), None)
    head = f"the guest kernel panicked: {panic}\n" if panic else ""
    return head + ("guest console:\n  " + "\n  ".join(tail) if tail else "(no console output)")


GIT_SCAN_LIMIT = 200_000  # directories looked into before a container starts


@dataclass
class WorkspaceScan:
    """What the container tier looks for in the workspace, relative to it:
    git metadata (each ``.git`` directory or file at any depth, each
    directory shaped like a bare repository) and special files (FIFOs,
    sockets, device nodes) and files hard-linked to another name. Links are not followed; ``.git`` directories
    are not looked into. ``whole``: the tree was seen within the limit."""

    git: list[Path]
    special: list[Path]
    whole: bool = True
    linked: list[Path] = field(default_factory=list)  # regular files with another name (nlink > 1)


def scan_workspace(workspace: Path, limit: int = GIT_SCAN_LIMIT) -> WorkspaceScan:
    found = WorkspaceScan([], [])
    pending = [workspace]
    seen = 0
    while pending:
        if seen >= limit:
            found.whole = False
            break
        directory = pending.pop()
        seen += 1
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        names = {e.name for e in entries}
        if directory != workspace and {"HEAD", "objects", "refs"} <= names:
            found.git.append(Path(directory).relative_to(workspace))
            continue
        for entry in entries:
            rel = Path(entry.path).relative_to(workspace)
            if entry.is_symlink():
                continue
            if entry.name.lower() == ".git":
                found.git.append(rel)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif not entry.is_file(follow_symlinks=False):
                found.special.append(rel)
            else:
                try:
                    if entry.stat(follow_symlinks=False).st_nlink > 1:
                        found.linked.append(rel)
                except OSError:
                    pass
    found.git.sort()
    found.special.sort()
    return found


def git_share(workspace: Path | None) -> Path | None:
    """The workspace's ``.git`` directory, if it has one (a ``.git`` file, as
    in a worktree, points elsewhere and is left as it is)."""
    if workspace is None:
        return None
    git = workspace / ".git"
    return git if git.is_dir() and not git.is_symlink() else None
