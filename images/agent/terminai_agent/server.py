"""The agent's event loop: one thread, one selector, many concurrent requests.

Connections, child pipes and the SIGCHLD wake-up pipe all sit in a single
selector. A request never blocks the loop for long and never ends it: any
failure becomes an error reply. Output is read from a child only while its
connection's send buffer is below a high-water mark, so a slow host slows
the command instead of growing the agent's memory.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import time

from terminai_protocol import bootcontract as boot
from terminai_protocol import protocol as P

from . import __version__
from .procs import (
    EXIT_GRACE,
    OUTPUT_PIPE,
    Forker,
    Process,
    base_env,
    foreground_group,
    parse_signal,
    proxy_env,
    reaped,
    set_window,
    spawn,
    start_spawned,
    wake_on_sigchld,
)

TYPE_CHECKING = False  # not typing's: importing typing costs ~15 ms at boot
if TYPE_CHECKING:
    import socket
    from typing import Any

HIGH_WATER = 4 << 20
READ_SIZE = 256 * 1024
WRITE_SIZE = 256 * 1024
IOV_PIECES = 16
OUTPUT_READ = OUTPUT_PIPE  # a command's output is read a pipe's worth at a time
DEFAULT_OUTPUT_CAP = 256 << 20
RECONNECT_POLL = 0.02


class Outbox:
    """Frames waiting for the host, written in place.

    A virtio-serial port takes at most 32 KiB per write, so a megabyte of
    output is dozens of writes: each takes a slice of the frame at the head
    (a view, not a copy) and nothing already queued is moved. (Deleting
    the written bytes from the front of one buffer moved the whole backlog
    on every write, and under emulation that copying was most of the cost
    of streaming output.)"""

    __slots__ = ("frames", "offset", "pending")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.offset = 0  # bytes of frames[0] already written
        self.pending = 0

    def __len__(self) -> int:
        return self.pending

    def append(self, *pieces: bytes) -> None:
        for piece in pieces:
            if piece:
                self.frames.append(piece)
                self.pending += len(piece)

    def clear(self) -> None:
        self.frames.clear()
        self.offset = self.pending = 0

    def write_to(self, fd: int) -> None:
        """Write until done or the descriptor would block (BlockingIOError):
        several queued pieces per system call (a frame's header and its body
        are two), never more than WRITE_SIZE."""
        while self.frames:
            views, size = [], 0
            for i, piece in enumerate(self.frames[:IOV_PIECES]):
                view = memoryview(piece)[self.offset if i == 0 else 0 :][: WRITE_SIZE - size]
                views.append(view)
                size += len(view)
                if size >= WRITE_SIZE:
                    break
            n = os.writev(fd, views)
            self.pending -= n
            n += self.offset
            while self.frames and n >= len(self.frames[0]):
                n -= len(self.frames.pop(0))
            self.offset = n


class Conn:
    """One host connection (a virtio-serial port, or an accepted socket)."""

    def __init__(self, fd: int, reconnectable: bool, sock: socket.socket | None, max_frame: int) -> None:
        self.fd = fd
        # A virtio-serial port: EOF means "no host connected now", not "gone".
        self.reconnectable = reconnectable
        self.sock = sock
        self.decoder = P.Decoder(max_frame)
        self.out = Outbox()
        self.greeted = False
        self.peer_max = P.DEFAULT_MAX_FRAME
        self.down_until = 0.0
        self.closed = False

    @property
    def chunk(self) -> int:
        """Output read per event: as much as a frame the host takes can hold."""
        return min(OUTPUT_READ, self.peer_max - 1024)


class AgentConfig:
    def __init__(
        self,
        pid1: bool = False,
        max_frame: int = P.DEFAULT_MAX_FRAME,
        workspace: str | None = None,
        network: str | None = None,
        proxy: str | None = None,
        deny: str | None = None,
        container: bool = False,
    ):
        self.pid1 = pid1
        self.container = container
        self.deny = deny  # networks commands may not reach (open mode): reject routes
        self.max_frame = max_frame
        self.session = new_session_id()
        self.workspace = workspace
        self.network = network  # ADDR/PREFIX,GATEWAY,DNS for eth0 (init.configure_network)
        self.proxy = proxy  # the allowlist proxy every command is pointed at
        self.marks: dict[str, float] = {}
        self.layers: list[str] = []  # the root filesystem's layers PID 1 mounted, bottom first


def new_session_id() -> str:
    return os.urandom(16).hex()


READ = select.EPOLLIN
WRITE = select.EPOLLOUT
_HANGUP = select.EPOLLHUP | select.EPOLLERR


class Server:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # epoll directly rather than selectors: one import less on the boot path.
        self.epoll = select.epoll()
        self.fd_data: dict[int, Any] = {}
        self.conns: list[Conn] = []
        self.listeners: list[socket.socket] = []
        self.procs: dict[tuple[int, int], Process] = {}
        self.registered: dict[int, int] = {}
        self.running = True
        self.shutdown_requested = False
        self.started = time.monotonic()
        # Bringing up lo needs the socket module: done before the first
        # command rather than on the boot path.
        self.lo_pending = config.pid1
        self.unsafe: str | None = None  # why no command may run here (a set-up step that failed)
        self.random_fd = -1  # the VM's init keeps /dev/random open for freshen
        syscall_filter = None
        if config.container:  # a shared kernel and a bind-mounted workspace: no setuid files (seccomp.py)
            from .seccomp import for_commands

            syscall_filter = for_commands()
        # How commands start: forked (a container's syscall filter goes in
        # the child), or, in the VM once init is confined, spawned by init
        # (``user``) or by the root launcher (``root``).
        domains = None
        if config.container:  # in the VM, init decides with the rest of its confinement (_confine_commands)
            from .landlock import Domains

            domains = Domains()
            if not domains.available:
                self._log(f"commands of this container are not kept apart: {domains.why_not}")
                domains = None
        self.start_user: Any = _not_confined if config.pid1 else Forker(syscall_filter, domains)
        self.start_root: Any = self.start_user
        self.launcher: Any = None
        if config.pid1:
            from .init import open_random

            self.random_fd = open_random()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sigchld_fd = rfd
        wake_on_sigchld(wfd)
        self._want(rfd, READ, ("sigchld", None))

    # -- registration -------------------------------------------------------
    def _want(self, fd: int, events: int, data: Any) -> None:
        current = self.registered.get(fd, 0)
        if events:
            self.fd_data[fd] = data
        else:
            self.fd_data.pop(fd, None)
        if events == current:
            return
        if current == 0:
            self.epoll.register(fd, events)
        elif events == 0:
            self.epoll.unregister(fd)
        else:
            self.epoll.modify(fd, events)
        if events:
            self.registered[fd] = events
        else:
            self.registered.pop(fd, None)

    def add_conn(self, fd: int, reconnectable: bool, sock: socket.socket | None = None) -> None:
        self.conns.append(Conn(fd, reconnectable, sock, self.config.max_frame))

    def add_listener(self, sock: socket.socket) -> None:
        self.listeners.append(sock)
        self._want(sock.fileno(), READ, ("listen", sock))

    # -- main loop ------------------------------------------------------------
    def run(self) -> None:
        while self.running:
            now = time.monotonic()
            self._update_interest(now)
            timeout = self._next_timeout(now)
            for fd, mask in self.epoll.poll(-1 if timeout is None else timeout):
                data = self.fd_data.get(fd)
                if data is None:
                    continue
                what, obj = data
                if mask & _HANGUP:
                    mask |= self.registered.get(fd, 0)  # let the read or write see the hang-up
                try:
                    if what == "conn":
                        if mask & WRITE:
                            self._flush(obj)
                        if mask & READ and not obj.closed:
                            self._read_conn(obj)
                    elif what == "out":
                        self._read_output(*obj)
                    elif what == "stdin":
                        self._write_stdin(obj)
                    elif what == "listen":
                        self._accept(obj)
                    elif what == "sigchld":
                        self._drain_sigchld()
                    elif what == "launcher":
                        obj.read()
                        if obj.gone:
                            self._want(fd, 0, None)
                except Exception as exc:  # the loop must survive anything
                    self._log(f"internal error handling {what}: {exc!r}")
            self._reap()
            self._check_deadlines(time.monotonic())
            if self.shutdown_requested and not any(c.out for c in self.conns if not c.closed):
                self.running = False

    def _update_interest(self, now: float) -> None:
        for conn in list(self.conns):
            if conn.closed:
                self._want(conn.fd, 0, None)
                self.conns.remove(conn)
                continue
            events = 0
            if conn.down_until <= now:
                events |= READ
                if conn.out:
                    events |= WRITE
            self._want(conn.fd, events, ("conn", conn))
        for proc in self.procs.values():
            congested = len(proc.conn.out) >= HIGH_WATER or proc.conn.closed
            for fd, name in proc.open_fds.items():
                if name == "stdin":
                    self._want(fd, WRITE if proc.stdin_buf else 0, ("stdin", proc))
                else:
                    self._want(fd, 0 if congested else READ, ("out", (proc, fd)))

    def _next_timeout(self, now: float) -> float | None:
        times = [c.down_until for c in self.conns if c.down_until > now]
        for p in self.procs.values():
            if p.deadline is not None and p.status is None:
                times.append(p.deadline)
            if p.exited_at is not None:
                times.append(p.exited_at + EXIT_GRACE)
        return max(0.0, min(times) - now) if times else None

    # -- connections ------------------------------------------------------------
    def _accept(self, sock: socket.socket) -> None:
        from .channels import from_host

        try:
            client, peer = sock.accept()
        except BlockingIOError:
            return
        if not from_host(client, peer, self.config.container):
            self._log(f"refused a connection from inside the guest ({peer!r})")
            client.close()
            return
        client.setblocking(False)
        self.add_conn(client.fileno(), False, client)

    def _read_conn(self, conn: Conn) -> None:
        try:
            data = os.read(conn.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            self._log(f"read error on channel: {exc}")
        if not data:
            self._disconnected(conn)
            return
        for item in conn.decoder.feed(data):
            if isinstance(item, P.ProtocolError):
                self._send(conn, P.error(0, item.code, item.message))
            else:
                self._handle(conn, item)

    def _disconnected(self, conn: Conn) -> None:
        """The host went away: its commands die with its connection."""
        for key, proc in list(self.procs.items()):
            if proc.conn is conn:
                proc.kill_group()
                self._close_proc_fds(proc)
                del self.procs[key]
        conn.decoder.reset()
        conn.out.clear()
        conn.greeted = False
        if conn.reconnectable:
            self._want(conn.fd, 0, None)
            conn.down_until = time.monotonic() + RECONNECT_POLL
        else:
            conn.closed = True
            self._want(conn.fd, 0, None)
            if conn.sock is not None:
                conn.sock.close()
            else:
                os.close(conn.fd)

    def _send(self, conn: Conn, frame: bytes | tuple[bytes, bytes]) -> None:
        """``frame``: whole, or as ``P.encode_parts`` gives it (a large body is queued as it is)."""
        if conn.closed:
            return
        conn.out.append(*(frame if isinstance(frame, tuple) else (frame,)))
        if len(conn.out) < HIGH_WATER:
            self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        try:
            conn.out.write_to(conn.fd)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENODEV):
                self._disconnected(conn)
                return
            raise

    # -- requests -----------------------------------------------------------------
    def _handle(self, conn: Conn, frame: P.Frame) -> None:
        header = frame.header
        rid = frame.id
        if header.get("kind") != P.REQUEST or not isinstance(header.get("id"), int):
            self._send(conn, P.error(rid, P.BAD_REQUEST, "expected a request with an integer id"))
            return
        op = header.get("op")
        if op != "hello" and not conn.greeted:
            self._send(conn, P.error(rid, P.HELLO_REQUIRED, "send hello first"))
            return
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op in P.OPS else None
        if handler is None:
            self._send(conn, P.error(rid, P.UNKNOWN_OP, f"unknown operation {op!r}"))
            return
        try:
            handler(conn, rid, header, frame.body)
        except P.ProtocolError as exc:
            self._send(conn, P.error(rid, exc.code, exc.message))
        except FileNotFoundError as exc:
            self._send(conn, P.error(rid, P.NOT_FOUND, str(exc)))
        except OSError as exc:
            self._send(conn, P.error(rid, P.IO_ERROR, str(exc), errno=exc.errno))
        except (KeyError, TypeError, ValueError) as exc:
            self._send(conn, P.error(rid, P.BAD_REQUEST, f"bad {op} request: {exc!r}"))
        except Exception as exc:
            self._send(conn, P.error(rid, P.INTERNAL, f"{op} failed: {exc!r}"))

    def op_hello(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        versions = [v for v in h.get("versions", [P.AGENT_PROTOCOL_VERSION]) if v in P.SUPPORTED_VERSIONS]
        if not versions:
            raise P.ProtocolError(P.VERSION_MISMATCH, f"agent speaks versions {list(P.SUPPORTED_VERSIONS)}")
        if conn.greeted:  # a new host session on the same channel: forget the old one
            for key, proc in list(self.procs.items()):
                if proc.conn is conn:
                    proc.kill_group()
                    self._close_proc_fds(proc)
                    del self.procs[key]
        peer_max = int(h.get("max_frame", P.DEFAULT_MAX_FRAME))
        conn.peer_max = max(P.MIN_MAX_FRAME, peer_max)
        conn.greeted = True
        self._send(
            conn,
            P.result(
                rid,
                version=max(versions),
                agent=__version__,
                session=self.config.session,
                max_frame=self.config.max_frame,
                python=sys.executable,
                pid1=self.config.pid1,
                layers=self.config.layers,
                # Milliseconds as integers: the first answer of a restored VM
                # runs on cold code, and float formatting is a lot of it.
                uptime_ms=int((time.monotonic() - self.started) * 1000),
                kernel_uptime_ms=int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000),
                marks_ms={k: int(v * 1000) for k, v in self.config.marks.items()},
            ),
        )

    def op_ping(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        self._send(
            conn,
            P.result(rid, pong=True, time_ms=time.time_ns() // 1_000_000, session=self.config.session),
        )

    def op_exec(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        if (conn.fd, rid) in self.procs:
            raise P.ProtocolError(P.BAD_REQUEST, f"request id {rid} is already a running process")
        argv = h.get("argv")
        command = h.get("command")
        if h.get("shell"):
            if not isinstance(command, str):
                raise P.ProtocolError(P.BAD_REQUEST, "shell=true needs a 'command' string")
            argv = ["/bin/sh", "-c", command]
        elif command is not None:
            raise P.ProtocolError(P.BAD_REQUEST, "a command string runs only with shell=true; send argv instead")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise P.ProtocolError(P.BAD_REQUEST, "argv must be a non-empty list of strings")
        window = _window(h["pty"]) if h.get("pty") is not None else None
        env = base_env()
        if window is not None:
            env["TERM"] = _term(h["pty"])
        if self.config.proxy:
            env.update(proxy_env(self.config.proxy))
        extra = h.get("env") or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise P.ProtocolError(P.BAD_REQUEST, "env must map strings to strings")
        env.update(extra)
        cwd = h.get("cwd") or None
        if cwd is not None and not isinstance(cwd, str):
            raise P.ProtocolError(P.BAD_REQUEST, "cwd must be a string")
        user = h.get("user", "user")
        if user not in ("user", "root"):
            raise P.ProtocolError(P.BAD_REQUEST, "user must be 'user' (no capabilities) or 'root'")
        # Everything is checked before the fork: a refused request never leaves a process behind.
        timeout = float(h["timeout"]) if h.get("timeout") else None
        cap = int(h["output_cap"]) if h.get("output_cap") is not None else DEFAULT_OUTPUT_CAP
        if (timeout is not None and timeout <= 0) or cap < 0:
            raise P.ProtocolError(P.BAD_REQUEST, "timeout must be positive and output_cap not negative")
        if self.unsafe:
            raise P.ProtocolError(P.SPAWN_FAILED, f"commands are refused in this VM: {self.unsafe}")
        if self.lo_pending:
            self.lo_pending = False
            self._before_first_command()
        try:
            pid, fds = spawn(argv, cwd, env, self.start_user if user == "user" else self.start_root, window)
        except OSError as exc:
            self._send(conn, P.error(rid, P.SPAWN_FAILED, f"cannot run {argv[0]!r}: {exc.strerror or exc}", ran=False))
            return
        proc = Process(
            id=rid,
            conn=conn,
            pid=pid,
            fds=fds,
            output_cap=cap,
            deadline=(time.monotonic() + timeout) if timeout else None,
            terminal=fds[1] if window is not None else None,
        )
        proc.stdin_buf += body
        if window is None:  # a terminal stays open for input while the command runs (close_stdin types ^D)
            proc.stdin_close = not h.get("stdin_open", False)
        self.procs[(conn.fd, rid)] = proc
        self._send(conn, P.result(rid, pid=pid))
        self._write_stdin(proc)

    def _before_first_command(self) -> None:
        """The VM's init, once, before anything the host asked for runs (off
        the boot path): the network, and the places a command without
        capabilities but with uid 0 could still reach PID 1 through are
        closed (``init.seal``)."""
        from .init import configure_network, loopback_up, seal

        self._confine_commands()
        try:
            loopback_up()
            if self.config.network:
                configure_network(self.config.network, self.config.deny)
        except OSError as exc:  # without its reject routes the network policy would not hold
            self.unsafe = f"the network policy could not be set up ({exc})"
        try:
            seal()
        except OSError as exc:
            self.unsafe = f"the VM could not be sealed ({exc})"
        if self.unsafe:  # fail closed: this command and every later one
            self._log(self.unsafe)
            raise P.ProtocolError(P.SPAWN_FAILED, f"commands are refused in this VM: {self.unsafe}")

    def _confine_commands(self) -> None:
        """The root launcher first (it keeps every capability for ``user:
        root`` commands), then init confines everything it starts from now
        on; only then do commands start with posix_spawn. If any of it
        fails, no command runs (``unsafe``)."""
        from .landlock import Domains, InOwnDomain
        from .launcher import Launcher
        from .procs import confine_descendants

        domains = Domains()
        if not domains.available:  # commands of one session could read and trace one another
            self.unsafe = f"commands cannot be kept apart: {domains.why_not}"
            return
        try:
            self.launcher = Launcher()
            self._want(self.launcher.fileno(), READ, ("launcher", self.launcher))
            confine_descendants()
        except OSError as exc:
            self.unsafe = f"commands could not be confined ({exc})"
            return
        self.start_user, self.start_root = InOwnDomain(start_spawned, domains), self.launcher

    def _target(self, conn: Conn, h: dict[str, Any]) -> Process:
        proc = self.procs.get((conn.fd, h.get("target")))  # type: ignore[arg-type]
        if proc is None:
            raise P.ProtocolError(P.NO_SUCH_PROCESS, f"no running process with id {h.get('target')!r}")
        return proc

    def op_write_stdin(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        proc = self._target(conn, h)
        if proc.stdin_close or "stdin" not in proc.open_fds.values():
            raise P.ProtocolError(P.BAD_REQUEST, "stdin is closed")
        proc.stdin_buf += body
        self._write_stdin(proc)
        self._send(conn, P.result(rid, queued=len(proc.stdin_buf)))

    def op_close_stdin(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        proc = self._target(conn, h)
        if proc.terminal is not None:  # a terminal is not closed: end of input is typed, as a person would
            proc.stdin_buf += b"\x04"
        else:
            proc.stdin_close = True
        self._write_stdin(proc)
        self._send(conn, P.result(rid))

    def op_resize(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        proc = self._target(conn, h)
        if proc.terminal is None:
            raise P.ProtocolError(P.BAD_REQUEST, "resize needs a process started with pty")
        if proc.status is None:
            set_window(proc.terminal, *_window(h))
        self._send(conn, P.result(rid))

    def op_signal(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        proc = self._target(conn, h)
        sig = parse_signal(h.get("signal", "SIGTERM"))
        if h.get("group", True) and proc.terminal is not None and proc.status is None:
            try:  # as the terminal would: its foreground job (a shell's child), else the session
                os.killpg(foreground_group(proc.terminal, proc.pid), sig)
            except OSError:
                proc.kill_group(sig)
        elif h.get("group", True):
            proc.kill_group(sig)
        elif proc.status is None:
            os.kill(proc.pid, sig)
        self._send(conn, P.result(rid))

    # -- files -------------------------------------------------------------------------
    # The host names a path; the agent (PID 1, with every right in the guest) opens
    # exactly that path and follows no symbolic link on the way or at its end: a link a
    # command planted in the workspace must not turn a read of a project file into a
    # read of /proc/1/environ, or a write into a write somewhere else (_beneath).
    def op_read(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        path = h["path"]
        offset = max(0, int(h.get("offset", 0)))
        limit = conn.peer_max - 4096
        length = max(0, min(int(h.get("length", limit)), limit))
        # Non-blocking and regular files only: a FIFO or a device must not
        # stall the agent's single loop (it is PID 1) or exhaust memory.
        with _Beneath(path) as (parent, name):
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=parent)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise P.ProtocolError(P.BAD_REQUEST, f"{path} is not a regular file")
            size = st.st_size
            f.seek(offset)
            data = f.read(length)
        self._send(conn, P.result(rid, data, size=size, offset=offset, eof=offset + len(data) >= size))

    def op_write(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        path = h["path"]
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        if h.get("truncate"):
            flags |= os.O_TRUNC
        if h.get("append"):
            flags |= os.O_APPEND
        with _Beneath(path, create=bool(h.get("create_dirs"))) as (parent, name):
            fd = os.open(name, flags, int(h.get("mode", 0o644)), dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise P.ProtocolError(P.BAD_REQUEST, f"{path} is not a regular file")
            if not h.get("append"):
                os.lseek(fd, int(h.get("offset", 0)), os.SEEK_SET)
            view = memoryview(body)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if h.get("fsync"):
                os.fsync(fd)
        finally:
            os.close(fd)
        self._send(conn, P.result(rid, written=len(body)))

    def op_stat(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        with _Beneath(h["path"]) as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)  # a link is reported as one
        self._send(conn, P.result(rid, **_stat_fields(st)))

    def op_list(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        path = h["path"]
        entries = []
        with _Beneath(path) as (parent, name):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                        entries.append({"name": entry.name, **_stat_fields(st)})
                    except OSError:
                        entries.append({"name": entry.name, "type": "unknown"})
        finally:
            os.close(fd)
        entries.sort(key=lambda e: e["name"])
        frame = P.result(rid, entries=entries)
        if len(frame) > conn.peer_max:
            raise P.ProtocolError(P.FRAME_TOO_LARGE, f"{path} has too many entries for one reply")
        self._send(conn, frame)

    def op_remove(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        with _Beneath(h["path"]) as (parent, name):
            if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=parent)
            else:
                if h.get("recursive"):
                    # Not shutil.rmtree: the agent imports nothing once commands run (init.seal says why).
                    # By descriptor, bottom up; a link (to a directory too) is unlinked, never followed.
                    for _root, dirs, files, fd in os.fwalk(name, topdown=False, dir_fd=parent):
                        for entry in files:
                            os.unlink(entry, dir_fd=fd)
                        for entry in dirs:
                            try:
                                os.rmdir(entry, dir_fd=fd)
                            except NotADirectoryError:
                                os.unlink(entry, dir_fd=fd)
                os.rmdir(name, dir_fd=parent)
        self._send(conn, P.result(rid))

    def op_mkdir(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        mode = int(h.get("mode", 0o755))
        parents = bool(h.get("parents"))
        with _Beneath(h["path"], create=parents) as (parent, name):
            try:
                os.mkdir(name, mode, dir_fd=parent)
            except FileExistsError:
                if not parents or not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise
        self._send(conn, P.result(rid))

    def op_rename(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        with _Beneath(h["src"]) as (src_dir, src), _Beneath(h["dst"]) as (dst_dir, dst):
            os.replace(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        self._send(conn, P.result(rid))

    # -- system ------------------------------------------------------------------------
    def op_mount(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        fstype = h.get("fstype", "9p")
        if not self.config.pid1:  # a container's engine mounts; a test's host is not to be touched
            raise P.ProtocolError(P.BAD_REQUEST, "mount is done by the VM's init only")
        if fstype not in ("9p", "virtiofs", "tmpfs", "bind"):
            raise P.ProtocolError(P.BAD_REQUEST, f"fstype {fstype!r} is not allowed")
        from .init import MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, mount

        target = h["target"]
        if fstype == "bind":  # a second place for what is already mounted (the workspace's alias), with its submounts
            os.makedirs(target, exist_ok=True)
            mount(h["source"], target, "", MS_BIND | MS_REC)
            self._send(conn, P.result(rid, target=target))
            return
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if h.get("readonly") else 0)
        if h.get("readonly") and not os.path.isdir(target):
            raise P.ProtocolError(P.NOT_FOUND, f"{target} is not a directory to cover")
        os.makedirs(target, exist_ok=True)
        options = h.get("options", boot.NINEP_OPTIONS if fstype == "9p" else "")
        mount(h["source"], target, fstype, flags, options)
        self._send(conn, P.result(rid, target=target))

    def op_freshen(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        """New randomness, clock and identity for a VM restored from a snapshot.
        Only the VM's init owns the machine's entropy pool, clock and host
        name: an agent that is not PID 1 (tests on the host) takes the
        session id alone."""
        if self.config.pid1:
            from .init import add_entropy, set_hostname

            if body:
                add_entropy(self.random_fd, body)
            if h.get("time"):
                time.clock_settime(time.CLOCK_REALTIME, float(h["time"]))
            if h.get("hostname"):
                set_hostname(str(h["hostname"]))
        self.config.session = str(h.get("session") or new_session_id())
        self._send(conn, P.result(rid, session=self.config.session))

    def op_prepare(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        """What would otherwise run before the first command (the network,
        the seal), now: the host sends this just before it saves a snapshot,
        so every VM restored from it starts with that done, and its first
        command does not pay for it on cold code. The settings come from the
        kernel command line, which is part of the snapshot's key."""
        if self.lo_pending:
            self.lo_pending = False
            self._before_first_command()
        self._send(conn, P.result(rid))

    def op_shutdown(self, conn: Conn, rid: int, h: dict[str, Any], body: bytes) -> None:
        """Commands end, then what they wrote is flushed (a workspace file
        written through a shared mapping is in the guest's page cache until
        then), and only then the answer: the host may stop the VM as soon as
        it has it, without waiting for the power-off."""
        for proc in list(self.procs.values()):
            proc.kill_group()
        os.sync()
        self._send(conn, P.result(rid))
        self.shutdown_requested = True

    # -- processes ------------------------------------------------------------------------
    def _write_stdin(self, proc: Process) -> None:
        fd = next((fd for fd, name in proc.open_fds.items() if name == "stdin"), None)
        if fd is None:
            proc.stdin_buf.clear()
            return
        while proc.stdin_buf:
            try:
                n = os.write(fd, proc.stdin_buf[:READ_SIZE])
            except BlockingIOError:
                return
            except OSError:  # the child closed its stdin: nothing more to deliver
                proc.stdin_buf.clear()
                break
            del proc.stdin_buf[:n]
        if proc.stdin_close:
            self._close_fd(proc, fd)

    def _read_output(self, proc: Process, fd: int) -> None:
        name = proc.open_fds.get(fd)
        if name is None:
            return
        try:
            data = os.read(fd, proc.conn.chunk)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd(proc, fd)
            return
        room = proc.output_cap - proc.sent[name]
        if room <= 0:
            proc.truncated[name] = True
            return
        if len(data) > room:
            data = data[:room]
            proc.truncated[name] = True
        proc.sent[name] += len(data)
        self._send(proc.conn, P.event_parts(proc.id, name, data))

    def _drain_outputs(self, proc: Process) -> None:
        """Send what is still buffered in the pipes before they are closed."""
        for fd, name in list(proc.open_fds.items()):
            if name == "stdin":
                continue
            for _ in range(64):  # at most a pipe's worth, in chunks
                if proc.open_fds.get(fd) is None:
                    break
                before = proc.sent[name]
                self._read_output(proc, fd)
                if proc.sent[name] == before:
                    break

    def _close_fd(self, proc: Process, fd: int) -> None:
        if proc.open_fds.pop(fd, None) is not None:
            self._want(fd, 0, None)
            os.close(fd)

    def _close_proc_fds(self, proc: Process) -> None:
        for fd in list(proc.open_fds):
            self._close_fd(proc, fd)

    def _drain_sigchld(self) -> None:
        try:
            while os.read(self.sigchld_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        by_pid = {p.pid: p for p in self.procs.values()}
        launched: list[tuple[int, int]] = []
        if self.launcher is not None:  # the root launcher's children: their statuses come from it
            launched, self.launcher.exited = self.launcher.exited, []
        for pid, status in [*launched, *reaped()]:
            proc = by_pid.get(pid)
            if proc is not None and proc.status is None:  # else an orphan re-parented to PID 1: just reaped
                proc.status = status
                proc.exited_at = time.monotonic()

    def _check_deadlines(self, now: float) -> None:
        for key, proc in list(self.procs.items()):
            if proc.status is None and proc.deadline is not None and now >= proc.deadline:
                proc.timed_out = True
                proc.kill_group()
                proc.deadline = None
            if proc.status is None:
                continue
            outputs_open = any(name != "stdin" for name in proc.open_fds.values())
            congested = len(proc.conn.out) >= HIGH_WATER and not proc.conn.closed
            if outputs_open and (congested or now < (proc.exited_at or now) + EXIT_GRACE):
                if congested:  # the grace period counts only while the host is reading
                    proc.exited_at = now
                continue
            proc.kill_group()
            self._drain_outputs(proc)
            self._close_proc_fds(proc)
            del self.procs[key]
            self._send(proc.conn, P.event(proc.id, "exit", **proc.exit_fields()))

    def _log(self, message: str) -> None:
        try:
            os.write(2, f"terminai-agent: {message}\n".encode())
        except OSError:
            pass


def _not_confined(*_: Any) -> int:
    """The VM's init starts nothing until it has confined what it starts."""
    raise PermissionError(1, "commands are not confined yet")


def _window(spec: Any) -> tuple[int, int]:
    """``{cols, rows}`` of a terminal, checked."""
    if not isinstance(spec, dict):
        raise P.ProtocolError(P.BAD_REQUEST, "pty must be an object {cols, rows, term?}")
    cols, rows = spec.get("cols"), spec.get("rows")
    for value in (cols, rows):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= P.MAX_WINDOW:
            raise P.ProtocolError(P.BAD_REQUEST, f"pty cols and rows must be whole numbers from 1 to {P.MAX_WINDOW}")
    return int(cols), int(rows)  # type: ignore[arg-type]


def _term(spec: dict[str, Any]) -> str:
    term = spec.get("term", "xterm-256color")
    if not isinstance(term, str) or not term or not term.replace("-", "").replace("+", "").isalnum():
        raise P.ProtocolError(P.BAD_REQUEST, "pty term must be a terminal name such as xterm-256color")
    return term


def _stat_fields(st: os.stat_result) -> dict[str, Any]:
    mode = st.st_mode
    kind = (
        "directory"
        if stat.S_ISDIR(mode)
        else "file"
        if stat.S_ISREG(mode)
        else "symlink"
        if stat.S_ISLNK(mode)
        else "other"
    )
    return {
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


class _Beneath:
    """``with _Beneath(path) as (parent, name)``: the directory that holds
    ``path``'s last component, opened from ``/`` one component at a time
    with ``O_NOFOLLOW`` (a symbolic link anywhere on the way is refused, not
    followed), and that component's name. ``create`` makes missing
    directories on the way (``mkdir -p``, by descriptor too)."""

    def __init__(self, path: str, create: bool = False) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise P.ProtocolError(P.BAD_REQUEST, f"{path!r} is not an absolute path")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts or not parts:
            raise P.ProtocolError(P.BAD_REQUEST, f"{path!r} names no file (or goes up with ..)")
        self.path, self.parts, self.create = path, parts, create
        self.fd = -1

    def __enter__(self) -> tuple[int, str]:
        fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in self.parts[:-1]:
                if self.create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise P.ProtocolError(P.BAD_REQUEST, f"{self.path}: {part} is a symbolic link or not a "
                                              "directory; the agent follows no link") from None  # fmt: skip
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return fd, self.parts[-1]

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
