"""A running VM and its agent: boot, use, close.

``Session.boot`` returns only when the guest agent has answered ``hello``;
``close`` asks the agent to power off, waits briefly, then kills the VMM
and removes the per-VM runtime directory whatever happened before.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from terminai_protocol import bootcontract as boot

from ._internal.accel import choose_accel
from ._internal.backends.base import Backend, Machine, ProcessMachine, RuntimeDir, git_share
from ._internal.client import AgentClient, Call
from ._internal.fsutil import cache_root
from ._internal.process import pid_alive
from .errors import AgentError, BootError, ChannelClosed, ShimError, TimeoutExpired
from .models import AccelChoice, BootConfig

OWNER_FILE = "owner.pid"
MAX_BASE = 60


def network_log() -> Path:
    """Every session's network decisions, one JSON line each, with its session id."""
    path = cache_root() / "logs" / "network.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _private_dir(path: Path) -> bool:
    """A real directory (not a link), ours, that nobody else can write. (It
    may be traversable: QEMU, dropped to the workspace's owner, reaches its
    own directory inside by name.)"""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o022 == 0


def runtime_base() -> Path:
    """Where per-VM directories live: sockets, the console, the empty share.

    Without XDG_RUNTIME_DIR (sudo, cron, CI) the base sits in a shared
    temporary directory, where another local user can create the name
    first and swap what is inside for links: QEMU would then write its
    console or export a share wherever that user chose. A base that is not
    a private directory of ours is never used; a fresh private one is made
    instead (mkdtemp: random name, mode 0700, created atomically)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(xdg) if xdg and _private_dir(Path(xdg)) else Path(tempfile.gettempdir())
    if len(str(base)) > MAX_BASE:  # Unix socket paths are short (108 bytes) and live below it
        base = Path("/tmp")
    path = base / f"terminai-{os.geteuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"terminai-{os.geteuid()}-", dir=base))
    if _private_dir(path):
        return path
    warnings.warn(f"{path} is not a private directory of this user; using a fresh one", stacklevel=2)
    return Path(tempfile.mkdtemp(prefix=f"terminai-{os.geteuid()}-", dir=base))


def _owner(entry: Path) -> int | None:
    try:
        fd = os.open(entry / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return int(os.read(fd, 32))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def clean_stale_runtime_dirs(base: Path) -> list[Path]:
    """Remove runtime directories whose shim died without cleaning up (SIGKILL).

    Its VMM died with it (PR_SET_PDEATHSIG); only the directory is left.
    """
    removed = []
    for entry in base.glob("vm-*"):
        owner = _owner(entry)
        if owner is not None and not entry.is_symlink() and not pid_alive(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def new_runtime_dir() -> RuntimeDir:
    base = runtime_base()
    clean_stale_runtime_dirs(base)
    path = Path(tempfile.mkdtemp(prefix="vm-", dir=base))
    fd = os.open(path / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    return RuntimeDir(path)


class Watchdog:
    """The host's own view of a running VM, independent of what its agent says.

    A guest can halt itself, freeze its agent, or fill its memory until
    nothing answers; its agent can ignore a command's timeout. None of that
    may hang the shim. While commands run, the agent must answer a ping at
    least every ``PING_EVERY`` seconds, and no command may outlive its
    timeout plus ``HOST_GRACE``; QEMU's own events (the guest shut down,
    stopped, panicked, reset) end the VM at once. Whatever the cause, the VM
    is stopped, and every waiting command fails with the reason."""

    PING_EVERY = 5.0
    PING_TIMEOUT = 10.0
    STOP_EVENTS = ("SHUTDOWN", "STOP", "GUEST_PANICKED", "RESET", "POWERDOWN")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.reason: str | None = None
        self._failing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _events(self) -> Any:
        """QEMU's event stream (QMP), or None where there is none (containers)."""
        control = self.session.runtime.control_socket
        if not isinstance(self.session.machine, ProcessMachine) or not control.exists():
            return None
        from ._internal.qmp import QmpError, QmpEvents

        try:
            return QmpEvents(str(control), expect_pid=self.session.machine.pid)
        except QmpError:
            return None

    def _run(self) -> None:
        session = self.session
        client = session.client
        qmp = self._events()
        ping: Call | None = None
        sent = 0.0
        try:
            while not self._stop.is_set():
                if qmp is not None:
                    event = qmp.next_event(1.0)
                    if event in self.STOP_EVENTS:
                        self.fail(f"the guest {event.lower().replace('_', ' ')} (QEMU event {event})")
                        return
                elif self._stop.wait(1.0):
                    return
                if client.closed or self._stop.is_set():
                    return
                now = time.monotonic()
                running = client.running()
                late = [p for p in running if p.host_deadline is not None and now > p.host_deadline]
                if late:
                    for proc in late:
                        proc.host_timed_out = True
                    self.fail("a command outlived its timeout and the guest did not end it")
                    return
                if not running:
                    ping = None
                elif ping is not None and (ping.done() or client.last_heard > sent or client.delivering):
                    ping = None  # it answered, or frames flow, or our own reader is held by a slow consumer
                elif ping is not None and now - sent > self.PING_TIMEOUT:
                    self.fail(f"the guest agent stopped answering (nothing for {self.PING_TIMEOUT:.0f}s)")
                    return
                elif ping is None and now - client.last_heard >= self.PING_EVERY:
                    try:
                        ping, sent = client.submit("ping"), now
                    except ShimError:
                        return  # the channel is closed: the waiting commands already know
        finally:
            if qmp is not None:
                qmp.close()

    def fail(self, reason: str) -> None:
        """Stop the VM now, every waiting command failing with ``reason`` (any
        thread). The first reason stands: stopping QEMU closes its monitor,
        which the watchdog's own loop then reads as a shutdown."""
        with self._failing:
            if self.reason is not None:
                return
            self.reason = reason
        for proc in self.session.client.running():
            proc.failure = f"{reason}; the VM was stopped and the command's outcome is unknown"
        self.session.machine.kill()
        self.session.client.close()


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
        self._kit: tuple[str, str, str, Any] | None = None  # (python, version, module, its stat) once imported
        self.watchdog = Watchdog(self)
        machine.watch(self.watchdog.fail)
        client.default_user = config.user

    @classmethod
    def boot(cls, config: BootConfig, backend: Backend | None = None, accel: AccelChoice | None = None) -> Session:
        """Boot (or restore) a VM and return once its agent answers.

        ``launch`` resolves and checks a request and passes the tier and
        accelerator it decided; without them they are decided here (tests,
        the benchmark). With ``snapshots="auto"`` on the QEMU backend, a
        saved VM matching every input is restored; if there is none, or it
        is damaged, the VM boots cold and is saved right after its agent
        answers, before any workspace is mounted or any command runs.
        """
        accel = accel or choose_accel(config.accel)
        if backend is None:
            from .launch import backend_for  # the tier is decided there, for every door

            backend = backend_for(config, accel)
        backend.check(config)
        started = time.monotonic()
        snap_key, description, store = None, None, None
        if config.snapshots == "auto" and backend.snapshots:
            description = backend.snapshot_description(config, accel)
        if description is not None:
            from ._internal.snapshot import SnapshotStore, key_of

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
                        session.watchdog.start()
                        return session
                warnings.warn(f"snapshot {snap_key[:12]} not used ({problem}); booting cold", stacklevel=2)
                store.remove(snap_key)
        session = cls._start(config, accel, backend, started)
        if store is not None and snap_key is not None and description is not None:
            try:
                # The set-up every command would otherwise wait for, done once and saved with the VM.
                session.client.call("prepare", timeout=max(1.0, started + config.boot_timeout - time.monotonic()))
                warm_up(session.client)
                session.snapshot = store.save(session.runtime.control_socket, snap_key, description,
                                              vmm_pid=session.machine.pid)  # fmt: skip
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
        session.watchdog.start()
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
            mounted = client.hello_info.get("layers", [])
            wanted = [layer.name for layer in config.layers]
            if backend.isolation == "microvm" and mounted != wanted:
                client.close()
                raise BootError(
                    f"the guest mounted the root filesystem layers {mounted}, not {wanted}; " + machine.diagnostics(),
                    hint="check that each layer file is a layer image (inv layers); the guest refuses commands",
                )
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
        """Before any command runs: the allowlist proxy (listening since
        before the VM started) learns the session's id for its log; ``open``
        is logged as the explicit choice it is."""
        policy = self.config.network
        if policy.mode == "none":
            return
        log = network_log()
        proxy = getattr(self.machine, "proxy", None)
        if proxy is not None:
            proxy.set_session(self.session_id, str(log))
        record = {"time": round(time.time(), 3), "session": self.session_id, "decision": "network",
                  "mode": policy.mode, "allow": list(policy.allow), "backend": self.backend.name}  # fmt: skip
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if policy.mode == "open":
            lifted = f" (host loopback/link-local lifted: {', '.join(policy.allow)})" if policy.allow else ""
            warnings.warn(f"session {self.session_id}: the guest can reach everything this host can, except its "
                          f"loopback and link-local addresses (network open){lifted}", stacklevel=3)  # fmt: skip

    def _mount_workspace(self) -> None:
        if not self.backend.shares_workspace_at_start:
            for fields in _mounts(self.config):
                self.client.call("mount", **fields)

    def adopt(self) -> None:
        """A VM that was kept waiting (``serve``'s pool) becomes a new
        session: new randomness, clock, host name and id, exactly as a
        restore gives them, and the network log learns the new id."""
        session_id = os.urandom(16).hex()
        self.client.call("freshen", os.urandom(64), timeout=10, time=time.time(),
                         hostname=f"terminai-{session_id[:8]}", session=session_id)  # fmt: skip
        self.client.hello_info["session"] = session_id
        self._open_network()

    def describe(self) -> dict[str, Any]:
        """The CLI's descriptor fields: which isolation is in force."""
        out: dict[str, Any] = {
            "type": self.backend.isolation,
            "isIsolated": True,
            "backend": self.backend.name,
            "displayName": self.backend.describe(self.accel),
            "network": {"mode": self.config.network.mode, "allow": list(self.config.network.allow)},
            "guestUser": self.config.user,
            "rootfs": {"profile": self.config.profile, "layers": [layer.name for layer in self.config.layers]},
            "gitReadOnly": self._git_read_only(),
        }
        notice = self.weaker_tier_notice()
        if notice:
            out["notice"] = notice
        return out

    def _git_read_only(self) -> bool:
        if self.config.writable_git or self.config.workspace is None:
            return False
        return self.backend.guards_workspace or self.machine.read_only_git

    def weaker_tier_notice(self) -> str | None:
        """Said once, on stderr and in ``initialize``: a tier weaker than a
        microVM was chosen (never silently: an engine that appears changes ``auto``)."""
        if self.backend.isolation == "microvm":
            return None
        return (f"running in the {self.backend.isolation} tier, which shares this host's kernel: weaker than a "
                "microVM (require one with --require-microvm, or requireMicrovm in initialize)")  # fmt: skip

    def health(self) -> dict[str, Any]:
        """A real round trip, every time. The first check of a boot runs
        the guest's Python and imports the survival kit (about half a second
        under emulation). Later ones ask the agent, in one wake-up, for a
        ping (its session must still be this one) and the kit module's
        ``stat``: the file that import loaded must be there unchanged (type,
        size, modification time), or the next check imports it again."""
        if self._kit is None:
            self.client.ping()
            status, out, err = self.client.run(
                ["python3", "-c", "import sys, terminai_apts; terminai_apts.model.ObjectTableLabels.TRANSIT; "
                 "print(sys.executable); print(terminai_apts.__version__); print(terminai_apts.__file__)"],
                timeout=60,
            )  # fmt: skip
            if status.exit_code != 0:
                raise ShimError(f"survival kit import failed in the guest: {err.decode(errors='replace').strip()}")
            python, version, module = out.decode().split()
            self._kit = (python, version, module, _kit_stat(self.client.submit("stat", path=module)))
        else:
            python, version, module, seen = self._kit
            ping = self.client.submit("ping")
            now = _kit_stat(self.client.submit("stat", path=module))
            answer = ping.result(10).header
            if answer.get("session") != self.session_id:
                raise ShimError("the guest agent answered for another session than this one")  # its words not echoed
            if now != seen:
                self._kit = None  # the next check imports it again
                raise ShimError(f"the survival kit changed in the guest ({module})")
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
        self.watchdog.stop()
        try:
            if self.machine.alive() and not self.client.closed:
                try:
                    self.client.shutdown()
                    if self.backend.isolation == "microvm":
                        # The agent answers once its commands are gone and their writes are flushed: nothing left
                        # in the VM is worth the power-off's wait (a container's engine cleans up as it ends).
                        timeout = 0
                except ShimError:
                    pass
                if timeout:
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


