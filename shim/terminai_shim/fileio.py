"""The two file operations both halves need, defined once: the pipeline
writes build records, manifests and releases with them, the shim its caches
and records. Standard library only, nothing else imported."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["sha256_file", "write_atomic"]

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Never visible half-written: ``path`` is the old file or the whole new
    one. The temporary name is per process and thread, so concurrent writers
    (two shims, two builds) never write into each other's file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
