"""The release a launch boots when it names none.

Why: the CLI builds its context with no arguments (``new
MicroVMRuntimeContext()``, then ``initialize()``) on a machine where the
user configured nothing, so "which release" must have an answer that is
neither a guess nor a prompt. The first of these that is set wins:

1. the environment: ``TERMINAI_RELEASE`` (a release directory or URL), or
   ``TERMINAI_RELEASE_STORE`` with ``TERMINAI_RELEASE_CHANNEL`` (a published
   store and its channel, default ``stable``);
2. ``$XDG_CONFIG_HOME/terminai/release.json`` (``~/.config`` when unset):
   ``{"manifest": ...}`` or ``{"store": ..., "channel": ...}``, optionally
   with ``"dev": true`` or a ``trustedRoot``, ``identity`` and ``issuer``.
   ``inv release`` writes one naming the release it signed with the local
   development identity (``development_default``), but never over a file
   the user wrote;
3. the store and channel fixed when this shim was built (the standalone
   build's record, ``defaultRelease``; a checkout's Python package has none).

The default names where a release comes from and, at most, who signed it;
everything else about it is checked exactly as for a release named
explicitly (signature, channel, expiry, serial, every artifact's digest).
A file that is there but unreadable or malformed is an error naming it, not
a silent fall-through to the next source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._internal.fsutil import config_root
from .errors import ConfigError
from .fileio import write_atomic
from .launch import ReleaseSource, Trust

CONFIG_FILE = "release.json"
DEVELOPMENT_MARK = "inv release"  # the writer a development default names (`writtenBy`)
_KEYS = {"manifest", "store", "channel", "dev", "trustedRoot", "identity", "issuer", "writtenBy"}


@dataclass(frozen=True)
class DefaultRelease:
    """Where a launch that names no release gets one, and where that came from (for messages)."""

    source: ReleaseSource
    trust: Trust
    origin: str

    def describe(self) -> str:
        what = self.source.manifest or f"{self.source.store} (channel {self.source.channel or 'stable'})"
        return f"{what}, from {self.origin}"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    return config_root(env) / CONFIG_FILE


def default_release(env: Mapping[str, str] | None = None) -> DefaultRelease | None:
    """The first default that is set (module docstring), or None."""
    env = os.environ if env is None else env
    if env.get("TERMINAI_RELEASE"):
        return DefaultRelease(ReleaseSource(manifest=env["TERMINAI_RELEASE"]), Trust(), "TERMINAI_RELEASE")
    if env.get("TERMINAI_RELEASE_STORE"):
        source = ReleaseSource(store=env["TERMINAI_RELEASE_STORE"], channel=env.get("TERMINAI_RELEASE_CHANNEL") or None)
        return DefaultRelease(source, Trust(), "TERMINAI_RELEASE_STORE")
    path = config_path(env)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _built_in()
    except OSError as exc:
        raise ConfigError(f"the default release's configuration {path} is unreadable ({exc.strerror})",
                          hint="fix its permissions or remove it") from None  # fmt: skip
    return _from_config(text, path)


def _from_config(text: str, path: Path) -> DefaultRelease:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"the default release's configuration {path} {why}",
                           hint='write {"manifest": "<release directory or URL>"} or {"store": "<URL>", '
                           '"channel": "stable"} there, or remove it')  # fmt: skip

    try:
        doc: Any = json.loads(text)
    except ValueError:
        raise bad("is not JSON") from None
    if not isinstance(doc, dict):
        raise bad("is not a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise bad(f"has unknown keys: {', '.join(unknown)}")
    texts = {k: doc.get(k) for k in _KEYS - {"dev"}}
    if any(v is not None and (not isinstance(v, str) or not v) for v in texts.values()):
        raise bad("has a value that is not a non-empty string")
    if not isinstance(doc.get("dev", False), bool):
        raise bad("has a dev that is not true or false")
    if bool(doc.get("manifest")) == bool(doc.get("store")):
        raise bad("must name one release: a manifest or a store")
    source = ReleaseSource(manifest=doc.get("manifest"), store=doc.get("store"), channel=doc.get("channel"))
    root = doc.get("trustedRoot")
    trust = Trust(Path(root) if root else None, doc.get("identity"), doc.get("issuer"), dev=doc.get("dev", False))
    return DefaultRelease(source, trust, str(path))


def _built_in() -> DefaultRelease | None:
    from .buildinfo import standalone_build

    build = standalone_build() or {}
    pinned = build.get("defaultRelease")
    if not isinstance(pinned, dict) or not isinstance(pinned.get("store"), str):
        return None
    channel = pinned.get("channel") if isinstance(pinned.get("channel"), str) else None
    return DefaultRelease(ReleaseSource(store=pinned["store"], channel=channel), Trust(), "this shim's build")


def development_default(manifest_dir: Path, env: Mapping[str, str] | None = None) -> Path | None:
    """Make a release signed with the development identity the default,
    unless the user configured their own (a file ``inv release`` did not
    write): the path written, or None when it was left alone."""
    path = config_path(env)
    try:
        current = json.loads(path.read_text())
    except FileNotFoundError:
        current = {"writtenBy": DEVELOPMENT_MARK}
    except (OSError, ValueError):
        return None  # unreadable or not JSON: the user's, and a launch will say what is wrong with it
    if not isinstance(current, dict) or current.get("writtenBy") != DEVELOPMENT_MARK:
        return None
    doc = {"manifest": str(manifest_dir.resolve()), "dev": True, "writtenBy": DEVELOPMENT_MARK}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


__all__ = [
    "CONFIG_FILE",
    "DefaultRelease",
    "config_path",
    "default_release",
    "development_default",
]
