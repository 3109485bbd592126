"""``terminai-shim run``: one command in a fresh VM, with live stdio.

Exit codes follow timeout(1) and env(1): the command's own code; 124 when
the timeout killed it; 125 when the shim failed before the command ran;
128+N when a signal N ended it.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, BinaryIO

from ._internal.fetch import Progress
from ._internal.termsafe import TerminalFilter
from .errors import DeadlineExceeded, ShimError
from .launch import LaunchRequest, resolve

TIMEOUT_EXIT = 124


def _pump_stdin(proc: Any) -> None:
    """Copy our stdin to the guest command until EOF."""
    try:
        fd = sys.stdin.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            proc.write_stdin(data)
        proc.close_stdin()
    except (OSError, ValueError, ShimError):
        pass


class GuestOutput:
    """Where one of the guest command's streams goes: our stdout or stderr.

    On a terminal the bytes pass through a TerminalFilter, unless ``raw``
    (a PTY session, where the guest is meant to drive the terminal)."""

    def __init__(self, stream: BinaryIO, *, raw: bool) -> None:
        self.stream = stream
        self.filter = None if raw or not stream.isatty() else TerminalFilter()
        self._lock = threading.Lock()  # output arrives on the channel's thread; finish() runs on ours

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.filter is not None:
                data = self.filter.feed(data)
            self.stream.write(data)
            self.stream.flush()

    def finish(self) -> None:
        """Show what the filter still holds (an incomplete character); never raises."""
        try:
            with self._lock:
                if self.filter is not None:
                    self.stream.write(self.filter.flush())
                    self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: an error here would hide the one that matters
            pass


def run_command(
    request: LaunchRequest,
    command: list[str],
    *,
    shell: bool,
    timeout: float | None,
    verbose: bool,
    raw_output: bool = False,
    progress: Progress | None = None,
) -> int:
    """``raw_output`` sends the guest's bytes to a terminal unfiltered (for a PTY session)."""
    launch = resolve(request, progress)
    config = launch.config
    if verbose:
        print(f"terminai-shim: starting the isolation tier ({launch.choice.name}: {launch.choice.reason}) ...",
              file=sys.stderr)  # fmt: skip
    with launch.boot() as session:
        notice = session.weaker_tier_notice()
        if notice:
            print(f"terminai-shim: {notice}", file=sys.stderr)
        if verbose:
            what = session.describe()["displayName"]
            why = session.accel.reason if session.backend.isolation == "microvm" else "a Docker engine answers"
            print(f"terminai-shim: {what} ready in {session.boot_seconds:.2f}s ({why})", file=sys.stderr)
        out = GuestOutput(sys.stdout.buffer, raw=raw_output)
        err = GuestOutput(sys.stderr.buffer, raw=raw_output)

        def on_event(name: str, value: Any) -> None:
            stream = out if name == "stdout" else err if name == "stderr" else None
            if stream is not None:
                stream.write(value)

        interactive_stdin = not sys.stdin.closed and not sys.stdin.isatty() if sys.stdin else False
        kwargs: dict[str, Any] = {"timeout": timeout, "stdin_open": interactive_stdin, "on_event": on_event,
                                  "cwd": config.workspace_mount if config.workspace else None}  # fmt: skip
        try:
            if shell:
                proc = session.client.exec(command=" ".join(command), shell=True, **kwargs)
            else:
                proc = session.client.exec(command, **kwargs)
            if interactive_stdin:
                threading.Thread(target=_pump_stdin, args=(proc,), daemon=True).start()
            try:
                status = proc.wait()
            except DeadlineExceeded:  # the guest ignored the timeout: the host's deadline stopped the VM
                print(f"terminai-shim: command timed out after {timeout}s; the guest did not end it, so the VM "
                      "was stopped", file=sys.stderr)  # fmt: skip
                return TIMEOUT_EXIT
        finally:
            out.finish()
            err.finish()
        if status.timed_out:
            print(f"terminai-shim: command timed out after {timeout}s and was killed", file=sys.stderr)
            return TIMEOUT_EXIT
        return status.exit_code
