"""Each command in a Landlock domain of its own.

Commands of one session run as the same uid (0, without capabilities), so
by the kernel's usual rules any of them could read another's
``/proc/<pid>/environ`` (the API token a later command was given), open its
memory, take its descriptors or trace it: a process one command left
behind would spy on every command after it. Landlock (Linux 5.13) confines
that whatever the uids: a process in a domain may reach (``ptrace`` access,
which guards all of those) only processes in its own domain or one nested
in it, and nothing outside any domain. So every command enters a fresh
domain as it starts: what it starts shares its domain (a shell and its
pipeline see each other, as they must); another command, the agent and the
root launcher are out of its reach.

A domain must restrict nothing a command may do: its ruleset handles only
``REFER`` (moving or linking a file into another directory, which Landlock
denies by default inside any domain, even one that does not handle it) and
grants it beneath ``/``, so that moves work as before. ABI 1 kernels cannot
grant it; there Landlock counts as absent. Standard library only.
"""

from __future__ import annotations

import _thread
import ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446  # the same numbers on every architecture
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
REFER = 1 << 13  # LANDLOCK_ACCESS_FS_REFER (ABI 2)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class Domains:
    """Landlock as this kernel offers it; ``enter`` puts the calling thread in a new domain."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._attr = ctypes.c_uint64(REFER)  # struct landlock_ruleset_attr: handled_access_fs
        self.abi = int(self._libc.syscall(CREATE_RULESET, None, ctypes.c_size_t(0),
                                          ctypes.c_uint32(CREATE_RULESET_VERSION)))  # fmt: skip
        if self.abi < 1:
            self.why_not = f"the kernel offers no Landlock ({os.strerror(ctypes.get_errno())})"
        elif self.abi < 2:
            self.why_not = f"the kernel's Landlock (ABI {self.abi}) would forbid moving files between directories"
        else:
            self.why_not = ""
        self._root = os.open("/", os.O_PATH | os.O_CLOEXEC) if self.abi >= 2 else -1

    @property
    def available(self) -> bool:
        return self.abi >= 2

    def enter(self) -> None:
        """Needs ``no_new_privs`` (set on the agent's commands already) or CAP_SYS_ADMIN."""
        fd = int(self._libc.syscall(CREATE_RULESET, ctypes.byref(self._attr), ctypes.c_size_t(8), ctypes.c_uint32(0)))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
        try:
            rule = _PathBeneath(REFER, self._root)
            if self._libc.syscall(ADD_RULE, ctypes.c_int(fd), ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule),
                                  ctypes.c_uint32(0)) != 0:  # fmt: skip
                err = ctypes.get_errno()
                raise OSError(err, f"landlock_add_rule: {os.strerror(err)}")
            if self._libc.syscall(RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
        finally:
            os.close(fd)


class InOwnDomain:
    """A start function (``procs.spawn``'s ``start``) whose command begins in
    a new domain: it runs ``start`` on a short-lived thread that first
    enters one, so that PID 1's own thread stays outside every domain and
    can still start, signal and reap them all. ``posix_spawn`` takes the
    calling thread's credentials, the domain among them."""

    def __init__(self, start: Any, domains: Domains) -> None:
        self.start = start
        self.domains = domains

    def __call__(self, argv: list[str], cwd: str | None, env: dict[str, str], stdio: Any) -> int:
        done = _thread.allocate_lock()
        done.acquire()
        box: list[Any] = []

        def run() -> None:
            try:
                self.domains.enter()
                box.append(self.start(argv, cwd, env, stdio))
            except BaseException as exc:  # handed to the caller below
                box.append(exc)
            finally:
                done.release()

        _thread.start_new_thread(run, ())
        done.acquire()
        if isinstance(box[0], BaseException):
            raise box[0]
        return int(box[0])
