"""A build cache keyed by the digest of each step's inputs.

An entry is a directory ``<root>/<step>/<key>/`` that appears only when the
step finished: the step writes into a temporary sibling directory which is
fsynced and renamed into place. A per-key lock file serialises concurrent
builds of the same key; the second builder finds the first one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_shim.fileio import write_atomic as write_atomic  # defined once, for both halves
from terminai_shim.layout import BUILD_RECORD as RECORD  # the shim reads it too


def default_cache_root() -> Path:
    explicit = os.environ.get("TERMINAI_BUILD_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "terminai-build"


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory's entries (after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(dirpath)


@dataclass(frozen=True)
class StepOutputs:
    """What a cached step made: its directory and build record, which names
    each output's file. Each step's artifacts add only their own names."""

    directory: Path
    record: dict[str, Any]
    cached: bool = False

    def output(self, name: str) -> Path:
        return self.directory / self.record["outputs"][name]["file"]


@dataclass(frozen=True)
class StepCache:
    root: Path

    def entry(self, step: str, key: str) -> Path:
        return self.root / step / key

    def lookup(self, step: str, key: str) -> Path | None:
        path = self.entry(step, key)
        return path if (path / RECORD).is_file() else None

    def record(self, step: str, key: str) -> dict[str, Any]:
        path = self.entry(step, key) / RECORD
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def obtain(self, step: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """The entry for ``key`` and whether it was cached; ``build`` fills a
        staging directory only when the entry is missing. The lookup before
        the lock keeps a no-op cheap; the one under it lets concurrent
        builders share one build."""
        found = self.lookup(step, key)
        if found is not None:
            return found, True
        with self.lock(step, key):
            found = self.lookup(step, key)  # another builder may have finished meanwhile
            if found is not None:
                return found, True
            with self.staging(step, key) as staging:
                build(staging)
            return self.entry(step, key), False

    @contextlib.contextmanager
    def lock(self, step: str, key: str) -> Iterator[None]:
        (self.root / step).mkdir(parents=True, exist_ok=True)
        with (self.root / step / f".{key}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self, step: str, key: str) -> Iterator[Path]:
        """Yield an empty directory; on success it becomes the cache entry.

        The caller must hold :meth:`lock`. On failure the staging directory is
        removed, so nothing half-built is ever visible under the key.
        """
        final = self.entry(step, key)
        tmp = final.with_name(f".{key}.staging")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if not (tmp / RECORD).is_file():
                raise RuntimeError(f"step {step} finished without writing {RECORD}")
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def link_from(self, other: StepCache, steps: tuple[str, ...]) -> None:
        """Take ``other``'s finished entries of these steps as this cache's
        own (links, not copies): a clean cache that rebuilds only the rest."""
        for step in steps:
            (self.root / step).mkdir(parents=True, exist_ok=True)
            for entry in (other.root / step).iterdir():
                if not entry.name.startswith("."):  # locks and staging directories stay behind
                    (self.root / step / entry.name).symlink_to(entry)

    def work_dir(self, step: str, key: str) -> Path:
        """Fresh, empty scratch space for a build (whatever an earlier attempt
        left is removed); kept after a failure so its log can be read."""
        path = self.root / "work" / f"{step}-{key[:16]}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path
