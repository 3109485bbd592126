"""The pinned kernel source (``kernel-config/source.toml``) and how to get it.

Two kinds are supported: Debian's ``linux-source-X.Y`` package (the default,
installed by bootstrap.sh) and an upstream tarball by URL. Both are checked
against the pinned sha256 before a single byte is extracted.
"""

from __future__ import annotations

import os
import shutil
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..cache import StepCache
from ..digest import sha256_file
from ..errors import BuildError


@dataclass(frozen=True)
class KernelSource:
    kind: str
    kernel_version: str
    sha256: str
    package: str | None = None
    version: str | None = None
    path: str | None = None
    url: str | None = None

    def identity(self) -> dict[str, str | None]:
        return {
            "kind": self.kind,
            "kernel_version": self.kernel_version,
            "sha256": self.sha256,
            "package": self.package,
            "version": self.version,
            "url": self.url,
        }


def load_source(path: Path) -> KernelSource:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{path}: missing", hint="restore kernel-config/source.toml from git") from None
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(f"{path}: not valid TOML: {exc}") from None
    kind = data.get("kind")
    required = {"debian-package": ("package", "version", "path"), "tarball": ("url",)}
    if kind not in required:
        raise BuildError(f"{path}: kind must be one of {sorted(required)}, got {kind!r}")
    for key in ("kernel_version", "sha256", *required[kind]):
        if not isinstance(data.get(key), str) or not data[key]:
            raise BuildError(f"{path}: '{key}' is required for kind {kind!r}")
    sha = data["sha256"].lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BuildError(f"{path}: sha256 {data['sha256']!r} is not 64 hex digits")
    known = {"kind", "kernel_version", "sha256", "package", "version", "path", "url"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BuildError(f"{path}: unknown keys {unknown}")
    return KernelSource(
        kind=kind,
        kernel_version=data["kernel_version"],
        sha256=sha,
        package=data.get("package"),
        version=data.get("version"),
        path=data.get("path"),
        url=data.get("url"),
    )


def fetch_source(source: KernelSource, cache: StepCache) -> Path:
    """Return a local path to the verified tarball (copied into the cache)."""
    blob = cache.root / "sources" / source.sha256
    if blob.is_file() and sha256_file(blob) == source.sha256:
        return blob
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_name(f".{source.sha256}.tmp{os.getpid()}")
    try:
        if source.kind == "debian-package":
            assert source.path is not None
            src = Path(source.path)
            if not src.is_file():
                raise BuildError(
                    f"kernel source {src} is missing",
                    hint=f"apt-get install {source.package}={source.version} (bootstrap.sh does this)",
                )
            shutil.copyfile(src, tmp)
        else:
            assert source.url is not None
            try:
                with urllib.request.urlopen(source.url, timeout=60) as resp, tmp.open("wb") as out:
                    shutil.copyfileobj(resp, out, 1 << 20)
            except OSError as exc:
                raise BuildError(f"cannot download kernel source {source.url}: {exc}") from None
        actual = sha256_file(tmp)
        if actual != source.sha256:
            where = source.path or source.url
            raise BuildError(
                f"kernel source {where} has sha256 {actual}, but kernel-config/source.toml pins {source.sha256}",
                hint="if the new source is intended, update sha256 (and version) in kernel-config/source.toml",
            )
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, blob)
        return blob
    finally:
        tmp.unlink(missing_ok=True)
