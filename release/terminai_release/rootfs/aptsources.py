"""Debian mirrors derived from this host's own apt configuration.

The project never names a mirror: it reads the URIs the host already uses
(deb822 ``.sources`` files and one-line ``sources.list`` entries) and the
few ``Acquire`` options that make them work (e.g. a proxy, or accepting a
snapshot's expired Release files), and writes the same for the build.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError

_PASSTHROUGH = (
    "Acquire::Check-Valid-Until",
    "Acquire::Check-Date",
    "Acquire::http::Proxy",
    "Acquire::https::Proxy",
    "Acquire::Retries",
)


@dataclass(frozen=True)
class AptEntry:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None


def _parse_deb822(text: str) -> list[AptEntry]:
    entries = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append(
                AptEntry(
                    uri,
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "").split()),
                    fields.get("signed-by"),
                )
            )
    return entries


def _parse_one_line(text: str) -> list[AptEntry]:
    entries = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        signed_by = None
        if words and words[0].startswith("["):
            options = []
            while words:
                w = words.pop(0)
                options.append(w)
                if w.endswith("]"):
                    break
            for opt in " ".join(options).strip("[]").split():
                if opt.startswith("signed-by="):
                    signed_by = opt.split("=", 1)[1]
        if len(words) >= 2:
            entries.append(AptEntry(words[0], (words[1],), tuple(words[2:]), signed_by))
    return entries


def host_entries(etc: Path = Path("/etc/apt")) -> list[AptEntry]:
    entries: list[AptEntry] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        if path.suffix == ".sources":
            entries += _parse_deb822(path.read_text())
        elif path.suffix == ".list" or path.name == "sources.list":
            entries += _parse_one_line(path.read_text())
    return entries


@dataclass(frozen=True)
class Mirrors:
    debian: str
    security: str

    def sources(self, release: str, with_security: bool = True) -> str:
        """A deb822 sources file for ``release`` (main only)."""
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        text = (
            f"Types: deb\nURIs: {self.debian}\nSuites: {release} {release}-updates\n"
            f"Components: main\nSigned-By: {keyring}\n"
        )
        if with_security:
            text += (
                f"\nTypes: deb\nURIs: {self.security}\nSuites: {release}-security\n"
                f"Components: main\nSigned-By: {keyring}\n"
            )
        return text


def host_mirrors(etc: Path = Path("/etc/apt")) -> Mirrors:
    entries = host_entries(etc)
    debian = next((e.uri for e in entries if any(s in ("bookworm", "stable") for s in e.suites)), None)
    security = next((e.uri for e in entries if any(s.endswith("-security") or "/updates" in s for s in e.suites)), None)
    if debian is None:
        raise BuildError(
            f"no Debian bookworm mirror in {etc}/sources.list*",
            hint="configure apt for Debian 12 first (apt-get update must work)",
        )
    return Mirrors(debian.rstrip("/"), (security or debian).rstrip("/"))


def host_acquire_options() -> str:
    """The host's Acquire options worth carrying over, as apt.conf text."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    lines = []
    for line in dump.splitlines():
        key, _, value = line.partition(" ")
        if key in _PASSTHROUGH and value.strip('";'):
            lines.append(f"{key} {value}")
    return "\n".join(lines) + ("\n" if lines else "")
