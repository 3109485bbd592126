"""Entry point: as the VM's init, or as a plain process (containers, tests).

Configuration comes from the kernel command line when running as a VM's
PID 1 (``terminai_channel=``, ``terminai_workspace=``, ``terminai_hostname=``:
plain ``key=value`` parameters, since dotted ones are taken for module
options) and from ``TERMINAI_*`` environment variables or flags otherwise.

In a container (``TERMINAI_CONTAINER=1``) the agent is PID 1 too, but the
engine has already mounted /proc, /dev, the tmpfs and the workspace and
has no kernel command line: it only reaps orphans and serves, and ending
it ends the container.
"""

from __future__ import annotations

import os
import sys

from terminai_protocol import bootcontract as boot

from .channels import ChannelSpec, listen, open_virtio_port
from .server import AgentConfig, Server


def _cmdline() -> dict[str, str]:
    try:
        with open("/proc/cmdline") as f:
            return boot.params_from_cmdline(f.read().split())
    except OSError:
        return {}


def _settings(argv: list[str]) -> dict[str, str]:
    settings = boot.params_from_environ(dict(os.environ))
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            settings[key.replace("-", "_")] = value
    return settings


def main(argv: list[str] | None = None, marks: dict[str, float] | None = None) -> int:
    """``marks``: boot-time stamps (CLOCK_BOOTTIME) the launcher took, reported in hello."""
    argv = sys.argv[1:] if argv is None else argv
    pid1 = os.getpid() == 1 and os.environ.get("TERMINAI_CONTAINER") != "1"
    unsafe, layers = None, []
    if pid1:
        from .init import mount_kernel_filesystems, setup_pid1

        mount_kernel_filesystems()  # /proc/cmdline is readable only after this
        settings = _cmdline()
        layers = boot.layer_names(settings.get("layers", ""))
        unsafe = setup_pid1(layers)
        from .init import set_hostname

        set_hostname(settings.get("hostname", "terminai"))
    else:
        settings = _settings(argv)
    config = AgentConfig(pid1=pid1, workspace=settings.get("workspace"), network=settings.get("net"),
                         proxy=settings.get("proxy"), deny=settings.get("deny"),
                         container=os.environ.get("TERMINAI_CONTAINER") == "1")  # fmt: skip
    if pid1 or config.container:
        from .init import untouchable

        untouchable()
    config.marks = dict(marks or {})
    config.marks["mounted"] = _boottime()
    config.layers = [] if unsafe else layers
    server = Server(config)
    server.unsafe = unsafe
    spec = ChannelSpec.parse(settings.get("channel", boot.DEFAULT_CHANNEL))
    if spec.kind == "virtio-serial":
        server.add_conn(open_virtio_port(spec.address), reconnectable=True)
    else:
        server.add_listener(listen(spec))
    if config.workspace and pid1:
        _mount_workspace(config.workspace)
    ready = settings.get("ready_fd")
    if ready:  # tell a supervising process that the channel is open
        os.write(int(ready), b"ready\n")
        os.close(int(ready))
    config.marks["serving"] = _boottime()
    try:
        server.run()
    finally:
        if pid1:
            from .init import power_off

            power_off()
    return 0


def _boottime() -> float:
    import time

    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _mount_workspace(spec: str) -> None:
    """``TAG:PATH``: mount the host's 9p share TAG at PATH."""
    from .init import mount

    tag, _, path = spec.partition(":")
    path = path or "/workspace"
    os.makedirs(path, exist_ok=True)
    try:
        mount(tag, path, "9p", 0, boot.NINEP_OPTIONS)
    except OSError as exc:
        os.write(2, f"terminai-agent: workspace not mounted: {exc}\n".encode())


if __name__ == "__main__":
    sys.exit(main())
