"""VM backends as configuration: the QEMU command line, accelerator choice,
and Firecracker's config and hybrid-vsock handshake (Firecracker itself is
not booted here: there is no usable KVM and no Firecracker package)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from terminai_shim._internal.accel import choose_accel, kvm_status
from terminai_shim._internal.backends import backend_order, choose_backend
from terminai_shim._internal.backends.base import RuntimeDir
from terminai_shim._internal.backends.firecracker import (
    FirecrackerBackend,
    hybrid_vsock_connect,
    snapshot_create_requests,
    snapshot_load_request,
    vm_config,
)
from terminai_shim._internal.backends.qemu import TCG_CPU, Channel, command_line
from terminai_shim.errors import BootError, ConfigError
from terminai_shim.launch import backend_for
from terminai_shim.models import AccelChoice, BootConfig

pytestmark = pytest.mark.unit
TCG = AccelChoice("tcg", "test")
KVM = AccelChoice("kvm", "test")


def _cfg(**kw):
    return BootConfig(kernel=Path("/k/vmlinux"), rootfs=Path("/r/root.squashfs"), **kw)


def test_qemu_command_line(tmp_path):
    rt = RuntimeDir(tmp_path)
    argv = command_line(_cfg(memory_mib=256, cpus=2), TCG, rt)
    joined = " ".join(argv)
    assert argv[argv.index("-M") + 1] == "microvm,acpi=off,pit=on,pic=on,rtc=on"
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == TCG_CPU
    assert argv[argv.index("-m") + 1] == "256" and argv[argv.index("-smp") + 1] == "2"
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert "file=/r/root.squashfs,format=raw,if=none,readonly=on" in joined
    assert f"socket,id=agent,path={rt.agent_socket},server=on,wait=off" in joined
    append = argv[argv.index("-append") + 1]
    assert "rootfstype=squashfs" in append and "terminai_channel=virtio-serial:agent" in append
    assert "tsc_early_khz=" in append and " -- " not in append
    assert "noapictimer" not in append, "two CPUs need their local APIC timers"
    one = command_line(_cfg(cpus=1), TCG, rt)
    assert "noapictimer" in one[one.index("-append") + 1], "one CPU under TCG skips the 0.2 s APIC calibration"
    for net in ("-netdev", "-nic", "-net"):
        assert net not in argv, "no network device unless asked"
    # Without a workspace the 9p device exports an empty directory: the
    # device layout stays the same, so one saved VM serves every session.
    assert f"local,id=ws,path={rt.empty_share},security_model=mapped-xattr,readonly=on" in joined
    assert f"local,id=git,path={rt.empty_share},security_model=mapped-xattr,readonly=on" in joined
    # QEMU confined: seccomp with no process starts (no allowlist here), console through the capped pipe.
    assert argv[argv.index("-sandbox") + 1].startswith("on,obsolete=deny,")
    assert "spawn=deny" in argv[argv.index("-sandbox") + 1] and "resourcecontrol=deny" in joined
    assert argv[argv.index("-serial") + 1] == "chardev:console" and "file:" not in joined
    assert "-incoming" not in argv
    restore = command_line(_cfg(), TCG, rt, incoming_fd=7)
    assert restore[-2:] == ["-incoming", "fd:7"]


def test_qemu_workspace_kvm_and_vsock(tmp_path):
    rt = RuntimeDir(tmp_path)
    argv = command_line(_cfg(workspace=tmp_path), KVM, rt, channel=Channel("vsock", 1234))
    joined = " ".join(argv)
    assert argv[argv.index("-cpu") + 1] == "host"
    assert f"local,id=ws,path={tmp_path},security_model=mapped-xattr" in joined
    assert "security_model=none" not in joined and "passthrough" not in joined
    assert "virtio-9p-device,fsdev=ws,mount_tag=workspace" in joined
    append = argv[argv.index("-append") + 1]
    assert "terminai_workspace" not in append, "the agent mounts the workspace on request, after boot"
    assert "tsc_early_khz" not in append and "noapictimer" not in append
    assert "vhost-vsock-device,guest-cid=1234" in joined and "virtserialport" not in joined
    assert "terminai_channel=vsock:1024" in append
    assert Channel.choose("virtio-serial").kind == "virtio-serial"
    expected = "vsock" if os.path.exists("/dev/vhost-vsock") else "virtio-serial"
    assert Channel.choose("auto").kind == expected


def test_accelerator_choice_matches_the_host():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    status = kvm_status()
    if not os.path.exists("/dev/kvm"):
        assert status.accel == "tcg" and "no /dev/kvm" in status.reason
    elif "vmx" not in flags and "svm" not in flags:
        assert status.accel == "tcg" and "vmx" in status.reason
        with pytest.raises(ConfigError, match="KVM was requested but is not usable"):
            choose_accel("kvm")
    else:
        assert status.accel == "kvm"
    assert choose_accel("tcg").accel == "tcg"
    with pytest.raises(ConfigError):
        choose_accel("hvf")


def test_firecracker_config(tmp_path):
    rt = RuntimeDir(tmp_path)
    doc = vm_config(_cfg(memory_mib=300, cpus=2), rt)
    assert doc["boot-source"]["kernel_image_path"] == "/k/vmlinux"
    assert "terminai_channel=vsock:1024" in doc["boot-source"]["boot_args"]
    assert doc["drives"] == [
        {"drive_id": "rootfs", "path_on_host": "/r/root.squashfs", "is_root_device": True, "is_read_only": True}
    ]
    assert doc["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 300, "smt": False}
    assert doc["vsock"] == {"guest_cid": 3, "uds_path": str(tmp_path / "vsock.sock")}
    assert doc["network-interfaces"] == []
    with pytest.raises(ConfigError, match="no shared folders"):
        vm_config(_cfg(workspace=tmp_path), rt)
    with pytest.raises(ConfigError, match="needs KVM"):
        FirecrackerBackend("/bin/true").start(_cfg(), TCG, rt)


def test_firecracker_snapshot_requests(tmp_path):
    rt = RuntimeDir(tmp_path)
    calls = snapshot_create_requests(rt)
    assert [(m, p) for m, p, _ in calls] == [("PATCH", "/vm"), ("PUT", "/snapshot/create"), ("PATCH", "/vm")]
    assert calls[0][2] == {"state": "Paused"} and calls[2][2] == {"state": "Resumed"}
    assert calls[1][2] == {
        "snapshot_type": "Full",
        "snapshot_path": str(tmp_path / "vm.snap"),
        "mem_file_path": str(tmp_path / "vm.mem"),
    }
    method, path, body = snapshot_load_request(tmp_path / "vm.snap", tmp_path / "vm.mem")
    assert (method, path) == ("PUT", "/snapshot/load")
    assert body["mem_backend"] == {"backend_type": "File", "backend_path": str(tmp_path / "vm.mem")}
    assert body["resume_vm"] is True and body["enable_diff_snapshots"] is False


def _peer(path: Path, script: list[bytes | None]) -> threading.Thread:
    """A stand-in for Firecracker's vsock Unix socket: for each connection,
    read CONNECT and answer with the next scripted reply (None: just close)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def serve() -> None:
        for reply in script:
            conn, _ = server.accept()
            request = b""
            while not request.endswith(b"\n"):
                request += conn.recv(1)
            assert request == b"CONNECT 1024\n"
            if reply is None:
                conn.close()
                continue
            conn.sendall(reply)
            if reply.startswith(b"OK"):
                conn.sendall(conn.recv(100).upper())  # echo, to show the stream is live
            conn.close()
        server.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_hybrid_vsock_handshake_retries_until_the_guest_listens(tmp_path):
    path = tmp_path / "v.sock"
    _peer(path, [None, None, b"OK 1073741824\n"])
    sock = hybrid_vsock_connect(str(path), 1024, time.monotonic() + 10)
    sock.sendall(b"ping")
    assert sock.recv(100) == b"PING"
    sock.close()


