"""The host side of the agent wire protocol (terminai_protocol.protocol).

One reader thread decodes frames from the channel and routes them: results
and errors complete the waiting call with the same id, events feed the
process handle with that id. Calls from many threads share one stream.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from terminai_protocol import protocol as P

from ..errors import AgentError, ChannelClosed, DeadlineExceeded, FileTooLarge, TimeoutExpired

STDIN_HIGH_WATER = 4 << 20
# The guest enforces a command's timeout; the host enforces its own, this much later, whatever the guest does.
HOST_GRACE = 5.0


@dataclass
class ExitStatus:
    code: int | None
    signal: int | None
    timed_out: bool
    truncated: list[str]
    duration: float

    @property
    def exit_code(self) -> int:
        """A shell-style code: the exit code, or 128 + the signal number."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


@dataclass(frozen=True)
class Pty:
    """A pseudo-terminal for a command: its size and the TERM it reports."""

    cols: int = 80
    rows: int = 24
    term: str = "xterm-256color"


MAX_PROTOCOL_ERRORS = 32  # kept for diagnostics; the guest cannot grow the list without bound
MAX_ERROR_TEXT = 1000
DEFAULT_OUTPUT_CAP = 256 << 20  # per stream, enforced here whatever the guest claims


def _bounded_text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "..."


def exit_status(h: dict[str, Any]) -> ExitStatus | None:
    """An exit event's fields, checked: the guest is not trusted to send
    well-formed ones. None if any field has the wrong type or range."""
    code, sig, timed_out = h.get("code"), h.get("signal"), h.get("timed_out", False)
    truncated, duration = h.get("truncated", []), h.get("duration", 0)
    if code is not None and (type(code) is not int or not 0 <= code <= 255):
        return None
    if sig is not None and (type(sig) is not int or not 1 <= sig <= 64):
        return None
    if (code is None) == (sig is None) or type(timed_out) is not bool:
        return None
    if not isinstance(truncated, list) or not all(t in ("stdout", "stderr") for t in truncated) or len(truncated) > 2:
        return None
    if type(duration) not in (int, float) or not 0 <= duration < 1e9:
        return None
    return ExitStatus(code, sig, timed_out, list(truncated), float(duration))


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    frame: P.Frame | None = None


