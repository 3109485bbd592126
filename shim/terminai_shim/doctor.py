"""``terminai-shim doctor``: what this host can run, and why.

Exit code 0 when a VM can boot here (QEMU present, artifacts present and
readable), 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._internal.backends.qemu import QemuBackend
from .fileio import sha256_file
from .layout import BUILD_RECORD
from .options import NETWORK_MODES
from .probes import backend_order, engine_answers, kvm_status


def _qemu_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def _validate(path: Path | None) -> str:
    """Compare an artifact with the build record beside it (sha256 and size)."""
    if path is None:
        return "missing"
    record = path.parent / BUILD_RECORD
    try:
        outputs = json.loads(record.read_text())["outputs"].values()
    except (OSError, ValueError, KeyError, AttributeError):
        return "present (no build record to check it against)"
    expected = next((o for o in outputs if isinstance(o, dict) and o.get("file") == path.name), None)
    if expected is None:
        return "present (not listed in its build record)"
    if sha256_file(path) != expected["sha256"] or path.stat().st_size != expected["size"]:
        return "INVALID: differs from its build record (rebuild it)"
    return "valid (sha256 matches its build record)"


def _confinement() -> dict[str, str]:
    """How QEMU is confined here: its seccomp filter, and who it runs as (for a session without a workspace;
    with one, started as root, it runs as the workspace's owner)."""
    from ._internal.backends.vmmprocess import sandbox_arg, vmm_identity
    from .models import BootConfig

    identity = vmm_identity(None)
    return {"sandbox": sandbox_arg(BootConfig()), "runs_as": identity.reason,
            "with_a_workspace": "the workspace's owner when started as root (root-owned: uid 0 with file-access "
            "capabilities only)" if os.geteuid() == 0 else "the invoking user"}  # fmt: skip


def _pool_cost() -> dict[str, Any]:
    """What a VM waiting in serve's pool costs, as the last pool on this host measured it (pool.py)."""
    from .pool import idle_record_path

    path = idle_record_path()
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"measured": None, "note": "off unless the CLI asks serve for it (pool.warm); none has run here yet"}
    return {"measured": record if isinstance(record, dict) else None, "record": str(path)}


def report() -> dict[str, Any]:
    from ._internal.netproxy import upstream_from_env
    from .errors import ConfigError
    from .launch import LaunchRequest, built_image, built_vm_artifacts, decide_tier
    from .session import network_log

    qemu = QemuBackend()
    kvm = kvm_status()
    firecracker = os.environ.get("TERMINAI_FIRECRACKER") or shutil.which("firecracker")
    kernel, rootfs = built_vm_artifacts()
    fmt = rootfs.suffix.lstrip(".") if rootfs else None
    image, _ = built_image()
    vhost_vsock = os.path.exists("/dev/vhost-vsock")
    engine, engine_reason = engine_answers()
    try:
        # The question a launch without options asks, of this host and its build outputs.
        choice = decide_tier(LaunchRequest(), kvm, has_image=image is not None, layers=False)
        backend, reason = choice.name, choice.reason
    except ConfigError as exc:
        backend, reason = "none", exc.message
    return {
        "accelerator": {"choice": kvm.accel, "reason": kvm.reason},
        "qemu": {"binary": qemu.qemu, "version": _qemu_version(qemu.qemu) if qemu.available() else None},
        "vmm_confinement": _confinement(),
        "vhost_vsock": vhost_vsock,
        "firecracker": firecracker,
        "container_engine": {"answers": engine, "reason": engine_reason},
        "backend_order": list(backend_order()),
        "backend": backend,
        "backend_reason": reason,
        "agent_channel": {"firecracker": "vsock", "container": "unix socket"}.get(backend, "virtio-serial"),
        "network": {
            "default": "none",
            "modes": list(NETWORK_MODES) if backend != "container" else ["none", "open"],
            "host_proxy": {k: bool(v) for k, v in upstream_from_env(dict(os.environ)).items()},
            "log": str(network_log()),
        },
        "warm_pool": _pool_cost(),
        "artifacts": {
            "container_image": str(image) if image else None,
            "container_image_status": _validate(image),
            "kernel": str(kernel) if kernel else None,
            "kernel_status": _validate(kernel),
            "rootfs": str(rootfs) if rootfs else None,
            "rootfs_status": _validate(rootfs),
            "rootfs_format": fmt,
        },
    }


def doctor(json_output: bool = False) -> int:
    info = report()
    arts = info["artifacts"]
    valid = all(arts[k] and not arts[f"{k}_status"].startswith("INVALID") for k in ("kernel", "rootfs"))
    can_run = bool(info["qemu"]["version"]) and valid
    info["can_run"] = can_run
    if json_output:
        print(json.dumps(info, indent=2))
        return 0 if can_run else 1
    acc = info["accelerator"]
    print(f"accelerator:   {acc['choice']} ({acc['reason']})")
    print(f"qemu:          {info['qemu']['version'] or 'missing: apt-get install qemu-system-x86'}")
    conf = info["vmm_confinement"]
    print(f"confinement:   -sandbox {conf['sandbox']}; runs as {conf['runs_as']}; with a workspace: "
          f"{conf['with_a_workspace']}")  # fmt: skip
    print(f"vhost-vsock:   {'yes' if info['vhost_vsock'] else 'no (the agent channel uses virtio-serial)'}")
    print(f"firecracker:   {info['firecracker'] or 'not configured'}")
    print(f"engine:        {info['container_engine']['reason']}")
    print(f"backend:       {info['backend']} over {info['agent_channel']} ({info['backend_reason']})")
    print(f"order:         {', '.join(info['backend_order'])} (TERMINAI_BACKEND_ORDER)")
    net = info["network"]
    upstream = ", ".join(net["host_proxy"]) or "none"
    print(f"network:       {net['default']} by default; {', '.join(net['modes'])} on request; host proxy: {upstream}; "
          f"decisions logged to {net['log']}")  # fmt: skip
    pool = info["warm_pool"]["measured"]
    if pool:
        print(f"warm pool:     a waiting VM costs {pool.get('rssKib', 0) / 1024:.0f} MiB resident and "
              f"{pool.get('cpuPercent', 0)} % of a CPU ({pool.get('backend')}, {pool.get('accel')}, measured by the "
              "last pool here)")  # fmt: skip
    else:
        print(f"warm pool:     {info['warm_pool']['note']}")
    print(f"kernel:        {arts['kernel'] or 'missing: run `inv kernel`'} [{arts['kernel_status']}]")
    print(f"root image:    {arts['rootfs'] or 'missing: run `inv rootfs`'} [{arts['rootfs_status']}]")
    print(f"OCI image:     {arts['container_image'] or 'missing: run `inv container`'} "
          f"[{arts['container_image_status']}]")  # fmt: skip
    print(f"can run a VM:  {'yes' if can_run else 'no'}", file=sys.stdout)
    return 0 if can_run else 1


__all__ = [
    "doctor",
    "report",
]
