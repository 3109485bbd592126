"""The interface every VM backend implements."""

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
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def empty_share(self) -> Path:
        """What the 9p device exports when the session has no workspace."""
        return self.path / "no-workspace"


class Machine(abc.ABC):
    """A started VM: a VMM child process plus the way to reach its agent."""

    def __init__(self, proc: subprocess.Popen[bytes], runtime: RuntimeDir) -> None:
        self.proc = proc
        self.runtime = runtime

    @abc.abstractmethod
    def connect_agent(self, deadline: float) -> socket.socket:
        """A stream connected to the guest agent's channel."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Stop the VM now; safe to call twice."""
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

    @abc.abstractmethod
    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        """Start a VM; with ``incoming``, resume the saved state in that file instead of booting."""
