"""VM backends: one interface (``base.Backend``), one file per VMM."""

from __future__ import annotations

from ...models import AccelChoice
from .base import Backend
from .firecracker import FirecrackerBackend
from .qemu import QemuBackend


def select_backend(accel: AccelChoice, requested: str = "auto") -> Backend:
    """Firecracker when configured and KVM is really usable; QEMU otherwise."""
    if requested == "qemu":
        return QemuBackend()
    firecracker = FirecrackerBackend()
    if requested == "firecracker" or (firecracker.available() and accel.accel == "kvm"):
        return firecracker
    return QemuBackend()
