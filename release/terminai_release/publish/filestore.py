"""A store on a local filesystem: a mirror for air-gapped sites or a CDN origin.

Same layout as the S3 store. Every object is written to a temporary name,
fsynced and renamed, so a reader never sees half a file; a lock per store
makes conditional writes atomic between publishers on one machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ..cache import fsync_path, write_atomic
from ..digest import sha256_bytes, sha256_file
from .store import Conflict, Headers, ObjectInfo, Store, StoreError


class FileStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / key

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot use {self.root} as a store: {exc}", hint="check the path and permissions"
            ) from None
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.root} is not writable", hint="check the permissions")

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        size = path.stat().st_size
        sha = self._meta(key).get("sha256")
        return ObjectInfo(size, sha, sha or str(size))

    def _meta(self, key: str) -> dict[str, str]:
        try:
            return dict(json.loads(self._path(key).with_name(f".{Path(key).name}.meta").read_text()))
        except (OSError, ValueError):
            return {}

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, sha256_bytes(data)

    def digest(self, key: str) -> str:
        return sha256_file(self._path(key))

    def _write(self, key: str, fill: bytes | Path, sha256: str, headers: Headers) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tmp.open("wb") as out:
            if isinstance(fill, Path):
                with fill.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                out.write(fill)
            out.flush()
            os.fsync(out.fileno())
        if sha256_file(tmp) != sha256:
            tmp.unlink()
            raise StoreError(f"{key} changed while it was written", hint="check the disk; publish again")
        meta = {"sha256": sha256, "contentType": headers.content_type, "cacheControl": headers.cache_control}
        write_atomic(path.with_name(f".{path.name}.meta"), json.dumps(meta).encode())
        os.replace(tmp, path)
        fsync_path(path.parent)

    def put_file(self, key: str, path: Path, sha256: str, headers: Headers) -> None:
        self._write(key, path, sha256, headers)

    def put_bytes(self, key: str, data: bytes, headers: Headers, *, replaces: str | None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".publish.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read(key)
            if (current[1] if current else None) != replaces:
                raise Conflict(f"{key} changed since it was read", hint="someone else published; run again to see")
            self._write(key, data, sha256_bytes(data), headers)
