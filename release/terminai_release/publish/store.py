"""What publishing needs from an artifact store, whatever it is.

Two stores implement it, each in its own module: ``s3`` (boto3; S3 and
S3-compatible servers) and ``filestore`` (a local or air-gapped mirror with
the same layout). Writes of mutable keys are conditional, so two publishers
cannot silently overwrite each other's channel pointer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError

IMMUTABLE = "public, max-age=31536000, immutable"  # blobs, and a release's files: never change
SHORT_LIVED = "public, max-age=60, must-revalidate"  # channel pointers: change on every publish


class StoreError(BuildError):
    """Anything the store refused or could not do, with what to do next."""


class Conflict(StoreError):
    """Someone else changed the object since we read it."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None  # as recorded when it was published (None: written by something else)
    version: str  # an opaque token for conditional writes (ETag, or a digest for files)


@dataclass(frozen=True)
class Headers:
    content_type: str
    cache_control: str


class Store(ABC):
    url: str

    @abstractmethod
    def check(self) -> None:
        """Fail early and clearly: bucket missing, credentials refused, unreachable."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def read(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its version token, or None when absent."""

    @abstractmethod
    def digest(self, key: str) -> str:
        """sha256 of the stored bytes, read back from the store."""

    @abstractmethod
    def put_file(self, key: str, path: Path, sha256: str, headers: Headers) -> None:
        """Upload; verified against ``sha256`` before it counts as written."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, headers: Headers, *, replaces: str | None) -> None:
        """Write only if the object is still what we read: ``replaces`` is the
        version token read before, or None for "must not exist yet". Raises
        Conflict otherwise."""
