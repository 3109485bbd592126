"""The guest kernel: pinned source + Kconfig fragments -> vmlinux and bzImage."""

from .build import KernelArtifacts, build_kernel, plan_kernel

__all__ = ["KernelArtifacts", "build_kernel", "plan_kernel"]
