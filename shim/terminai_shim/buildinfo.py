"""What this shim is: the Python package, or the standalone build of it.

``terminai-shim --version --json`` answers from here, so the CLI can tell
which build it found (and a release engineer can compare the standalone
build's digest with the one the signed release lists) without booting anything.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ShimError
from .layout import STANDALONE_BUILD_INFO


def standalone_build() -> dict[str, Any] | None:
    """The record `inv shim-dist` left inside the frozen folder; None when
    this is the Python package. A frozen shim without its record is broken."""
    if not getattr(sys, "frozen", False):
        return None
    path = Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent / "_internal")) / STANDALONE_BUILD_INFO
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShimError(f"the standalone shim's build record {path} is unreadable ({exc})",
                        hint="install the shim again: its folder is incomplete") from None  # fmt: skip
    return record


def version_report() -> dict[str, Any]:
    build = standalone_build()
    try:
        sigstore = metadata.version("sigstore")
    except metadata.PackageNotFoundError:
        sigstore = None
    return {
        "version": __version__,
        "standalone": build is not None,
        "executable": sys.executable,
        "python": platform.python_version(),
        "sigstore": sigstore,
        "build": build,
    }


__all__ = [
    "standalone_build",
    "version_report",
]
