"""The container tier: the same root image and agent, run by a Docker engine.

Where KVM is not usable, a container is the fastest honest isolation. The
image is the release's OCI archive, loaded from the verified file and run
by its image id (the sha256 of its config, which binds every layer): never
pulled, never resolved by tag. The container gets no network, a read-only
root with tmpfs where a userland writes, no capabilities, the engine's
default seccomp profile, ``no-new-privileges``, memory, CPU and pids
limits, and the workspace bind-mounted where the microVM mounts it. The
agent is PID 1 and serves the wire protocol on a Unix socket in a host
directory bind-mounted at ``/run/terminai``.

Every container carries labels naming the shim that owns it; containers
whose shim died (SIGKILL leaves no chance to clean up) are removed the next
time any shim starts one.

The docker SDK is imported only here, and only when this backend is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tarfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from terminai_protocol import bootcontract as boot

from ...errors import BootError, ConfigError
from ...models import AccelChoice, BootConfig
from ..diskfloor import DIRECT_STOP_SECONDS, ENGINE_STOP_SECONDS, DiskFloor, FloorWatch, disk_floor
from ..fsutil import cache_root, fd_digest, locked, others_can_write, sealed_copy
from ..process import pid_alive
from .base import GIT_SCAN_LIMIT, Backend, Machine, RuntimeDir, WorkspaceScan, scan_workspace

LABEL = "org.terminai.shim"
OWNER_PID = "org.terminai.owner-pid"
OWNER_HOST = "org.terminai.owner-host"
# Writable places a userland expects, as tmpfs over the read-only root.
TMPFS = {
    "/tmp": "rw,nosuid,nodev,mode=1777",
    "/var/tmp": "rw,nosuid,nodev,mode=1777",
    "/run": "rw,nosuid,nodev,mode=0755",
    "/root": "rw,nosuid,nodev,mode=0700",
}
PIDS_LIMIT = 1024


def engine_socket() -> str | None:
    """The engine's Unix socket, from DOCKER_HOST or the default."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host[len("unix://") :] if host.startswith("unix://") else None


def engine_answers(timeout: float = 1.0) -> tuple[bool, str]:
    """Does a Docker engine answer ``/_ping``? Raw HTTP over the socket: the
    SDK costs a few hundred milliseconds to import, which ``auto`` must not pay."""
    path = engine_socket()
    if path is None:  # tcp:// engines: ask the SDK
        try:
            import docker

            docker.from_env(timeout=int(max(1, timeout))).ping()
            return True, f"the Docker engine at {os.environ['DOCKER_HOST']} answers"
        except Exception as exc:
            return False, f"the Docker engine at {os.environ.get('DOCKER_HOST')} does not answer ({exc})"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = s.recv(256)
    except OSError as exc:
        return False, f"no Docker engine answers on {path} ({exc.strerror or exc})"
    if reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]:
        return True, f"the Docker engine on {path} answers"
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    return False, f"the Docker engine on {path} answered {status}"


def archive_image_id(archive: BinaryIO, name: str = "the image archive", profile: str | None = None) -> str:
    """The image id the engine will report for ``profile`` (None: the
    archive's first image, its default): the config digest it names. An
    archive holds one image per profile, tagged ``...-<profile>``."""
    try:
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            entries = json.load(member)
        if profile is None:
            config = str(entries[0]["Config"])
        else:
            found = [e for e in entries if any(str(t).endswith(f"-{profile}") for t in e.get("RepoTags") or [])]
            if len(found) != 1:
                tags = [t for e in entries for t in e.get("RepoTags") or []]
                raise ConfigError(f"{name} has no image for profile {profile!r} (it has {', '.join(tags)})",
                                  hint="choose one of its profiles (--profile)")  # fmt: skip
            config = str(found[0]["Config"])
    except (OSError, KeyError, IndexError, ValueError, TypeError, AttributeError, tarfile.TarError) as exc:
        raise ConfigError(f"{name} is not an image archive: {exc}", hint="build it with `inv container`") from None
    digest = config.rsplit("/", 1)[-1].removesuffix(".json")
    if not digest or len(digest) != 64:
        raise ConfigError(f"{name} names no config digest")
    return f"sha256:{digest}"


