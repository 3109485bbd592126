"""The VMM's system calls on the workspace and the network, decided on the host.

Why: QEMU's 9p server writes the workspace with the host user's rights, and
its user networking connects wherever the guest asks. Neither filters by
name or destination, and whatever the guest sets up itself (read-only
mounts over ``.git``, reject routes) its own root can undo. So QEMU runs
under a seccomp filter that hands the calls that create, write, rename or
remove a name, and (in ``open`` mode) those that connect or send to an
address, to the shim (``SECCOMP_RET_USER_NOTIF``). The shim reads the
call's arguments from QEMU's memory, resolves the directory descriptor
through ``/proc``, asks ``wspolicy`` or ``netpolicy``, and lets the kernel
carry the call out or answers it with an error. Reads, and writes through
descriptors already checked, never leave the kernel: the data path keeps
its speed.

Why letting the call continue is sound here (``seccomp_unotify(2)`` warns
that a target may change its arguments after the check): the target is
QEMU, not the guest. The names and addresses it passes are built by its own
code in its own memory, which the guest cannot write, and directories are
named by descriptor, whose object cannot move into or out of git metadata
(renames to or from a ``.git`` are refused). A QEMU the guest has taken
over is a different boundary: QEMU's own seccomp filter and user hold it.

If the shim goes away, the kernel fails every such call (ENOSYS): nothing
is let through unchecked. The same thread watches the workspace's free
space and stops the session at its disk floor.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import ipaddress
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .diskfloor import FLOOR_CHECK_EVERY, DiskFloor
from .netpolicy import OpenPolicy
from .notifyfilter import (
    CLONE_THREAD,
    NOTIF_ID_VALID,
    NOTIF_RECV,
    NOTIF_SEND,
    SECCOMP_USER_NOTIF_FLAG_CONTINUE,
    Arch,
    Notif,
    NotifResp,
)
from .wspolicy import BARE_SHAPE, BreakLink, Deny, WorkspacePolicy

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
# The allowlist's connector: QEMU starts one process per guest connection. A guest
# that opens and closes connections in a loop would make it start hundreds a second.
SPAWN_RATE, SPAWN_BURST = 40.0, 64  # processes a second, and at once (two per connection: glib forks twice)
MAX_WAITING_SPAWNS = 256  # beyond this many held back, a start fails (EAGAIN)
DEFER = -1  # a decision that is answered later
LOCAL_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Target:
    path: str  # the real path the call names
    parent: str  # a path that opens the directory object the call names it in
    name: str


class GuardError(Exception):
    pass


class VmmGuard:
    """One per VMM process: answers its notifications until closed."""

    def __init__(
        self,
        listener: int,
        vmm_pid: int,
        arch: Arch,
        workspace: WorkspacePolicy | None,
        floor: DiskFloor | None,
        network: OpenPolicy | None,
    ) -> None:
        self.listener = listener
        self.vmm_pid = vmm_pid
        self.names = {nr: name for name, nr in arch.calls.items()}
        self.workspace = workspace
        self.floor = floor
        self.network = network
        self.violation: str | None = None
        self.spawns = _TokenBucket(SPAWN_RATE, SPAWN_BURST)
        self._waiting: collections.deque[int] = collections.deque()  # notification ids held back by the rate
        self.denied: dict[str, int] = {}  # what was refused, by kind (counts only: the guest picks the names)
        self.broken_links = 0
        self.spawned = 0  # processes the VMM was let start (the allowlist's connectors)
        self.served, self.busy = 0, 0.0  # calls decided, and the seconds spent deciding (the bench's cost)
        self._on_violation: Callable[[str], None] | None = None
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._mem: dict[int, int] = {}
        self._local: dict[str, tuple[float, bool]] = {}
        self._floor_at = 0.0
        self._below = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vmm-guard", daemon=True)
        self._thread.start()

    # -- lifecycle
    def on_violation(self, handler: Callable[[str], None]) -> None:
        """Who stops the session when the guard must (the disk floor): the
        session's watchdog, which names the reason to every waiting command."""
        self._on_violation = handler
        if self.violation is not None:
            handler(self.violation)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        for fd in (self.listener, self._wake_r, self._wake_w, *self._mem.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._mem.clear()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            wait = FLOOR_CHECK_EVERY if not self._waiting else min(FLOOR_CHECK_EVERY, self.spawns.wait())
            ready = poller.poll(wait * 1000)
            if self._closed:
                return
            while self._waiting and self.spawns.take():
                self.spawned += 1
                self._respond(self._waiting.popleft(), 0)
            for fd, events in ready:
                if fd == self.listener:
                    if events & (select.POLLHUP | select.POLLERR) and not events & select.POLLIN:
                        return  # the VMM and everything it started are gone
                    self._serve_one()
            self._check_floor()

    def _check_floor(self, force: bool = False) -> bool:
        if self.floor is None or self.workspace is None:
            return False
        now = time.monotonic()
        if not force and now - self._floor_at < FLOOR_CHECK_EVERY:
            return self._below
        self._floor_at = now
        try:
            breach = self.floor.breach(os.statvfs(self.workspace.root))
        except OSError:
            return self._below
        self._below = breach is not None
        if breach is not None and self.violation is None:
            self.violation = f"the workspace reached its disk floor ({breach}); the session was stopped"
            if self._on_violation is not None:
                self._on_violation(self.violation)
            else:
                try:
                    os.kill(self.vmm_pid, signal.SIGKILL)
                except OSError:
                    pass
        return self._below

    # -- one notification
    def _serve_one(self) -> None:
        notif = Notif()
        if self._libc.ioctl(self.listener, NOTIF_RECV, ctypes.byref(notif)) != 0:
            return  # ENOENT: the caller died before we read it
        started = time.perf_counter()
        try:
            self._serve(notif)
        finally:
            self.served += 1
            self.busy += time.perf_counter() - started

    def _serve(self, notif: Notif) -> None:
        """Every notification gets an answer: one left unanswered would hang that QEMU thread for good."""
        try:
            error = self._decide(notif)
        except OSError as exc:
            error = exc.errno or errno.EPERM
        except Exception:  # GuardError, or anything unforeseen: refused, and the guard goes on
            error = errno.EPERM
        if error != DEFER:
            self._respond(notif.id, error)

    def _respond(self, nid: int, error: int) -> None:
        resp = NotifResp(nid, 0, -error if error else 0, 0 if error else SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        self._libc.ioctl(self.listener, NOTIF_SEND, ctypes.byref(resp))  # ENOENT: the caller is gone

    def _still_waiting(self, notif: Notif) -> None:
        """After reading the caller's memory: the same call is still waiting (no pid reuse)."""
        nid = ctypes.c_uint64(notif.id)
        if self._libc.ioctl(self.listener, NOTIF_ID_VALID, ctypes.byref(nid)) != 0:
            raise GuardError("gone")

    def _decide(self, notif: Notif) -> int:
        """0: let the call go on; else the errno it fails with."""
        name = self.names.get(notif.data.nr, "")
        a = list(notif.data.args)
        pid = notif.pid
        if name in ("clone", "fork", "vfork", "clone3"):
            if name == "clone3":  # struct clone_args: its first field is the flags
                flags = struct.unpack("=Q", self._read(pid, a[0], 8))[0] if a[0] else 0
                self._still_waiting(notif)
                if flags & CLONE_THREAD:
                    return 0
            if not self._waiting and self.spawns.take():
                self.spawned += 1
                return 0
            if len(self._waiting) >= MAX_WAITING_SPAWNS:
                return self._deny(Deny(errno.EAGAIN, "process rate"))
            self._waiting.append(notif.id)  # answered once the rate allows: backpressure, nothing dropped
            return DEFER
        if name in ("connect", "sendto"):
            addr, length = (a[1], a[2]) if name == "connect" else (a[4], a[5])
            raw = self._read(pid, addr, min(int(length), 128)) if addr else b""
            self._still_waiting(notif)
            return self._decide_address(raw)
        if self.workspace is None:
            return 0
        if name in ("openat", "open", "creat"):
            dirfd, path, flags = (a[0], a[1], a[2]) if name == "openat" else (AT_FDCWD, a[0], a[1])
            if name == "creat":
                flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
            target = self._target(notif, dirfd, path)
            return self._open(target, int(flags))
        if name == "truncate":
            return self._open(self._target(notif, AT_FDCWD, a[0]), os.O_WRONLY)
        changes: list[tuple[Target, bool]] = []  # (target, creates a name)
        if name in ("mkdirat", "mknodat"):
            changes = [(self._target(notif, a[0], a[1]), True)]
        elif name in ("mkdir", "mknod"):
            changes = [(self._target(notif, AT_FDCWD, a[0]), True)]
        elif name == "symlinkat":
            changes = [(self._target(notif, a[1], a[2]), True)]
        elif name == "symlink":
            changes = [(self._target(notif, AT_FDCWD, a[1]), True)]
        elif name in ("linkat", "renameat", "renameat2"):
            changes = [(self._target(notif, a[0], a[1], empty_ok=name == "linkat"), False),
                       (self._target(notif, a[2], a[3]), True)]  # fmt: skip
        elif name in ("link", "rename"):
            changes = [(self._target(notif, AT_FDCWD, a[0]), False), (self._target(notif, AT_FDCWD, a[1]), True)]
        elif name == "unlinkat":
            changes = [(self._target(notif, a[0], a[1]), False)]
        elif name in ("unlink", "rmdir"):
            changes = [(self._target(notif, AT_FDCWD, a[0]), False)]
        else:
            return errno.EPERM  # a call the filter sends that this table does not know
        below = any(creates for _t, creates in changes) and self._check_floor(force=True)
        for target, creates in changes:
            bare = creates and self._bare_shape(target)
            decided = self.workspace.change(target.path, creates=creates, below_floor=below, bare_shape=bare)
            if isinstance(decided, Deny):
                return self._deny(decided)
        return 0

    def _open(self, target: Target, flags: int) -> int:
        assert self.workspace is not None
        if not self.workspace.inside(target.path):
            return 0
        dirfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                st = os.stat(target.name, dir_fd=dirfd, follow_symlinks=False)
                nlink, regular = st.st_nlink, (st.st_mode & 0o170000) == 0o100000
            except FileNotFoundError:
                nlink, regular = 0, True
            creates = bool(flags & os.O_CREAT)
            below = self._check_floor(force=creates and nlink == 0)
            decided = self.workspace.write(target.path, nlink=nlink, regular=regular, creates=creates,
                                           below_floor=below)  # fmt: skip
            if isinstance(decided, Deny):
                return self._deny(decided)
            if isinstance(decided, BreakLink):
                break_link(dirfd, target.name)
                self.broken_links += 1
            return 0
        finally:
            os.close(dirfd)

    def _bare_shape(self, target: Target, dirfd: int | None = None) -> bool:
        """``target`` is named like a part of a bare repository whose directory has another part."""
        assert self.workspace is not None
        if not self.workspace.protect_git or target.name not in BARE_SHAPE or not self.workspace.inside(target.path):
            return False
        fd = dirfd if dirfd is not None else os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for other in BARE_SHAPE:
                if other != target.name:
                    try:
                        os.stat(other, dir_fd=fd, follow_symlinks=False)
                        return True
                    except FileNotFoundError:
                        pass
            return False
        finally:
            if dirfd is None:
                os.close(fd)

    def _deny(self, decided: Deny) -> int:
        kind = errno.errorcode.get(decided.errno, str(decided.errno))
        self.denied[kind] = self.denied.get(kind, 0) + 1
        return decided.errno

    def _decide_address(self, raw: bytes) -> int:
        if len(raw) < 2:
            return 0  # no address: a connected socket's send
        family = struct.unpack_from("=H", raw)[0]
        if family in (socket.AF_UNIX, socket.AF_UNSPEC):
            return 0  # QEMU's own sockets; the guest's traffic is only ever IP
        if self.network is None:
            return 0
        try:
            if family == socket.AF_INET and len(raw) >= 8:
                port, addr = struct.unpack_from("!H", raw, 2)[0], ipaddress.IPv4Address(raw[4:8])
            elif family == socket.AF_INET6 and len(raw) >= 24:
                port, addr = struct.unpack_from("!H", raw, 2)[0], ipaddress.IPv6Address(raw[8:24])  # type: ignore[assignment]
            else:
                return self._deny(Deny(errno.EAFNOSUPPORT, "address family"))
        except ValueError:
            return self._deny(Deny(errno.EINVAL, "address"))
        if self.network.decide(addr, port, self._is_local).allowed:
            return 0
        return self._deny(Deny(errno.ECONNREFUSED, "destination"))

    def _is_local(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``addr`` is this host's own: the kernel routes a datagram to
        its own address from that same address (a route lookup, no packet;
        binding would not tell where ``ip_nonlocal_bind`` is set)."""
        key = str(addr)
        now = time.monotonic()
        hit = self._local.get(key)
        if hit is not None and now - hit[0] < LOCAL_CACHE_SECONDS:
            return hit[1]
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect((key, 9))
                local = ipaddress.ip_address(s.getsockname()[0].split("%", 1)[0]) == addr
            except OSError as exc:  # no route: not reachable from here at all, so no host service either
                local = exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        if len(self._local) > 4096:
            self._local.clear()
        self._local[key] = (now, local)
        return local

    # -- reading the caller
    def _read(self, pid: int, addr: int, size: int) -> bytes:
        fd = self._mem.get(pid)
        if fd is None:
            if len(self._mem) > 256:
                for old in self._mem.values():
                    os.close(old)
                self._mem.clear()
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            self._mem[pid] = fd
        return os.pread(fd, size, addr)

    def _string(self, pid: int, addr: int) -> str:
        if addr == 0:
            return ""
        out = b""
        while len(out) < 4096:
            chunk = 4096 - (addr + len(out)) % 4096  # up to the page end: the next page may be unmapped
            data = self._read(pid, addr + len(out), chunk)
            if not data:
                raise GuardError("unreadable path")
            end = data.find(b"\0")
            if end >= 0:
                return os.fsdecode(out + data[:end])
            out += data
        raise GuardError("path too long")

    def _target(self, notif: Notif, dirfd_arg: int, path_arg: int, empty_ok: bool = False) -> Target:
        pid = notif.pid
        path = self._string(pid, path_arg)
        dirfd = ctypes.c_int32(dirfd_arg & 0xFFFF_FFFF).value
        self._still_waiting(notif)
        proc = re.match(r"^/proc/(?:self|thread-self|\d+)/fd/(\d+)(?:/(.*))?$", path)
        if proc:  # how QEMU's 9p names a file by its directory's descriptor
            dirfd, path = int(proc[1]), proc[2] or ""
        if path.startswith("/"):
            parent_ref, base = None, "/"
        elif dirfd == AT_FDCWD:
            parent_ref, base = f"/proc/{pid}/cwd", os.readlink(f"/proc/{pid}/cwd")
        else:
            parent_ref, base = f"/proc/{pid}/fd/{dirfd}", os.readlink(f"/proc/{pid}/fd/{dirfd}")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        full = os.path.normpath(os.path.join(base, *parts)) if parts else base
        ws = self.workspace
        if ws is not None and (ws.inside(full) or ws.inside(base)):
            # Inside the workspace QEMU names one entry of a directory it holds open; anything
            # else (a walk, "..", a directory that is gone) is not what the 9p server does.
            if base.endswith(" (deleted)") or ".." in parts or len(parts) > 1 or parent_ref is None:
                raise GuardError(f"unexpected path form in the workspace: {path!r}")
            if not parts and not empty_ok:
                raise GuardError("no name")
        if parent_ref is None or len(parts) != 1:
            parent_ref, name = os.path.dirname(full), os.path.basename(full)
        else:
            name = parts[0]
        return Target(full, parent_ref, name)


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait(self) -> float:
        """Seconds until the next token."""
        return max(0.001, (1 - self.tokens) / self.rate)


def break_link(dirfd: int, name: str) -> None:
    """Give a hard-linked file its own inode under the same name: a copy of
    its bytes, extended attributes, mode (less set-id bits), owner and
    times, renamed over it. The other names keep the old inode, untouched."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    tmp = f".terminai-unlink-{os.urandom(6).hex()}"
    try:
        st = os.fstat(src)
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        try:
            left = st.st_size
            while left > 0:
                n = os.copy_file_range(src, dst, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
            for attr in os.listxattr(src):
                try:
                    os.setxattr(dst, attr, os.getxattr(src, attr))
                except OSError:
                    pass
            if os.geteuid() == 0:
                os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, st.st_mode & 0o1777)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
        raise
    finally:
        os.close(src)
