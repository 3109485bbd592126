"""Child processes that must not outlive the shim (the VMM above all)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the shim dies, even by SIGKILL."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the shim died before prctl took effect
            os._exit(1)

    return preexec


def pid_alive(pid: int) -> bool:
    """Whether a process exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_LAST = 63


def keep_only_capabilities(keep: tuple[int, ...]) -> None:
    """In a child about to exec (a preexec_fn): remove every capability but
    ``keep`` from the bounding set, and forbid gaining any back
    (``no_new_privs``). A root process that then execs keeps uid 0 but only
    these capabilities. Raises OSError if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(CAP_LAST + 1):
        if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != 22:  # EINVAL: a capability this kernel does not know
                raise OSError(err, os.strerror(err))
    no_new_privileges()


def no_new_privileges() -> None:
    """Nothing this process execs can gain privileges (setuid bits, file capabilities)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid)
