"""A deterministic OCI image archive from a root filesystem tree.

The archive is an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/...``) that also carries Docker's ``manifest.json``, so
``docker load`` of any version reads it. Determinism: entries sorted by
path, times clamped to the source date, numeric owners only, no user or
group names, uncompressed layer (compressor output differs between zlib
builds); the config's ``created`` is the source date. The engine's image
id is the sha256 of the config: known before anything is loaded.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..digest import sha256_bytes, sha256_file

LAYER_MEDIA = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA = "application/vnd.oci.image.index.v1+json"
ARCHIVE_MEDIA = "application/vnd.oci.image.layout.v1+tar"


@dataclass(frozen=True)
class ImageSpec:
    """What the image runs: the agent as PID 1 with its container settings."""

    entrypoint: tuple[str, ...]
    env: tuple[str, ...]
    labels: dict[str, str]
    tag: str


@dataclass(frozen=True)
class OciImage:
    archive: Path
    image_id: str  # sha256:<config digest>, what the engine reports after loading
    layer_digest: str


def _walk(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted bytewise (parents first)."""
    out: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirs + files):
            out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out, key=os.fsencode)


def write_layer(tree: Path, out: Path, sde: int) -> str:
    """The tree as one uncompressed layer tar; returns its sha256."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(tree):
            path = tree / rel
            info = tar.gettarinfo(str(path), arcname=rel)  # hard links become link entries
            info.mtime = min(int(info.mtime), sde)
            info.uname = info.gname = ""
            if stat.S_ISCHR(os.lstat(path).st_mode) or stat.S_ISBLK(os.lstat(path).st_mode):
                continue  # the engine provides /dev
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return sha256_file(out)


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, sde: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), sde, 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, sde: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, sde, 0o755
    tar.addfile(info)


def write_archive(tree: Path, spec: ImageSpec, out: Path, work: Path, sde: int) -> OciImage:
    layer = work / "layer.tar"
    layer_digest = write_layer(tree, layer, sde)
    config = _json({
        "architecture": "amd64",
        "os": "linux",
        "created": _iso(sde),
        "config": {"Entrypoint": list(spec.entrypoint), "Env": list(spec.env), "WorkingDir": "/",
                   "Labels": dict(spec.labels)},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": _iso(sde), "created_by": "terminai-release container (root image tree)"}],
    })  # fmt: skip
    config_digest = sha256_bytes(config)
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA,
        "config": {"mediaType": CONFIG_MEDIA, "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": [{"mediaType": LAYER_MEDIA, "digest": f"sha256:{layer_digest}", "size": layer.stat().st_size}],
    })  # fmt: skip
    index = _json({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA,
        "manifests": [{"mediaType": MANIFEST_MEDIA, "digest": f"sha256:{sha256_bytes(manifest)}",
                       "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": spec.tag}}],
    })  # fmt: skip
    docker = _json([{"Config": f"blobs/sha256/{config_digest}", "RepoTags": [spec.tag],
                     "Layers": [f"blobs/sha256/{layer_digest}"]}])  # fmt: skip
    blobs = sorted([(config_digest, config), (sha256_bytes(manifest), manifest)])
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "blobs", sde)
        _add_dir(tar, "blobs/sha256", sde)
        entries: list[tuple[str, bytes | Path]] = [(f"blobs/sha256/{d}", b) for d, b in blobs]
        entries.append((f"blobs/sha256/{layer_digest}", layer))
        for name, body in sorted(entries):
            if isinstance(body, Path):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = body.stat().st_size, sde, 0o644
                with body.open("rb") as f:
                    tar.addfile(info, f)
            else:
                _add_bytes(tar, name, body, sde)
        _add_bytes(tar, "index.json", index, sde)
        _add_bytes(tar, "manifest.json", docker, sde)
        _add_bytes(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}), sde)
    layer.unlink()
    return OciImage(out, f"sha256:{config_digest}", layer_digest)
