"""Backends: one interface (``base.Backend``), one file per way to isolate.

``auto`` walks an ordered list of tiers and takes the first this host can
really run: a microVM with usable KVM, then a container when a Docker
engine answers (and the release has an image for it), then a microVM
under TCG. The order comes from ``TERMINAI_BACKEND_ORDER`` (comma-separated
``microvm-kvm``, ``container``, ``microvm-tcg``) or the default below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import ConfigError
from ...models import AccelChoice
from ...options import BACKENDS
from .base import Backend

DEFAULT_ORDER = ("microvm-kvm", "container", "microvm-tcg")
TIERS = frozenset(DEFAULT_ORDER)
NAMES = BACKENDS  # the --backend choices, spelled once with the options


@dataclass(frozen=True)
class BackendChoice:
    name: str  # qemu | firecracker | container
    reason: str


def backend_order(text: str | None = None) -> tuple[str, ...]:
    text = text if text is not None else os.environ.get("TERMINAI_BACKEND_ORDER", "")
    if not text.strip():
        return DEFAULT_ORDER
    order = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in order if t not in TIERS]
    if unknown:
        raise ConfigError(f"unknown tiers {unknown} in TERMINAI_BACKEND_ORDER", hint=f"use {', '.join(DEFAULT_ORDER)}")
    return order


def _microvm(accel: AccelChoice, network: str = "none", layers: bool = False) -> str:
    """Firecracker only without a network (the policy's networking is built
    on QEMU's user networking) and without root filesystem layers (it has no
    SCSI controller to carry them)."""
    from .firecracker import FirecrackerBackend  # each backend is loaded when it is asked about

    firecracker = FirecrackerBackend()
    plain = network == "none" and not layers
    return "firecracker" if firecracker.available() and accel.accel == "kvm" and plain else "qemu"


def choose_backend(
    accel: AccelChoice,
    requested: str = "auto",
    *,
    has_image: bool = True,
    order: tuple[str, ...] | None = None,
    network: str = "none",
    require_microvm: bool = False,
    layers: bool = False,
) -> BackendChoice:
    """Which backend runs, and why (``doctor`` shows the reason).
    ``require_microvm``: a policy that never settles for a shared kernel."""
    if requested not in NAMES:
        raise ConfigError(f"unknown backend {requested!r}", hint=f"choose one of {', '.join(NAMES)}")
    if require_microvm and requested == "container":
        raise ConfigError("the container tier was requested, but the policy requires a microVM",
                          hint="choose --backend qemu, or drop --require-microvm")  # fmt: skip
    if requested != "auto":
        return BackendChoice(requested, "requested")
    skipped = []
    for tier in order or backend_order():
        if tier == "microvm-kvm":
            if accel.accel == "kvm":
                return BackendChoice(_microvm(accel, network, layers), f"KVM is usable ({accel.reason})")
            skipped.append(f"no microVM with KVM: {accel.reason}")
        elif tier == "container":
            from .container import engine_answers

            if require_microvm:
                skipped.append("the policy requires a microVM")
                continue
            if network == "allowlist":
                skipped.append("the container tier has no allowlist networking")
                continue
            if not has_image:  # nothing to run there: no need to ask the engine
                skipped.append("no container image to run (release or `inv container`)")
                continue
            answers, why = engine_answers()
            if answers:
                return BackendChoice("container", why + "; " + "; ".join(skipped) if skipped else why)
            skipped.append(why)
        elif tier == "microvm-tcg":
            return BackendChoice("qemu", "microVM under TCG; " + "; ".join(skipped) if skipped else "microVM under TCG")
    raise ConfigError("no backend in TERMINAI_BACKEND_ORDER can run here: " + "; ".join(skipped),
                      hint="add microvm-tcg to the order, or start a Docker engine")  # fmt: skip


def make_backend(name: str) -> Backend:
    if name == "container":
        from .container import ContainerBackend

        return ContainerBackend()
    if name == "firecracker":
        from .firecracker import FirecrackerBackend

        return FirecrackerBackend()
    from .qemu import QemuBackend

    return QemuBackend()
