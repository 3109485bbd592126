"""Child processes run on the host's behalf.

Each command runs in its own session (so its whole process group can be
killed), with three pipes, or on a pseudo-terminal of its own (``pty``:
the terminal is its controlling terminal and its stdin, stdout and stderr,
so programs that check ``isatty`` behave as they do for a person). Exit statuses come from the server's SIGCHLD
handling, because as PID 1 the agent also reaps orphans and must not lose a
tracked child's status to that.

``spawn`` is small rather than ``subprocess.Popen``: importing subprocess
(with threading and locale) costs about 0.1 s of boot time under
emulation, and the agent needs none of its generality. In the VM, the
agent starts commands with ``posix_spawn`` (``start_spawned``); a ``fork``
(``Forker``) only where the child must do more before it execs.
"""

from __future__ import annotations

import os
import time

try:  # the C module: signal.py wraps it in enums, and enum's imports cost ~0.2 s of boot under TCG
    import _signal as signal
except ImportError:  # another Python: the same calls through the public module
    import signal  # type: ignore[no-redef]

TYPE_CHECKING = False  # not typing's: importing typing costs ~15 ms at boot
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGTERM,
                   signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)  # fmt: skip

# A command's output pipes hold this much (the kernel's default is 64 KiB):
# fewer wake-ups of the agent, and larger frames for the same bytes.
OUTPUT_PIPE = 1 << 20
F_SETPIPE_SZ = 1031

# After the main process exits, its pipes are read this long at most; then
# the rest of its process group is killed, so nothing outlives the command.
EXIT_GRACE = 0.5


class Process:
    """A running command and everything the loop tracks about it.

    On a pseudo-terminal ``terminal`` is the master side: its output is one
    stream (``stdout``) and input goes to a duplicate of it (``stdin``)."""

    def __init__(
        self,
        id: int,
        conn: Any,
        pid: int,
        fds: tuple[int, int, int],
        output_cap: int,
        deadline: float | None,
        terminal: int | None = None,
    ):
        self.id = id
        self.conn = conn  # the connection that owns it (server.Conn)
        self.pid = pid
        self.terminal = terminal
        stdin, stdout, stderr = fds
        self.open_fds: dict[int, str] = {stdout: "stdout", stdin: "stdin"}
        if stderr >= 0:
            self.open_fds[stderr] = "stderr"
        self.output_cap = output_cap
        self.deadline = deadline
        self.started = time.monotonic()
        self.stdin_buf = bytearray()
        self.stdin_close = False
        self.sent = {"stdout": 0, "stderr": 0}
        self.truncated = {"stdout": False, "stderr": False}
        self.status: int | None = None
        self.exited_at: float | None = None
        self.timed_out = False

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.pid, sig)
        except OSError:
            pass

    def exit_fields(self) -> dict[str, Any]:
        status = self.status if self.status is not None else 0
        return {
            "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": self.timed_out,
            "truncated": [name for name, cut in self.truncated.items() if cut],
            "duration": round((self.exited_at or time.monotonic()) - self.started, 6),
        }


def base_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }


def proxy_env(proxy: str) -> dict[str, str]:
    """Both spellings: tools disagree on which one they read."""
    no_proxy = "localhost,127.0.0.1,::1"
    return {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}  # fmt: skip


PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST = 40


def confine_descendants() -> None:
    """In the VM's init, once: nothing it starts from now on can ever hold a
    capability (an empty bounding set, ``no_new_privs``; both are inherited
    and survive exec). Init itself keeps its own capabilities: the bounding
    set limits only what an exec grants, and init never execs. A command
    keeps uid 0, so it reads and writes what root owns (the image, the
    workspace as the host maps it), but it cannot trace PID 1 or take its
    descriptors (the agent channel), load code into the kernel, reconfigure
    the network, mount, or reboot.

    Done in init rather than in each child, so that commands start with
    ``posix_spawn`` (a vfork: nothing of the agent is copied), not a fork
    of the whole Python process: under emulation that halved a command's
    start. Checked after: a capability still in the set raises."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(CAP_LAST + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "no_new_privs")
    kept = [cap for cap in range(CAP_LAST + 1) if libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1]
    if kept:
        raise OSError(0, f"capabilities {kept} are still in the bounding set")


def set_window(fd: int, cols: int, rows: int) -> None:
    """The terminal's size; the kernel sends SIGWINCH to its foreground
    process group when it changes."""
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def foreground_group(terminal: int, fallback: int) -> int:
    """Who a keyboard signal reaches: the terminal's foreground process group."""
    try:
        return os.tcgetpgrp(terminal)
    except OSError:
        return fallback


class Stdio:
    """A command's standard streams: three pipes, or a new pseudo-terminal.

    ``child`` are the command's ends (stdin, stdout, stderr), ``parent`` the
    agent's (on a terminal: a duplicate of the master side for input, the
    master for output, and -1), ``tty`` the terminal's path."""

    __slots__ = ("child", "parent", "tty")

    def __init__(self, window: tuple[int, int] | None) -> None:
        self.tty: str | None = None
        if window is not None:
            master, slave = os.openpty()  # both close-on-exec (PEP 446)
            try:
                set_window(slave, *window)
                self.tty = os.ttyname(slave)
                self.child, self.parent = (slave, slave, slave), (os.dup(master), master, -1)
            except BaseException:
                os.close(master)
                os.close(slave)
                raise
            return
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        _grow_pipe(out_r)
        _grow_pipe(err_r)
        self.child, self.parent = (in_r, out_w, err_w), (in_w, out_r, err_r)

    @classmethod
    def passed(cls, child: tuple[int, int, int], tty: bool) -> Stdio:
        """The command's ends, received from another process (the root launcher's side)."""
        stdio = cls.__new__(cls)
        stdio.child, stdio.parent = child, (-1, -1, -1)
        stdio.tty = os.ttyname(child[0]) if tty else None
        return stdio

    def close_child(self) -> None:
        for fd in set(self.child):
            os.close(fd)

    def close_parent(self) -> None:
        for fd in self.parent:
            if fd >= 0:
                os.close(fd)


