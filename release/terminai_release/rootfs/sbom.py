"""An SPDX 2.3 (JSON) bill of materials for the root image: every Debian
package with its version, and every Python distribution installed into it."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from ..cache import write_atomic
from ..digest import canonical_json, digest_inputs


def _python_dists(tree: Path) -> list[dict[str, str]]:
    found = []
    for meta in sorted(tree.glob("usr/lib/python3*/**/*.dist-info/METADATA")):
        text = meta.read_text(errors="replace")
        name = re.search(r"^Name: (.+)$", text, re.M)
        version = re.search(r"^Version: (.+)$", text, re.M)
        if name and version:
            found.append({"name": name.group(1).strip(), "version": version.group(1).strip()})
    agent_init = tree / "usr/lib/terminai/terminai_agent/__init__.py"
    if agent_init.is_file():
        m = re.search(r'__version__ = "([^"]+)"', agent_init.read_text())
        found.append({"name": "terminai-agent", "version": m.group(1) if m else "unknown"})
    return found


def write_sbom(path: Path, *, name: str, version: str, sde: int, debian: list[dict[str, str]], tree: Path) -> None:
    packages: list[dict[str, Any]] = []
    for p in debian:
        packages.append(
            {
                "SPDXID": f"SPDXRef-deb-{re.sub(r'[^A-Za-z0-9.-]', '-', p['name'])}",
                "name": p["name"],
                "versionInfo": p["version"],
                "downloadLocation": "NOASSERTION",
                "externalRefs": [
                    {
                        "referenceCategory": "PACKAGE-MANAGER",
                        "referenceType": "purl",
                        "referenceLocator": f"pkg:deb/debian/{p['name']}@{p['version']}?arch={p['architecture']}",
                    }
                ],
            }
        )
    for d in _python_dists(tree):
        packages.append(
            {
                "SPDXID": f"SPDXRef-py-{re.sub(r'[^A-Za-z0-9.-]', '-', d['name'])}",
                "name": d["name"],
                "versionInfo": d["version"],
                "downloadLocation": "NOASSERTION",
                "externalRefs": [
                    {
                        "referenceCategory": "PACKAGE-MANAGER",
                        "referenceType": "purl",
                        "referenceLocator": f"pkg:pypi/{d['name'].lower()}@{d['version']}",
                    }
                ],
            }
        )
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "documentNamespace": f"https://terminai.invalid/spdx/{name}-{digest_inputs(packages)[:16]}",
        "creationInfo": {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sde)),
            "creators": [f"Tool: terminai-release-{version}"],
        },
        "packages": packages,
    }
    write_atomic(path, canonical_json(doc))
