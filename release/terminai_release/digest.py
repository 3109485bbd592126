"""Content digests: the only notion of identity the pipeline uses."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from terminai_shim.fileio import sha256_file as sha256_file  # defined once, for both halves


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Stable bytes for a JSON value, so equal inputs always give equal keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_inputs(value: Any) -> str:
    return sha256_bytes(canonical_json(value))


def sha256_tree(root: Path, exclude: Collection[str] = (), sources: bool = True) -> str:
    """Digest of a directory's names, modes and contents (not timestamps).

    ``sources``: a source tree, whose ``__pycache__`` directories are left out
    (compiled caches are not inputs); a built tree counts every file.
    ``exclude``: relative paths left out (a record kept inside the tree)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in exclude or (sources and "__pycache__" in path.relative_to(root).parts):
            continue
        if path.is_symlink():
            h.update(f"L {rel} {path.readlink()}\n".encode())
        elif path.is_file():
            mode = "x" if path.stat().st_mode & 0o111 else "-"
            h.update(f"F {rel} {mode} {sha256_file(path)}\n".encode())
        elif path.is_dir():
            h.update(f"D {rel}\n".encode())
    return h.hexdigest()
