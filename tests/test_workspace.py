"""The workspace behaves like a local directory inside the VM.

Each check runs the same script on the host (in a local directory, which
proves the check itself passes where nothing is in the way) and in the
guest's 9p workspace. Before `cache=mmap` SQLite in WAL mode failed there
with "disk I/O error" and shared writable mmap with EINVAL.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import fcntl, json, mmap, os, socket, sqlite3, sys, threading

root = sys.argv[1]
os.makedirs(root, exist_ok=True)
os.chdir(root)
results = {}

def check(name):
    def wrap(fn):
        try:
            fn()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return wrap

@check("sqlite-wal")
def _():
    db = sqlite3.connect("db.sqlite")
    assert db.execute("pragma journal_mode=wal").fetchone()[0] == "wal"
    db.execute("create table t(a)")
    db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    db.commit()
    other = sqlite3.connect("db.sqlite")  # a second connection reads through the shared-memory index
    assert other.execute("select count(*) from t").fetchone()[0] == 1000

@check("shared-mmap")
def _():
    with open("mapped", "w+b") as f:
        f.truncate(1 << 16)
        m = mmap.mmap(f.fileno(), 1 << 16)
        m[100:105] = b"hello"
        m.flush()
        m.close()
    with open("mapped", "rb") as f:
        assert f.read()[100:105] == b"hello"

@check("fifo")
def _():
    os.mkfifo("fifo")
    r = os.open("fifo", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open("fifo", os.O_WRONLY)
    os.write(w, b"through the fifo")
    assert os.read(r, 100) == b"through the fifo"

@check("unix-socket")
def _():
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock")
    server.listen()
    client = socket.socket(socket.AF_UNIX)
    client.connect("sock")
    conn, _ = server.accept()
    client.sendall(b"ping")
    assert conn.recv(4) == b"ping"

@check("flock")
def _():
    a, b = open("lock", "w"), open("lock", "w")
    fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        raise AssertionError("a second flock on the file was granted")
    except BlockingIOError:
        pass
    fcntl.flock(a, fcntl.LOCK_UN)
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)

@check("fcntl-lock")
def _():
    with open("record", "w") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid = os.fork()
        if pid == 0:  # another process must be refused the lock
            try:
                fcntl.lockf(open("record", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB)
                os._exit(1)
            except OSError:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0, "another process got the lock"

@check("rename-over-open")
def _():
    with open("config", "w") as held:
        held.write("old")
        held.flush()
        with open("config.new", "w") as f:
            f.write("new")
        os.replace("config.new", "config")
        held.write(" still writable")
    with open("config") as f:
        assert f.read() == "new"

@check("large-write")
def _():
    block = os.urandom(1 << 20)
    with open("large", "wb") as f:
        for _ in range(64):
            f.write(block)
    assert os.path.getsize("large") == 64 << 20
    with open("large", "rb") as f:
        f.seek(63 << 20)
        assert f.read() == block
    os.unlink("large")

print(json.dumps(results))
"""

CHECKS = ["sqlite-wal", "shared-mmap", "fifo", "unix-socket", "flock", "fcntl-lock", "rename-over-open", "large-write"]


@pytest.mark.unit
def test_the_probe_passes_in_a_local_directory(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "local")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dict.fromkeys(CHECKS, "ok")


@pytest.mark.vm
def test_the_vm_workspace_behaves_like_a_local_directory(vm, workspace):
    status, out, err = vm.client.run(["python3", "-c", PROBE, "/workspace/probe"])
    assert status.exit_code == 0, err
    results = json.loads(out)
    assert results == dict.fromkeys(CHECKS, "ok"), results
    # What the guest made is on the host as plain files: the FIFO and the socket too (mapped-xattr).
    made = workspace / "probe"
    assert (made / "db.sqlite").stat().st_size > 0
    assert all((made / name).is_file() for name in ("fifo", "sock"))


MAPPED_WRITE = r"""
import mmap, os, sys, time
path = sys.argv[1]
if os.fork() == 0:  # a process that left the command's group and keeps its mapping open, pages dirty
    os.setsid()
    with open(path, "w+b") as f:
        f.truncate(1 << 20)
        m = mmap.mmap(f.fileno(), 1 << 20)
        m[: 1 << 20] = b"m" * (1 << 20)  # no msync, no fsync, and the mapping is never closed
        open(path + ".ready", "w").close()
        time.sleep(600)
while not os.path.exists(path + ".ready"):
    time.sleep(0.05)
"""


@pytest.mark.vm
def test_what_a_command_wrote_through_a_mapping_is_on_the_host_once_the_session_ends(boot_config, tmp_path):
    """The shim stops QEMU as soon as the agent answers shutdown, without
    waiting for the guest to power off: the agent syncs before it answers,
    so pages still dirty in a shared mapping (here, a process that left the
    command's group keeps one open) reach the host before QEMU is gone."""
    import dataclasses

    from terminai_shim.session import Session

    with Session.boot(dataclasses.replace(boot_config, workspace=tmp_path)) as s:
        status, _out, err = s.client.run(["python3", "-c", MAPPED_WRITE, "/workspace/mapped"])
        assert status.exit_code == 0, err
    assert (tmp_path / "mapped").read_bytes() == b"m" * (1 << 20)
