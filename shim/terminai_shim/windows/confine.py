"""The brain's file operations, confined by the descriptor they act on.

A check of a path string followed by an operation on the same string can be
raced: a symbolic link flipped between the two moves the operation outside
the workspace (the broker's first version leaked a file after 982 tries).
Here the workspace is held open, every operation opens its path beneath it
once, and then acts on that descriptor only:

- ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` where the kernel has
  it (Linux 5.6): links that stay inside the workspace work, any resolution
  that would leave it fails in the kernel;
- otherwise a walk from the workspace, one component at a time, each opened
  with ``O_NOFOLLOW``: no link is followed at all (stricter, never looser);
- on Windows (``win32.open_beneath``) the path is opened as a handle, then
  the handle's final path (``GetFinalPathNameByHandleW``) must lie under the
  workspace's and no component may be a reparse point, before the handle is used.

Writes go to a new temporary name in the opened parent directory and are
renamed over the final name there: a link planted at the final name is
replaced, never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Protocol

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (the unified syscall table)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08


class OutsideWorkspace(PermissionError):
    """The path leaves the workspace (or reaches it through a link the walk refuses)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def relative_to_workspace(root: Path, path: str) -> str:
    """A request's path (absolute inside the workspace, or relative to it) as a
    relative path, lexically: nothing is resolved on disk here (that is the
    open's job), and ``..`` that climbs out is refused."""
    pure = PureWindowsPath if os.name == "nt" else PurePosixPath
    given, base = pure(path), pure(str(root))
    if given.is_absolute():
        try:
            given = given.relative_to(base)
        except ValueError:
            raise OutsideWorkspace(errno.EACCES, f"{path!r} is outside the workspace") from None
    parts: list[str] = []
    for part in given.parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise OutsideWorkspace(errno.EACCES, f"{path!r} climbs out of the workspace")
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


class Workspace:
    """The workspace directory, held open for the session (POSIX)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        self._openat2 = sys.platform.startswith("linux")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- opening beneath the workspace ---------------------------------------------------
    def open(self, relative: str, flags: int, mode: int = 0o600) -> int:
        """``relative`` opened beneath the workspace; the caller owns the descriptor."""
        flags |= _O_CLOEXEC
        if not relative:
            return os.open(".", flags, dir_fd=self.fd)
        if self._openat2:
            fd = _openat2(self.fd, relative, flags, mode)
            if fd is not None:
                return fd
            self._openat2 = False  # no openat2 here (an old kernel, or a seccomp filter): walk from now on
        return self._walk(relative, flags, mode)

    def _walk(self, relative: str, flags: int, mode: int) -> int:
        *dirs, last = relative.split("/")
        current = os.dup(self.fd)
        try:
            for name in dirs:
                following = _open_no_link(name, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC, 0, current, relative)
                os.close(current)
                current = following
            return _open_no_link(last, flags, mode, current, relative)
        finally:
            os.close(current)

    def open_dir(self, relative: str, create: bool = False) -> int:
        """A directory beneath the workspace; with ``create``, made as needed,
        one component at a time, each opened without following a link."""
        flags = os.O_RDONLY | _O_DIRECTORY
        if not create or not relative:
            return self.open(relative, flags)
        made = ""
        for name in relative.split("/"):
            made = f"{made}/{name}" if made else name
            try:
                os.close(self.open(made, flags))
            except FileNotFoundError:
                parent = self.open_dir(made.rpartition("/")[0])
                try:
                    os.mkdir(name, 0o755, dir_fd=parent)
                except FileExistsError:
                    pass  # made meanwhile: the open below decides what it is
                finally:
                    os.close(parent)
        return self.open(relative, flags)

    # -- the operations ------------------------------------------------------------------
    @contextlib.contextmanager
    def directory(self, relative: str) -> Iterator[tuple[str, tuple[int, ...]]]:
        """A directory beneath the workspace as a command's working directory:
        on Linux the opened descriptor itself (``/proc/self/fd/N``, passed to
        the child), so the directory the child starts in is the one checked."""
        fd = self.open_dir(relative)
        try:
            if sys.platform.startswith("linux"):
                yield f"/proc/self/fd/{fd}", (fd,)
            else:  # no descriptor-relative chdir through Popen here: the checked path, by name
                yield str(self.root / relative), ()
        finally:
            os.close(fd)

    def read(self, relative: str) -> bytes:
        fd = self.open(relative, os.O_RDONLY | _O_NONBLOCK)  # a FIFO must not block the broker
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(errno.EISDIR, f"{relative or '.'} is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)

    def write(self, relative: str, data: bytes, create_dirs: bool = False) -> int:
        parent_rel, _, name = relative.rpartition("/")
        if not name:
            raise IsADirectoryError(errno.EISDIR, "writeFile needs a file name")
        parent = self.open_dir(parent_rel, create=create_dirs)
        tmp = f".{name}.terminai-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)  # replaces a link, never follows it
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
                raise
        finally:
            os.close(parent)
        return len(data)

    def list(self, relative: str, include_hidden: bool = False) -> list[dict[str, Any]]:
        fd = self.open_dir(relative)
        try:
            entries = []
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.name.startswith(".") and not include_hidden:
                        continue
                    st = entry.stat(follow_symlinks=False)  # a link is reported, never followed
                    kind = ("directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                            else "symlink" if stat.S_ISLNK(st.st_mode) else "other")  # fmt: skip
                    entries.append({"name": entry.name, "type": kind, "size": st.st_size})
            return sorted(entries, key=lambda e: e["name"])
        finally:
            os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _openat2(dirfd: int, relative: str, flags: int, mode: int) -> int | None:
    """The descriptor, or None when this kernel (or a filter) has no openat2."""
    libc = _libc()
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = int(libc.syscall(_SYS_OPENAT2, dirfd, relative.encode(), ctypes.byref(how), ctypes.sizeof(how)))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM):
        return None
    raise _named(OSError(err, os.strerror(err)), relative)


def _open_no_link(name: str, flags: int, mode: int, dir_fd: int, relative: str) -> int:
    try:
        return os.open(name, flags | _O_NOFOLLOW, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # what O_NOFOLLOW (with O_DIRECTORY) says of a link
            try:
                link = exc.errno == errno.ELOOP or stat.S_ISLNK(
                    os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
                )
            except OSError:
                link = False
            if link:
                raise OutsideWorkspace(errno.EACCES, f"{relative!r} goes through a symbolic link (this kernel has "
                                       "no openat2 to tell where it leads, so none is followed)") from None  # fmt: skip
        raise _named(exc, relative) from None


def _named(exc: OSError, relative: str) -> OSError:
    if exc.errno == errno.EXDEV:  # openat2: the resolution would have left the workspace
        return OutsideWorkspace(errno.EACCES, f"{relative!r} resolves outside the workspace")
    exc.filename = relative
    return exc


class FileArea(Protocol):
    """What the broker's file operations need of a workspace, on any platform."""

    def directory(self, relative: str) -> contextlib.AbstractContextManager[tuple[str, tuple[int, ...]]]: ...
    def read(self, relative: str) -> bytes: ...
    def write(self, relative: str, data: bytes, create_dirs: bool = False) -> int: ...
    def list(self, relative: str, include_hidden: bool = False) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


