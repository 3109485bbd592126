"""The README's main job, end to end: build, sign a release, verify it, boot it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.vm


def test_inv_demo(kernel, rootfs):
    proc = subprocess.run([sys.executable, "-m", "invoke", "demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Hello from MicroVM: 6.1." in proc.stdout and "TRANSIT" in proc.stdout
    assert "signed manifest.json" in proc.stderr
