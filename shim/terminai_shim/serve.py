"""``terminai-shim serve``: the JSON-lines protocol the TerminAI CLI speaks.

One JSON object per line on stdin (requests) and stdout (responses and
notifications); see docs/shim-protocol.md and docs/shim-protocol.schema.json.
Requests run on a pool of worker threads, so a long ``execute`` does not block a
``healthCheck``; stdout writes are serialised. When stdin closes, or on
SIGTERM, the VM is shut down and the shim exits 0.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import itertools
import json
import posixpath
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from terminai_protocol import protocol as P

from . import __version__, options
from ._internal.client import Pty, RemoteProcess
from .errors import AgentError, ConfigError, DeadlineExceeded, ShimError
from .launch import LaunchRequest, resolve
from .options import GUEST_USERS, INITIALIZE_KEYS
from .pool import MAX_SIZE as MAX_POOL
from .pool import WarmPool, pool_key
from .session import Session

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .windows.approvals import PendingApprovals
    from .windows.launch import BrainSession

SERVE_PROTOCOL_VERSION = 1  # serve's JSON lines (docs/shim-protocol.md)
POOL_WAIT = 60.0  # an initialize waits this long for a pooled VM that is still starting
DEFAULT_EXEC_OUTPUT_CAP = 16 << 20
MAX_READ_FILE = 16 << 20  # fs.readFile: a file the guest made can be any size

# Every method and the parameters it takes: anything else is refused by name
# (a typo such as ``worksapce`` must not boot a VM without a workspace).
# docs/shim-protocol.schema.json says the same; a test keeps them equal.
# The trust options of a launch, which brain.launch takes too (options.py).
_TRUST_KEYS = frozenset(o.key for o in options.OPTIONS if o.group == "trust" and o.key)
_COMMAND = frozenset({"command", "args", "shell", "cwd", "env", "timeout", "user"})
PARAMS: dict[str, frozenset[str]] = {
    "initialize": INITIALIZE_KEYS,  # the launch options (options.py)
    "healthCheck": frozenset(),
    "execute": _COMMAND | {"stdin", "outputCap"},
    "spawn": _COMMAND | {"binary", "pty"},
    "process.write": frozenset({"processId", "data", "encoding"}),
    "process.closeStdin": frozenset({"processId"}),
    "process.resize": frozenset({"processId", "cols", "rows"}),
    "process.kill": frozenset({"processId", "signal"}),
    "cancel": frozenset({"id"}),
    "fs.readFile": frozenset({"path", "encoding"}),
    "fs.writeFile": frozenset({"path", "content", "encoding", "createDirs"}),
    "fs.stat": frozenset({"path"}),
    "fs.list": frozenset({"path"}),
    "fs.remove": frozenset({"path", "recursive"}),
    "fs.mkdir": frozenset({"path"}),
    "dispose": frozenset(),
    # serve's warm pool (pool.py): VMs for an initialize with these very parameters, restored and waiting.
    "pool.warm": frozenset({"size", "params"}),
    "pool.status": frozenset(),
    # The Windows tier: a signed brain bundle behind the broker, whose level B
    # and C requests come to the CLI as approval.request notifications.
    "brain.launch": frozenset({"bundle", "signature", "workspace", "allowShell", "approvalTimeoutMs", "cliVersion",
                               "policy", "channel"}) | _TRUST_KEYS,
    "brain.health": frozenset(),
    "approval.respond": frozenset({"approvalId", "allow", "session"}),
}  # fmt: skip
# Requests that steer or watch what runs: served by their own workers, so a
# health check or a kill never waits behind the user's long commands.
CONTROL = frozenset({"healthCheck", "process.write", "process.closeStdin", "process.resize", "process.kill", "cancel",
                     "dispose", "brain.health", "approval.respond", "pool.status"})  # fmt: skip


class RequestError(ShimError):
    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


@dataclass
class _Spawned:
    proc: RemoteProcess | None
    binary: bool = False
    decoders: dict[str, codecs.IncrementalDecoder] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False
    held: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def remote(self) -> RemoteProcess:
        assert self.proc is not None
        return self.proc


class Server:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.out_lock = threading.Lock()
        self.session: Session | None = None
        self.session_lock = threading.Lock()
        self.procs: dict[str, _Spawned] = {}
        self.proc_ids = itertools.count(1)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="req")
        self.control = ThreadPoolExecutor(max_workers=8, thread_name_prefix="control")
        self.stopping = threading.Event()
        self.executing: dict[Any, RemoteProcess] = {}  # request id -> its command, for `cancel`
        self.request_id = threading.local()
        self.brain: BrainSession | None = None  # the Windows tier, instead of a VM (brain.launch)
        self.approvals: PendingApprovals | None = None
        self.warm_pool: WarmPool | None = None  # pool.warm

    # -- output --------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        # ASCII only: a lone surrogate (an id the client sent, a file name that is not UTF-8,
        # decoded with surrogateescape) goes out as a \\u escape a strict parser accepts,
        # never as bytes that are not UTF-8.
        line = json.dumps(message, separators=(",", ":"), ensure_ascii=True)
        with self.out_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send({"method": method, "params": params})

    # -- input -----------------------------------------------------------------
    def handle_line(self, line: str) -> None:
        """Every line gets an answer or a named error, whatever it holds; nothing here ends the server."""
        try:
            self._handle_line(line)
        except Exception as exc:  # the reader keeps reading whatever a line does
            message = f"the request could not be handled ({type(exc).__name__}); this is a bug, please report it"
            self.send({"id": None, "error": {"code": "INTERNAL", "message": message, "ran": False}})

    def parse_error(self, message: str) -> None:
        self.send({"id": None, "error": {"code": "PARSE_ERROR", "message": message, "ran": False}})

    def _handle_line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError as exc:
            self.parse_error(f"not JSON: {exc}")
            return
        except RecursionError:
            self.parse_error("not JSON the shim reads: nested too deeply")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
            rid = msg.get("id") if isinstance(msg, dict) else None
            self.send(
                {
                    "id": rid,
                    "error": {"code": "INVALID_REQUEST", "message": "expected {id, method, params}", "ran": False},
                }
            )
            return
        rid = msg.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
            self.send({"id": None, "error": {"code": "INVALID_REQUEST", "message": "id must be an integer or a string",
                                             "ran": False}})  # fmt: skip
            return
        (self.control if msg["method"] in CONTROL else self.pool).submit(self._dispatch, msg)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        method = msg["method"]
        params = msg.get("params") or {}
        self.request_id.value = rid
        handler = getattr(self, "m_" + method.replace(".", "_"), None) if method in PARAMS else None
        try:
            if handler is None:
                raise RequestError("METHOD_NOT_FOUND", f"unknown method {method!r}")
            if not isinstance(params, dict):
                raise RequestError("INVALID_PARAMS", f"{method}: params must be an object")
            unknown = sorted(set(params) - PARAMS[method])
            if unknown:
                known = ", ".join(sorted(PARAMS[method])) or "none"
                raise RequestError("INVALID_PARAMS", f"{method}: unknown parameter {', '.join(map(repr, unknown))} "
                                   f"(known: {known})")  # fmt: skip
            result = handler(params)
            after = None
            if isinstance(result, tuple):  # (result, what to do once it is written)
                result, after = result
            self.send({"id": rid, "result": result})
            if after is not None:
                after()
            if method == "dispose" and not (self.warm_pool and self.warm_pool.size):
                self.stopping.set()  # with a pool, the shim waits for the next initialize (or its stdin's end)
        except ShimError as exc:
            self.send({"id": rid, "error": exc.to_dict()})
        except KeyError as exc:  # a required parameter, named (never Python's own words)
            message = f"{method}: parameter {exc.args[0]!r} is required"
            self.send({"id": rid, "error": {"code": "INVALID_PARAMS", "message": message, "ran": False}})
        except (TypeError, ValueError, binascii.Error) as exc:
            message = f"{method}: a parameter has the wrong type or value ({exc})"
            self.send({"id": rid, "error": {"code": "INVALID_PARAMS", "message": message, "ran": False}})
        except Exception as exc:  # the server keeps serving whatever happens
            message = f"{method} failed inside the shim ({type(exc).__name__}); this is a bug, please report it"
            self.send({"id": rid, "error": {"code": "INTERNAL", "message": message, "ran": False}})

    # -- helpers -----------------------------------------------------------------
    def _session(self) -> Session:
        if self.session is None:
            raise RequestError("NOT_INITIALIZED", "call initialize first")
        return self.session

    @staticmethod
    def _argv(params: dict[str, Any]) -> tuple[list[str] | None, str | None]:
        """argv, or a shell command line when the caller asked for a shell.

        A command line without ``args`` is split with POSIX quoting rules
        but never handed to a shell: pipes and ``$(...)`` need ``shell: true``.
        """
        command = params["command"]
        if not isinstance(command, str) or not command:
            raise RequestError("INVALID_PARAMS", "command must be a non-empty string")
        args = params.get("args")
        if params.get("shell"):
            if args:
                command = shlex.join([command, *args])
            return None, command
        if args is not None:
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise RequestError("INVALID_PARAMS", "args must be a list of strings")
            return [command, *args], None
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise RequestError("INVALID_PARAMS", f"cannot split command line: {exc}") from None
        return argv, None

    def _cwd(self, params: dict[str, Any]) -> str | None:
        """Where a command starts: the workspace unless told; a relative cwd is
        inside the workspace; with a workspace, an absolute cwd must be in it
        (at its host path or at /workspace), never silently somewhere else."""
        cwd = params.get("cwd")
        config = self._session().config
        if cwd is not None and not isinstance(cwd, str):
            raise RequestError("INVALID_PARAMS", "cwd must be a string")
        if not cwd:
            return config.workspace_mount if config.workspace is not None else None
        if config.workspace is None:
            return cwd
        resolved = posixpath.normpath(posixpath.join(config.workspace_mount, cwd))
        if not any(resolved == w or resolved.startswith(w.rstrip("/") + "/") for w in config.workspace_paths):
            raise RequestError("INVALID_PARAMS", f"cwd {cwd} is outside the workspace, which the guest has at "
                               f"{' and '.join(config.workspace_paths)}",
                               hint="pass a path inside the workspace (host paths work unchanged)")  # fmt: skip
        return resolved

    def _fs_path(self, params: dict[str, Any]) -> str:
        """A file path: absolute as given, relative to the workspace (or / without one)."""
        path = params["path"]
        if not isinstance(path, str) or not path:
            raise RequestError("INVALID_PARAMS", "path must be a non-empty string")
        config = self._session().config
        base = config.workspace_mount if config.workspace is not None else "/"
        return posixpath.join(base, path)

    @staticmethod
    def _user(params: dict[str, Any]) -> str | None:
        user = params.get("user")
        if user is not None and user not in GUEST_USERS:
            raise RequestError("INVALID_PARAMS", f"user must be one of {', '.join(GUEST_USERS)}")
        return None if user is None else str(user)

    @staticmethod
    def _pty(value: Any) -> Pty | None:
        """``{cols, rows, term?}``, or None for pipes."""
        if value is None or value is False:
            return None
        if not isinstance(value, dict):
            raise RequestError("INVALID_PARAMS", "pty must be an object {cols, rows, term?}")
        term = value.get("term", Pty.term)
        if not isinstance(term, str):
            raise RequestError("INVALID_PARAMS", "pty term must be a string")
        return Pty(*_window(value.get("cols", Pty.cols), value.get("rows", Pty.rows)), term)

    @staticmethod
    def _timeout(params: dict[str, Any]) -> float | None:
        ms = params.get("timeout")
        return float(ms) / 1000 if ms else None

    # -- methods -------------------------------------------------------------------
    def m_initialize(self, p: dict[str, Any]) -> dict[str, Any]:
        with self.session_lock:
            if self.session is not None:
                raise RequestError("ALREADY_INITIALIZED", "this shim already runs a VM; dispose it first")
            request = launch_request(p)
            pooled = self.warm_pool.take(pool_key(p), POOL_WAIT) if self.warm_pool else None
            if pooled is not None:
                s, launch = pooled
            else:
                self.notify("initialize.progress", {"stage": "verify"})
                launch = resolve(request, self._download_progress())
                self.notify("initialize.progress", {"stage": "boot", "backend": launch.choice.name})
                s = launch.boot()
            self.session = s
            return {
                "pooled": pooled is not None,
                "protocolVersion": SERVE_PROTOCOL_VERSION,
                "shimVersion": __version__,
                **s.describe(),
                "pythonPath": s.client.hello_info.get("python"),
                "accel": s.accel.accel,
                "accelReason": s.accel.reason,
                "backendReason": launch.choice.reason,
                "bootSeconds": round(s.boot_seconds, 3),
                "restoredFromSnapshot": s.restored_from is not None,
                "session": s.client.hello_info.get("session"),
                "workspace": s.config.workspace_mount if s.config.workspace else None,
                "workspaceAlias": s.config.workspace_alias,
                **({"release": _release_info(launch.release)} if launch.release is not None else {}),
            }

    def m_pool_warm(self, p: dict[str, Any]) -> dict[str, Any]:
        """Resolve (and verify) now; start the VMs in the background."""
        size = _whole(p, "size")
        size = 1 if size is None else size
        if not 0 <= size <= MAX_POOL:
            raise RequestError("INVALID_PARAMS", f"pool.warm: size must be 0 to {MAX_POOL}")
        params = p.get("params")
        if not isinstance(params, dict):
            raise RequestError("INVALID_PARAMS", "pool.warm: params must be the initialize parameters, an object")
        unknown = sorted(set(params) - PARAMS["initialize"])
        if unknown:
            raise RequestError(
                "INVALID_PARAMS", f"pool.warm: unknown initialize parameter {', '.join(map(repr, unknown))}"
            )
        with self.session_lock:
            if self.warm_pool is None:
                self.warm_pool = WarmPool()
            pool = self.warm_pool
        if size == 0:
            pool.warm("", None, 0)
            return pool.status()
        launch = resolve(launch_request(params), self._download_progress())
        launch.backend.check(launch.config)  # what a boot would refuse is refused now, not in the background
        pool.warm(pool_key(params), launch, size)
        return pool.status()

    def m_pool_status(self, p: dict[str, Any]) -> dict[str, Any]:
        return self.warm_pool.status() if self.warm_pool else {"size": 0, "vms": [], "errors": []}

    def _download_progress(self) -> Callable[[str, int, int], None]:
        """Downloads as ``initialize.progress`` notifications, at most ten a second per file (and its end)."""
        last: dict[str, float] = {}

        def report(name: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last.get(name, 0.0) >= 0.1:
                last[name] = now
                self.notify("initialize.progress", {"stage": "download", "name": name, "done": done, "total": total})

        return report

    def m_healthCheck(self, p: dict[str, Any]) -> dict[str, Any]:
        try:
            session = self._session()
            if not session.machine.alive():
                return {"ok": False, "error": "the VM is not running"}
            return session.health()
        except ShimError as exc:
            return {"ok": False, "error": exc.message}

    def m_execute(self, p: dict[str, Any]) -> dict[str, Any]:
        """Runs to the end, or until ``timeout``, or until a ``cancel`` names this request."""
        session = self._session()
        argv, command = self._argv(p)
        env = p.get("env") or {}
        rid = self.request_id.value

        def started(proc: RemoteProcess) -> None:
            if rid is not None:
                self.executing[rid] = proc

        try:
            status, out, err = session.client.run(
                argv, started, command=command, shell=command is not None, cwd=self._cwd(p), env=env,
                timeout=self._timeout(p), stdin=str(p.get("stdin", "")).encode(),
                output_cap=int(p.get("outputCap", DEFAULT_EXEC_OUTPUT_CAP)), user=self._user(p),
            )  # fmt: skip
        except AgentError as exc:
            if exc.agent_code == "SPAWN_FAILED":
                return {"stdout": "", "stderr": "", "exitCode": 127, "runtimeError": exc.to_dict()}
            raise
        except DeadlineExceeded as exc:  # the host's deadline stopped a VM that ignored the timeout
            return {"stdout": "", "stderr": "", "exitCode": None, "timedOut": True, "runtimeError": exc.to_dict()}
        finally:
            self.executing.pop(rid, None)
        result: dict[str, Any] = {
            "stdout": _text_of(out, "stdout" in status.truncated),
            "stderr": _text_of(err, "stderr" in status.truncated),
            "exitCode": status.exit_code,
            "timedOut": status.timed_out,
        }
        if status.truncated:
            result["truncated"] = status.truncated
        if status.signal is not None:
            result["signal"] = status.signal
        return result

    def m_cancel(self, p: dict[str, Any]) -> dict[str, Any]:
        """Stop a running ``execute`` by its request id: its process group is killed (SIGKILL) and the
        execute answers as a command ended by signal 9 would."""
        self._session()
        proc = self.executing.get(p["id"])
        if proc is None:
            raise RequestError("NO_SUCH_REQUEST", f"cancel: no execute with id {p['id']!r} is running")
        proc.signal("SIGKILL")
        return {}

    def m_spawn(self, p: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
        """Notifications for a process are held back until the response that
        names it has been written: a client never sees an unknown processId."""
        session = self._session()
        argv, command = self._argv(p)
        pty = self._pty(p.get("pty"))
        pid_name = f"p{next(self.proc_ids)}"
        # A terminal's output is bytes (escape sequences may carry any of them, and a character
        # may be split across reads): always base64, which a client turns back into the bytes.
        spawned = _Spawned(None, binary=bool(p.get("binary")) or pty is not None)

        def on_event(name: str, value: Any) -> None:
            with spawned.lock:
                if not spawned.released:
                    spawned.held.append((name, value))
                    return
                self._forward(pid_name, spawned, name, value)

        spawned.proc = session.client.exec(
            argv, command=command, shell=command is not None, cwd=self._cwd(p), env=p.get("env") or {},
            timeout=self._timeout(p), stdin_open=True, on_event=on_event, user=self._user(p), pty=pty,
        )  # fmt: skip
        self.procs[pid_name] = spawned

        def release() -> None:
            with spawned.lock:
                spawned.released = True
                for name, value in spawned.held:
                    self._forward(pid_name, spawned, name, value)
                spawned.held.clear()

        return {"processId": pid_name, "pid": spawned.proc.pid}, release

    def _forward(self, pid_name: str, spawned: _Spawned, name: str, value: Any) -> None:
        if name in ("stdout", "stderr"):
            if spawned.binary:
                data = base64.b64encode(value).decode()
            else:
                dec = spawned.decoders.setdefault(name, codecs.getincrementaldecoder("utf-8")("replace"))
                data = dec.decode(value)
                if not data:
                    return
            self.notify("process.output", {"processId": pid_name, "stream": name, "data": data,
                                           "encoding": "base64" if spawned.binary else "utf8"})  # fmt: skip
        elif name == "exit":
            for stream, dec in spawned.decoders.items():
                tail = dec.decode(b"", final=True)
                if tail:
                    self.notify(
                        "process.output", {"processId": pid_name, "stream": stream, "data": tail, "encoding": "utf8"}
                    )
            self.procs.pop(pid_name, None)
            self.notify("process.exit", {"processId": pid_name, "exitCode": value.exit_code, "signal": value.signal,
                                         "timedOut": value.timed_out})  # fmt: skip
        elif name == "gone":
            self.procs.pop(pid_name, None)
            self.notify("process.exit", {"processId": pid_name, "exitCode": None, "signal": None, "timedOut": False,
                                         "error": {"code": "VM_GONE", "message": "the VM stopped; outcome unknown",
                                                   "ran": True}})  # fmt: skip

    def _proc(self, p: dict[str, Any]) -> _Spawned:
        self._session()  # NOT_INITIALIZED before anything else
        spawned = self.procs.get(str(p.get("processId")))
        if spawned is None:
            raise RequestError("NO_SUCH_PROCESS", f"no running process {p.get('processId')!r}")
        return spawned

    def m_process_write(self, p: dict[str, Any]) -> dict[str, Any]:
        spawned = self._proc(p)
        data = base64.b64decode(p["data"]) if p.get("encoding") == "base64" else str(p["data"]).encode()
        spawned.remote.write_stdin(data)
        return {}

    def m_process_closeStdin(self, p: dict[str, Any]) -> dict[str, Any]:
        self._proc(p).remote.close_stdin()
        return {}

    def m_process_resize(self, p: dict[str, Any]) -> dict[str, Any]:
        self._proc(p).remote.resize(*_window(p.get("cols"), p.get("rows")))
        return {}

    def m_process_kill(self, p: dict[str, Any]) -> dict[str, Any]:
        self._proc(p).remote.signal(p.get("signal", "SIGTERM"))
        return {}

    def m_fs_readFile(self, p: dict[str, Any]) -> dict[str, Any]:
        data = self._session().client.read_file(self._fs_path(p), limit=MAX_READ_FILE)
        if p.get("encoding") == "base64":
            return {"content": base64.b64encode(data).decode(), "encoding": "base64"}
        return {"content": data.decode("utf-8", "replace"), "encoding": "utf8"}

    def m_fs_writeFile(self, p: dict[str, Any]) -> dict[str, Any]:
        content = p["content"]
        data = base64.b64decode(content) if p.get("encoding") == "base64" else str(content).encode()
        self._session().client.write_file(self._fs_path(p), data, create_dirs=bool(p.get("createDirs")))
        return {"bytesWritten": len(data)}

    def m_fs_stat(self, p: dict[str, Any]) -> dict[str, Any]:
        st = self._session().client.stat(self._fs_path(p))
        return {k: st[k] for k in ("type", "size", "mode", "mtime")}

    def m_fs_list(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"entries": self._session().client.listdir(self._fs_path(p))}

    def m_fs_remove(self, p: dict[str, Any]) -> dict[str, Any]:
        self._session().client.remove(self._fs_path(p), recursive=bool(p.get("recursive")))
        return {}

    def m_fs_mkdir(self, p: dict[str, Any]) -> dict[str, Any]:
        self._session().client.mkdir(self._fs_path(p))
        return {}

    def m_dispose(self, p: dict[str, Any]) -> dict[str, Any]:
        self.close(final=False)
        return {}

    # -- the Windows tier ------------------------------------------------------------
    def m_brain_launch(self, p: dict[str, Any]) -> dict[str, Any]:
        from .windows.approvals import PendingApprovals
        from .windows.resolve import DEFAULT_APPROVAL_TIMEOUT, BrainRequest, launch_brain

        bundle = _path(p, "bundle")
        if bundle is None:
            raise RequestError("INVALID_PARAMS", "brain.launch: parameter 'bundle' is required")
        timeout_ms = _whole(p, "approvalTimeoutMs")
        timeout = timeout_ms / 1000 if timeout_ms else DEFAULT_APPROVAL_TIMEOUT
        given = {k: v for k, v in p.items() if k in _TRUST_KEYS}
        trust = options.launch_request(options.from_params(given)).trust
        request = BrainRequest(bundle, signature=_path(p, "signature"), trust=trust, channel=_text(p, "channel"),
                               workspace=_path(p, "workspace"), cli_version=_text(p, "cliVersion") or "",
                               allow_shell=p.get("allowShell") is True, policy=_path(p, "policy"),
                               approval_timeout=timeout)  # fmt: skip
        with self.session_lock:
            if self.session is not None or self.brain is not None:
                raise RequestError("ALREADY_INITIALIZED", "this shim already runs a tier; dispose it first")
            approvals = PendingApprovals(self.notify)
            bundle_doc, self.brain = launch_brain(request, approver=approvals)
            self.approvals = approvals
            return {"session": self.brain.session, "isolation": self.brain.isolation, "pid": self.brain.pid,
                    "bundleVersion": str(bundle_doc.doc.get("version"))}  # fmt: skip

    def m_brain_health(self, p: dict[str, Any]) -> dict[str, Any]:
        if self.brain is None:
            raise RequestError("NOT_INITIALIZED", "call brain.launch first")
        return self.brain.health()

    def m_approval_respond(self, p: dict[str, Any]) -> dict[str, Any]:
        approval_id, allow, session = p["approvalId"], p["allow"], p.get("session", False)
        if not isinstance(approval_id, str) or not isinstance(allow, bool) or not isinstance(session, bool):
            raise RequestError("INVALID_PARAMS", "approval.respond needs approvalId (a string), allow and session? "
                               "(true/false)")  # fmt: skip
        if self.approvals is None or not self.approvals.respond(approval_id, allow, session):
            raise RequestError("INVALID_PARAMS", f"no open approval request {approval_id!r} (answered, expired, "
                               "or never asked)")  # fmt: skip
        return {}

    def close(self, final: bool = True) -> None:
        """``final``: the shim is ending, so the pool goes too (``dispose`` ends the session alone)."""
        with self.session_lock:
            session, self.session = self.session, None
            brain, self.brain = self.brain, None
            approvals, self.approvals = self.approvals, None
        if session is not None:
            session.close()
        if final and self.warm_pool is not None:
            self.warm_pool.close()
        if approvals is not None:
            approvals.close()  # open questions are denied: nothing waits on a CLI that has gone
        if brain is not None:
            brain.stop()


def _text_of(data: bytes, truncated: bool) -> str:
    """Output as text. A stream cut at its byte cap may end inside a UTF-8
    character: the partial character is dropped, never turned into U+FFFD,
    so the text stays within the cap."""
    if truncated:
        tail = data[-3:]
        for back in range(min(3, len(tail)), 0, -1):  # a lead byte whose character is incomplete
            byte = tail[-back]
            need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 0
            if need > back:
                data = data[:-back]
                break
    return data.decode("utf-8", "replace")


def _window(cols: Any, rows: Any) -> tuple[int, int]:
    """A terminal's size, checked: whole numbers from 1 to the protocol's MAX_WINDOW."""
    if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= P.MAX_WINDOW for v in (cols, rows)):
        raise RequestError("INVALID_PARAMS", f"pty cols and rows must be whole numbers from 1 to {P.MAX_WINDOW}")
    return int(cols), int(rows)


def _text(p: dict[str, Any], key: str) -> str | None:
    value = p.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    return value


def _whole(p: dict[str, Any], key: str) -> int | None:
    value = p.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, not {value!r}")
    return value


def _path(p: dict[str, Any], key: str) -> Path | None:
    text = _text(p, key)
    return Path(text) if text is not None else None


def launch_request(p: dict[str, Any]) -> LaunchRequest:
    """``initialize``'s params as a launch request (docs/shim-protocol.md);
    ``launch`` checks it as a whole, exactly as it checks the command line's."""
    return options.launch_request(options.from_params(p))


