"""``serve``'s warm pool: VMs restored and waiting, so that ``initialize``
hands one out instead of starting one.

The CLI asks for it with ``pool.warm`` and the same parameters it will
give ``initialize``; the request is resolved (and a release verified) then,
once, and the pool starts its VMs in the background. An ``initialize``
whose parameters are the same takes a waiting VM: it is removed from the
pool first (no VM ever serves two sessions), then given what a restore
gives every VM, new randomness, clock, host name and session id, and the
pool starts another behind it. Any other ``initialize`` boots as usual.

A waiting VM costs memory and a little CPU (its guest idles on a timer):
the pool measures both once a VM is ready and records them in the shim's
cache, where ``doctor`` reports them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._internal.fsutil import cache_root, write_atomic
from .errors import ShimError

if TYPE_CHECKING:
    from .launch import Launch
    from .session import Session

MAX_SIZE = 4
IDLE_SAMPLE_SECONDS = 2.0
IDLE_RECORD = "pool-idle.json"


def pool_key(params: dict[str, Any]) -> str:
    """Which ``initialize`` a pooled VM answers: exactly the same parameters."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def idle_record_path() -> Path:
    return cache_root() / IDLE_RECORD


@dataclass
class _Waiting:
    future: Future[Session]


class WarmPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._launch: Launch | None = None
        self._size = 0
        self._waiting: list[_Waiting] = []
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool")
        self._measured = False
        self._closed = False
        self.errors: list[str] = []  # why starting a VM failed, newest last

    @property
    def size(self) -> int:
        return self._size

    def warm(self, key: str, launch: Launch | None, size: int) -> None:
        """Keep ``size`` VMs of ``launch`` waiting (0: none); VMs of another request are stopped."""
        stale: list[_Waiting] = []
        with self._lock:
            if key != self._key:
                stale, self._waiting = self._waiting, []
            self._key, self._launch, self._size = key, launch, size
            while len(self._waiting) > size:
                stale.append(self._waiting.pop())
        for waiting in stale:
            _discard(waiting)
        self._top_up()

    def take(self, key: str, timeout: float) -> tuple[Session, Launch] | None:
        """A waiting VM for this request, made a new session; None if there is none to give."""
        with self._lock:
            if key != self._key or not self._waiting or self._launch is None:
                return None
            waiting, launch = self._waiting.pop(0), self._launch
        try:
            try:
                session = waiting.future.result(timeout)
            except Exception:  # the start failed (recorded in errors) or is too slow: initialize boots as usual
                _discard(waiting)
                return None
            if not session.machine.alive():
                session.close()
                return None
            try:
                session.adopt()
            except ShimError:
                session.close()
                return None
            return session, launch
        finally:
            self._top_up()

    def status(self) -> dict[str, Any]:
        with self._lock:
            waiting = list(self._waiting)
        vms = []
        for w in waiting:
            if not w.future.done() or w.future.exception() is not None:
                vms.append({"ready": False})
                continue
            session = w.future.result()
            vms.append({"ready": session.machine.alive(), **_usage(session.machine.pid)})
        return {"size": self._size, "vms": vms, "errors": self.errors[-3:]}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, []
        for w in waiting:
            _discard(w)
        self._starter.shutdown(wait=False, cancel_futures=True)

    def _top_up(self) -> None:
        with self._lock:
            if self._closed or self._launch is None:
                return
            while len(self._waiting) < self._size:
                self._waiting.append(_Waiting(self._starter.submit(self._start, self._launch)))

    def _start(self, launch: Launch) -> Session:
        from .session import warm_up

        try:
            session = launch.boot()
            warm_up(session.client)  # the code a hand-out and a first command run, translated before they come
        except ShimError as exc:
            self.errors.append(exc.message)
            raise
        if not self._measured:
            threading.Thread(target=self._record_idle, args=(session,), daemon=True, name="pool-idle").start()
        return session

    def _record_idle(self, session: Session) -> None:
        """What a waiting VM costs: its VMM's resident memory and CPU share
        while nobody uses it (a VM handed out meanwhile does not count: the
        next one is measured instead)."""
        before = _usage(session.machine.pid)
        time.sleep(IDLE_SAMPLE_SECONDS)
        after = _usage(session.machine.pid)
        with self._lock:
            still_waiting = any(w.future.done() and w.future.result() is session for w in self._waiting
                                if not w.future.cancelled() and w.future.exception() is None)  # fmt: skip
        if not before or not after or not still_waiting:
            return
        self._measured = True
        record = {
            "time": round(time.time(), 3),
            "rssKib": after["rssKib"],
            "cpuPercent": round(100 * (after["cpuSeconds"] - before["cpuSeconds"]) / IDLE_SAMPLE_SECONDS, 2),
            "memoryMib": session.config.memory_mib,
            "backend": session.backend.name,
            "accel": session.accel.accel,
        }
        try:
            idle_record_path().parent.mkdir(parents=True, exist_ok=True)
            write_atomic(idle_record_path(), json.dumps(record, indent=2).encode())
        except OSError:
            pass


def _discard(waiting: _Waiting) -> None:
    def stop(future: Future[Session]) -> None:
        if not future.cancelled() and future.exception() is None:
            future.result().close()

    waiting.future.add_done_callback(stop)


def _usage(pid: int | None) -> dict[str, Any]:
    """Resident memory and CPU time of a VMM process, from /proc."""
    if pid is None:
        return {}
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rssKib": rss, "cpuSeconds": (int(stat[11]) + int(stat[12])) / ticks}


__all__ = [
    "MAX_SIZE",
    "WarmPool",
    "idle_record_path",
    "pool_key",
]
