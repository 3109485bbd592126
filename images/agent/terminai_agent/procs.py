"""Child processes run on the host's behalf.

Each command runs in its own session (so its whole process group can be
killed), with three pipes. Exit statuses come from the server's SIGCHLD
handling, never from ``Popen.wait``, because as PID 1 the agent also reaps
orphans and must not lose a tracked child's status to that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
TYPE_CHECKING = False  # not typing's: importing typing costs ~15 ms at boot
if TYPE_CHECKING:
    from typing import Any

# After the main process exits, its pipes are read this long at most; then
# the rest of its process group is killed, so nothing outlives the command.
EXIT_GRACE = 0.5


class Process:
    """A running command and everything the loop tracks about it."""

    def __init__(self, id: int, conn: Any, popen: subprocess.Popen[bytes], output_cap: int, deadline: float | None):
        self.id = id
        self.conn = conn  # the connection that owns it (server.Conn)
        self.popen = popen
        self.output_cap = output_cap
        self.deadline = deadline
        self.started = time.monotonic()
        self.stdin_buf = bytearray()
        self.stdin_close = False
        self.sent = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}
        self.open_fds: dict[int, str] = {}
        self.status: int | None = None
        self.exited_at: float | None = None
        self.timed_out = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, sig)
        except OSError:
            pass

    def exit_fields(self) -> dict[str, Any]:
        status = self.status if self.status is not None else 0
        fields: dict[str, Any] = {
            "code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": self.timed_out,
            "truncated": [name for name, cut in self.truncated.items() if cut],
            "duration": round((self.exited_at or time.monotonic()) - self.started, 6),
        }
        return fields


def base_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


def spawn(argv: list[str], cwd: str | None, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` with piped stdio in a new session. Raises OSError if it cannot run."""
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        assert pipe is not None
        os.set_blocking(pipe.fileno(), False)
    return popen


def parse_signal(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal, name, None)
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise ValueError(f"unknown signal {value!r}")