def _release_info(release: Any) -> dict[str, Any]:
    m = release.manifest
    return {"version": m.release, "channel": m.channel, "serial": m.serial, "verified": list(release.kinds)}


MAX_LINE = 256 << 20  # one request (a file written through fs.writeFile is base64 in it)


def _lines(source: Any, server: Server) -> Iterator[str]:
    """The requests, each as text: from the byte stream under a text one, so
    that a line that is not UTF-8, or longer than ``MAX_LINE``, is a named
    error for that line alone."""
    raw = getattr(source, "buffer", None)
    if raw is None:  # already text (a test's StringIO)
        yield from source
        return
    while True:
        line = raw.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of it
                line = raw.readline(1 << 20)
            server.parse_error(f"a request line is longer than {MAX_LINE >> 20} MiB")
            continue
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            server.parse_error(f"a request line is not UTF-8 (byte {exc.start})")


def serve(stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    source = stdin or sys.stdin
    server = Server(stdout or sys.stdout)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stopping.set())
    failed: list[BaseException] = []

    def read_requests() -> None:
        try:
            for line in _lines(source, server):
                server.handle_line(line)
                if server.stopping.is_set():
                    return
        except BaseException as exc:  # reading itself failed: say so and exit non-zero, never "success"
            failed.append(exc)

    reader = threading.Thread(target=read_requests, name="stdin", daemon=True)
    reader.start()
    try:
        while reader.is_alive() and not server.stopping.is_set():
            reader.join(0.2)
    finally:
        server.close()  # requests still waiting on the VM now fail fast
        server.pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        print(f"terminai-shim serve: could not read requests: {failed[0]}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "PARAMS",
    "SERVE_PROTOCOL_VERSION",
    "Server",
    "launch_request",
    "serve",
]
