"""A seccomp filter for commands in the container tier when they run as uid 0.

The container shares the host's kernel and bind-mounts the workspace: a
file that a command there makes setuid or setgid is that on the host too,
owned by the invoking user (root, when the shim runs as root), and any
local user who can reach the workspace could run it. Docker's own filter
and an empty capability set do not stop an owner from setting those bits
on its own files. This filter, stacked on Docker's, refuses every way to
create or mark a file setuid or setgid (EPERM), and the interfaces that
would bypass a filter on arguments (``openat2`` takes its mode in a struct
the filter cannot read; io_uring opens files without system calls; other
ABIs, i386 and x32, whose calls have other numbers): those get ENOSYS, so
libc falls back to the plain calls.

Standard library only; the filter is assembled once, installed in each
command's child between fork and exec (``install``).
"""

from __future__ import annotations

import ctypes
import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
SPECIAL_BITS = 0o6000  # S_ISUID | S_ISGID

# BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
X32_BIT = 0x40000000
AND_K = 0x54
RET_K = 0x06

# (audit arch, {syscall: index of the mode argument}, refused outright)
ARCHES = {
    "x86_64": (
        0xC000003E,
        {90: 1, 91: 1, 268: 2, 452: 2, 2: 2, 257: 3, 85: 1, 133: 1, 259: 2},
        (437, 425),  # openat2, io_uring_setup
    ),
    "aarch64": (
        0xC00000B7,
        {52: 1, 53: 2, 452: 2, 56: 3, 33: 2},
        (437, 425),
    ),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes | None:
    """The filter's instructions for this machine, or None for an
    architecture it does not know (then no filter is installed)."""
    arch = ARCHES.get(machine or os.uname().machine)
    if arch is None:
        return None
    audit, modes, refused = arch
    out = [
        _insn(LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(JEQ_K, 1, 0, audit),
        _insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),  # another ABI (i386 int 0x80): none here
        _insn(LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        _insn(JGE_K, 0, 1, X32_BIT),
        _insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),  # x32 system calls: the same numbers, another table
    ]
    for nr in refused:
        out += [_insn(JEQ_K, 0, 1, nr), _insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS)]
    for nr, index in modes.items():
        # nr == N ? (args[index] & 06000 ? EPERM : ALLOW) : next
        out += [
            _insn(JEQ_K, 0, 5, nr),
            _insn(LD_W_ABS, 0, 0, 16 + 8 * index),  # low half of the argument (little-endian)
            _insn(AND_K, 0, 0, SPECIAL_BITS),
            _insn(JEQ_K, 1, 0, 0),
            _insn(RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
            _insn(RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
    out.append(_insn(RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(out)


class Filter:
    """A filter ready to install: the memory it needs is set up in the
    parent, so the child between fork and exec only makes two calls."""

    def __init__(self, code: bytes) -> None:
        self._code = ctypes.create_string_buffer(code, len(code))
        # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
        self._prog = ctypes.create_string_buffer(
            struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(self._code)), 16
        )
        self._libc: Any = ctypes.CDLL(None, use_errno=True)

    def install(self) -> None:
        if self._libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "no_new_privs")
        if self._libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._prog, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "seccomp filter")


def for_commands() -> Filter | None:
    """The filter commands get, or None when they need none: not uid 0, or
    a machine this filter does not know."""
    if os.getuid() != 0:
        return None
    code = program()
    return Filter(code) if code is not None else None
