"""Progress for long work: a live line on a terminal, JSON events for machines.

A ``Reporter`` is passed down explicitly; nothing here is global.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Reporter:
    """``mode`` is ``tty`` (one rewritten status line), ``plain`` or ``json``."""

    mode: str = "plain"
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _last_draw: float = 0.0
    _open_line: bool = False

    @classmethod
    def auto(cls, json_events: bool = False) -> Reporter:
        if json_events:
            return cls("json")
        return cls("tty" if sys.stderr.isatty() else "plain")

    def _emit(self, event: str, step: str, **fields: Any) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def info(self, step: str, message: str, **fields: Any) -> None:
        if self.mode == "json":
            self._emit("info", step, message=message, **fields)
            return
        self._end_line()
        self.stream.write(f"[{step}] {message}\n")
        self.stream.flush()

    def progress(self, step: str, done: int, total: int | None = None, detail: str = "") -> None:
        """Report a count; throttled so a fast loop does not flood the output."""
        now = time.monotonic()
        if now - self._last_draw < (0.1 if self.mode == "tty" else 10.0):
            return
        self._last_draw = now
        if self.mode == "json":
            self._emit("progress", step, done=done, total=total, detail=detail)
        elif self.mode == "tty":
            of = f"/{total}" if total else ""
            line = f"[{step}] {done}{of} {detail}"[:100]
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self._open_line = True
        else:
            of = f"/{total}" if total else ""
            self.stream.write(f"[{step}] {done}{of} {detail}\n")
            self.stream.flush()

    def done(self, step: str, message: str, **fields: Any) -> None:
        if self.mode == "json":
            self._emit("done", step, message=message, **fields)
            return
        self._end_line()
        self.stream.write(f"[{step}] {message}\n")
        self.stream.flush()
