"""File helpers: atomic writes, locks, and digests that are re-computed
whenever a file's size, mtime or inode changed (never a digest file alone)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("TERMINAI_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "terminai-shim"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_digest(path: Path, index_dir: Path | None = None) -> str:
    """sha256 of ``path``, remembered per (realpath, size, mtime, inode)."""
    index_dir = index_dir or cache_root()
    index = index_dir / "digests.json"
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    with locked(index_dir / ".digests.lock"):
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        entry = known.get(real)
        if entry and entry.get("stamp") == stamp:
            return str(entry["sha256"])
        digest = sha256_file(Path(real))
        known[real] = {"stamp": stamp, "sha256": digest}
        write_atomic(index, json.dumps(known).encode())
        return digest
