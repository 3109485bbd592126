"""``terminai-shim run``: one command in a fresh VM, with live stdio.

Exit codes follow timeout(1) and env(1): the command's own code; 124 when
the timeout killed it; 125 when the shim failed before the command ran;
128+N when a signal N ended it.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from .errors import ShimError
from .models import BootConfig
from .session import Session

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


def run_command(config: BootConfig, command: list[str], *, shell: bool, timeout: float | None, verbose: bool) -> int:
    if verbose:
        print("terminai-shim: starting the isolation tier ...", file=sys.stderr)
    with Session.boot(config) as session:
        if verbose:
            what = session.describe()["displayName"]
            why = session.accel.reason if session.backend.isolation == "microvm" else "a Docker engine answers"
            print(f"terminai-shim: {what} ready in {session.boot_seconds:.2f}s ({why})", file=sys.stderr)
        out = sys.stdout.buffer
        err = sys.stderr.buffer

        def on_event(name: str, value: Any) -> None:
            stream = out if name == "stdout" else err if name == "stderr" else None
            if stream is not None:
                stream.write(value)
                stream.flush()

        interactive_stdin = not sys.stdin.closed and not sys.stdin.isatty() if sys.stdin else False
        kwargs: dict[str, Any] = {"timeout": timeout, "stdin_open": interactive_stdin, "on_event": on_event,
                                  "cwd": config.workspace_mount if config.workspace else None}  # fmt: skip
        if shell:
            proc = session.client.exec(command=" ".join(command), shell=True, **kwargs)
        else:
            proc = session.client.exec(command, **kwargs)
        if interactive_stdin:
            threading.Thread(target=_pump_stdin, args=(proc,), daemon=True).start()
        status = proc.wait()
        if status.timed_out:
            print(f"terminai-shim: command timed out after {timeout}s and was killed", file=sys.stderr)
            return TIMEOUT_EXIT
        return status.exit_code
