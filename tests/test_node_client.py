"""The shim driven by a real Node.js client, as the TerminAI CLI drives it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.vm


def test_cli_acceptance_sequence_from_node(boot_config, tmp_path):
    node = shutil.which("node")
    assert node, "node is installed by bootstrap.sh"
    shim = Path(sys.executable).with_name("terminai-shim")
    env = dict(os.environ, SHIM=str(shim), KERNEL=str(boot_config.kernel), ROOTFS=str(boot_config.rootfs),
               WORKSPACE=str(tmp_path))  # fmt: skip
    proc = subprocess.run([node, "--test", str(REPO / "tests/node/shim-acceptance.test.mjs")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# pass 1" in proc.stdout
