"""Packing a finished tree into a read-only image: the root image and the
layers use the same formats and the same fixed settings, so two builds of
one tree give the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

FORMATS = ("squashfs", "erofs")
EROFS_UUID = "5e1f0c3a-7a2b-4d3c-9e4f-1a2b3c4d5e6f"
# zstd levels. The root image has a size budget (30 MB) and is small: 19.
# A layer is large and downloaded once: on the build layer (271 MB of tree)
# level 19 gave 81.4 MB in 140 s, 15 gave 82.1 MB in 67 s, 12 gave 87.8 MB
# in 30 s, 10 gave 88.0 MB in 11 s (2 cores): 10, for 8 % more bytes.
ROOT_LEVEL = 19
LAYER_LEVEL = 10


def mkfs_argv(
    fmt: str, tree: Path, image: Path, sde: int, actions: Path | None = None, level: int = ROOT_LEVEL
) -> list[str]:
    if fmt == "squashfs":
        return [
            "mksquashfs", str(tree), str(image), "-noappend", "-no-progress", "-comp", "zstd",
            "-Xcompression-level", str(level), "-b", "256K", "-all-root", "-no-xattrs",
            "-mkfs-time", str(sde), "-all-time", str(sde),
            *(["-action-file", str(actions)] if actions else []),
        ]  # fmt: skip
    return [
        "mkfs.erofs",
        "-zlz4hc,12",
        "-T",
        str(sde),
        "-U",
        EROFS_UUID,
        "--all-root",
        "-x",
        "-1",
        str(image),
        str(tree),
    ]


def mkfs_env(fmt: str) -> dict[str, str]:
    env = dict(os.environ)
    if fmt == "squashfs":
        env.pop("SOURCE_DATE_EPOCH", None)  # mksquashfs refuses it together with explicit times
    return env
