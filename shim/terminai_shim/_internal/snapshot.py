"""Warm start: a VM saved right after it reached a ready agent, restored
instead of booted.

A snapshot is QEMU's own migration stream written to a file, stored under
the digest of everything it depends on (kernel and root image digests,
machine, memory, vCPUs, device layout, QEMU version, accelerator, shim and
protocol versions). Anything different means another key: a cold boot and
a fresh snapshot, never a half-compatible restore. Snapshots are taken
before any workspace is mounted or any command runs, and are never shipped
between machines.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_protocol import protocol as P

from .. import __version__
from ..models import AccelChoice, BootConfig
from .fsutil import cache_root, file_digest, locked, sha256_file, stamp, stamp_holds, write_atomic
from .qmp import Qmp, QmpError

STATE = "state.bin"
META = "meta.json"


def qemu_identity(binary: str) -> str:
    """The QEMU build, by the digest of its binary (cached by stat, so this
    costs no process start on the restore path)."""
    path = shutil.which(binary)
    return f"sha256:{file_digest(Path(path))}" if path else f"missing:{binary}"


def _stamp(path: Path) -> list[int]:
    return stamp(path.stat())


def describe(config: BootConfig, accel: AccelChoice, qemu: str, devices: list[str]) -> dict[str, Any]:
    """Everything a saved state depends on. ``devices`` is the device layout
    (the VMM command line with host paths taken out)."""
    assert config.kernel is not None and config.rootfs is not None  # the backend checked them
    return {
        "kernel_sha256": file_digest(config.kernel),
        "rootfs_sha256": file_digest(config.rootfs),
        "rootfs_format": config.rootfs_format,
        "layers": [[layer.name, file_digest(layer.path)] for layer in config.layers],
        "memory_mib": config.memory_mib,
        "cpus": config.cpus,
        "accel": accel.accel,
        "qemu": qemu_identity(qemu),
        "devices": devices,
        "kernel_args": list(config.kernel_args),
        "shim": __version__,
        "protocol": P.AGENT_PROTOCOL_VERSION,
    }


def key_of(description: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    key: str
    directory: Path
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.directory / STATE

    def verify(self) -> str | None:
        """None if intact; else what is wrong (a truncated or corrupted file).

        The state is re-hashed unless its size, modification time, inode and
        change time are exactly those recorded (a write can put the
        modification time back, never the change time) and the record is not
        racy (``fsutil.stamp_holds``)."""
        try:
            st = self.state.stat()
        except OSError as exc:
            return f"state file unreadable: {exc}"
        if st.st_size != self.meta.get("size"):
            return f"state file is {st.st_size} bytes, {self.meta.get('size')} were saved"
        if stamp_holds(self.meta.get("stamp"), st):
            return None
        if sha256_file(self.state) != self.meta.get("sha256"):
            return "state file does not match the digest recorded when it was saved"
        try:  # a stamp taken now is no longer racy: the next restore need not hash again
            write_atomic(self.directory / META, json.dumps(dict(self.meta, stamp=stamp(st)), indent=2).encode())
        except OSError:
            pass
        return None


class SnapshotStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "snapshots"

    def find(self, key: str) -> Snapshot | None:
        d = self.root / key
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            return None
        return Snapshot(key, d, meta)

    def all(self) -> list[Snapshot]:
        if not self.root.is_dir():
            return []
        found = [self.find(d.name) for d in sorted(self.root.iterdir()) if not d.name.startswith(".")]
        return sorted((s for s in found if s is not None), key=lambda s: s.meta.get("created", 0), reverse=True)

    def remove(self, key: str) -> bool:
        d = self.root / key
        with locked(self.root / f".{key}.lock"):
            if not d.is_dir():
                return False
            shutil.rmtree(d)
        return True

    def gc(self, keep: int) -> list[str]:
        removed = []
        for tmp in self.root.glob(".*.tmp*") if self.root.is_dir() else []:
            pid = tmp.name.rsplit(".tmp", 1)[-1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):  # its saver died mid-way
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
        for snap in self.all()[keep:]:
            self.remove(snap.key)
            removed.append(snap.key)
        return removed

    @staticmethod
    def _migrate(control_socket: Path, target: Path, timeout: float, vmm_pid: int | None) -> None:
        """Stream the running VM's state into ``target``; the VM runs on afterwards,
        whether the migration completed, failed or timed out."""
        qmp = Qmp(str(control_socket), time.monotonic() + 10, expect_pid=vmm_pid)
        completed = False
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                qmp.execute_with_fd("getfd", fd, fdname="snapshot")
            finally:
                os.close(fd)
            qmp.execute("migrate", uri="fd:snapshot")
            deadline = time.monotonic() + timeout
            while True:
                status = qmp.execute("query-migrate").get("status")
                if status == "completed":
                    completed = True
                    return
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise QmpError(f"saving the VM state failed (migration {status})")
                time.sleep(0.02)
        finally:
            try:
                if not completed:
                    qmp.execute("migrate_cancel")
                if qmp.execute("query-status").get("status") != "running":
                    qmp.execute("cont")  # a completed migration leaves the source paused
            except QmpError:
                pass
            qmp.close()

    def save(
        self,
        control_socket: Path,
        key: str,
        description: dict[str, Any],
        timeout: float = 120,
        vmm_pid: int | None = None,
    ) -> Snapshot:
        """Migrate the running VM into the store, then let it continue."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        started = time.monotonic()
        try:
            self._migrate(control_socket, tmp / STATE, timeout, vmm_pid)
            state = tmp / STATE
            with state.open("rb") as f:
                os.fsync(f.fileno())
            meta = {
                "description": description,
                "sha256": sha256_file(state),
                "size": state.stat().st_size,
                "stamp": _stamp(state),
                "created": time.time(),
                "create_seconds": round(time.monotonic() - started, 3),
            }
            write_atomic(tmp / META, json.dumps(meta, indent=2).encode())
            final = self.root / key
            with locked(self.root / f".{key}.lock"):  # two VMs saving the same key at once
                existing = self.find(key)
                if existing is not None and existing.verify() is None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return existing
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never a half-written snapshot
            raise
        return Snapshot(key, final, meta)