if sys.platform == "win32":  # pragma: no cover - exercised by the Windows job of the release workflow
    from .win32 import pinned

    class NtWorkspace:
        """The workspace on Windows: every path is pinned by a handle (``win32.pinned``:
        checked by its final path, no reparse point, not renamable while held) and
        used by that final path while the handle is held."""

        def __init__(self, root: Path) -> None:
            self.root = root

        def close(self) -> None:
            pass

        def _pinned(self, relative: str) -> contextlib.AbstractContextManager[str]:
            return pinned(str(self.root), str(self.root / relative) if relative else str(self.root))

        @contextlib.contextmanager
        def directory(self, relative: str) -> Iterator[tuple[str, tuple[int, ...]]]:
            with self._pinned(relative) as final:
                yield final, ()

        def read(self, relative: str) -> bytes:
            with self._pinned(relative) as final:
                return Path(final).read_bytes()

        def write(self, relative: str, data: bytes, create_dirs: bool = False) -> int:
            parent_rel, _, name = relative.rpartition("/")
            if not name:
                raise IsADirectoryError(errno.EISDIR, "writeFile needs a file name")
            if create_dirs:
                made = ""
                for part in parent_rel.split("/") if parent_rel else []:
                    with self._pinned(made) as final:
                        (Path(final) / part).mkdir(exist_ok=True)
                    made = f"{made}/{part}" if made else part
            with self._pinned(parent_rel) as final:
                tmp = Path(final) / f".{name}.terminai-{os.getpid()}-{os.urandom(4).hex()}"
                with open(tmp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, Path(final) / name)  # replaces a link at the name, never follows it
            return len(data)

        def list(self, relative: str, include_hidden: bool = False) -> list[dict[str, Any]]:
            with self._pinned(relative) as final:
                entries = []
                for entry in os.scandir(final):
                    if entry.name.startswith(".") and not include_hidden:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    reparse = st.st_file_attributes & stat.FILE_ATTRIBUTE_REPARSE_POINT  # links and junctions
                    kind = "symlink" if reparse else "directory" if entry.is_dir(follow_symlinks=False) else "file"
                    entries.append({"name": entry.name, "type": kind, "size": st.st_size})
                return sorted(entries, key=lambda e: e["name"])


def open_workspace(root: Path) -> FileArea:
    if sys.platform == "win32":
        return NtWorkspace(root)
    return Workspace(root)


__all__ = [
    "FileArea",
    "OutsideWorkspace",
    "Workspace",
    "open_workspace",
    "relative_to_workspace",
]
