"""Classify files in a downloads folder so the agent can propose a clean-up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..model import ObjectTableLabels
from ._paths import show

_PARTIAL = {".crdownload", ".part", ".partial", ".download", ".tmp", ".opdownload"}
_TRANSIT = {".exe", ".msi", ".dmg", ".pkg", ".deb", ".rpm", ".appimage", ".iso", ".apk", ".whl", ".msix"}
_ARCHIVE = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar"}
_KEEP = {
    ".pdf", ".doc", ".docx", ".odt", ".txt", ".md", ".rtf", ".xls", ".xlsx", ".ods", ".csv",
    ".ppt", ".pptx", ".odp", ".jpg", ".jpeg", ".png", ".gif", ".webp", ".heic", ".svg",
    ".mp3", ".flac", ".wav", ".ogg", ".mp4", ".mkv", ".mov", ".webm", ".epub",
}  # fmt: skip


def classify_file(path: str | os.PathLike[str]) -> ObjectTableLabels:
    """Label one file by its kind; anything not a readable regular file is UNKNOWN."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return ObjectTableLabels.UNKNOWN
    if not stat.S_ISREG(st.st_mode):
        return ObjectTableLabels.UNKNOWN
    suffixes = [s.lower() for s in Path(os.fsdecode(path)).suffixes]
    last = suffixes[-1] if suffixes else ""
    if last in _PARTIAL:
        return ObjectTableLabels.DELETE
    if st.st_size == 0:
        return ObjectTableLabels.DELETE
    if last in _TRANSIT:
        return ObjectTableLabels.TRANSIT
    if last in _ARCHIVE:
        return ObjectTableLabels.ARCHIVE
    if last in _KEEP:
        return ObjectTableLabels.KEEP
    return ObjectTableLabels.UNKNOWN


def scan_downloads(downloads_dir: str | None = None, scan_limit: int = 10000) -> dict[str, list[str]]:
    """Group the files directly in ``downloads_dir`` (default ~/Downloads) by label.

    At most ``scan_limit`` entries are looked at, so a huge folder costs a
    bounded time. On failure the result is ``{"error": [message]}``.
    """
    folder = Path(downloads_dir) if downloads_dir else Path.home() / "Downloads"
    result: dict[str, list[str]] = {label.value: [] for label in ObjectTableLabels}
    if scan_limit < 0:
        return {"error": [f"scan_limit must be >= 0, got {scan_limit}"]}
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= scan_limit:
                    break
                label = classify_file(entry.path)
                result[label.value].append(show(entry.path))
    except OSError as exc:
        return {"error": [f"cannot scan {show(folder)}: {exc.strerror or exc}"]}
    for paths in result.values():
        paths.sort()
    return result
