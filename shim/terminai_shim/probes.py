"""What this host can run: the probes ``launch`` decides a tier with and
``doctor`` reports, run once per launch. Cheap by design (no SDK imports,
no boot): the CLI calls them to decide whether to offer isolation at all.
The tier itself is decided in one place, ``launch.decide_tier``.
"""

from __future__ import annotations

from ._internal.accel import choose_accel, kvm_status
from ._internal.backends import BackendChoice, backend_order
from ._internal.backends.container import engine_answers
from .models import AccelChoice

__all__ = [
    "AccelChoice",
    "BackendChoice",
    "accelerator",
    "backend_order",
    "engine_answers",
    "kvm_status",
]


def accelerator(requested: str = "auto") -> AccelChoice:
    """KVM where it really runs guests (not merely where /dev/kvm opens), else TCG;
    ``requested`` may insist on either (``TERMINAI_ACCEL`` overrides ``auto``)."""
    return choose_accel(requested)