# Run before a snapshot is saved, through the whole request path: a restored
# VM's first command then finds the programs in the page cache and the
# agent's code already specialised by its Python (3.11 adapts bytecode as it
# runs). Under TCG it took a third off a warm `run`'s first command.
WARM_UP = (["true"], ["/bin/sh", "-c", "true"], ["/bin/sh", "-c", "echo warm; echo up >&2"])


def warm_up(client: AgentClient) -> None:
    for _ in range(2):
        for argv in WARM_UP:
            client.run(argv, timeout=30)


def _kit_stat(call: Any) -> tuple[Any, ...] | None:
    """The survival kit module's type, size and mtime as the agent sees them (None: gone)."""
    try:
        h = call.result(10).header
    except AgentError as exc:
        if exc.agent_code == "NOT_FOUND":
            return None
        raise
    return (h.get("type"), h.get("size"), h.get("mtime"))


def _mounts(config: BootConfig) -> list[dict[str, Any]]:
    """The workspace, then its ``.git`` read-only over it (unless asked to be
    writable): guest code must not plant hooks or ``core.fsmonitor`` that
    the host's next ``git`` command in the workspace would run; then the
    ``/workspace`` alias of both."""
    if config.workspace is None:
        return []
    mounts: list[dict[str, Any]] = [{"source": boot.WORKSPACE_TAG, "target": config.workspace_mount, "fstype": "9p"}]
    if not config.writable_git and git_share(config.workspace) is not None:
        mounts.append({"source": boot.GIT_TAG, "target": f"{config.workspace_mount}/.git", "fstype": "9p",
                       "readonly": True})  # fmt: skip
    if config.workspace_alias is not None:  # after .git: the alias carries it along (a recursive bind)
        mounts.append({"source": config.workspace_mount, "target": config.workspace_alias, "fstype": "bind"})
    return mounts


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
        for fields in _mounts(self.config):  # the QEMU backend shares it through 9p, mounted on request
            self.calls.append(client.submit("mount", **fields))
        client.accept_hello(hello.result(max(0.1, deadline - time.monotonic())))

    def finish(self, session: Session, timeout: float) -> None:
        """Wait for the answers (the first error is raised), then set the
        clock once more: the first ``freshen`` waited in QEMU's queue while
        the VM was loading, so its time is a fraction of a second old. Now
        the agent answers at once, and the clock is off by half a round trip.
        That second one is not waited for: the agent handles requests in
        order, so it is done before any command the host sends next, and a
        round trip on cold code is the largest part of a warm start."""
        deadline = time.monotonic() + timeout
        for call in self.calls:
            call.result(max(0.1, deadline - time.monotonic()))
        session.client.submit("freshen", time=time.time(), session=self.session_id)
        session.client.hello_info["session"] = self.session_id


__all__ = [
    "Session",
    "clean_stale_runtime_dirs",
    "network_log",
    "new_runtime_dir",
]
