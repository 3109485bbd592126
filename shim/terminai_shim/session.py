"""A running VM and its agent: boot, use, close.

``Session.boot`` returns only when the guest agent has answered ``hello``;
``close`` asks the agent to power off, waits briefly, then kills the VMM
and removes the per-VM runtime directory whatever happened before.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from ._internal.accel import choose_accel
from ._internal.backends import select_backend
from ._internal.backends.base import Backend, Machine, RuntimeDir
from ._internal.backends.qemu import WORKSPACE_TAG, Channel, QemuBackend, device_layout
from ._internal.client import AgentClient, Call
from ._internal.fsutil import cache_root, write_atomic
from ._internal.netpolicy import Allowlist
from ._internal.process import pid_alive
from .errors import BootError, ChannelClosed, ConfigError, ShimError, TimeoutExpired
from .models import AccelChoice, BootConfig

OWNER_FILE = "owner.pid"


def network_log() -> Path:
    """Every session's network decisions, one JSON line each, with its session id."""
    path = cache_root() / "logs" / "network.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def runtime_base() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"terminai-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def clean_stale_runtime_dirs(base: Path) -> list[Path]:
    """Remove runtime directories whose shim died without cleaning up (SIGKILL).

    Its VMM died with it (PR_SET_PDEATHSIG); only the directory is left.
    """
    removed = []
    for entry in base.glob("vm-*"):
        try:
            owner = int((entry / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not pid_alive(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def new_runtime_dir() -> RuntimeDir:
    base = runtime_base()
    clean_stale_runtime_dirs(base)
    path = Path(tempfile.mkdtemp(prefix="vm-", dir=base))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return RuntimeDir(path)


class Session:
    def __init__(
        self,
        config: BootConfig,
        accel: AccelChoice,
        machine: Machine,
        runtime: RuntimeDir,
        client: AgentClient,
        backend: Backend,
    ) -> None:
        self.config = config
        self.backend = backend
        self.accel = accel
        self.machine = machine
        self.runtime = runtime
        self.client = client
        self.boot_seconds = 0.0
        self.restored_from: str | None = None
        self.snapshot: Any = None  # the snapshot saved by this cold boot, if any
        self._closed = False

    @classmethod
    def boot(cls, config: BootConfig, backend: Backend | None = None) -> Session:
        """Boot (or restore) a VM and return once its agent answers.

        With ``snapshots="auto"`` on the QEMU backend, a saved VM matching
        every input is restored; if there is none, or it is damaged, the VM
        boots cold and is saved right after its agent answers, before any
        workspace is mounted or any command runs.
        """
        accel = choose_accel(config.accel)
        backend = backend or select_backend(accel, config)
        backend.check(config)
        if config.network.mode == "allowlist":
            Allowlist.parse(config.network.allow)  # a bad entry is refused before anything starts
        if config.workspace is not None and not Path(config.workspace).is_dir():
            raise ConfigError(
                f"workspace {config.workspace} is not a directory", hint="create it or pass an existing one"
            )
        started = time.monotonic()
        snap_key, description, store = None, None, None
        if (
            config.snapshots == "auto"
            and backend.snapshots
            and isinstance(backend, QemuBackend)
            and Channel.choose(config.channel).kind == ("virtio-serial")
        ):
            from ._internal.snapshot import SnapshotStore, describe, key_of

            description = describe(config, accel, backend.qemu, device_layout(config, accel))
            snap_key = key_of(description)
            store = SnapshotStore()
            snap = store.find(snap_key)
            if snap is not None:
                problem = snap.verify()
                if problem is None:
                    restore = _Restore(config)
                    try:
                        session = cls._start(config, accel, backend, started, incoming=snap.state, prelude=restore)
                    except ShimError as exc:
                        problem = f"restore failed: {exc.message}"
                    else:
                        try:
                            session.restored_from = snap_key
                            restore.finish(session, max(0.1, started + config.boot_timeout - time.monotonic()))
                            session._open_network()
                        except BaseException:
                            session.close()  # the snapshot is fine; this session is not
                            raise
                        session.boot_seconds = time.monotonic() - started
                        return session
                warnings.warn(f"snapshot {snap_key[:12]} not used ({problem}); booting cold", stacklevel=2)
                store.remove(snap_key)
        session = cls._start(config, accel, backend, started)
        if store is not None and snap_key is not None and description is not None:
            try:
                session.snapshot = store.save(session.runtime.control_socket, snap_key, description)
            except Exception as exc:  # a VM that could not be saved still serves
                warnings.warn(f"could not save a snapshot: {exc}", stacklevel=2)
                if not session.machine.alive() or session.client.closed:
                    session.close()
                    raise
        try:
            session._mount_workspace()
            session._open_network()
        except BaseException:
            session.close()
            raise
        session.boot_seconds = time.monotonic() - started
        return session

    @classmethod
    def _start(
        cls,
        config: BootConfig,
        accel: AccelChoice,
        backend: Backend,
        started: float,
        incoming: Path | None = None,
        prelude: _Restore | None = None,
    ) -> Session:
        """Start the VM and greet its agent (a restored one through ``prelude``)."""
        runtime = new_runtime_dir()
        deadline = started + config.boot_timeout
        machine: Machine | None = None
        try:
            machine = backend.start(config, accel, runtime, incoming)
            sock = machine.connect_agent(deadline)
            client = AgentClient(sock)
            try:
                if prelude is not None:
                    prelude.greet(client, deadline)
                else:
                    client.hello(timeout=max(0.1, deadline - time.monotonic()))
            except (ChannelClosed, TimeoutExpired) as exc:
                client.close()
                machine.wait(2.0)  # a panicking guest is about to take QEMU down
                state = "exited" if not machine.alive() else "is still running"
                raise BootError(
                    f"the guest agent did not answer ({exc.message}); the VM {state}. " + machine.diagnostics(),
                    hint="check the kernel and root image; `terminai-shim doctor` shows the host's state",
                ) from None
        except BaseException:
            if machine is not None:
                machine.kill()
            shutil.rmtree(runtime.path, ignore_errors=True)
            raise
        return cls(config, accel, machine, runtime, client, backend)

    @property
    def session_id(self) -> str:
        return str(self.client.hello_info.get("session"))

    def _open_network(self) -> None:
        """Before any command runs: the allowlist proxy learns the session's
        rules and id (it is spawned per connection and reads them then);
        ``open`` is logged as the explicit choice it is."""
        policy = self.config.network
        if policy.mode == "none":
            return
        log = network_log()
        if policy.mode == "allowlist":
            from ._internal.netproxy import upstream_from_env

            doc = {"session": self.session_id, "allow": list(policy.allow), "log": str(log),
                   "upstream": upstream_from_env(dict(os.environ))}  # fmt: skip
            write_atomic(self.runtime.proxy_config, json.dumps(doc).encode())
        record = {"time": round(time.time(), 3), "session": self.session_id, "decision": "network",
                  "mode": policy.mode, "allow": list(policy.allow), "backend": self.backend.name}  # fmt: skip
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if policy.mode == "open":
            warnings.warn(f"session {self.session_id}: the guest can reach everything this host can "
                          "(network open)", stacklevel=3)  # fmt: skip

    def _mount_workspace(self) -> None:
        if self.config.workspace is not None and not self.backend.shares_workspace_at_start:
            self.client.call("mount", **_mount_fields(self.config))

    def describe(self) -> dict[str, Any]:
        """The CLI's descriptor fields: which isolation is in force."""
        return {
            "type": self.backend.isolation,
            "isIsolated": True,
            "backend": self.backend.name,
            "displayName": self.backend.describe(self.accel),
            "network": {"mode": self.config.network.mode, "allow": list(self.config.network.allow)},
        }

    def health(self) -> dict[str, Any]:
        """A real round trip: ping, then import the survival kit in the guest."""
        self.client.ping()
        status, out, err = self.client.run(
            ["python3", "-c", "import sys, terminai_apts; terminai_apts.model.ObjectTableLabels.TRANSIT; "
             "print(sys.executable); print(terminai_apts.__version__)"],
            timeout=60,
        )  # fmt: skip
        if status.exit_code != 0:
            raise ShimError(f"survival kit import failed in the guest: {err.decode(errors='replace').strip()}")
        python, version = out.decode().split()
        return {
            "ok": True,
            "pythonPath": python,
            "taptsVersion": version,
            "session": self.client.hello_info.get("session"),
        }

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.machine.alive() and not self.client.closed:
                try:
                    self.client.shutdown()
                except ShimError:
                    pass
                self.machine.wait(timeout)
        finally:
            self.machine.kill()
            self.client.close()
            shutil.rmtree(self.runtime.path, ignore_errors=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _mount_fields(config: BootConfig) -> dict[str, Any]:
    return {"source": WORKSPACE_TAG, "target": config.workspace_mount, "fstype": "9p"}


class _Restore:
    """What a restored VM needs before anything runs. Every restored VM
    starts from the same memory: it gets new randomness, the current time
    and its own identity, then the workspace.

    All of it goes out right behind ``hello``, before the answer: the agent
    handles the lot in one wake-up, and under TCG each round trip after a
    restore runs on cold code (QEMU translates every guest instruction anew)."""

    def __init__(self, config: BootConfig) -> None:
        self.config = config
        self.session_id = os.urandom(16).hex()
        self.calls: list[Call] = []

    def greet(self, client: AgentClient, deadline: float) -> None:
        hello = client.submit_hello()
        hostname = f"terminai-{self.session_id[:8]}"
        self.calls.append(
            client.submit("freshen", os.urandom(64), time=time.time(), hostname=hostname, session=self.session_id)
        )
        if self.config.workspace is not None:  # the QEMU backend shares it through 9p, mounted on request
            self.calls.append(client.submit("mount", **_mount_fields(self.config)))
        client.accept_hello(hello.result(max(0.1, deadline - time.monotonic())))

    def finish(self, session: Session, timeout: float) -> None:
        """Wait for the answers (the first error is raised), then set the
        clock once more: the first ``freshen`` waited in QEMU's queue while
        the VM was loading, so its time is a fraction of a second old. Now
        the agent answers at once, and the clock is off by half a round trip."""
        deadline = time.monotonic() + timeout
        for call in self.calls:
            call.result(max(0.1, deadline - time.monotonic()))
        session.client.call("freshen", timeout=max(0.1, deadline - time.monotonic()), time=time.time(),
                            session=self.session_id)  # fmt: skip
        session.client.hello_info["session"] = self.session_id
