"""The interface every VM backend implements."""

from __future__ import annotations

import abc
import socket
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
    """A started VM."""

    @abc.abstractmethod
    def connect_agent(self, deadline: float) -> socket.socket:
        """A stream connected to the guest agent's channel."""

    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the VM now; safe to call twice."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None: ...

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        """Start a VM; with ``incoming``, resume the saved state in that file instead of booting."""
