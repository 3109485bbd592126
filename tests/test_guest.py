"""Proof in a booted VM: the real kernel, the real root image, the agent as
PID 1, driven over virtio-serial under QEMU."""

from __future__ import annotations

import json
import struct
import threading
import time

import pytest
from terminai_protocol import protocol as P

pytestmark = pytest.mark.vm


def test_survival_kit_imports(vm):
    status, out, err = vm.client.run(
        ["python3", "-c", "import terminai_apts; print(terminai_apts.model.ObjectTableLabels.TRANSIT)"]
    )
    assert (status.exit_code, out, err) == (0, b"TRANSIT\n", b"")
    assert vm.health()["taptsVersion"] == "0.1.0"


def test_agent_is_pid1_on_a_writable_overlay(vm):
    info = vm.client.hello_info
    assert info["pid1"] is True
    status, out, _ = vm.client.run(["sh", "-c", "echo hi > /etc/written && cat /etc/written && cat /proc/mounts"])
    text = out.decode()
    assert status.exit_code == 0 and text.startswith("hi\n")
    assert " / overlay " in text and " /tmp tmpfs " in text and " /proc proc " in text
    assert " /workspace 9p " in text


def test_arguments_are_not_shell_interpreted(vm):
    args = ["two words", "it's", 'say "hi"', "$(reboot)", "`id`", "a;b", "*"]
    status, out, _ = vm.client.run(["python3", "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *args])
    assert status.exit_code == 0 and json.loads(out) == args


def test_stream_50_mb_byte_exact(vm):
    script = "import sys\nw = sys.stdout.buffer.write\nfor i in range(800):\n    w(i.to_bytes(4, 'big') * 16384)\n"
    proc = vm.client.exec(["python3", "-c", script])
    received = bytearray()
    for name, chunk in proc.output():
        assert name == "stdout"
        received += chunk
    assert proc.wait().exit_code == 0
    assert len(received) == 800 * 65536
    view = memoryview(received)
    for i in range(800):
        assert view[i * 65536 : (i + 1) * 65536] == i.to_bytes(4, "big") * 16384, f"chunk {i} corrupted"


def test_stdin_is_fed(vm):
    _status, out, _ = vm.client.run(["sha256sum"], stdin=b"terminai" * 100000)
    import hashlib

    assert out.split()[0].decode() == hashlib.sha256(b"terminai" * 100000).hexdigest()
    proc = vm.client.exec(["cat"], stdin_open=True)
    proc.write_stdin(b"line one\n")
    proc.close_stdin()
    assert b"".join(c for _, c in proc.output()) == b"line one\n"


def test_timeout_kills_and_process_is_gone(vm):
    started = time.monotonic()
    proc = vm.client.exec(["sleep", "100"], timeout=1)
    status = proc.wait(60)
    assert status.timed_out and status.signal == 9
    assert time.monotonic() - started < 30
    status, out, _ = vm.client.run(["sh", "-c", f"test -e /proc/{proc.pid} && echo alive || echo gone"])
    assert out == b"gone\n"


def test_32_concurrent_commands(vm):
    results: dict[int, tuple[int, bytes]] = {}

    def one(i: int) -> None:
        status, out, _ = vm.client.run(["sh", "-c", f"echo start-{i}; sleep 0.5; echo end-{i}"])
        results[i] = (status.exit_code, out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(32))
    for i, (code, out) in results.items():
        assert code == 0 and out == f"start-{i}\nend-{i}\n".encode()


def test_workspace_both_ways(vm, workspace):
    (workspace / "from-host.txt").write_text("written on the host\n")
    status, out, _ = vm.client.run(["cat", "/workspace/from-host.txt"])
    assert out == b"written on the host\n"
    status, _, _ = vm.client.run(["sh", "-c", "echo written in the guest > /workspace/from-guest.txt"])
    assert status.exit_code == 0
    assert (workspace / "from-guest.txt").read_text() == "written in the guest\n"
    vm.client.write_file("/workspace/sub/binary.bin", bytes(range(256)) * 1000, create_dirs=True)
    assert (workspace / "sub/binary.bin").read_bytes() == bytes(range(256)) * 1000


def test_garbage_frames_then_ping(vm):
    vm.client.send_raw(b"\xde\xad\xbe\xef not a frame at all " * 50)
    vm.client.send_raw(struct.pack("!4sII", P.MAGIC, 1 << 31, 3) + b"bad")
    assert vm.client.ping()["pong"] is True
    _status, out, _ = vm.client.run(["echo", "still serving"])
    assert out == b"still serving\n"
