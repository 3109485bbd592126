"""Errors the shim reports: each carries a stable code, whether the command
may have run, and the next thing to try."""

from __future__ import annotations


class ShimError(Exception):
    code = "SHIM_ERROR"

    def __init__(self, message: str, *, hint: str | None = None, ran: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.ran = ran

    def __str__(self) -> str:
        return f"{self.message} (next: {self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": self.message, "ran": self.ran}
        if self.hint:
            out["hint"] = self.hint
        return out


class ConfigError(ShimError):
    code = "INVALID_CONFIG"


class BootError(ShimError):
    """The VM did not reach a ready agent: nothing ran."""

    code = "BOOT_FAILED"


class AgentError(ShimError):
    """The agent answered with an error (its code is kept in ``agent_code``)."""

    code = "AGENT_ERROR"

    def __init__(self, agent_code: str, message: str, *, ran: bool = False) -> None:
        super().__init__(message, ran=ran)
        self.agent_code = agent_code

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["agentCode"] = self.agent_code
        return out


class ChannelClosed(ShimError):
    """The agent channel went away: a running command's outcome is unknown."""

    code = "VM_GONE"


class DeadlineExceeded(ChannelClosed):
    """A command outlived its timeout and the guest did not end it: the
    host's own deadline stopped the VM (so the outcome is unknown)."""


class TimeoutExpired(ShimError):
    code = "TIMEOUT"


class FileTooLarge(ShimError):
    code = "FILE_TOO_LARGE"


__all__ = [
    "AgentError",
    "BootError",
    "ChannelClosed",
    "ConfigError",
    "DeadlineExceeded",
    "FileTooLarge",
    "ShimError",
    "TimeoutExpired",
]
