"""``terminai-shim run``: one command in a fresh VM, with live stdio.

Exit codes follow timeout(1) and env(1): the command's own code; 124 when
the timeout killed it; 125 when the shim failed before the command ran;
128+N when a signal N ended it.

Stdin and terminals behave like ``docker run``: ``-i`` forwards stdin as a
stream, ``-t`` runs the command on a terminal in the guest sized like
ours. Without either, a terminal on stdin means both (a person at a
keyboard), anything else means ``-i``. Unlike docker, ``-t`` alone still
forwards the keys of a terminal on stdin (nobody means to type into a
terminal that ignores them); with stdin not a terminal, ``-t`` alone
leaves it unread, as docker does. On a terminal, ours is put in raw
mode (every key goes to the guest, Ctrl-C included, which the guest's
terminal turns into SIGINT for its foreground job) and restored on every
way out.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from ._internal.client import Pty
from ._internal.termsafe import PtyFilter, TerminalFilter
from .errors import DeadlineExceeded, ShimError
from .launch import LaunchRequest, resolve

if TYPE_CHECKING:
    from ._internal.fetch import Progress

TIMEOUT_EXIT = 124
SHIM_FAILED = 125
# `run` streams what it receives and keeps none of it: no cap cuts a stream short.
# (serve's execute, which answers with the whole output, has a cap and says when it cut.)
STREAM_CAP = 1 << 62


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and not stream.closed and stream.isatty())
    except (OSError, ValueError):
        return False


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

    On a terminal the bytes pass through a TerminalFilter, or for a PTY
    session, where the guest is meant to drive the terminal, through the
    narrower PtyFilter (no clipboard, no pass-through strings); ``raw``
    passes everything (a caller that filters itself)."""

    def __init__(self, stream: BinaryIO, *, raw: bool = False, pty: bool = False) -> None:
        self.stream = stream
        self.filter: TerminalFilter | PtyFilter | None = None
        if not raw and stream.isatty():
            self.filter = PtyFilter() if pty else TerminalFilter()
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


class LocalTerminal:
    """Our terminal in raw mode for a PTY session, and back as it was on
    every way out: the command's end, the guest's death, an exception, and
    SIGTERM or SIGHUP to the shim (turned into an exception, so the same
    ``finally`` runs). Window-size changes are passed on as they happen."""

    def __init__(self, fd: int, on_resize: Callable[[int, int], None] | None) -> None:
        self.fd = fd
        self.on_resize = on_resize
        self.saved: list[Any] | None = None
        self.handlers: dict[int, Any] = {}

    def __enter__(self) -> LocalTerminal:
        import signal
        import termios
        import tty

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self.handlers[sig] = signal.signal(sig, _raise_exit)
        if self.on_resize is not None:
            self.handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, lambda *_: self._resized())
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def _resized(self) -> None:
        cols, rows = terminal_size()
        if self.on_resize is not None:
            threading.Thread(target=self.on_resize, args=(cols, rows), daemon=True).start()  # not in the handler

    def __exit__(self, *exc: object) -> None:
        import signal
        import termios

        if self.saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def terminal_size() -> tuple[int, int]:
    """Ours, from whichever standard stream is a terminal (80x24 otherwise,
    and for a side a terminal reports as 0, as terminals themselves do)."""
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return size.columns or Pty.cols, size.lines or Pty.rows
    return Pty.cols, Pty.rows


# What a full-screen program may leave switched on when it (or its VM) dies: mouse
# reporting in every encoding, focus events, bracketed paste, the alternate screen, a
# hidden cursor, application cursor keys and keypad, the kitty keyboard protocol,
# colours and attributes. Each is switched off, as `reset` would, without clearing.
RESTORE_MODES = (b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1005l\x1b[?1006l\x1b[?1015l\x1b[?1004l"
                 b"\x1b[?2004l\x1b[?1049l\x1b[?25h\x1b[?1l\x1b>\x1b[<u\x1b[0m")  # fmt: skip


def restore_terminal_modes(stream: BinaryIO) -> None:
    """After a PTY session, on every way out: the user's terminal as it was."""
    try:
        if stream.isatty():
            stream.write(RESTORE_MODES)
            stream.flush()
    except (OSError, ValueError):
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
    interactive: bool | None = None,
    tty: bool | None = None,
) -> int:
    """``interactive``/``tty``: ``-i``/``-t`` (None: decided by whether stdin
    is a terminal). ``raw_output`` sends the guest's bytes unfiltered."""
    stdin_tty = _isatty(sys.stdin)
    if interactive is None:  # -t alone still takes a person's keys (docker's -t would ignore them)
        interactive = tty is None or stdin_tty
    if tty is None:
        tty = stdin_tty
    interactive, tty = bool(interactive), bool(tty)
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
        out = GuestOutput(sys.stdout.buffer, raw=raw_output, pty=tty)
        err = GuestOutput(sys.stderr.buffer, raw=raw_output)

        def on_event(name: str, value: Any) -> None:
            stream = out if name == "stdout" else err if name == "stderr" else None
            if stream is not None:
                stream.write(value)

        forward = interactive and sys.stdin is not None and not sys.stdin.closed
        kwargs: dict[str, Any] = {"timeout": timeout, "stdin_open": forward, "on_event": on_event,
                                  "cwd": config.workspace_mount if config.workspace else None,
                                  "output_cap": STREAM_CAP}  # fmt: skip
        if tty:
            kwargs["pty"] = Pty(*terminal_size(), os.environ.get("TERM") or Pty.term)
        try:
            if shell:
                proc = session.client.exec(command=" ".join(command), shell=True, **kwargs)
            else:
                proc = session.client.exec(command, **kwargs)
            local = LocalTerminal(0, proc.resize if tty else None) if tty and forward and stdin_tty else None
            with local or contextlib.nullcontext():
                if forward:
                    threading.Thread(target=_pump_stdin, args=(proc,), daemon=True).start()
                try:
                    status = proc.wait()
                except DeadlineExceeded:  # the guest ignored the timeout: the host's deadline stopped the VM
                    out.finish()
                    print(f"\r\nterminai-shim: command timed out after {timeout}s; the guest did not end it, so the "
                          "VM was stopped", file=sys.stderr)  # fmt: skip
                    return TIMEOUT_EXIT
        finally:
            out.finish()
            err.finish()
            if tty:
                restore_terminal_modes(sys.stdout.buffer)
        if status.timed_out:
            print(f"terminai-shim: command timed out after {timeout}s and was killed", file=sys.stderr)
            return TIMEOUT_EXIT
        if status.truncated:  # never silently: the agent says it cut a stream
            print(f"terminai-shim: the command's {' and '.join(status.truncated)} was cut short by the guest agent "
                  f"(it exited {status.exit_code}); what was shown is incomplete", file=sys.stderr)  # fmt: skip
            return SHIM_FAILED
        return status.exit_code


__all__ = [
    "SHIM_FAILED",
    "TIMEOUT_EXIT",
    "restore_terminal_modes",
    "run_command",
    "terminal_size",
]
