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
HEADER = (
    "# The Python tooling, every version pinned and every file hashed: `inv lock` writes it from\n"
    "# pyproject.toml, bootstrap.sh installs it with --require-hashes. Do not edit by hand.\n"
)


def write_lock(repo: Path, upgrade: bool = False) -> Path:
    lock = repo / LOCK
    with tempfile.TemporaryDirectory(prefix="terminai-lock-") as tmp:
        env_dir = Path(tmp) / "uv"
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
        pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", UV]
        if subprocess.run(pip).returncode != 0:
            raise BuildError(f"cannot install {UV} to resolve the lock", hint="the package index must be reachable")
        argv = [str(env_dir / "bin" / "uv"), "pip", "compile", "pyproject.toml", "--generate-hashes", "--no-header",
                "--annotation-style", "line", "--python-version", "3.11",
                "--python-platform", "x86_64-unknown-linux-gnu", "-o", str(Path(tmp) / LOCK)]  # fmt: skip
        for extra in EXTRAS:
            argv += ["--extra", extra]
        if lock.exists() and not upgrade:  # what is locked stays locked
            pins = Path(tmp) / "pins.txt"
            pins.write_text("\n".join(re.findall(r"^[A-Za-z0-9_.-]+==\S+", lock.read_text(), re.M)) + "\n")
            argv += ["-c", str(pins)]
        done = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"uv could not resolve the lock: {done.stderr.strip()[-2000:]}")
        text = (Path(tmp) / LOCK).read_text()
    text = re.sub(r"-c \S+pins\.txt, |, -c \S+pins\.txt", "", text)
    text = re.sub(r"\n\s*# via -c \S+pins\.txt(?=\n)", "", text)
    tmp_lock = lock.with_name(f".{LOCK}.tmp")
    tmp_lock.write_text(HEADER + text)
    tmp_lock.replace(lock)
    return lock