def spawn(
    argv: list[str],
    cwd: str | None,
    env: dict[str, str],
    start: Any,
    window: tuple[int, int] | None = None,
) -> tuple[int, tuple[int, int, int]]:
    """Start ``argv`` in a new session with piped stdio, or on a new
    pseudo-terminal of ``window`` (cols, rows), through ``start``
    (``start_spawned``, ``Forker`` or the root launcher).

    Returns the pid and the parent's (stdin, stdout, stderr) ends, all
    non-blocking. Raises OSError, with the child's errno, if the command
    could not be executed (so "never ran" is told apart from "ran and failed").
    """
    stdio = Stdio(window)
    try:
        pid = start(argv, cwd, env, stdio)
    except BaseException:
        stdio.close_child()
        stdio.close_parent()
        raise
    stdio.close_child()
    for fd in stdio.parent:
        if fd >= 0:
            os.set_blocking(fd, False)
    return pid, stdio.parent


def find_program(name: str, path: str) -> str:
    """Where ``execvp`` would find ``name`` on ``path`` (the command's own
    PATH, not the agent's)."""
    if "/" in name:
        return name
    denied = None
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = candidate
    if denied is not None:
        raise PermissionError(13, os.strerror(13), denied)
    raise FileNotFoundError(2, os.strerror(2), name)


def start_spawned(argv: list[str], cwd: str | None, env: dict[str, str], stdio: Stdio) -> int:
    """``posix_spawn`` from the agent itself: a new session, default
    signals and mask, the streams in place; a terminal is opened by path
    after ``setsid``, which makes it the controlling terminal. The agent
    is one thread, so it enters ``cwd`` for the spawn and leaves it after
    (posix_spawn has no chdir here). For the VM's init after
    ``confine_descendants``."""
    if stdio.tty is not None:
        actions = [(os.POSIX_SPAWN_OPEN, 0, stdio.tty, os.O_RDWR, 0),
                   (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]  # fmt: skip
    else:
        actions = [(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(stdio.child)]
    if cwd:
        os.chdir(cwd)
    try:
        program = find_program(argv[0], env.get("PATH", os.defpath))
        return os.posix_spawn(program, argv, env, file_actions=actions, setsid=True, setsigdef=DEFAULT_SIGNALS,
                              setsigmask=())  # fmt: skip
    finally:
        if cwd:
            os.chdir("/")


class Forker:
    """``fork`` and ``exec``: where a child must do more than posix_spawn
    can before it execs (install a syscall filter in a container; start a
    command from the root launcher, whose own state the agent's differs from)."""

    def __init__(self, syscall_filter: Any = None, domains: Any = None) -> None:
        self.syscall_filter = syscall_filter
        self.domains = domains  # landlock.Domains: each command in a domain of its own

    def __call__(self, argv: list[str], cwd: str | None, env: dict[str, str], stdio: Stdio) -> int:
        in_r, out_w, err_w = stdio.child
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:
            os.close(report_r)
            os.close(report_w)
            raise
        if pid == 0:  # child: nothing here may return
            try:
                os.setsid()
                if stdio.tty is not None:  # the new session's controlling terminal
                    import fcntl
                    import termios

                    fcntl.ioctl(in_r, termios.TIOCSCTTY, 0)
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                for sig in DEFAULT_SIGNALS:  # the agent ignores some; a command starts with none ignored
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                if cwd:
                    os.chdir(cwd)
                if self.domains is not None:
                    self.domains.enter()
                if self.syscall_filter is not None:
                    self.syscall_filter.install()
                os.execvpe(argv[0], argv, env)
            except OSError as exc:
                os.write(report_w, str(exc.errno or 0).encode())
            except BaseException:
                os.write(report_w, b"0")
            finally:
                os._exit(127)
        os.close(report_w)
        report = b""
        while chunk := os.read(report_r, 64):
            report += chunk
        os.close(report_r)
        if report:  # exec failed: the child has exited; collect it now
            os.waitpid(pid, 0)
            code = int(report) or 0
            raise OSError(code, os.strerror(code) if code else "exec failed")
        return pid


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, status) of every child that has ended, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _grow_pipe(fd: int) -> None:
    import fcntl  # built in, or loaded before the seal by init

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, OUTPUT_PIPE)
    except OSError:  # over the system's limit for this user: the default size still works
        pass


def wake_on_sigchld(fd: int) -> None:
    """A byte on ``fd`` for every SIGCHLD, so the event loop (not a signal
    handler) reaps children."""
    signal.set_wakeup_fd(fd)
    signal.signal(signal.SIGCHLD, lambda *_: None)


def parse_signal(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        # SIG_DFL, SIG_IGN, SIG_BLOCK...: constants of the module, not signals
        sig = getattr(signal, name, None) if "_" not in name else None
        if isinstance(sig, int):
            return int(sig)
    raise ValueError(f"unknown signal {value!r}")
