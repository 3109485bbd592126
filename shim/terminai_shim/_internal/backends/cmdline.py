"""The guest kernel's command line, for every VMM: one builder, so that what
PID 1 reads (bootcontract) is said the same way whichever VMM boots it.
Each VMM passes only what is its own: how it reboots and panics, and how the
root device is named (QEMU's ``root=``; Firecracker adds its own)."""

from __future__ import annotations

from terminai_protocol import bootcontract as boot

from ...models import AccelChoice, BootConfig
from ..accel import host_tsc_khz
from ..netpolicy import GATEWAY, GUEST_ADDRESS, OPEN_MODE_BLOCKS, PROXY_ADDRESS, PROXY_PORT, RESOLVER


def kernel_cmdline(config: BootConfig, accel: AccelChoice, channel_arg: str, vmm_args: tuple[str, ...]) -> str:
    """``channel_arg``: how PID 1 reaches the host (``terminai_channel=``)."""
    args = [f"console={boot.CONSOLE}", *vmm_args, "quiet", f"rootfstype={config.rootfs_format}",
            f"init={boot.INIT}", channel_arg]  # fmt: skip
    if accel.accel == "tcg":
        khz = host_tsc_khz()
        if khz:  # TSC calibration against the PIT fails at random under TCG
            args.append(f"tsc_early_khz={khz}")
        if config.cpus == 1:
            # Calibrating the local APIC timer waits 0.2 s of real time on
            # every boot; with one CPU the PIT drives the tick instead. And a
            # one-CPU kernel patches every LOCK prefix out of its text, one
            # page-table switch (a TCG TLB flush) each: 0.1 s; keep them.
            args += ["noapictimer", "noreplace-smp"]
    mode = config.network.mode
    if mode != "none":
        args.append(boot.param("net", f"{GUEST_ADDRESS},{GATEWAY},{RESOLVER if mode == 'open' else 'none'}"))
    if mode == "open":
        blocked = [net for name, net in OPEN_MODE_BLOCKS.items() if name not in config.network.allow]
        if blocked:
            args.append(boot.param("deny", ",".join(blocked)))
    if mode == "allowlist":
        args.append(boot.param("proxy", f"http://{PROXY_ADDRESS}:{PROXY_PORT}"))
    if config.layers:
        args.append(boot.param("layers", boot.layers_setting([layer.name for layer in config.layers])))
    args.extend(config.kernel_args)
    return " ".join(args)
