"""The root launcher: where ``user: root`` commands start in the VM.

The VM's init empties its capability bounding set before the first command
(``procs.confine_descendants``), so that every command it spawns itself is
confined without a fork of the agent. A command that is to keep every
capability therefore cannot come from init any more: it comes from this
process, forked from init just before, with init's capabilities and full
bounding set. It does one thing: on a request from init (over a socket
pair only the two hold), it forks and execs the command on the streams init
passed with the request, and reports the pid, then the exit status.

It is not dumpable and holds capabilities a command lacks, so a command
cannot trace it or reach its descriptors; a command can kill it (same uid),
and then ``user: root`` commands are refused, and those it started are
reaped by init.
"""

from __future__ import annotations

import array
import marshal
import os
import select
import socket

from .procs import Forker, Stdio, reaped

try:
    import _signal as signal
except ImportError:  # another Python
    import signal  # type: ignore[no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_MESSAGE = 1 << 20
REPLY_TIMEOUT = 30.0


class LauncherGone(OSError):
    pass


class Launcher:
    """Init's side."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                _serve(theirs)
            finally:
                os._exit(0)
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.pid = pid
        self.exited: list[tuple[int, int]] = []  # (pid, status) read while waiting for a reply
        self.gone = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def __call__(self, argv: list[str], cwd: str | None, env: dict[str, str], stdio: Stdio) -> int:
        """A ``spawn`` start function: the command starts in the launcher."""
        if self.gone:
            raise LauncherGone(1, "the root launcher has ended (a command stopped it); start a new session")
        fds = sorted(set(stdio.child))
        layout = [fds.index(fd) for fd in stdio.child]
        message = marshal.dumps((argv, cwd, env, stdio.tty is not None, layout))
        try:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except (BrokenPipeError, ConnectionResetError):
            self.gone = True
            raise LauncherGone(1, "the root launcher has ended (a command stopped it); start a new session") from None
        except OSError:  # EMSGSIZE: this request is too large for one message; the launcher is fine
            raise OSError(7, "the arguments and environment are too large for a root command") from None
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            if not poller.poll(REPLY_TIMEOUT * 1000):
                raise LauncherGone(110, "the root launcher did not answer")
            for reply in self.read():
                if reply[0] == "started":
                    return int(reply[1])
                if reply[0] == "failed":
                    code = int(reply[1])
                    raise OSError(code, os.strerror(code) if code else "exec failed")
            if self.gone:
                raise LauncherGone(1, "the root launcher has ended (a command stopped it); start a new session")

    def read(self) -> list[tuple[Any, ...]]:
        """Messages waiting; exit statuses go to ``exited``, the rest are returned."""
        replies = []
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return replies
            except OSError:
                data = b""
            if not data:
                self.gone = True
                return replies
            try:
                message = marshal.loads(data)
            except (EOFError, ValueError, TypeError):
                continue
            if isinstance(message, tuple) and message and message[0] == "exited" and len(message) == 3:
                self.exited.append((int(message[1]), int(message[2])))
            elif isinstance(message, tuple) and len(message) == 2:
                replies.append(message)


def _serve(sock: socket.socket) -> None:
    """The launcher's loop: requests from init, and its children's exits."""
    keep = sock.fileno()
    os.closerange(3, keep)  # init's channel, listeners, epoll: none of them are ours
    os.closerange(keep + 1, 1 << 16)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    from .landlock import Domains

    domains = Domains()
    start = Forker(domains=domains if domains.available else None)
    poller = select.poll()
    poller.register(keep, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                _report_exits(sock)
                continue
            message, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 3))
            if not message:
                return  # init is gone
            fds: list[int] = []
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
            try:
                argv, cwd, env, tty, layout = marshal.loads(message)
                stdio = Stdio.passed(tuple(fds[i] for i in layout), tty)
                sock.send(marshal.dumps(("started", start(argv, cwd, env, stdio))))
            except OSError as exc:
                sock.send(marshal.dumps(("failed", exc.errno or 0)))
            except Exception:
                sock.send(marshal.dumps(("failed", 0)))
            finally:
                for fd in fds:
                    os.close(fd)
            _report_exits(sock)


def _report_exits(sock: socket.socket) -> None:
    for pid, status in reaped():
        sock.send(marshal.dumps(("exited", pid, status)))
