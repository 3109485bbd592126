"""The disk floor: the free space and inodes a session must leave on the
workspace's file system, so that a guest filling the workspace stops before
it fills the host. The microVM's guard refuses new names below it and stops
the session; the container tier, where no guard sees the calls, checks it
on a timer (``FloorWatch``) and stops ahead of it by what the guest writes
while the engine stops the container."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

FLOOR_CHECK_EVERY = 0.05  # seconds between free-space checks
# What stopping a container's writers takes once asked: through the engine's
# API (seen: 0.05-0.3 s on two busy cores), or by the shim's own SIGKILL where
# it may send one. The container tier stops this far ahead of the floor.
ENGINE_STOP_SECONDS = 0.5
DIRECT_STOP_SECONDS = 0.1
WATCH_EVERY = 0.01  # the container tier's checks: a statvfs each, cheap beside the writes they bound
DEFAULT_FLOOR = "2G,5%"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DiskFloor:
    """The free space (bytes) and inodes a session must leave on the
    workspace's file system: the larger of each size and share given."""

    bytes: int
    inodes: int

    @classmethod
    def parse(cls, setting: str, st: os.statvfs_result) -> DiskFloor:
        total, files = st.f_blocks * st.f_frsize, st.f_files
        floor_bytes, share = 0, None
        for item in setting.split(","):
            item = item.strip()
            if item.endswith("%"):
                try:
                    share = float(item[:-1]) / 100
                except ValueError:
                    share = -1.0
                if not 0 <= share < 1:
                    raise ConfigError(f"disk floor {item!r} is not a share below 100%")
                floor_bytes = max(floor_bytes, int(total * share))
                continue
            m = _SIZE.match(item)
            if not m:
                raise ConfigError(f"disk floor {item!r} is not a size (2G, 500M) or a share (5%)",
                                  hint="set TERMINAI_DISK_FLOOR like 2G,5%")  # fmt: skip
            floor_bytes = max(floor_bytes, int(float(m[1]) * 1024 ** " kmgt".index((m[2] or " ").lower())))
        inodes = int(files * (share if share is not None else 0.05)) if files else 0
        return cls(floor_bytes, inodes)

    def breach(self, st: os.statvfs_result, in_flight: int = 0) -> str | None:
        """Why ``st`` is below the floor, or None; ``in_flight`` bytes that
        will land before the writer can be stopped count as written."""
        free = st.f_bavail * st.f_frsize
        if free - in_flight < self.bytes:
            ahead = f" with {_human(in_flight)} more on the way" if in_flight else ""
            return f"{_human(free)} free{ahead}, below the floor of {_human(self.bytes)}"
        if self.inodes and st.f_favail < self.inodes:
            return f"{st.f_favail} inodes free, below the floor of {self.inodes}"
        return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def disk_floor(workspace: str, setting: str | None = None) -> DiskFloor:
    """The session's floor, refusing to start a session already below it."""
    setting = setting or os.environ.get("TERMINAI_DISK_FLOOR") or DEFAULT_FLOOR
    st = os.statvfs(workspace)
    floor = DiskFloor.parse(setting, st)
    breach = floor.breach(st)
    if breach is not None:
        raise ConfigError(f"the workspace's file system ({workspace}) has {breach}",
                          hint="free space there, or lower the floor: TERMINAI_DISK_FLOOR=1G,2%")  # fmt: skip
    return floor


class FloorWatch:
    """The disk floor where no guard sees the calls (the container tier):
    free space checked every ``WATCH_EVERY`` seconds, and ``stop``
    called once with the reason when it would be crossed before the engine
    could stop the writer, counting what it writes until the next check
    too. The guest's write rate is taken at its recent peak (halving each
    second), so a burst cannot slip under the check by writing fast between
    two of them."""

    def __init__(self, root: str, floor: DiskFloor, stop: Callable[[str], None],
                 stop_seconds: float = ENGINE_STOP_SECONDS) -> None:  # fmt: skip
        self.root, self.floor, self.stop, self.stop_seconds = root, floor, stop, stop_seconds
        self._done = threading.Event()
        threading.Thread(target=self._run, name="disk-floor", daemon=True).start()

    def _run(self) -> None:
        rate = 0.0  # bytes per second, at the recent peak
        last: tuple[int, float] | None = None  # (free, when) at the last check
        try:
            st = os.statvfs(self.root)
            last = (st.f_bavail * st.f_frsize, time.monotonic())
        except OSError:
            pass
        while not self._done.wait(WATCH_EVERY):
            try:
                st = os.statvfs(self.root)
            except OSError:
                continue
            free, now = st.f_bavail * st.f_frsize, time.monotonic()
            gap = WATCH_EVERY  # until the next check, judged by the last one: a busy host checks late
            if last is not None and now > last[1]:
                elapsed = now - last[1]
                gap = max(gap, elapsed)
                rate = max((last[0] - free) / elapsed, rate * 0.5**elapsed)
            last = (free, now)
            # What lands before a stop could: writes until the next check, then
            # while the stop itself takes its time.
            breach = self.floor.breach(st, int(rate * (gap + self.stop_seconds)))
            if breach is not None:
                self._done.set()
                self.stop(f"the workspace reached its disk floor ({breach}); the session was stopped")

    def close(self) -> None:
        self._done.set()
