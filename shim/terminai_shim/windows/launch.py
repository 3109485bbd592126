"""Start a verified brain behind a broker and wait for its handshake.

On Windows: the AppContainer profile ``TerminAI_Brain_Sandbox`` (created on
first use), a named pipe ``\\\\.\\pipe\\terminai-<session>`` whose DACL
admits only that AppContainer and the owning user and which rejects
remote clients, and ``node agent-brain.js --pipe=...`` launched inside the
AppContainer with the four ``TERMINAI_*`` variables.

Elsewhere (development, and the tests that drive the real ``agent-brain.js``
on Linux): a Unix socket in a private directory and a plain child process.
That is **not** isolation; the session says so (``isolation: "none"``).

Either way the brain must say hello with the session's token within the
handshake timeout (10 s), or it is stopped and the launch fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BootError
from .broker import Approver, Broker, BrokerConfig, Log
from .bundle import BrainBundle
from .policy import Policy
from .win32 import brain_environment


@dataclass
class BrainSession:
    broker: Broker
    session: str
    pipe: str
    isolation: str  # "appcontainer" on Windows, "none" elsewhere
    process: subprocess.Popen[bytes] | None
    pid: int
    _runtime: Path | None = None
    _handle: int = 0  # Windows: the brain's process handle
    _job: int = 0  # Windows: the job the brain (and all it starts) runs in; closing it ends them

    def health(self, timeout: float = 10.0) -> dict[str, Any]:
        """Started and answering: a ping through the broker to the brain and back."""
        start = time.monotonic()
        pong = self.broker.ping(timeout=timeout)
        return {
            "ok": bool(pong.get("pong")),
            "session": self.session,
            "isolation": self.isolation,
            "pid": self.pid,
            "brainVersion": pong.get("brainVersion"),
            "roundTripMs": round((time.monotonic() - start) * 1000, 1),
        }

    def stop(self, timeout: float = 10.0) -> int | None:
        try:
            self.broker.call_brain("shutdown", timeout=timeout)
        except Exception:
            pass  # already gone, or not answering: stopped below either way
        code = None
        if sys.platform == "win32" and self._handle:  # pragma: no cover - the Windows CI job
            from .win32 import stop_process

            code = stop_process(self._handle, timeout, self._job)
            self._handle = self._job = 0
        if self.process is not None:
            try:
                code = self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        self.broker.stop()
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
        return code


def _node(bundle: BrainBundle) -> str:
    if sys.platform == "win32" and bundle.node is not None:
        return str(bundle.node)  # an AppContainer may not read Program Files: the bundle's own node.exe
    found = shutil.which("node")
    if found is None:
        raise BootError("node is not installed", hint="install Node.js, or use a bundle that carries node.exe")
    return found


def launch(
    bundle: BrainBundle,
    *,
    workspace: Path | None = None,
    cli_version: str = "",
    allow_shell: bool = False,
    handshake_timeout: float = 10.0,
    log: Log | None = None,
    approver: Approver | None = None,
    approval_timeout: float = 120.0,
    policy: Policy | None = None,
) -> BrainSession:
    session = secrets.token_hex(12)
    token = secrets.token_urlsafe(32)
    isolation = "appcontainer" if sys.platform == "win32" else "none"
    config = BrokerConfig(
        token=token,
        workspace=workspace,
        allow_shell=allow_shell,
        handshake_timeout=handshake_timeout,
        approval_timeout=approval_timeout,
        metadata={
            "session": session,
            "runtime": "brain",
            "isolation": isolation,
            "bundle": str(bundle.doc.get("version")),
        },
    )
    broker = Broker(config, policy=policy, approver=approver, log=log)
    argv_tail = [str(bundle.entrypoint)]
    if bundle.module is not None:
        argv_tail.append(f"--module={bundle.module}")
    runtime: Path | None = None
    process = None
    handle = job = 0
    if sys.platform == "win32":  # pragma: no cover - the Windows CI job
        from .win32 import PipeListener, current_user_sid, ensure_profile, launch_in_appcontainer, pipe_name, pipe_sddl

        pipe = pipe_name(session)
        appcontainer = ensure_profile()
        listener: Any = PipeListener(pipe, pipe_sddl(current_user_sid(), appcontainer))
        threading.Thread(target=broker.serve, args=(listener,), daemon=True).start()
        env = brain_environment(os.environ, pipe, token, str(workspace or ""), cli_version)
        pid, handle, job = launch_in_appcontainer(
            [_node(bundle), *argv_tail, f"--pipe={pipe}"], env, str(bundle.directory), appcontainer
        )
    else:
        runtime = Path(tempfile.mkdtemp(prefix="terminai-brain-"))  # 0700: only this user reaches the socket
        pipe = str(runtime / "pipe")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(pipe)
        listener.listen(16)
        threading.Thread(target=broker.serve, args=(listener,), daemon=True).start()
        env = brain_environment(os.environ, pipe, token, str(workspace or ""), cli_version)
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        with (runtime / "brain.log").open("wb") as brain_log:  # the child keeps its own handle
            process = subprocess.Popen(
                [_node(bundle), *argv_tail, f"--pipe={pipe}"], env=env, cwd=bundle.directory,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=brain_log,
            )  # fmt: skip
        pid = process.pid
    brain = BrainSession(broker, session, pipe, isolation, process, pid, runtime, handle, job)
    if not broker.handshake.wait(handshake_timeout):
        detail = ""
        if runtime is not None and (runtime / "brain.log").exists():
            detail = (runtime / "brain.log").read_text(errors="replace").strip()[-500:]
        brain.stop(timeout=1)
        raise BootError(
            f"the brain did not complete its handshake within {handshake_timeout:g} s"
            + (f": {detail}" if detail else ""),
            hint="check the bundle and Node.js",
        )
    return brain


__all__ = [
    "BrainSession",
    "launch",
]
