"""The kernel config version and the fragment digests recorded beside it.

``kernel-config/versions.toml`` is append-only history: one entry per config
version with the digest of every fragment at that version. The current
fragments must match the newest entry, so changing a fragment without
bumping the version (``inv kernel-config-bump``) stops the build, and a test.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..digest import sha256_file
from ..errors import BuildError

HEADER = """\
# Kernel config versions, oldest first. Append-only: each entry records the
# sha256 of every fragment at that version. `inv kernel-config-bump` appends
# a new entry after a fragment changes; the version is part of the kernel's
# artifact name and of `uname -r` (6.1.x-taiN).
"""


@dataclass(frozen=True)
class ConfigVersion:
    version: int
    fragments: dict[str, str]


def load_versions(path: Path) -> list[ConfigVersion]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return []
    except tomllib.TOMLDecodeError as exc:
        raise BuildError(f"{path}: not valid TOML: {exc}") from None
    entries = [ConfigVersion(int(e["version"]), dict(e["fragments"])) for e in data.get("versions", [])]
    for prev, cur in itertools.pairwise(entries):
        if cur.version <= prev.version:
            raise BuildError(f"{path}: version {cur.version} does not increase after {prev.version}")
    return entries


def all_digests(config_dir: Path) -> dict[str, str]:
    """Digests of every fragment of every architecture: the version covers them all."""
    paths = sorted((config_dir / "fragments").glob("*.conf")) + sorted((config_dir / "arch").glob("*.conf"))
    return {p.relative_to(config_dir).as_posix(): sha256_file(p) for p in paths}


def current_version(config_dir: Path) -> int:
    path = config_dir / "versions.toml"
    entries = load_versions(path)
    digests = all_digests(config_dir)
    if not entries:
        raise BuildError(f"{path} has no versions", hint="run `inv kernel-config-bump`")
    newest = entries[-1]
    if newest.fragments != digests:
        changed = sorted(
            name for name in set(digests) | set(newest.fragments) if digests.get(name) != newest.fragments.get(name)
        )
        raise BuildError(
            f"kernel fragments changed since config version {newest.version}: {', '.join(changed)}",
            hint="run `inv kernel-config-bump` to record a new config version",
        )
    return newest.version


def bump_version(config_dir: Path) -> int:
    path = config_dir / "versions.toml"
    entries = load_versions(path)
    digests = all_digests(config_dir)
    if entries and entries[-1].fragments == digests:
        return entries[-1].version
    new = ConfigVersion((entries[-1].version + 1) if entries else 1, digests)
    entries.append(new)
    lines = [HEADER]
    for e in entries:
        lines.append("[[versions]]")
        lines.append(f"version = {e.version}")
        lines.append("[versions.fragments]")
        lines.extend(f'"{name}" = "{digest}"' for name, digest in sorted(e.fragments.items()))
        lines.append("")
    path.write_text("\n".join(lines))
    return new.version