class ContainerMachine(Machine):
    def __init__(self, container: Any, runtime: RuntimeDir) -> None:
        self.container = container
        self.runtime = runtime
        self._pid = int(container.attrs.get("State", {}).get("Pid") or 0)
        self.sweep: tuple[Path, WorkspaceScan, bool] | None = None  # (workspace, as it was, writable git)
        self.floor: tuple[str, DiskFloor] | None = None  # (workspace, its floor): watched once the session is
        self._floor_watch: FloorWatch | None = None
        self.moved_aside: list[Path] = []
        self.plain_now: list[Path] = []  # FIFOs, sockets and devices it made, now plain files

    @property
    def agent_socket(self) -> Path:
        return self.runtime.path / "agent" / boot.CONTAINER_AGENT_SOCKET

    @property
    def pid(self) -> int:
        return self._pid

    def connect_agent(self, deadline: float) -> socket.socket:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.agent_socket))
                return sock
            except OSError:
                sock.close()
            if not self.alive():
                raise BootError("the container exited before its agent listened: " + self.diagnostics())
            if time.monotonic() > deadline:
                raise BootError("the container's agent did not listen in time: " + self.diagnostics())
            time.sleep(0.01)

    def _status(self) -> dict[str, Any]:
        from docker.errors import NotFound

        try:
            self.container.reload()
        except NotFound:
            return {"Status": "removed"}
        state: dict[str, Any] = self.container.attrs.get("State", {})
        return state

    def alive(self) -> bool:
        try:
            return self._status().get("Status") == "running"
        except Exception:
            return False

    def wait(self, timeout: float) -> int | None:
        end = time.monotonic() + timeout
        while True:
            state = self._status()
            if state.get("Status") != "running":
                return int(state.get("ExitCode", 0))
            if time.monotonic() > end:
                return None
            time.sleep(0.05)

    def watch(self, stop: Callable[[str], None]) -> None:
        if self.floor is not None:
            direct = self._pid > 0 and os.geteuid() == 0  # see _kill_pid_namespace
            self._floor_watch = FloorWatch(self.floor[0], self.floor[1], stop,
                                           DIRECT_STOP_SECONDS if direct else ENGINE_STOP_SECONDS)  # fmt: skip

    def kill(self) -> None:
        """Remove the container with everything still running in it."""
        from docker.errors import APIError, NotFound

        if self._floor_watch is not None:
            self._floor_watch.close()
        self._kill_pid_namespace()
        try:
            self.container.remove(force=True)
        except NotFound:
            pass
        except APIError as exc:
            if "already in progress" not in str(exc):
                raise
        self._sweep()

    def _kill_pid_namespace(self) -> None:
        """Where the shim may signal it (root), the container's PID 1 gets
        SIGKILL straight away, and the kernel ends every other process of
        its PID namespace with it, before the engine's API round trip: a
        guest writing at memory speed writes for as long as a stop takes.
        The process is held by a pidfd and must still be in a cgroup named
        for this container's id, so a reused pid is never signalled;
        elsewhere the engine's removal below does the same, later."""
        cid = str(getattr(self.container, "id", "") or "")
        if self._pid <= 0 or len(cid) < 12 or os.geteuid() != 0:
            return
        try:
            fd = os.pidfd_open(self._pid)
        except OSError:
            return
        try:
            groups = Path(f"/proc/{self._pid}/cgroup").read_text()
            if any(line.partition(":")[2].partition(":")[2].endswith(cid) or f"-{cid}." in line
                   for line in groups.splitlines()):  # fmt: skip
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _sweep(self) -> None:
        """Once the container is gone: what it made in the workspace that a
        host program would act on is made harmless, so that nothing it
        leaves runs code through host git or hangs a host tool. Git
        metadata it made (a repository, a ``.git`` file, a bare shape) is
        moved aside (unless git is writable); a FIFO, socket or device node
        it made becomes an empty plain file, as the microVM's 9p export
        makes them. While the session runs this tier cannot refuse either
        (docs/security.md)."""
        if self.sweep is None:
            return
        workspace, before, writable_git = self.sweep
        self.sweep = None
        now = scan_workspace(workspace)
        if not writable_git:
            for rel in sorted(set(now.git) - set(before.git), key=lambda p: len(p.parts), reverse=True):
                path = workspace / rel
                if path.name.lower() != ".git":  # a bare shape: break it
                    path = path / "HEAD"
                aside = path.with_name(f"{path.name}.terminai-untrusted-{os.urandom(3).hex()}")
                try:
                    os.rename(path, aside)
                    self.moved_aside.append(aside)
                except OSError:
                    continue
        for rel in set(now.special) - set(before.special):
            path = workspace / rel
            try:
                tmp = path.with_name(f".{path.name}.terminai-{os.urandom(3).hex()}")
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
                os.rename(tmp, path)
                self.plain_now.append(path)
            except OSError:
                continue
        if self.moved_aside:
            shown = ", ".join(str(p.relative_to(workspace)) for p in self.moved_aside[:5])
            more = f" and {len(self.moved_aside) - 5} more" if len(self.moved_aside) > 5 else ""
            warnings.warn(f"the container made git metadata in the workspace; moved aside so that host git does "
                          f"not run what it says: {shown}{more} (--writable-git keeps it)", stacklevel=2)  # fmt: skip

    def diagnostics(self) -> str:
        try:
            logs = self.container.logs(tail=12).decode(errors="replace").strip()
        except Exception:
            logs = ""
        return "container output:\n  " + "\n  ".join(logs.splitlines()) if logs else "(no container output)"


