"""Warm start: restore a saved VM instead of booting it (QEMU migration to a
file, under TCG), with fresh randomness, clock and identity per copy."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
import warnings

import pytest
from terminai_shim._internal.snapshot import SnapshotStore
from terminai_shim.session import Session

pytestmark = pytest.mark.vm


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "shim-cache"))
    return SnapshotStore()


@pytest.fixture
def saved(store, boot_config):
    """A cold boot that saves the snapshot the other tests restore."""
    with Session.boot(boot_config) as cold:
        assert cold.restored_from is None and cold.snapshot is not None
        key = cold.snapshot.key
        assert cold.client.run(["true"])[0].exit_code == 0
    assert [s.key for s in store.all()] == [key]
    return key


def _sample(session):
    status, out, _ = session.client.run(["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; hostname"])
    assert status.exit_code == 0
    return out.decode()


def test_restore_then_the_acceptance_sequence(saved, boot_config, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "from-host.txt").write_text("host")
    with Session.boot(dataclasses.replace(boot_config, workspace=ws)) as s:
        assert s.restored_from == saved
        assert s.health()["ok"] is True
        _, out, _ = s.client.run(["echo", "Hello from MicroVM"])
        assert out == b"Hello from MicroVM\n"
        proc = s.client.exec(["python3", "-c", "import sys; print(sys.stdin.read().upper())"], stdin_open=True)
        proc.write_stdin(b"restored")
        proc.close_stdin()
        assert b"".join(c for _, c in proc.output()) == b"RESTORED\n"
        assert s.client.run(["cat", "/workspace/from-host.txt"])[1] == b"host"
        s.client.run(["sh", "-c", "echo guest > /workspace/from-guest.txt"])
        assert (ws / "from-guest.txt").read_text() == "guest\n"
        # ping reports the guest's clock; a round trip brackets it
        before = time.time()
        guest = s.client.ping()["time_ms"] / 1000
        after = time.time()
        assert before - 0.075 <= guest <= after + 0.075, f"guest clock {guest - after:+.3f} s off"


def test_copies_differ_and_run_concurrently(saved, boot_config, tmp_path):
    results = {}

    def one(i):
        ws = tmp_path / f"ws{i}"
        ws.mkdir()
        with Session.boot(dataclasses.replace(boot_config, workspace=ws)) as s:
            assert s.restored_from == saved
            s.client.run(["sh", "-c", f"echo {i} > /workspace/mine.txt; ls /workspace > /workspace/seen.txt"])
            results[i] = (s.client.hello_info["session"], _sample(s))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == [0, 1, 2, 3]
    sessions = {session for session, _ in results.values()}
    samples = {sample for _, sample in results.values()}
    assert len(sessions) == 4, "restored VMs share a session id"
    assert len(samples) == 4, f"restored VMs produced the same random bytes or hostname: {samples}"
    for i in range(4):
        assert (tmp_path / f"ws{i}" / "mine.txt").read_text() == f"{i}\n"
        assert (tmp_path / f"ws{i}" / "seen.txt").read_text() == "mine.txt\nseen.txt\n"


def test_changed_root_image_is_never_restored(saved, store, boot_config, tmp_path):
    other = tmp_path / "other.squashfs"
    shutil.copyfile(boot_config.rootfs, other)
    with other.open("ab") as f:
        f.write(bytes(4096))  # same file system, other digest
    with Session.boot(dataclasses.replace(boot_config, rootfs=other)) as s:
        assert s.restored_from is None and s.snapshot is not None and s.snapshot.key != saved
    assert len(store.all()) == 2


def test_corrupt_snapshot_falls_back_to_cold(saved, store, boot_config):
    state = store.find(saved).state
    with state.open("r+b") as f:
        f.seek(state.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Session.boot(boot_config) as s:
            assert s.restored_from is None, "a corrupted snapshot was restored"
            assert s.snapshot is not None and s.snapshot.key == saved
            assert s.client.run(["true"])[0].exit_code == 0
    assert any("does not match the digest" in str(w.message) for w in caught)
    truncated = store.find(saved).state
    with truncated.open("r+b") as f:
        f.truncate(1000)
    assert "bytes" in store.find(saved).verify()


def test_cold_flag_neither_restores_nor_saves(saved, store, boot_config):
    with Session.boot(dataclasses.replace(boot_config, snapshots="off")) as s:
        assert s.restored_from is None and s.snapshot is None
    assert [x.key for x in store.all()] == [saved]
