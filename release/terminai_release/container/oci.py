"""A deterministic OCI image archive from root filesystem trees.

The archive is an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/...``) that also carries Docker's ``manifest.json``, so
``docker load`` of any version reads it. It holds one image per profile,
each a stack of the same layer blobs (the root image's tree, then each
root filesystem layer's, whose overlay whiteouts become OCI ``.wh.``
entries), each blob stored once; the default profile's image comes first.
Determinism: entries sorted by path, times clamped to the source date,
numeric owners only, no user or group names, uncompressed layers
(compressor output differs between zlib builds); the configs' ``created``
is the source date. The engine's image id is the sha256 of the config:
known before anything is loaded.
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


def _walk(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted bytewise (parents first)."""
    out: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(dirs + files):
            out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out, key=os.fsencode)


WHITEOUT = ".wh."


def write_layer(tree: Path, out: Path, sde: int) -> str:
    """The tree as one uncompressed layer tar; returns its sha256. An
    overlayfs whiteout (a character device 0/0) becomes the OCI one: an
    empty ``.wh.<name>`` beside where the name was."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(tree):
            path = tree / rel
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
                parent, _, name = rel.rpartition("/")
                info = tarfile.TarInfo(f"{parent}/{WHITEOUT}{name}" if parent else f"{WHITEOUT}{name}")
                info.mtime, info.mode = sde, 0o644
                tar.addfile(info)
                continue
            info = tar.gettarinfo(str(path), arcname=rel)  # hard links become link entries
            info.mtime = min(int(info.mtime), sde)
            info.uname = info.gname = ""
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
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


@dataclass(frozen=True)
class OciArchive:
    archive: Path
    images: dict[str, str]  # profile -> image id (sha256:<config digest>), the default profile first
    layers: dict[str, str]  # tree name -> layer digest


def write_archive(
    trees: dict[str, Path], profiles: dict[str, tuple[str, ...]], spec: ImageSpec, out: Path, work: Path, sde: int
) -> OciArchive:
    """``trees``: each layer's tree by name, bottom first; ``profiles``:
    each image's layers by name, bottom first, the default profile first.
    ``spec.tag`` gets ``-<profile>`` appended for each image."""
    blobs: dict[str, bytes | Path] = {}
    diff_ids: dict[str, str] = {}
    for name, tree in trees.items():
        layer = work / f"layer-{name}.tar"
        digest = write_layer(tree, layer, sde)
        diff_ids[name] = digest
        blobs[digest] = layer
    images: dict[str, str] = {}
    index_entries, docker_entries = [], []
    for profile, names in profiles.items():
        tag = f"{spec.tag}-{profile}"
        config = _json({
            "architecture": "amd64",
            "os": "linux",
            "created": _iso(sde),
            "config": {"Entrypoint": list(spec.entrypoint), "Env": list(spec.env), "WorkingDir": "/",
                       "Labels": {**spec.labels, "org.terminai.profile": profile}},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_ids[n]}" for n in names]},
            "history": [{"created": _iso(sde), "created_by": f"terminai-release container ({n} tree)"} for n in names],
        })  # fmt: skip
        config_digest = sha256_bytes(config)
        manifest = _json({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA,
            "config": {"mediaType": CONFIG_MEDIA, "digest": f"sha256:{config_digest}", "size": len(config)},
            "layers": [{"mediaType": LAYER_MEDIA, "digest": f"sha256:{diff_ids[n]}",
                        "size": Path(blobs[diff_ids[n]]).stat().st_size} for n in names],  # type: ignore[arg-type]
        })  # fmt: skip
        blobs[config_digest] = config
        blobs[sha256_bytes(manifest)] = manifest
        images[profile] = f"sha256:{config_digest}"
        ref = {"org.opencontainers.image.ref.name": tag}
        index_entries.append({"mediaType": MANIFEST_MEDIA, "digest": f"sha256:{sha256_bytes(manifest)}",
                              "size": len(manifest), "annotations": ref})  # fmt: skip
        docker_entries.append({"Config": f"blobs/sha256/{config_digest}", "RepoTags": [tag],
                               "Layers": [f"blobs/sha256/{diff_ids[n]}" for n in names]})  # fmt: skip
    index = _json({"schemaVersion": 2, "mediaType": INDEX_MEDIA, "manifests": index_entries})
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, "blobs", sde)
        _add_dir(tar, "blobs/sha256", sde)
        for digest, body in sorted(blobs.items()):
            name = f"blobs/sha256/{digest}"
            if isinstance(body, Path):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = body.stat().st_size, sde, 0o644
                with body.open("rb") as f:
                    tar.addfile(info, f)
                body.unlink()
            else:
                _add_bytes(tar, name, body, sde)
        _add_bytes(tar, "index.json", index, sde)
        _add_bytes(tar, "manifest.json", _json(docker_entries), sde)
        _add_bytes(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}), sde)
    return OciArchive(out, images, diff_ids)
