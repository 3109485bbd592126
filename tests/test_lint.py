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


def _locked(lock: str) -> dict[str, str]:
    import re

    hashed = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+) (?:; [^\\]*)?\\\n(?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+", lock, re.M
    )
    assert len(hashed) == len(re.findall(r"^[A-Za-z0-9_.-]+==", lock, re.M)), "an entry without hashes"
    return {name.lower().replace("_", "-"): version for name, version in hashed}


def test_the_standalone_shim_is_built_from_its_own_lock_at_the_development_versions():
    """shim/requirements.lock (what `inv shim-dist` installs, hash-checked) holds the
    shim distribution's dependencies, its container extra and the freezer, nothing
    of the pipeline, and every package it shares with the development lock at the
    same version: the shim that is tested is the shim that is frozen."""
    import re
    import tomllib

    shim = tomllib.loads((REPO / "shim/pyproject.toml").read_text())["project"]
    assert shim["name"] == "terminai-shim" and shim["dependencies"] == ["sigstore==4.5.1"]
    locked = _locked((REPO / "shim/requirements.lock").read_text())
    wanted = shim["dependencies"] + shim["optional-dependencies"]["container"]
    wanted += [line for line in (REPO / "shim/standalone.in").read_text().splitlines() if line and line[0] != "#"]
    for requirement in wanted:
        assert re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower() in locked, f"{requirement}: run `inv lock`"
    assert not {"boto3", "invoke", "jinja2", "pytest", "matplotlib"} & set(locked), "pipeline tools in the shim's lock"
    development = _locked((REPO / "requirements.lock").read_text())
    differ = {
        name: (v, development[name]) for name, v in locked.items() if name in development and development[name] != v
    }
    assert not differ, f"the two locks disagree: {differ} (run `inv lock`)"


@pytest.mark.build
def test_the_shims_own_distribution_holds_the_shim_and_its_protocol_only(tmp_path):
    """shim/pyproject.toml builds `terminai-shim`: the shim and the protocol
    package, none of the pipeline or the agent, with sigstore its one
    dependency (docker and boto3 as extras)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # as `inv shim-dist` builds it: from a copy, never in the checkout
    shutil.copytree(REPO / "shim", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("terminai_shim-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"terminai_shim", "terminai_protocol"}, tops
    assert any(n.startswith("terminai_shim/trust/") and n.endswith(".json") for n in names)
    requires = sorted(line for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert requires[0] == 'Requires-Dist: boto3<2,>=1.34; extra == "s3"' or "boto3" in requires[0], requires
    assert "Requires-Dist: sigstore==4.5.1" in requires and len(requires) == 3, requires
