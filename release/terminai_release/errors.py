"""Errors the pipeline reports to a person: what failed and what to do next."""

from __future__ import annotations


class BuildError(Exception):
    """A build step failed in a way the user can act on.

    ``hint`` is the next step to take; ``log`` points at a kept build log.
    """

    def __init__(self, message: str, *, hint: str | None = None, log: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log = log

    def __str__(self) -> str:
        parts = [self.message]
        if self.log:
            parts.append(f"build log kept at {self.log}")
        if self.hint:
            parts.append(f"next: {self.hint}")
        return "\n".join(parts)
