"""The Python tooling's lockfile (``requirements.lock``): every package the
virtual environment gets, at one version, with the sha256 of every file
that version may be installed from. ``bootstrap.sh`` installs with
``--require-hashes``, so a changed file on the index is refused.

The lock is written by uv's resolver (a pinned uv, in a throw-away
environment: it is needed only here). Versions already locked stay as
they are unless ``upgrade`` is asked for, so relocking after adding one
dependency moves nothing else.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import BuildError

UV = "uv==0.13.9"
LOCK = "requirements.lock"
EXTRAS = ("pipeline", "dev", "container")
# The environment `inv shim-dist` freezes: the shim's own distribution with its
# container extra, and the freezer. Its versions are the development lock's.
SHIM_LOCK = "shim/requirements.lock"
SHIM_INPUTS = ("shim/pyproject.toml", "shim/standalone.in")
SHIM_EXTRAS = ("container",)
HEADER = "# Every version pinned and every file hashed: `inv lock` writes it from\n# {inputs}. Do not edit by hand.\n"


def _pins(*locks: Path) -> str:
    """The pinned versions of existing locks; a later lock's pin of a name wins."""
    pins: dict[str, str] = {}
    for lock in locks:
        if lock.exists():
            for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.M):
                pins[name.lower()] = f"{name}=={version}"
    return "".join(f"{pin}\n" for pin in pins.values())


def _compile(
    uv: Path, repo: Path, inputs: tuple[str, ...], extras: tuple[str, ...], lock: Path, pins: str, universal: bool
) -> None:
    """``universal``: for every platform (markers, every wheel's hash), as the
    standalone shim is built on each platform's runner; else for this one."""
    where = ["--universal"] if universal else ["--python-platform", "x86_64-unknown-linux-gnu"]
    with tempfile.TemporaryDirectory(prefix="terminai-lock-") as tmp:
        argv = [str(uv), "pip", "compile", *inputs, "--generate-hashes", "--no-header",
                "--annotation-style", "line", "--python-version", "3.11", *where,
                "-o", str(Path(tmp) / lock.name)]  # fmt: skip
        for extra in extras:
            argv += ["--extra", extra]
        if pins:  # what is locked stays locked
            (Path(tmp) / "pins.txt").write_text(pins)
            argv += ["-c", str(Path(tmp) / "pins.txt")]
        done = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            why = done.stderr.strip()[-2000:]
            raise BuildError(f"uv could not resolve {lock.name} from {', '.join(inputs)}: {why}")
        text = (Path(tmp) / lock.name).read_text()
    text = re.sub(r"-c \S+pins\.txt, |, -c \S+pins\.txt", "", text)
    text = re.sub(r"\n\s*# via -c \S+pins\.txt(?=\n)", "", text)
    tmp_lock = lock.with_name(f".{lock.name}.tmp")
    tmp_lock.write_text(HEADER.format(inputs=" and ".join(inputs)) + text)
    tmp_lock.replace(lock)


def write_lock(repo: Path, upgrade: bool = False) -> list[Path]:
    """Both locks: the development environment's, then the standalone shim's,
    constrained to the same versions (one sigstore, one cryptography)."""
    lock, shim_lock = repo / LOCK, repo / SHIM_LOCK
    with tempfile.TemporaryDirectory(prefix="terminai-uv-") as tmp:
        env_dir = Path(tmp) / "uv"
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
        pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", UV]
        if subprocess.run(pip).returncode != 0:
            raise BuildError(f"cannot install {UV} to resolve the lock", hint="the package index must be reachable")
        uv = env_dir / "bin" / "uv"
        _compile(uv, repo, ("pyproject.toml",), EXTRAS, lock, "" if upgrade else _pins(lock), universal=False)
        pins = _pins(lock) if upgrade else _pins(shim_lock, lock)
        _compile(uv, repo, SHIM_INPUTS, SHIM_EXTRAS, shim_lock, pins, universal=True)
    return [lock, shim_lock]
