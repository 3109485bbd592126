"""The store a URL names: one level above the store backends, so that the
interface (``store.py``) imports none of them and each imports only it."""

from __future__ import annotations

from pathlib import Path

from .filestore import FileStore
from .s3 import S3Store
from .store import Store, StoreError


def open_store(url: str) -> Store:
    if url.startswith("s3://"):
        return S3Store(url)
    if url.startswith("file://") or "://" not in url:
        return FileStore(Path(url.removeprefix("file://")).resolve())
    raise StoreError(f"unsupported store {url}", hint="use s3://BUCKET/PREFIX or file://DIR")
