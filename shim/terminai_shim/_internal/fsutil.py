"""File helpers: atomic writes, locks, and digests that are re-computed
whenever a file's size, mtime or inode changed (never a digest file alone)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from ..fileio import sha256_file as sha256_file  # defined once, for both halves
from ..fileio import write_atomic as write_atomic

if sys.platform == "win32":  # the brain's broker runs the shim on Windows
    import msvcrt

    def _lock(handle: IO[str], shared: bool) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # exclusive only: shared locks do not exist there

    def _unlock(handle: IO[str]) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(handle: IO[str], shared: bool) -> None:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)

    def _unlock(handle: IO[str]) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)


def cache_root() -> Path:
    explicit = os.environ.get("TERMINAI_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "terminai-shim"


def config_root(env: Mapping[str, str] | None = None) -> Path:
    """The user's TerminAI configuration (the development trust root, the
    default release): the user's own, never the cache or a release's folder."""
    env = os.environ if env is None else env
    return Path(env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")) / "terminai"


@contextlib.contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        _lock(handle, shared)
        try:
            yield
        finally:
            _unlock(handle)


# The kernel stamps ctime from a coarse clock (a tick of a few milliseconds;
# whole seconds on some file systems): a write in the same tick as the hash
# leaves ctime as it was. So a stamp is trusted only when the file's ctime was
# at least this much older than the stamp itself ("racily clean", as git says);
# a fresher one means hashing again, once, a moment later.
RACY_NS = 2_000_000_000


def stamp(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes can have: size, mtime, inode and
    ctime, and when the stamp was taken. A writer can put mtime back; ctime
    it cannot set (the kernel moves it on every write and on every mtime
    change), so a matching stamp that is not racy (``stamp_holds``) means the
    bytes are those that were hashed."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, time.time_ns()]


def stamp_holds(recorded: object, st: os.stat_result) -> bool:
    """The file is as it was when ``recorded`` was taken, and that was long
    enough after its last change for a write since to show in its ctime."""
    if not isinstance(recorded, list) or len(recorded) != 5:
        return False
    return recorded[:4] == stamp(st)[:4] and recorded[4] - recorded[3] >= RACY_NS


def file_digest(path: Path, index_dir: Path | None = None) -> str:
    """sha256 of the file ``path`` names now (see ``fd_digest``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO in its place must not hang us
    try:
        return fd_digest(fd, index_dir)
    finally:
        os.close(fd)


def fd_digest(fd: int, index_dir: Path | None = None) -> str:
    """sha256 of the open file ``fd``, remembered per (device, inode) with its
    ``stamp``: the file a descriptor holds cannot be swapped for another by
    renaming, and a write to it moves its ctime, so a remembered digest
    whose stamp matches is that file's."""
    index_dir = index_dir or cache_root()
    st = os.fstat(fd)
    key, before = f"fd:{st.st_dev}:{st.st_ino}", stamp(st)
    with locked(index_dir / ".digests.lock"):
        entry = _digest_index(index_dir).get(key)
    if entry and stamp_holds(entry.get("stamp"), st):
        return str(entry["sha256"])
    h = hashlib.sha256()
    for chunk in _chunks(fd):
        h.update(chunk)
    digest = h.hexdigest()
    with locked(index_dir / ".digests.lock"):
        known = _digest_index(index_dir)
        known[key] = {"stamp": before, "sha256": digest}  # a write while hashing moved ctime: re-hashed next time
        write_atomic(index_dir / "digests.json", json.dumps(known).encode())
    return digest


def others_can_write(fd: int) -> bool:
    """Whether anyone but us (or root) can change this file's bytes in place:
    another owner, or group/other write bits (an ACL that grants write shows
    in the group bits). Holding its descriptor does not stop such a writer."""
    st = os.fstat(fd)
    return st.st_uid not in (0, os.geteuid()) or bool(st.st_mode & 0o022)


def sealed_copy(fd: int, name: str) -> tuple[int, str]:
    """A private, sealed in-memory copy of an open file and the sha256 of
    exactly the bytes copied: what someone else could still write to in
    place becomes a file nobody can change (F_SEAL_WRITE), so the digest
    checked is the content used."""
    import fcntl

    copy = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        h = hashlib.sha256()
        for chunk in _chunks(fd):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(copy, view) :]
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(copy, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(copy)
        raise
    return copy, h.hexdigest()


def _chunks(fd: int) -> Iterator[bytes]:
    """An open file's bytes from its start, a MiB at a time (pread: the descriptor's own offset is left alone)."""
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        yield chunk
        offset += len(chunk)


def _digest_index(index_dir: Path) -> dict[str, Any]:
    try:
        known = json.loads((index_dir / "digests.json").read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
