"""The code standards, enforced: ruff everywhere, mypy --strict on the shim."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit


def test_ruff():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_on_the_shim():
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shim_runtime_dependencies_stay_light():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["sigstore==4.5.1"], "the shim is started often: one lazy dependency"


def test_python_tooling_is_locked_with_hashes():
    """Every dependency pyproject.toml names (every extra) is in requirements.lock at
    one exact version with at least one sha256; bootstrap.sh installs only from it."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    lock = (REPO / "requirements.lock").read_text()
    hashed = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n(?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+", lock, re.M)
    entries = {name.lower().replace("_", "-"): version for name, version in hashed}
    for requirement in wanted:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in entries, f"{name} is not in requirements.lock: run `inv lock`"
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9_.-]+==", lock, re.M)), "an entry without hashes"
    assert "--require-hashes -r requirements.lock" in (REPO / "bootstrap.sh").read_text()
