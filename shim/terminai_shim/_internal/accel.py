"""Which accelerator a VM gets, and why.

/dev/kvm existing is not enough: on a nested PVM host it opens, accepts
KVM_CREATE_VM, and then hangs ordinary guests. KVM counts as usable only
when /dev/kvm opens read-write and the CPU advertises vmx or svm.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from ..models import AccelChoice


def kvm_status() -> AccelChoice:
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "no /dev/kvm on this host")
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return AccelChoice("tcg", f"/dev/kvm cannot be opened: {exc.strerror}")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "vmx" not in flags and "svm" not in flags:
        return AccelChoice(
            "tcg", "/dev/kvm opens but the CPU shows neither vmx nor svm (a nested or PVM host): guests would hang"
        )
    return AccelChoice("kvm", "/dev/kvm opens and the CPU has hardware virtualization")


def choose_accel(requested: str) -> AccelChoice:
    requested = os.environ.get("TERMINAI_ACCEL", requested) if requested == "auto" else requested
    if requested == "tcg":
        return AccelChoice("tcg", "TCG requested")
    status = kvm_status()
    if requested == "kvm":
        if status.accel != "kvm":
            raise ConfigError(f"KVM was requested but is not usable: {status.reason}", hint="use --accel tcg")
        return AccelChoice("kvm", "KVM requested; " + status.reason)
    if requested != "auto":
        raise ConfigError(f"unknown accelerator {requested!r}", hint="use auto, kvm or tcg")
    return status


def host_tsc_khz() -> int | None:
    """The host TSC rate; under TCG the guest reads the host's TSC."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None