class ContainerBackend(Backend):
    name = "container"
    isolation = "container"
    shares_workspace_at_start = True

    def __init__(self) -> None:
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            try:
                import docker
                from docker.errors import DockerException
            except ImportError:
                raise BootError("the container backend needs the docker SDK", hint="pip install docker") from None
            try:
                self._client = docker.from_env(timeout=60)
                self._client.ping()
            except DockerException as exc:
                self._client = None
                raise BootError(f"the Docker engine is not running or refuses us: {exc}",
                                hint="start dockerd, or choose --backend qemu") from None  # fmt: skip
        return self._client

    def available(self) -> bool:
        return engine_answers()[0]

    def check(self, config: BootConfig) -> None:
        if config.network.mode == "allowlist":
            raise ConfigError("the container tier offers network none or open, not allowlist",
                              hint="use the microVM tier (--backend qemu) for an allowlist")  # fmt: skip
        if config.image is None or not Path(config.image).is_file():
            raise ConfigError(f"container image archive {config.image} does not exist",
                              hint="build it with `inv container` or use a release that lists one")  # fmt: skip

    def describe(self, accel: AccelChoice) -> str:
        return "Container (Docker)"

    def ensure_image(self, archive: Path, expected: str | None = None, profile: str | None = None) -> str:
        """The verified archive's image in the engine, by id; loaded if missing.
        One open file serves the check, the id and the load: the bytes that
        were checked are the bytes the engine gets (a sealed private copy of
        them when someone else could still write the archive in place)."""
        from docker.errors import ImageNotFound

        with contextlib.ExitStack() as stack:
            f = stack.enter_context(archive.open("rb"))
            if expected is not None:
                if others_can_write(f.fileno()):
                    copy, got = sealed_copy(f.fileno(), archive.name)
                    f = stack.enter_context(os.fdopen(copy, "rb"))
                else:
                    got = fd_digest(f.fileno())
                if got != expected:
                    raise ConfigError(
                        f"container image archive {archive} has sha256 {got}, expected {expected}: "
                        "refused before loading it",
                        hint="the archive was altered or swapped; fetch or build it again",
                    )
            image_id = archive_image_id(f, str(archive), profile)
            client = self.client()
            with locked(cache_root() / "locks" / f"image-{image_id[7:19]}.lock"):
                try:
                    client.images.get(image_id)
                    return image_id
                except ImageNotFound:
                    pass
                f.seek(0)
                loaded = {image.id for image in client.images.load(f)}
        if image_id not in loaded:
            raise BootError(f"the engine loaded {sorted(loaded)}, not {image_id}", hint="rebuild the archive")
        return image_id

    def clean_stale(self) -> list[str]:
        """Remove containers whose owning shim on this host is gone."""
        removed = []
        host = socket.gethostname()
        for container in self.client().containers.list(all=True, filters={"label": LABEL}):
            labels = container.labels or {}
            try:
                owner = int(labels.get(OWNER_PID, "0"))
            except ValueError:
                continue
            if labels.get(OWNER_HOST) == host and owner and not pid_alive(owner):
                try:
                    container.remove(force=True)
                    removed.append(container.name)
                except Exception:
                    pass  # another shim is removing it
        return removed

    def start(
        self, config: BootConfig, accel: AccelChoice, runtime: RuntimeDir, incoming: Path | None = None
    ) -> Machine:
        if incoming is not None:
            raise BootError("the container backend does not restore saved state")
        from docker.errors import DockerException
        from docker.types import Mount

        self.check(config)
        assert config.image is not None
        image_id = self.ensure_image(Path(config.image), config.image_sha256, config.profile)
        self.clean_stale()
        agent_dir = runtime.path / "agent"
        agent_dir.mkdir(exist_ok=True)
        mounts = [Mount(boot.CONTAINER_AGENT_DIR, str(agent_dir), type="bind")]
        scan = WorkspaceScan([], [])
        floor = None
        if config.workspace is not None:
            floor = disk_floor(str(config.workspace))  # refuses a session already below it
            scan = scan_workspace(config.workspace)
            if scan.linked:  # a write in the container would reach the other name, maybe outside the workspace
                shown = ", ".join(str(p) for p in scan.linked[:10])
                more = f" and {len(scan.linked) - 10} more" if len(scan.linked) > 10 else ""
                raise ConfigError(f"the workspace has files hard-linked to other names, which a write from the "
                                  f"container tier would change too: {shown}{more}",
                                  hint="use the microVM tier (it copies such a file before the guest writes it), "
                                  "or give the files their own copies (pnpm: package-import-method=copy)")  # fmt: skip
            if not scan.whole:
                warnings.warn(f"{config.workspace} is too large to look through for git metadata "
                              f"(more than {GIT_SCAN_LIMIT} directories): only what was seen is read-only",
                              stacklevel=2)  # fmt: skip
        for target in config.workspace_paths:  # the host's own path and the alias
            mounts.append(Mount(target, str(config.workspace), type="bind"))
            for rel in [] if config.writable_git else scan.git:  # hooks and config there run on the host
                # read-only over itself: without capabilities the container cannot unmount it
                mounts.append(Mount(f"{target}/{rel}", f"{config.workspace}/{rel}", type="bind", read_only=True))
        uid, gid = os.getuid(), os.getgid()
        try:
            container = self.client().containers.create(
                image_id,
                name=f"terminai-{runtime.path.name}",
                hostname=f"terminai-{os.urandom(4).hex()}",
                labels={LABEL: "1", OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname()},
                network_mode="bridge" if config.network.mode == "open" else "none",
                read_only=True,
                tmpfs=TMPFS,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                mem_limit=f"{config.memory_mib}m",
                memswap_limit=f"{config.memory_mib}m",
                pids_limit=PIDS_LIMIT,
                nano_cpus=int(config.cpus * 1e9),
                mounts=mounts,
                user=f"{uid}:{gid}",
                environment={"HOME": "/root" if uid == 0 else "/tmp"},
                working_dir="/",
            )
        except DockerException as exc:
            raise BootError(f"the engine could not create the container: {exc}",
                            hint="check `docker info` and the engine's log") from None  # fmt: skip
        machine = ContainerMachine(container, runtime)
        machine.read_only_git = bool(scan.git) and not config.writable_git
        if floor is not None:
            machine.floor = (str(config.workspace), floor)
        if config.workspace is not None:
            machine.sweep = (config.workspace, scan, config.writable_git)
        try:
            container.start()
            container.reload()
            machine._pid = int(container.attrs.get("State", {}).get("Pid") or 0)
        except BaseException as exc:
            machine.kill()
            if isinstance(exc, DockerException):
                raise BootError(f"the engine could not start the container: {exc}",
                                hint="check `docker info` and the engine's log") from None  # fmt: skip
            raise
        return machine
