"""The seccomp filter QEMU runs under, and its user-notification listener.

Which of QEMU's system calls go to the shim for a decision (``vmmguard``)
is decided here once, as a BPF program built from labels, per architecture;
the program is installed in QEMU's process right before its exec, and the
listener handed to the shim over a socket pair, QEMU keeping no copy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
from collections.abc import Callable
from dataclasses import dataclass

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF_0000
SECCOMP_RET_USER_NOTIF = 0x7FC0_0000
SECCOMP_RET_ERRNO = 0x0005_0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
NOTIF_RECV, NOTIF_SEND, NOTIF_ID_VALID = 0xC050_2100, 0xC018_2101, 0x4008_2102
O_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
CLONE_THREAD = 0x0001_0000


@dataclass(frozen=True)
class Arch:
    audit: int
    seccomp: int  # the seccomp system call
    calls: dict[str, int]


# Only the calls the guard needs, per architecture (the generic table has no legacy path calls).
ARCHES = {
    "x86_64": Arch(0xC000_003E, 317, dict(
        open=2, creat=85, openat=257, mkdir=83, mkdirat=258, mknod=133, mknodat=259, symlink=88,
        symlinkat=266, link=86, linkat=265, rename=82, renameat=264, renameat2=316, unlink=87,
        unlinkat=263, rmdir=84, truncate=76, connect=42, sendto=44,
        clone=56, fork=57, vfork=58, clone3=435,
        openat2=437, io_uring_setup=425, open_by_handle_at=304)),
    "aarch64": Arch(0xC000_00B7, 277, dict(
        openat=56, mkdirat=34, mknodat=33, symlinkat=36, linkat=37, renameat=38, renameat2=276,
        unlinkat=35, truncate=45, connect=203, sendto=206,
        clone=220, clone3=435,
        openat2=437, io_uring_setup=425, open_by_handle_at=265)),
}  # fmt: skip
FILE_CALLS = ("creat", "mkdir", "mkdirat", "mknod", "mknodat", "symlink", "symlinkat", "link", "linkat",
              "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "truncate")  # fmt: skip
# Calls that would bypass a check by path: refused outright (QEMU does not need them).
REFUSED = ("openat2", "io_uring_setup", "open_by_handle_at")


def host_arch() -> Arch | None:
    return ARCHES.get(platform.machine()) if os.uname().sysname == "Linux" else None


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


class SeccompData(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_int), ("arch", ctypes.c_uint32), ("ip", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]  # fmt: skip


class Notif(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("data", SeccompData)]


class NotifResp(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("val", ctypes.c_int64), ("error", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]  # fmt: skip


# -- the filter ------------------------------------------------------------------------------------------
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06


def filter_program(arch: Arch, *, files: bool, network: bool, spawns: bool = False) -> list[tuple[int, int, int, int]]:
    """The BPF program: which of QEMU's calls go to the shim. Built from
    labels so that each rule reads as what it checks."""
    c = arch.calls
    prog: list[tuple[int, str | int, str | int, int]] = [(LD_ABS, 0, 0, 4), (JEQ, 0, "enosys", arch.audit)]
    prog.append((LD_ABS, 0, 0, 0))
    if arch.audit == ARCHES["x86_64"].audit:
        prog.append((JGE, "enosys", 0, 0x4000_0000))  # the x32 table
    for name in REFUSED:
        prog.append((JEQ, "enosys", 0, c[name]))
    if files:
        for name in FILE_CALLS:
            if name in c:
                prog.append((JEQ, "notify", 0, c[name]))
        prog.append((JEQ, "openat", 0, c["openat"]))
        if "open" in c:
            prog.append((JEQ, "open", 0, c["open"]))
    if network:
        prog.append((JEQ, "notify", 0, c["connect"]))
        prog.append((JEQ, "sendto", 0, c["sendto"]))
    if spawns:  # a new process (not a thread) is counted against the rate
        for name in ("fork", "vfork", "clone3"):
            if name in c:
                prog.append((JEQ, "notify", 0, c[name]))
        prog.append((JEQ, "clone", 0, c["clone"]))
    prog.append((RET, 0, 0, SECCOMP_RET_ALLOW))
    labels: dict[str, int] = {}

    def label(name: str, *body: tuple[int, str | int, str | int, int]) -> None:
        labels[name] = len(prog)
        prog.extend(body)

    def arg(i: int, high: bool = False) -> int:  # the offset of seccomp_data.args[i] (little-endian halves)
        return 16 + 8 * i + (4 if high else 0)

    label("openat", (LD_ABS, 0, 0, arg(2)), (JSET, "notify", "allow", O_WRITES))
    label("open", (LD_ABS, 0, 0, arg(1)), (JSET, "notify", "allow", O_WRITES))
    label("sendto", (LD_ABS, 0, 0, arg(4)), (JEQ, 0, "notify", 0), (LD_ABS, 0, 0, arg(4, True)),
          (JEQ, "allow", "notify", 0))  # fmt: skip
    label("clone", (LD_ABS, 0, 0, arg(0)), (JSET, "allow", "notify", CLONE_THREAD))
    label("notify", (RET, 0, 0, SECCOMP_RET_USER_NOTIF))
    label("allow", (RET, 0, 0, SECCOMP_RET_ALLOW))
    label("enosys", (RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS))
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = [labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
        assert all(0 <= r <= 255 for r in rel), (i, rel)
        out.append((code, rel[0], rel[1], k))
    return out


def installer(arch: Arch, program: list[tuple[int, int, int, int]]) -> tuple[Callable[[], None], socket.socket]:
    """A preexec step that installs the filter in the child and sends its
    listener to the shim, and the shim's end of that socket. Everything is
    allocated here, before the fork; the child only makes system calls.
    The child closes its copy of the listener: QEMU must never answer for itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    filters = (SockFilter * len(program))(*(SockFilter(*ins) for ins in program))
    prog = SockFprog(len(program), filters)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def install() -> None:
        fd = libc.syscall(arch.seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, ctypes.byref(prog))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp listener: {os.strerror(err)}")
        socket.send_fds(theirs, [b"L"], [fd])
        os.close(fd)
        theirs.close()

    install.keep = (filters, prog, theirs)  # type: ignore[attr-defined]  # alive until the fork
    return install, ours


def receive_listener(ours: socket.socket, timeout: float = 10.0) -> int:
    ours.settimeout(timeout)
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    finally:
        ours.close()
    if len(fds) != 1:
        raise OSError("the VMM sent no seccomp listener")
    return fds[0]