class RemoteProcess:
    """A command running in the guest. Output arrives as (stream, bytes) events."""

    def __init__(self, client: AgentClient, rid: int, pid: int, output_cap: int = DEFAULT_OUTPUT_CAP) -> None:
        self.client = client
        self.id = rid
        self.pid = pid
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.status: ExitStatus | None = None
        self._exited = threading.Event()
        self.on_event: Callable[[str, Any], None] | None = None
        self.output_cap = output_cap
        self.received = {"stdout": 0, "stderr": 0}
        self.cut: set[str] = set()
        self.host_deadline: float | None = None  # the shim's own limit: the guest's timeout plus a grace
        self.failure: str | None = None  # why the host gave up on it (a bad exit event, a hung VM)
        self.host_timed_out = False  # the host's deadline ended it (the guest did not)

    def _deliver(self, name: str, value: Any) -> None:
        if name in ("stdout", "stderr"):
            # The cap is the host's: whatever the guest says it sent, no more is kept or passed on.
            room = self.output_cap - self.received[name]
            if room <= 0:
                self.cut.add(name)
                return
            if len(value) > room:
                value = value[:room]
                self.cut.add(name)
            self.received[name] += len(value)
        elif name not in ("exit", "gone"):
            return  # an event this host does not know: dropped
        if name == "exit" and self.cut:
            value.truncated = sorted(set(value.truncated) | self.cut)
        if name in ("exit", "gone"):
            self.status = value
            self._exited.set()
        if self.on_event is not None:
            self.on_event(name, value)
        else:
            self.events.put((name, value))

    def output(self) -> Iterator[tuple[str, bytes]]:
        """Yield ("stdout"|"stderr", chunk) until the process exits."""
        while True:
            name, value = self.events.get()
            if name == "exit":
                return
            if name == "gone":
                raise ChannelClosed("the agent channel closed while the command ran", ran=True)
            yield name, value

    def wait(self, timeout: float | None = None) -> ExitStatus:
        if not self._exited.wait(timeout):
            raise TimeoutExpired(f"process {self.id} still running after {timeout}s", ran=True)
        if self.status is None:
            reason = self.failure or "the VM went away while the command ran; its outcome is unknown"
            raise (DeadlineExceeded if self.host_timed_out else ChannelClosed)(reason, ran=True)
        return self.status

    def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin, no faster than it reads.

        The agent reports how much it still holds for the command; above
        STDIN_HIGH_WATER the host waits, so a command that does not read its
        input cannot make the agent buffer without bound."""
        for start in range(0, len(data), P.CHUNK):
            queued = int(self.client.call("write_stdin", data[start : start + P.CHUNK], target=self.id).header.get(
                "queued", 0))  # fmt: skip
            delay = 0.002
            while queued > STDIN_HIGH_WATER:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                queued = int(self.client.call("write_stdin", b"", target=self.id).header.get("queued", 0))

    def close_stdin(self) -> None:
        self.client.call("close_stdin", target=self.id)

    def signal(self, sig: str | int = "SIGTERM", group: bool = True) -> None:
        """On a terminal, ``group`` reaches its foreground job, as a keyboard signal would."""
        self.client.call("signal", target=self.id, signal=sig, group=group)

    def resize(self, cols: int, rows: int) -> None:
        """A terminal's new size (the guest's foreground job gets SIGWINCH)."""
        self.client.call("resize", target=self.id, cols=cols, rows=rows)


class Call:
    """A request on the wire whose answer is still to come."""

    def __init__(self, client: AgentClient, op: str, rid: int, pending: _Pending) -> None:
        self.client = client
        self.op = op
        self.id = rid
        self._pending = pending

    def done(self) -> bool:
        return self._pending.done.is_set()

    def result(self, timeout: float | None = 60.0) -> P.Frame:
        if not self._pending.done.wait(timeout):
            with self.client._lock:
                self.client._pending.pop(self.id, None)
            raise TimeoutExpired(f"agent did not answer {self.op} within {timeout}s", ran=self.op == "exec")
        frame = self._pending.frame
        if frame is None:
            raise ChannelClosed(f"the agent channel closed during {self.op}", ran=self.op == "exec")
        if frame.kind == P.ERROR:
            h = frame.header
            raise AgentError(_bounded_text(h.get("code")), _bounded_text(h.get("message")), ran=bool(h.get("ran")))
        return frame


class AgentClient:
    def __init__(self, sock: socket.socket, max_frame: int = P.DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.peer_max = P.DEFAULT_MAX_FRAME
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._procs: dict[int, RemoteProcess] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closed = False
        self.protocol_errors: collections.deque[str] = collections.deque(maxlen=MAX_PROTOCOL_ERRORS)
        self.hello_info: dict[str, Any] = {}
        self.default_user = "user"  # who commands run as in the guest unless a call says otherwise
        self.last_heard = time.monotonic()  # when the agent last sent anything (the watchdog's evidence)
        self.delivering = False
        self._reader = threading.Thread(target=self._read_loop, name="agent-reader", daemon=True)
        self._reader.start()

    # -- plumbing -----------------------------------------------------------
    def _read_loop(self) -> None:
        decoder = P.Decoder(self.max_frame)
        try:
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    break
                self.last_heard = time.monotonic()
                self.delivering = True  # a consumer that blocks (a paused pager) holds the reader here
                try:
                    for item in decoder.feed(data):
                        if isinstance(item, P.ProtocolError):
                            self.protocol_errors.append(_bounded_text(item.message))
                        else:
                            self._route(item)
                finally:
                    self.delivering = False
        except OSError:
            pass
        finally:
            self._fail_all()

    def _route(self, frame: P.Frame) -> None:
        kind, rid = frame.kind, frame.id
        if kind == P.EVENT:
            with self._lock:
                proc = self._procs.get(rid)
            if proc is None:
                return
            name = frame.header.get("event", "")
            if name == "exit":
                with self._lock:
                    self._procs.pop(rid, None)
                status = exit_status(frame.header)
                if status is None:
                    proc.failure = "the guest sent a malformed exit status; the outcome is unknown"
                    self.protocol_errors.append(_bounded_text(f"malformed exit event: {frame.header!r}"))
                    proc._deliver("gone", None)
                else:
                    proc._deliver("exit", status)
            else:
                proc._deliver(name, frame.body)
            return
        if kind == P.ERROR and rid == 0:
            self.protocol_errors.append(_bounded_text(frame.header.get("message")))
            return
        with self._lock:
            pending = self._pending.pop(rid, None)
        if pending is not None:
            pending.frame = frame
            pending.done.set()

    def _fail_all(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
            procs, self._procs = self._procs, {}
        for p in pending.values():
            p.done.set()
        for proc in procs.values():
            proc._deliver("gone", None)

    @property
    def closed(self) -> bool:
        return self._closed

    def running(self) -> list[RemoteProcess]:
        with self._lock:
            return list(self._procs.values())

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def submit(self, op: str, body: bytes = b"", **fields: Any) -> Call:
        """Send a request now and read its answer later (``Call.result``):
        requests sent back to back cost the guest one wake-up, not one each."""
        rid = next(self._ids)
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise ChannelClosed("the agent channel is closed", hint="the VM has stopped; start a new session")
            self._pending[rid] = pending
        try:
            self.send_raw(P.request(rid, op, body, self.peer_max, **fields))
        except P.ProtocolError as exc:
            with self._lock:
                self._pending.pop(rid, None)
            raise AgentError(exc.code, f"{op} request not sent: {exc.message}") from None
        except OSError as exc:
            with self._lock:
                self._pending.pop(rid, None)
            raise ChannelClosed(f"cannot send to the agent: {exc}") from None
        return Call(self, op, rid, pending)

    def call(self, op: str, body: bytes = b"", *, timeout: float | None = 60.0, **fields: Any) -> P.Frame:
        return self.submit(op, body, **fields).result(timeout)

    # -- operations -------------------------------------------------------------
    def submit_hello(self) -> Call:
        return self.submit("hello", versions=list(P.SUPPORTED_VERSIONS), max_frame=self.max_frame)

    def accept_hello(self, frame: P.Frame) -> dict[str, Any]:
        peer_max = frame.header.get("max_frame", P.DEFAULT_MAX_FRAME)
        if type(peer_max) is not int:
            peer_max = P.DEFAULT_MAX_FRAME
        self.peer_max = min(max(peer_max, P.MIN_MAX_FRAME), P.DEFAULT_MAX_FRAME)
        self.hello_info = dict(frame.header)
        return self.hello_info

    def hello(self, timeout: float | None = 60.0) -> dict[str, Any]:
        return self.accept_hello(self.submit_hello().result(timeout))

    def ping(self, timeout: float | None = 10.0) -> dict[str, Any]:
        return self.call("ping", timeout=timeout).header

    def exec(
        self,
        argv: list[str] | None = None,
        *,
        command: str | None = None,
        shell: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        stdin: bytes = b"",
        stdin_open: bool = False,
        output_cap: int | None = None,
        on_event: Callable[[str, Any], None] | None = None,
        user: str | None = None,
        pty: Pty | None = None,
    ) -> RemoteProcess:
        """``pty``: run on a pseudo-terminal of that size in the guest (its
        output is one stream, ``stdout``; its input stays open)."""
        rid = next(self._ids)
        fields: dict[str, Any] = {"cwd": cwd, "env": env or {}, "timeout": timeout, "stdin_open": stdin_open,
                                  "user": user or self.default_user}  # fmt: skip
        if pty is not None:
            fields["pty"] = {"cols": pty.cols, "rows": pty.rows, "term": pty.term}
        if shell:
            fields.update(shell=True, command=command)
        else:
            fields["argv"] = argv
        if output_cap is not None:
            fields["output_cap"] = output_cap
        first, rest = stdin[: P.CHUNK], stdin[P.CHUNK :]
        if rest:
            fields["stdin_open"] = True
        pending = _Pending()
        proc = RemoteProcess(self, rid, 0, DEFAULT_OUTPUT_CAP if output_cap is None else output_cap)
        proc.on_event = on_event
        if timeout is not None:
            proc.host_deadline = time.monotonic() + timeout + HOST_GRACE
        with self._lock:
            if self._closed:
                raise ChannelClosed("the agent channel is closed", hint="the VM has stopped; start a new session")
            self._pending[rid] = pending
            self._procs[rid] = proc
        try:
            self.send_raw(P.request(rid, "exec", first, self.peer_max, **fields))
        except (OSError, P.ProtocolError) as exc:
            with self._lock:
                self._pending.pop(rid, None)
                self._procs.pop(rid, None)
            if isinstance(exc, P.ProtocolError):  # e.g. arguments larger than a frame: nothing was sent
                raise AgentError(exc.code, f"command not sent: {exc.message}") from None
            raise ChannelClosed(f"cannot send to the agent: {exc}") from None
        pending.done.wait()
        frame = pending.frame
        if frame is None:  # the request went out: the command may have started
            raise ChannelClosed("the agent channel closed before the command was confirmed started", ran=True)
        if frame.kind == P.ERROR:
            with self._lock:
                self._procs.pop(rid, None)
            h = frame.header
            raise AgentError(_bounded_text(h.get("code")), _bounded_text(h.get("message")), ran=bool(h.get("ran")))
        pid = frame.header.get("pid", 0)
        proc.pid = pid if type(pid) is int and 0 < pid < 1 << 22 else 0
        if rest:
            try:
                proc.write_stdin(rest)
                if not stdin_open:
                    proc.close_stdin()
            except AgentError as exc:
                if exc.agent_code != P.NO_SUCH_PROCESS:
                    raise
                # The command ended without reading all of its input: its
                # result is still on its way; only the rest of stdin is moot.
        return proc

    def run(
        self, argv: list[str] | None = None, started: Callable[[RemoteProcess], None] | None = None, **kwargs: Any
    ) -> tuple[ExitStatus, bytes, bytes]:
        """Run to completion and collect the output; ``started`` learns the
        process as soon as it runs (to signal it while it is collected)."""
        proc = self.exec(argv, **kwargs)
        if started is not None:
            started(proc)
        out: list[bytes] = []
        err: list[bytes] = []
        for name, chunk in proc.output():
            (out if name == "stdout" else err).append(chunk)
        return proc.wait(), b"".join(out), b"".join(err)

    def read_file(self, path: str, limit: int | None = None) -> bytes:
        """The whole file, or ``FileTooLarge`` once it is past ``limit`` bytes
        (a guest can make a sparse file of any size: the host holds no more)."""
        chunks: list[bytes] = []
        offset = 0
        while True:
            frame = self.call("read", path=path, offset=offset)
            chunks.append(frame.body)
            offset += len(frame.body)
            if limit is not None and offset > limit:
                raise FileTooLarge(f"{path} is larger than {limit} bytes", hint="read it in parts through a command")
            if frame.header.get("eof") or not frame.body:
                return b"".join(chunks)

    def write_file(self, path: str, data: bytes, mode: int = 0o644, create_dirs: bool = False) -> None:
        """Write through a temporary name and rename: readers never see half a file."""
        tmp = f"{path}.terminai-{os.urandom(6).hex()}"  # a name a command cannot have planted a link at
        step = max(P.MIN_MAX_FRAME, self.peer_max - 4096)
        offset = 0
        first = True
        while first or offset < len(data):
            chunk = data[offset : offset + step]
            self.call("write", chunk, path=tmp, offset=offset, truncate=first, mode=mode,
                      create_dirs=create_dirs and first,
                      fsync=offset + len(chunk) >= len(data))  # fmt: skip
            offset += len(chunk)
            first = False
        self.call("rename", src=tmp, dst=path)

    def stat(self, path: str) -> dict[str, Any]:
        return self.call("stat", path=path).header

    def listdir(self, path: str) -> list[dict[str, Any]]:
        return list(self.call("list", path=path).header.get("entries", []))

    def remove(self, path: str, recursive: bool = False) -> None:
        self.call("remove", path=path, recursive=recursive)

    def mkdir(self, path: str, parents: bool = True) -> None:
        self.call("mkdir", path=path, parents=parents)

    def shutdown(self) -> None:
        self.call("shutdown", timeout=10)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)
