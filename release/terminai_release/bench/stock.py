"""Debian's stock cloud kernel, as the baseline the guest kernel is measured
against. It keeps virtio and file systems in modules, so booting it on our
root image needs a small initramfs that loads them and switches root."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from terminai_protocol import bootcontract as boot

from ..cache import StepCache
from ..errors import BuildError

PACKAGE = "linux-image-cloud-amd64"
# What the stock kernel needs, as modules, to boot our image on microvm.
MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "squashfs", "overlay", "virtio_rng")


@dataclass(frozen=True)
class StockKernel:
    version: str
    vmlinuz: Path
    modules: Path  # lib/modules/<version>


def fetch_stock_kernel(cache: StepCache) -> StockKernel:
    """Download the current cloud kernel through the host's apt (cached)."""
    root = cache.root / "bench" / "stock-kernel"
    done = root / ".complete"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        dep = subprocess.run(["apt-cache", "depends", PACKAGE], capture_output=True, text=True).stdout
        image = next(
            (line.split(":", 1)[1].strip() for line in dep.splitlines() if "Depends: linux-image-" in line), None
        )
        if image is None:
            raise BuildError(f"apt does not know {PACKAGE}", hint="run apt-get update")
        proc = subprocess.run(["apt-get", "download", image], cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cannot download {image}: {proc.stderr.strip()[-300:]}")
        deb = next(root.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "x")], check=True)
        deb.unlink()
        done.write_text(image + "\n")
    vmlinuz = next((root / "x/boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return StockKernel(version, vmlinuz, root / "x/lib/modules" / version)


def _module_path(kernel: StockKernel, name: str) -> Path:
    for candidate in kernel.modules.rglob("*.ko"):
        if candidate.stem.replace("-", "_") == name.replace("-", "_"):
            return candidate
    raise BuildError(f"module {name} not found in {kernel.modules}")


def load_order(kernel: StockKernel, names: tuple[str, ...] = MODULES) -> list[Path]:
    order: list[Path] = []

    def visit(name: str) -> None:
        path = _module_path(kernel, name)
        if path in order:
            return
        deps = subprocess.run(["modinfo", "-F", "depends", str(path)], capture_output=True, text=True).stdout.strip()
        for dep in filter(None, deps.split(",")):
            visit(dep)
        if path not in order:
            order.append(path)

    for n in names:
        visit(n)
    return order


def stock_initramfs(kernel: StockKernel, dest: Path, *, then: str) -> Path:
    """A busybox initramfs that loads the modules, then either prints a marker
    (``then="marker"``) or switches to the root image's own init (``"agent"``).

    The stock kernel lacks VIRTIO_MMIO_CMDLINE_DEVICES, so it is booted with
    ACPI describing the virtio-mmio devices (``BootConfig.acpi``)."""
    root = dest / f"initramfs-{then}"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    loads = [f"insmod /lib/modules/{path.name}" for path in load_order(kernel)]
    for path in load_order(kernel):
        shutil.copy(path, root / "lib/modules" / path.name)
    tail = (
        "echo TERMINAI-KERNEL-MARKER\nreboot -f\n"
        if then == "marker"
        else "while [ ! -b /dev/vda ]; do sleep 0.01; done\n"
        "mount -t squashfs -o ro /dev/vda /newroot\nmount --move /dev /newroot/dev\numount /proc /sys\n"
        f"exec switch_root /newroot {boot.INIT}\n"
    )
    (root / "init").write_text(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n"
        "mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n"
        + "\n".join(loads)
        + "\n"
        + tail
    )
    os.chmod(root / "init", 0o755)
    return cpio(root, dest / f"initramfs-{then}.cpio")


def cpio(root: Path, archive: Path) -> Path:
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    with archive.open("wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(), stdout=out, check=True)
    return archive


def marker_initramfs(dest: Path) -> Path:
    """For our kernel: everything built in, so busybox alone."""
    root = dest / "initramfs-plain"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    (root / "init").write_text("#!/bin/busybox sh\n/bin/busybox echo TERMINAI-KERNEL-MARKER\n/bin/busybox reboot -f\n")
    os.chmod(root / "init", 0o755)
    return cpio(root, dest / "initramfs-plain.cpio")
