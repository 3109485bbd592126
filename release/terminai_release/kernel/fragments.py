"""Kconfig fragments: parsing, the merge order, and the survival check.

The merge order is fixed and documented in docs/kernel.md: the kernel's own
``tinyconfig`` first, then ``kernel-config/fragments/*.conf`` in name order,
then ``kernel-config/arch/<arch>.conf``. A later fragment may not silently
redefine a symbol an earlier one set: that is reported as an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..digest import sha256_file
from ..errors import BuildError

_SET = re.compile(r'^CONFIG_([A-Za-z0-9_]+)=(y|n|m|-?[0-9]+|0x[0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")
_KCONFIG_DEF = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Setting:
    symbol: str
    value: str  # "n" for "is not set"
    fragment: str
    line: int


@dataclass(frozen=True)
class Fragment:
    path: Path
    name: str  # relative to kernel-config/, used in messages and records
    settings: tuple[Setting, ...]

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)


def parse_fragment(path: Path, name: str) -> Fragment:
    settings: list[Setting] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if m := _UNSET.match(line):
            symbol, value = m.group(1), "n"
        elif m := _SET.match(line):
            symbol, value = m.group(1), m.group(2)
        elif line.startswith("#") and not line.startswith("# CONFIG_"):
            continue
        else:
            raise BuildError(
                f"{name}:{number}: malformed line {raw!r}",
                hint='write CONFIG_NAME=y, CONFIG_NAME=123, CONFIG_NAME="text" or "# CONFIG_NAME is not set"',
            )
        if value == "m":
            raise BuildError(
                f"{name}:{number}: CONFIG_{symbol}=m asks for a module, but the guest kernel has no modules",
                hint=f"use CONFIG_{symbol}=y",
            )
        if symbol in seen:
            raise BuildError(f"{name}:{number}: CONFIG_{symbol} is already set on line {seen[symbol]}")
        seen[symbol] = number
        settings.append(Setting(symbol, value, name, number))
    return Fragment(path=path, name=name, settings=tuple(settings))


def fragment_paths(config_dir: Path, arch: str) -> list[tuple[Path, str]]:
    """The fragments in merge order, with their names relative to ``config_dir``."""
    paths = sorted((config_dir / "fragments").glob("*.conf"))
    arch_path = config_dir / "arch" / f"{arch}.conf"
    if not arch_path.is_file():
        raise BuildError(f"no fragment for architecture {arch}: {arch_path} is missing")
    paths.append(arch_path)
    return [(p, p.relative_to(config_dir).as_posix()) for p in paths]


def load_fragments(config_dir: Path, arch: str) -> list[Fragment]:
    fragments = [parse_fragment(p, n) for p, n in fragment_paths(config_dir, arch)]
    owner: dict[str, Setting] = {}
    for fragment in fragments:
        for s in fragment.settings:
            prev = owner.get(s.symbol)
            if prev is not None:
                raise BuildError(
                    f"{s.fragment}:{s.line}: CONFIG_{s.symbol} is also set in {prev.fragment}:{prev.line}",
                    hint="set each symbol in exactly one fragment",
                )
            owner[s.symbol] = s
    return fragments


def known_symbols(source_tree: Path) -> set[str]:
    """Every symbol any Kconfig file in the tree defines."""
    symbols: set[str] = set()
    for kconfig in source_tree.rglob("Kconfig*"):
        if kconfig.is_file():
            symbols.update(_KCONFIG_DEF.findall(kconfig.read_text(errors="replace")))
    return symbols


def check_known(fragments: list[Fragment], symbols: set[str]) -> None:
    unknown = [s for f in fragments for s in f.settings if s.symbol not in symbols]
    if unknown:
        lines = [f"  {s.fragment}:{s.line}: CONFIG_{s.symbol}" for s in unknown]
        raise BuildError(
            "unknown Kconfig symbols (misspelled, or not in this kernel version):\n" + "\n".join(lines),
            hint="fix the spelling or remove the line",
        )


def read_config(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def dropped_settings(fragments: list[Fragment], final: dict[str, str]) -> list[tuple[Setting, str]]:
    """Requested settings whose value did not survive ``olddefconfig``."""
    dropped = []
    for fragment in fragments:
        for s in fragment.settings:
            actual = final.get(s.symbol, "n")
            if actual != s.value:
                dropped.append((s, actual))
    return dropped
