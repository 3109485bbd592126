"""The interface every backend implements: VMMs (qemu, firecracker) and the container engine."""

from __future__ import annotations

import abc
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...models import AccelChoice, BootConfig


@dataclass(frozen=True)
class RuntimeDir:
    """Per-VM scratch: sockets, console log. Removed when the VM stops."""

    path: Path

    @property
    def agent_socket(self) -> Path:
        return self.path / "agent.sock"

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def proxy_config(self) -> Path:
        """The allowlist proxy's configuration (netproxy), written once the session has an id."""
        return self.path / "proxy.json"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def empty_share(self) -> Path:
        """What the 9p device exports when the session has no workspace."""
        return self.path / "no-workspace"


class Machine(abc.ABC):
    """A started isolation tier (a VM, or a container) and the way to reach its agent."""

    runtime: RuntimeDir

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

    def diagnostics(self) -> str:
        """What to show when the agent never answered: the guest console's tail."""
        return console_tail(self.runtime.console_log)


class ProcessMachine(Machine):
    """A VMM child process."""

    def __init__(self, proc: subprocess.Popen[bytes], runtime: RuntimeDir) -> None:
        self.proc = proc
        self.runtime = runtime

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

    @abc.abstractmethod
    def check(self, config: BootConfig) -> None:
        """Refuse a config this backend cannot start, naming what is missing."""

    @abc.abstractmethod
    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        """Start; with ``incoming``, resume the saved state in that file instead of booting."""

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
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    all_lines = [line for line in text.splitlines() if line.strip()]
    tail = all_lines[-lines:]
    panic = next((line.strip() for line in all_lines if "Kernel panic" in line), None)
    head = f"the guest kernel panicked: {panic}\n" if panic else ""
    return head + ("guest console:\n  " + "\n  ".join(tail) if tail else "(no console output)")
