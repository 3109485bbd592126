"""PID 1 duties: the file systems a Linux userland expects, then serve.

The root image is read-only (erofs or squashfs on virtio-blk). A tmpfs
overlay on top makes it writable for the session without ever changing the
image, and everything written is gone at shutdown.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
PR_SET_DUMPABLE = 4
# Shares of guest memory for each tmpfs: together below the whole, so that
# files alone cannot take the memory the agent needs to answer.
OVERLAY_SIZE, TMP_SIZE, SHM_SIZE, RUN_SIZE = "35%", "25%", "10%", "5%"
# What a command with uid 0 but no capabilities could still write to reach
# PID 1 or the kernel: made read-only before the first command (``seal``).
SEALED = ("/proc/sys", "/sys", "/sys/fs/cgroup", "/usr/lib/python3.11", "/usr/lib/terminai")
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC
_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def _mount_quiet(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    try:
        mount(source, target, fstype, flags, data)
    except OSError as exc:
        if exc.errno != 16:  # EBUSY: already mounted (devtmpfs by the kernel)
            raise


def _layer_devices(count: int) -> dict[int, str]:
    """The layer disks by SCSI target (the layer's position), waiting a
    little for the probe: the kernel may still be attaching disks."""
    import time

    found: dict[int, str] = {}
    deadline = time.monotonic() + 5
    while True:
        try:
            addresses = os.listdir("/sys/class/scsi_disk")
        except OSError:
            addresses = []
        for address in addresses:  # host:channel:target:lun
            parts = address.split(":")
            if len(parts) == 4 and parts[1] == "0" and parts[3] == "0" and parts[2].isdigit():
                try:
                    found[int(parts[2])] = "/dev/" + os.listdir(f"/sys/class/scsi_disk/{address}/device/block")[0]
                except (OSError, IndexError):
                    continue
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _mount_layers(layers: list[str]) -> list[str]:
    """Each layer's disk, read-only, under /run/ovl/layers; returns the
    overlay's lower directories, top first, the root image last."""
    from terminai_protocol import bootcontract as boot

    lower = ["/"]
    devices = _layer_devices(len(layers)) if layers else {}
    for i, name in enumerate(layers):
        if i not in devices:
            raise OSError(2, f"layer {name}: no disk at SCSI target {i}")
        target = f"/run/ovl/layers/{i}"
        os.makedirs(target, exist_ok=True)
        mount(devices[i], target, boot.LAYER_FSTYPE, MS_RDONLY | MS_NODEV)
        lower.insert(0, target)
    return lower


def _overlay_root(layers: list[str]) -> str | None:
    """Switch to a tmpfs-backed overlay of the read-only root and its layers.
    A layer that cannot be mounted leaves the root image alone under the
    overlay and is reported: the agent then refuses every command rather
    than run them on another system than the session asked for."""
    _mount_quiet("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={OVERLAY_SIZE}")
    for d in ("/run/ovl/upper", "/run/ovl/work", "/run/ovl/root"):
        os.makedirs(d, exist_ok=True)
    error = None
    try:
        lower = _mount_layers(layers)
    except OSError as exc:
        error, lower = f"the root filesystem's layers could not be mounted ({exc})", ["/"]
    mount("overlay", "/run/ovl/root", "overlay", 0,
          f"lowerdir={':'.join(lower)},upperdir=/run/ovl/upper,workdir=/run/ovl/work")  # fmt: skip
    # /run itself stays where it is, hidden below the new root: it holds the
    # overlay's upper layer and the layers' mounts for the rest of the VM's life.
    for sub in ("/proc", "/sys", "/dev"):
        mount(sub, "/run/ovl/root" + sub, "", MS_MOVE)
    os.chdir("/run/ovl/root")
    mount(".", "/", "", MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={RUN_SIZE}")
    return error


def mount_kernel_filesystems() -> None:
    _mount_quiet("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount_quiet("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount_quiet("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")


def setup_pid1(layers: list[str]) -> str | None:
    """After ``mount_kernel_filesystems``; returns why commands must be refused, if they must."""
    error = None
    if _root_is_readonly():
        error = _overlay_root(layers)
    elif layers:
        error = "the root filesystem's layers need a read-only root image"
    _mount_quiet("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    _mount_quiet("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={SHM_SIZE}")
    _mount_quiet("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={TMP_SIZE}")
    try:
        _mount_quiet("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # a kernel without cgroup2 still serves commands
    return error


def untouchable() -> None:
    """The agent as PID 1 (of the VM or of a container), at start: it ignores
    the signals a command could send it (Python would raise
    KeyboardInterrupt on SIGINT and the agent would end), and it is not
    dumpable, so a command of the same uid cannot trace it or take its
    descriptors (the agent channel)."""
    try:
        import _signal as signal
    except ImportError:  # another Python
        import signal  # type: ignore[no-redef]
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def seal() -> None:
    """Before the first command: what a command with uid 0 but no
    capabilities could otherwise write to reach PID 1 or the kernel
    (sysctls, sysfs, cgroups, the code the agent is made of) is mounted
    read-only; without CAP_SYS_ADMIN nothing undoes it. Every module the
    agent uses is loaded by now (``socket`` by the network set-up just
    before), and none is imported after: a command may move the directory
    above a sealed one and put its own files where a later import would look.
    The terminal modules a ``pty`` command needs (``termios`` is a file in
    lib-dynload, not built in) are loaded here for that reason, off the boot path."""
    import fcntl  # noqa: F401
    import termios  # noqa: F401

    for path in SEALED:
        if not os.path.isdir(path):
            continue
        if not os.path.ismount(path):
            mount(path, path, "", MS_BIND)
        mount(path, path, "", MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _root_is_readonly() -> bool:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "/":
                return "ro" in parts[3].split(",")
    return False


def set_hostname(name: str) -> None:
    """The system call rather than /proc/sys/kernel/hostname: after a restore
    every kernel path is cold code under TCG, and procfs is a long one."""
    raw = name.encode()
    _libc.sethostname(raw, len(raw))


def loopback_up() -> None:
    """Bring ``lo`` up so commands can use 127.0.0.1 even with no network."""
    import socket

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def configure_network(spec: str, deny: str | None = None) -> None:
    """``ADDR/PREFIX,GATEWAY,DNS``: set up eth0 from what the host passed on the
    kernel command line (no DHCP, nothing to wait for). DNS ``none``: no
    resolver (the allowlist proxy resolves names on the host). ``deny``:
    comma-separated networks that get reject routes (commands, without
    CAP_NET_ADMIN, cannot remove them)."""
    import socket

    SIOCSIFADDR, SIOCSIFNETMASK, SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCADDRT = 0x8916, 0x891C, 0x8913, 0x8914, 0x890B
    IFF_UP, RTF_UP, RTF_GATEWAY = 0x1, 0x1, 0x2
    address, gateway, dns = spec.split(",")
    ip, _, prefix = address.partition("/")
    mask = socket.inet_ntoa(struct.pack(">I", (0xFFFFFFFF << (32 - int(prefix or 24))) & 0xFFFFFFFF))

    def sin(addr: str) -> bytes:
        return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))

    def ifreq(data: bytes = b"") -> bytes:
        return struct.pack("16s", b"eth0") + data.ljust(24, b"\0")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFADDR, ifreq(sin(ip)))
        fcntl.ioctl(s, SIOCSIFNETMASK, ifreq(sin(mask)))
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq()))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, ifreq(struct.pack("H", flags | IFF_UP)))
        # struct rtentry: the default route through the gateway
        route = struct.pack("@L16s16s16sHhLPhPLLH", 0, sin("0.0.0.0"), sin(gateway), sin("0.0.0.0"),
                            RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)  # fmt: skip
        fcntl.ioctl(s, SIOCADDRT, route)
        RTF_REJECT = 0x0200
        for net in (deny or "").split(","):
            if not net:
                continue
            dst, _, bits = net.partition("/")
            netmask = socket.inet_ntoa(struct.pack(">I", (0xFFFFFFFF << (32 - int(bits or 32))) & 0xFFFFFFFF))
            reject = struct.pack("@L16s16s16sHhLPhPLLH", 0, sin(dst), sin("0.0.0.0"), sin(netmask),
                                 RTF_UP | RTF_REJECT, 0, 0, 0, 0, 0, 0, 0, 0)  # fmt: skip
            fcntl.ioctl(s, SIOCADDRT, reject)
    with open("/etc/resolv.conf", "w") as f:
        f.write(f"nameserver {dns}\n" if dns != "none" else "# no resolver: names are resolved by the proxy\n")


def open_random() -> int:
    """Opened at boot and kept: the open is in every snapshot, so a restored
    VM's freshen does not pay for it on cold code."""
    return os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)


def add_entropy(fd: int, data: bytes) -> None:
    """Credit host-provided randomness to the kernel pool (RNDADDENTROPY) and
    reseed the CRNG at once (RNDRESEEDCRNG): a restored VM must not hand out
    the random stream every other copy of the same snapshot also produces."""
    RNDADDENTROPY = 0x40085203
    RNDRESEEDCRNG = 0x5207
    fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
    fcntl.ioctl(fd, RNDRESEEDCRNG)


def power_off() -> None:
    """End the VM. A reboot request makes QEMU (run with -no-reboot) exit."""
    os.sync()
    _libc.reboot(RB_AUTOBOOT)
    os._exit(0)
