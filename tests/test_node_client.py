"""The shim driven by a real Node.js client, as the TerminAI CLI drives it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import REPO
from shimproc import SHIM

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("backend", ["qemu", "container"])
def test_cli_acceptance_sequence_from_node(ctx, kernel, rootfs, tmp_path, backend, docker_engine):
    from terminai_release.release import build_release, sign_release

    node = shutil.which("node")
    assert node, "node is installed by bootstrap.sh"
    release = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, release)
    shim = SHIM
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = dict(os.environ, SHIM=str(shim), MANIFEST=str(release.directory), WORKSPACE=str(workspace), BACKEND=backend,
               TERMINAI_CACHE=str(tmp_path / "shim-cache"))  # fmt: skip
    proc = subprocess.run([node, "--test", str(REPO / "tests/node/shim-acceptance.test.mjs")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# pass 1" in proc.stdout
