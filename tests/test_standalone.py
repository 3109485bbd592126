"""The standalone shim of each platform, smoke-tested as the release workflow's
runners do: `--version --json`, `doctor --json`, and `verify` of a signed
release that lists it. This machine builds and tests its own platform (the
whole shim suite runs against it too: `inv test`, `pytest --standalone-shim`);
the others exist only on their own runners."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from shimproc import run_settings
from terminai_shim.layout import STANDALONE_PLATFORMS, manifest_platform, standalone_platform

pytestmark = pytest.mark.build


@pytest.mark.parametrize("platform", STANDALONE_PLATFORMS)
def test_the_standalone_shim_of_each_platform_answers_and_verifies_its_release(ctx, kernel, rootfs, tmp_path,
                                                                                platform):  # fmt: skip
    if platform != standalone_platform():
        pytest.skip(f"{platform}: a standalone shim runs only on its own platform; release/github/release.yml "
                    "builds it on that platform's runner and smoke-tests it there (shim-dist, shim-smoke)")  # fmt: skip
    from terminai_release.release import build_release, sign_release

    release = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, release)
    listed = release.manifest.artifact("shim-standalone", manifest_platform(platform))
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xzf", str(release.directory / listed.location), "-C", str(unpacked)], check=True)
    shim = str(unpacked / "terminai-shim" / "terminai-shim")
    # No Python project on PATH; HOME is the developer's, whose dev trust root `inv release` wrote.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "TERMINAI_CACHE": str(tmp_path / "cache"),
           **run_settings()}  # fmt: skip
    version = json.loads(subprocess.run([shim, "--version", "--json"], env=env, capture_output=True, text=True,
                                        check=True).stdout)  # fmt: skip
    assert version["build"]["platform"] == platform and version["build"]["digest"] == listed.build["digest"]
    doctor = subprocess.run([shim, "doctor", "--json"], env=env, capture_output=True, text=True)
    assert doctor.returncode in (0, 1) and "accelerator" in json.loads(doctor.stdout), doctor.stderr
    verified = subprocess.run([shim, "verify", str(release.directory), "--dev"], env=env, capture_output=True,
                              text=True)  # fmt: skip
    assert verified.returncode == 0, verified.stderr
