"""The release version: one number for the runtime, the agent and the kit."""

from __future__ import annotations

import tomllib
from pathlib import Path


def release_version(repo: Path) -> str:
    return str(tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"])
