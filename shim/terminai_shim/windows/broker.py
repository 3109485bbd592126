"""The broker: the host side of the brain's pipe. Platform-neutral.

It serves newline-delimited JSON (docs/brain-protocol.md) over any stream
socket: a named pipe on Windows, a Unix socket elsewhere (where the tests
run it against the real ``agent-brain.js``). Nothing is served before the
client's ``hello`` carries the session token (compared in constant time); a
wrong token gets ``HANDSHAKE_FAILED`` and the connection is closed; a client
that never says hello is dropped after the handshake timeout. Requests are
matched by id and run concurrently; an id already in flight is refused.
Every request is confined to the workspace first (what leaves it is
refused), then given a level by the policy (``policy.py``): level A runs,
levels B and C run only once the CLI approved them (``Approver``), and
every decision is logged with its level and the runtime's metadata.
``execute`` runs an argv; a shell only for ``mode: "shell"``.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .confine import FileArea, OutsideWorkspace, open_workspace, relative_to_workspace
from .policy import Policy

BROKER_PROTOCOL_VERSION = 1  # the brain–broker protocol (docs/brain-protocol.md)
MIN_TOKEN = 16
CODES = ("INVALID_REQUEST", "HANDSHAKE_REQUIRED", "HANDSHAKE_FAILED", "AMSI_BLOCKED", "POLICY_DENIED",
         "APPROVAL_DENIED", "EXECUTION_ERROR")  # fmt: skip
Log = Callable[[dict[str, Any]], None]
# Windows: a command is created suspended, put in a job, then resumed (win32.adopt_suspended).
_SUSPENDED = 0x4 if sys.platform == "win32" else 0
# What commands the broker runs for the brain inherit from the host: never its secrets.
PASSED_ENV = ("PATH", "SYSTEMROOT", "SYSTEMDRIVE", "WINDIR", "TEMP", "TMP", "PATHEXT", "COMSPEC", "LANG", "HOME",
              "USERPROFILE")  # fmt: skip


class BrokerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    code: str = "POLICY_DENIED"
    level: str | None = None  # A, B or C (policy.py); None: refused before any level applies
    approval: str = "none"  # none (level A), session (granted earlier), allowed, denied, timeout, unavailable


@dataclass(frozen=True)
class ApprovalRequest:
    """What the CLI is asked (docs/brain-protocol.md, "Approvals")."""

    id: str
    level: str
    method: str
    summary: str  # the argv as a shell would quote it, or the path
    reason: str
    subject: str  # what "for this session" would cover: a program, or a method
    cwd: str | None = None


@dataclass(frozen=True)
class Approval:
    allow: bool
    session: bool = False  # allow the same subject at this level for the rest of the session


# Asks and waits for the answer; None when none came within the timeout given.
Approver = Callable[[ApprovalRequest, float], Approval | None]


@dataclass(frozen=True)
class BrokerConfig:
    token: str
    workspace: Path | None = None
    allow_shell: bool = False  # level C (shells and their equivalents) approved for the whole session
    handshake_timeout: float = 10.0
    request_timeout: float = 60.0
    approval_timeout: float = 120.0  # no answer in time is a denial
    max_message: int = 1 << 20
    metadata: dict[str, str] = field(default_factory=dict)  # session, runtime, profile: in every log line

    def __post_init__(self) -> None:
        if len(self.token) < MIN_TOKEN:
            raise ValueError(f"the handshake token must be at least {MIN_TOKEN} characters")


def confined(method: str, params: dict[str, Any], workspace: Path | None) -> str | None:
    """Why a request leaves the workspace (refused outright, never asked about), or None."""
    if method in ("execute", "powershell") and params.get("cwd"):
        if workspace is None:
            return "this session has no workspace to run in"
        where = str(params["cwd"])
    elif method in ("readFile", "writeFile", "listDir"):
        if workspace is None:
            return "this session has no workspace for file operations"
        where = str(params.get("path", ""))
    else:
        return None
    try:
        relative_to_workspace(workspace, where)
    except OutsideWorkspace:
        return f"{where!r} is outside the workspace"
    return None


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.write_lock = threading.Lock()
        self.authenticated = threading.Event()
        self.inflight: set[Any] = set()
        self.inflight_lock = threading.Lock()
        self.pending: dict[str, Future[dict[str, Any]]] = {}
        self.closed = False

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.write_lock:
            if not self.closed:
                try:
                    self.sock.sendall(data)
                except OSError:
                    self.closed = True

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(BrokerError("EXECUTION_ERROR", "the brain disconnected"))


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        policy: Policy | None = None,
        approver: Approver | None = None,
        log: Log | None = None,
    ) -> None:
        self.config = config
        self.policy = policy or Policy.load()
        self.approver = approver
        self.granted: set[tuple[str, str]] = set()  # (level, subject) approved for the session
        self._approvals = 0
        self.log_sink = log or (lambda record: sys.stderr.write(json.dumps(record) + "\n"))
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="broker")
        self.clients: list[Connection] = []
        self.handshake = threading.Event()
        self._ids = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._listeners: list[Any] = []
        # File operations act on descriptors opened beneath this, never on a checked path string.
        self.files: FileArea | None = open_workspace(config.workspace) if config.workspace else None

    # -- serving ------------------------------------------------------------------------
    def serve(self, listener: Any) -> None:
        """Accept clients until ``stop``; each gets its own reader thread."""
        self._listeners.append(listener)
        while not self._stopping:
            try:
                sock, _ = listener.accept()
            except OSError:
                break
            threading.Thread(target=self.handle, args=(sock,), daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        for listener in self._listeners:
            try:
                listener.close()
            except OSError:
                pass
        for conn in list(self.clients):
            conn.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.files is not None:
            self.files.close()

    def log(self, **fields: Any) -> None:
        self.log_sink({"time": round(time.time(), 3), **self.config.metadata, **fields})

    def handle(self, sock: socket.socket) -> None:
        conn = Connection(sock)
        timer = threading.Timer(self.config.handshake_timeout, self._handshake_timeout, args=(conn,))
        timer.daemon = True
        timer.start()
        buffer = b""
        discarding = False
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if discarding:  # the tail of an oversized message
                        discarding = False
                        continue
                    if line.strip():
                        self._on_line(conn, line)
                if len(buffer) > self.config.max_message:
                    conn.send(self._error(None, "INVALID_REQUEST",
                                          f"message larger than {self.config.max_message} bytes"))  # fmt: skip
                    self.log(event="refused", code="INVALID_REQUEST", reason="message over the size limit")
                    buffer, discarding = b"", True
                if conn.closed:
                    break
        except OSError:
            pass
        finally:
            timer.cancel()
            if conn in self.clients:
                self.clients.remove(conn)
            conn.close()

    def _handshake_timeout(self, conn: Connection) -> None:
        if not conn.authenticated.is_set():
            self.log(event="refused", code="HANDSHAKE_REQUIRED", reason="no hello within the handshake timeout")
            conn.close()

    @staticmethod
    def _error(rid: Any, code: str, message: str) -> dict[str, Any]:
        return {"id": rid, "success": False, "error": message, "code": code}

    def _on_line(self, conn: Connection, line: bytes) -> None:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            conn.send(self._error(None, "INVALID_REQUEST", f"malformed JSON: {exc}"))
            return
        rid = msg.get("id")
        if "method" not in msg:  # a response to one of our requests (ping, shutdown)
            fut = conn.pending.pop(str(rid), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        method = msg.get("method")
        params = msg.get("params") or {}
        if rid is None or not isinstance(method, str) or not isinstance(params, dict):
            conn.send(self._error(rid, "INVALID_REQUEST", "a request needs an id, a method and object params"))
            return
        if not conn.authenticated.is_set():
            self._hello(conn, rid, method, params)
            return
        with conn.inflight_lock:
            if rid in conn.inflight:
                conn.send(self._error(rid, "INVALID_REQUEST", f"request id {rid!r} is already in flight"))
                return
            conn.inflight.add(rid)
        self.pool.submit(self._run, conn, rid, method, params)

    def _hello(self, conn: Connection, rid: Any, method: str, params: dict[str, Any]) -> None:
        if method != "hello":
            conn.send(self._error(rid, "HANDSHAKE_REQUIRED", "say hello with the session token first"))
            self.log(event="refused", code="HANDSHAKE_REQUIRED", method=method)
            return
        token = str(params.get("token", ""))
        if len(token) < MIN_TOKEN or not hmac.compare_digest(token.encode(), self.config.token.encode()):
            conn.send(self._error(rid, "HANDSHAKE_FAILED", "the session token does not match"))
            self.log(event="refused", code="HANDSHAKE_FAILED", reason="wrong token")
            conn.close()
            return
        conn.authenticated.set()
        self.clients.append(conn)
        conn.send({"id": rid, "success": True, "data": {"protocolVersion": BROKER_PROTOCOL_VERSION,
                                                         "session": self.config.metadata.get("session")}})  # fmt: skip
        self.log(event="handshake", clientVersion=params.get("clientVersion"), brainVersion=params.get("brainVersion"))
        self.handshake.set()

    def decide(self, method: str, params: dict[str, Any]) -> Decision:
        """Confinement first (refused, never asked), then the policy's level,
        then for B and C the CLI's answer, unless this session already gave it."""
        outside = confined(method, params, self.config.workspace)
        if outside is not None:
            return Decision(False, outside)
        verdict = self.policy.judge(method, params)
        if verdict.level is None:
            return Decision(False, verdict.reason, "INVALID_REQUEST")
        if verdict.level == "A":
            return Decision(True, verdict.reason, level="A")
        if (verdict.level, verdict.subject) in self.granted or (verdict.level == "C" and self.config.allow_shell):
            return Decision(True, verdict.reason, level=verdict.level, approval="session")
        level = verdict.level
        if self.approver is None:
            why = f"{verdict.reason}: level {level} needs the CLI's approval, and nobody can be asked in this session"
            return Decision(False, why, "APPROVAL_DENIED", level, "unavailable")
        with self._lock:
            self._approvals += 1
            ask_id = f"approval-{self._approvals}"
        args = params.get("args") or []
        summary = (shlex.join([str(params.get("command", "")), *map(str, args)]) if method == "execute"
                   else str(params.get("script") if method == "powershell" else params.get("path", "")))  # fmt: skip
        request = ApprovalRequest(ask_id, verdict.level, method, summary, verdict.reason, verdict.subject,
                                  str(params["cwd"]) if params.get("cwd") else None)  # fmt: skip
        self.log(event="approval-request", approvalId=ask_id, level=verdict.level, method=method, summary=summary)
        answer = self.approver(request, self.config.approval_timeout)
        if answer is None:
            why = f"{verdict.reason}: no answer to the approval request within {self.config.approval_timeout:g} s"
            return Decision(False, why, "APPROVAL_DENIED", level, "timeout")
        if not answer.allow:
            return Decision(False, f"{verdict.reason}: denied by the user", "APPROVAL_DENIED", level, "denied")
        if answer.session:
            self.granted.add((verdict.level, verdict.subject))
        return Decision(True, verdict.reason, level=verdict.level, approval="allowed")

    def _run(self, conn: Connection, rid: Any, method: str, params: dict[str, Any]) -> None:
        reply = self._reply(rid, method, params)
        with conn.inflight_lock:  # answered means no longer in flight: the client may use the id again at once
            conn.inflight.discard(rid)
        conn.send(reply)

    def _reply(self, rid: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            decision = self.decide(method, params)
            self.log(event="decision", id=rid, method=method, level=decision.level, allowed=decision.allowed,
                     approval=decision.approval, reason=decision.reason)  # fmt: skip
            if not decision.allowed:
                return self._error(rid, decision.code, decision.reason)
            handler = getattr(self, f"op_{method}", None)
            if handler is None:
                return self._error(rid, "INVALID_REQUEST", f"unknown method {method!r}")
            return {"id": rid, "success": True, "data": handler(params)}
        except BrokerError as exc:
            return self._error(rid, exc.code, str(exc))
        except OutsideWorkspace as exc:  # the open itself refused to leave the workspace
            self.log(event="refused", id=rid, method=method, code="POLICY_DENIED", reason=exc.strerror)
            return self._error(rid, "POLICY_DENIED", str(exc.strerror))
        except Exception as exc:  # an operation failed: the client hears why, the broker serves on
            return self._error(rid, "EXECUTION_ERROR", f"{type(exc).__name__}: {exc}")

    # -- the broker's requests to the brain ---------------------------------------------
    def call_brain(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        if not self.clients:
            raise BrokerError("EXECUTION_ERROR", "no brain is connected")
        conn = self.clients[0]
        with self._lock:
            self._ids += 1
            rid = f"broker-{self._ids}"
        fut: Future[dict[str, Any]] = Future()
        conn.pending[rid] = fut
        conn.send({"id": rid, "method": method, "params": params or {}})
        try:
            reply = fut.result(timeout=timeout)
        except TimeoutError:
            conn.pending.pop(rid, None)
            raise BrokerError("EXECUTION_ERROR", f"the brain did not answer {method} in {timeout:g} s") from None
        if not reply.get("success"):
            raise BrokerError(str(reply.get("code", "EXECUTION_ERROR")), str(reply.get("error")))
        data: dict[str, Any] = reply.get("data") or {}
        return data

    def ping(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.call_brain("ping", timeout=timeout)

    # -- operations -------------------------------------------------------------------
    def op_ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "timestamp": int(time.time() * 1000)}

    def op_execute(self, params: dict[str, Any]) -> dict[str, Any]:
        command = params.get("command")
        args = params.get("args") or []
        if not isinstance(command, str) or not command or not all(isinstance(a, str) for a in args):
            raise BrokerError("INVALID_REQUEST", "execute needs a command string and string args")
        if params.get("mode", "exec") == "shell":
            line = " ".join([command, *args])
            argv = ["cmd.exe", "/d", "/s", "/c", line] if os.name == "nt" else ["/bin/sh", "-c", line]
        else:
            argv = [command, *args]
        return self._run_argv(argv, params)

    def op_powershell(self, params: dict[str, Any]) -> dict[str, Any]:
        shell = shutil.which("powershell.exe") or shutil.which("pwsh")
        if shell is None:
            raise BrokerError("EXECUTION_ERROR", "PowerShell is not available on this host")
        return self._run_argv([shell, "-NoProfile", "-NonInteractive", "-Command", str(params.get("script", ""))],
                              params)  # fmt: skip

    def _run_argv(self, argv: list[str], params: dict[str, Any]) -> dict[str, Any]:
        timeout = float(params.get("timeout") or self.config.request_timeout * 1000) / 1000
        env = {k: v for k, v in os.environ.items() if k.upper() in PASSED_ENV}
        env.update({str(k): str(v) for k, v in (params.get("env") or {}).items()})
        with contextlib.ExitStack() as stack:
            cwd: str | None = None
            fds: tuple[int, ...] = ()
            if self.files is not None:  # the directory checked is the one the command starts in
                relative = self._relative(str(params.get("cwd") or ""))
                cwd, fds = stack.enter_context(self.files.directory(relative))
            job = 0
            try:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=os.name != "nt",
                                        pass_fds=fds, creationflags=_SUSPENDED)  # fmt: skip
            except OSError as exc:
                raise BrokerError("EXECUTION_ERROR", f"cannot run {argv[0]}: {exc.strerror or exc}") from None
            if sys.platform == "win32":  # pragma: no cover - the Windows job: the tree lives and dies in a job
                from .win32 import adopt_suspended, close_handle, new_job

                job = new_job()
                stack.callback(close_handle, job)  # closed after the command: ends whatever it left running
                adopt_suspended(job, int(proc._handle), proc.pid)  # type: ignore[attr-defined]
            timed_out = False
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                if sys.platform == "win32":  # pragma: no cover - the Windows job
                    from .win32 import terminate_job

                    terminate_job(job)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: nothing it started lives on
                out, err = proc.communicate()
        return {"exitCode": proc.returncode, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"), "timedOut": timed_out}  # fmt: skip

    def _relative(self, path: str) -> str:
        assert self.config.workspace is not None  # the policy refused file operations without one
        return relative_to_workspace(self.config.workspace, path) if path else ""

    def _files(self) -> FileArea:
        if self.files is None:
            raise BrokerError("POLICY_DENIED", "this session has no workspace for file operations")
        return self.files

    def op_readFile(self, params: dict[str, Any]) -> dict[str, Any]:
        data = self._files().read(self._relative(str(params.get("path", ""))))
        if params.get("encoding") == "base64":
            return {"content": base64.b64encode(data).decode(), "encoding": "base64"}
        return {"content": data.decode(str(params.get("encoding") or "utf-8"), errors="replace"), "encoding": "utf8"}

    def op_writeFile(self, params: dict[str, Any]) -> dict[str, Any]:
        content = str(params.get("content", ""))
        data = base64.b64decode(content) if params.get("encoding") == "base64" else content.encode()
        written = self._files().write(self._relative(str(params.get("path", ""))), data,
                                      create_dirs=bool(params.get("createDirs")))  # fmt: skip
        return {"bytesWritten": written}

    def op_listDir(self, params: dict[str, Any]) -> dict[str, Any]:
        entries = self._files().list(self._relative(str(params.get("path", ""))), bool(params.get("includeHidden")))
        return {"entries": entries}

    def op_amsiScan(self, params: dict[str, Any]) -> dict[str, Any]:
        if sys.platform == "win32":
            from .win32 import amsi_scan

            if amsi_scan(str(params.get("content", "")), str(params.get("filename", "brain"))):
                raise BrokerError("AMSI_BLOCKED", "the antimalware scan flagged the content")
            return {"clean": True}
        raise BrokerError("EXECUTION_ERROR", "AMSI exists only on Windows")


__all__ = [
    "BROKER_PROTOCOL_VERSION",
    "Approval",
    "ApprovalRequest",
    "Approver",
    "Broker",
    "BrokerConfig",
    "BrokerError",
    "Decision",
    "Log",
]
