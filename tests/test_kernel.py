"""The built kernel: its record, its cache, and a real boot under QEMU."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO
from terminai_release.digest import sha256_file
from terminai_release.kernel import build_kernel
from terminai_release.kernel.fragments import load_fragments, read_config

BUSYBOX = "/bin/busybox"


@pytest.mark.build
def test_kernel_record_and_outputs(kernel):
    rec = kernel.record
    assert rec["artifact"] == "kernel"
    assert rec["kernel_release"].endswith(f"-tai{rec['inputs']['config_version']}")
    for name in ("vmlinux", "bzImage", "config"):
        out = rec["outputs"][name]
        path = kernel.directory / out["file"]
        assert sha256_file(path) == out["sha256"] and path.stat().st_size == out["size"]
        assert f"tai{rec['inputs']['config_version']}" in out["file"], "the config version is part of the name"
    assert rec["outputs"]["bzImage"]["size"] <= 4 * 1024 * 1024
    final = read_config(kernel.directory / rec["outputs"]["config"]["file"])
    for frag in load_fragments(REPO / "kernel-config", "x86_64"):
        for s in frag.settings:
            assert final.get(s.symbol, "n") == s.value, f"{s.fragment}:{s.line} CONFIG_{s.symbol} did not survive"


@pytest.mark.build
def test_second_build_is_a_cache_hit(ctx, kernel):
    again = build_kernel(ctx)
    assert again.cached and again.directory == kernel.directory


def _initramfs(tmp: Path) -> Path:
    root = tmp / "initramfs"
    for d in ("bin", "dev", "proc", "sys", "mnt/ro", "mnt/ws"):
        (root / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    (root / "init").write_text(
        "#!/bin/busybox sh\n"
        "/bin/busybox --install -s /bin\n"
        "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n"
        'mount -t erofs -o ro /dev/vda /mnt/ro && echo "blk: $(cat /mnt/ro/marker.txt)"\n'
        "mount -t 9p -o trans=virtio,version=9p2000.L workspace /mnt/ws && cat /mnt/ws/from-host.txt "
        "&& echo from-guest > /mnt/ws/from-guest.txt && umount /mnt/ws\n"
        "port=$(grep -l '^agent$' /sys/class/virtio-ports/*/name | cut -d/ -f5)\n"
        'echo "serial-ok $(uname -r)" > /dev/$port\n'
        "echo TERMINAI-KERNEL-MARKER\n"
        "reboot -f\n"
    )
    os.chmod(root / "init", 0o755)
    archive = tmp / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    with archive.open("wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(), stdout=out, check=True)
    return archive


@pytest.mark.vm
def test_kernel_boots_with_serial_9p_and_erofs(kernel, tmp_path):
    """PVH vmlinux under TCG on microvm: virtio-blk (erofs), virtio-9p and
    virtio-serial all work from a busybox init."""
    from terminai_shim._internal.accel import choose_accel
    from terminai_shim._internal.backends.base import RuntimeDir
    from terminai_shim._internal.backends.qemu import QemuBackend
    from terminai_shim.models import BootConfig

    content = tmp_path / "erofs-content"
    content.mkdir()
    (content / "marker.txt").write_text("erofs-ok\n")
    image = tmp_path / "disk.erofs"
    subprocess.run(["mkfs.erofs", "-zlz4hc", str(image), str(content)], check=True, capture_output=True)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "from-host.txt").write_text("9p-read-ok\n")
    runtime = RuntimeDir(tmp_path / "rt")
    runtime.path.mkdir()
    config = BootConfig(kernel=kernel.vmlinux, rootfs=image, rootfs_format="erofs", workspace=ws,
                        initrd=_initramfs(tmp_path), memory_mib=256, accel="tcg")  # fmt: skip
    machine = QemuBackend().start(config, choose_accel("tcg"), runtime)
    try:
        sock = machine.connect_agent(time.monotonic() + 30)
        sock.settimeout(60)
        received = b""
        while b"\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        assert machine.wait(60) == 0, "the guest did not power off"
    finally:
        machine.kill()
    console = runtime.console_log.read_text(errors="replace")
    assert "TERMINAI-KERNEL-MARKER" in console, console[-2000:]
    assert "blk: erofs-ok" in console
    assert "9p-read-ok" in console
    assert (ws / "from-guest.txt").read_text() == "from-guest\n"
    assert received.decode().startswith("serial-ok " + kernel.record["kernel_release"])
