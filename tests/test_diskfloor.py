"""The container tier's disk floor watch, against a real writer on a tmpfs of
the test's own: it must stop a writer going at memory speed before the floor,
given the time its stop takes."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from terminai_shim._internal.diskfloor import DiskFloor, FloorWatch

pytestmark = pytest.mark.unit


@pytest.fixture
def tmpfs():
    where = Path(tempfile.mkdtemp(prefix="floor-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600M", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def test_the_watch_stops_a_fast_writer_before_the_floor_given_its_stop_time(tmpfs):
    floor = DiskFloor.parse("200M", os.statvfs(tmpfs))
    stop_takes = 0.2
    asked, stopped = threading.Event(), threading.Event()
    reasons: list[str] = []

    def stop(reason: str) -> None:  # a stop that lands only after it took its time, as an engine's does
        reasons.append(reason)
        asked.set()
        time.sleep(stop_takes)
        stopped.set()

    watch = FloorWatch(str(tmpfs), floor, stop, stop_seconds=stop_takes)
    try:
        block = b"\0" * (1 << 20)
        with open(tmpfs / "big", "wb") as f:
            while not stopped.is_set():
                try:
                    f.write(block)
                except OSError:
                    break
                time.sleep(0.001)  # writes at about 500 MiB/s at most: a disk's pace, tmpfs could go faster
    finally:
        watch.close()
    st = os.statvfs(tmpfs)
    assert asked.is_set() and "disk floor" in reasons[0], reasons
    assert st.f_bavail * st.f_frsize >= floor.bytes, "the writer went below the floor before its stop landed"


def test_the_watch_leaves_a_burst_far_above_the_floor_alone(tmpfs):
    """The projection costs only a burst near the floor: 10 MiB at memory
    speed (however fast it lands between two checks) 490 MiB above it goes
    on, and the floor itself still stops."""
    floor = DiskFloor.parse("100M", os.statvfs(tmpfs))
    reasons: list[str] = []
    watch = FloorWatch(str(tmpfs), floor, reasons.append, stop_seconds=0.02)
    try:
        (tmpfs / "burst").write_bytes(b"\0" * (10 << 20))
        time.sleep(0.5)
        assert reasons == []
        (tmpfs / "more").write_bytes(b"\0" * (500 << 20))
        deadline = time.monotonic() + 5
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.close()
    assert reasons and "below the floor of 100.0 MiB" in reasons[0], reasons