def test_hybrid_vsock_handshake_failures(tmp_path):
    path = tmp_path / "bad.sock"
    _peer(path, [b"ERR no\n"])
    with pytest.raises(BootError, match="handshake failed"):
        hybrid_vsock_connect(str(path), 1024, time.monotonic() + 10)
    with pytest.raises(BootError, match="did not accept"):
        hybrid_vsock_connect(str(tmp_path / "nobody.sock"), 1024, time.monotonic() + 0.3)


def test_backend_selection(tmp_path, monkeypatch):
    """The order of tiers: KVM microVM, container, TCG microVM. "No engine" is
    a socket nobody listens on (the engine itself is tested in test_container)."""
    fake = tmp_path / "firecracker"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TERMINAI_FIRECRACKER", str(fake))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert choose_backend(TCG).name == "qemu"
    assert "no Docker engine" in choose_backend(TCG).reason
    assert choose_backend(KVM).name == "firecracker"
    assert choose_backend(KVM, "qemu").name == "qemu"
    assert choose_backend(TCG, "container").name == "container"
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend(TCG, "lxc")
    with pytest.raises(ConfigError, match="no backend"):
        choose_backend(TCG, order=backend_order("microvm-kvm,container"))
    with pytest.raises(ConfigError, match="unknown tiers"):
        backend_order("microvm,cloud")
    monkeypatch.delenv("TERMINAI_FIRECRACKER")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert choose_backend(KVM).name == "qemu"
    assert backend_for(BootConfig(backend="qemu"), TCG).name == "qemu"


@pytest.mark.unit
def test_the_workspace_is_at_its_host_path_and_at_the_alias_unless_that_would_hide_it(tmp_path):
    from terminai_protocol import bootcontract as boot
    from terminai_shim.models import BootConfig
    from terminai_shim.session import _mounts

    def paths(host: str) -> tuple[str, ...]:
        return BootConfig(workspace=tmp_path, workspace_mount=boot.workspace_target(host)).workspace_paths

    assert paths("/home/me/project") == ("/home/me/project", "/workspace")
    assert paths("/usr/src/project") == ("/workspace",), "a guest system directory is never covered"
    assert paths("/workspace") == ("/workspace",)
    # A host workspace inside /workspace (a dev container's layout): a bind of it over /workspace
    # would hide the mount and show its own subdirectory at the host path; host paths win.
    assert paths("/workspace/sub") == ("/workspace/sub",)
    config = BootConfig(workspace=tmp_path, workspace_mount="/workspace/sub")
    assert [m["target"] for m in _mounts(config)] == ["/workspace/sub"]
