"""What every build step needs to know about where it runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from terminai_shim.layout import BUILD_DIR

from .cache import StepCache, default_cache_root
from .progress import Reporter


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BuildContext:
    repo: Path = field(default_factory=repo_root)
    cache: StepCache = field(default_factory=lambda: StepCache(default_cache_root()))
    reporter: Reporter = field(default_factory=Reporter.auto)
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def out(self) -> Path:
        """Stable names for the latest outputs (symlinks into the cache)."""
        return self.repo / BUILD_DIR

    def publish_link(self, name: str, target: Path) -> Path:
        """Point ``build/<name>`` at a cache entry, replacing the link atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        link = self.out / name
        tmp = self.out / f".{name}.link{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)
        return link
