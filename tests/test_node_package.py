"""The CLI's TypeScript package (clients/node), built by the task a user runs
(`inv client`), driven by its own `node --test` suite against a real shim and
a real isolation tier: a microVM, and a container."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def package(ctx):
    from terminai_release.client import build_client

    return build_client(ctx)


@pytest.mark.parametrize("backend", ["qemu", "container"])
def test_the_package_is_the_clis_runtime_context(ctx, kernel, rootfs, package, tmp_path, backend, docker_engine):
    from terminai_release.release import build_release, sign_release

    node = shutil.which("node")
    assert node, "node is installed by bootstrap.sh"
    release = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, release)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env = dict(os.environ, SHIM=str(Path(sys.executable).with_name("terminai-shim")), MANIFEST=str(release.directory),
               WORKSPACE=str(workspace), BACKEND=backend, TERMINAI_CACHE=str(tmp_path / "shim-cache"))  # fmt: skip
    env.pop("TERMINAI_SHIM", None)
    done = subprocess.run([node, "--test", "test/"], cwd=package.directory, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout and "# pass 3" in done.stdout, done.stdout[-2000:]


@pytest.mark.unit
def test_the_package_has_no_runtime_dependencies_and_a_lockfile_without_hosts():
    import json

    manifest = json.loads((REPO / "clients/node/package.json").read_text())
    assert not manifest.get("dependencies"), "the CLI's package must not pull anything in at run time"
    assert manifest["type"] == "module" and manifest["engines"]["node"] == ">=20"
    lock = (REPO / "clients/node/package-lock.json").read_text()
    assert '"resolved"' not in lock, "the lockfile pins by integrity, without a registry's address"
    versions = manifest["devDependencies"].values()
    assert all(v[0].isdigit() for v in versions), "dev dependencies are pinned exactly"


@pytest.mark.build
def test_the_package_packs_to_the_same_bytes_and_the_release_signs_them(ctx, package, tmp_path):
    import hashlib

    from terminai_release.ci import npm_package
    from terminai_release.client import pack_client
    from terminai_release.release import build_release, release_version, sign_release

    version = release_version(ctx.repo)
    first = hashlib.sha256(pack_client(ctx, version).read_bytes()).hexdigest()
    for built in package.dist.iterdir():
        os.utime(built)  # today's times: npm pack writes fixed ones
    assert hashlib.sha256(pack_client(ctx, version).read_bytes()).hexdigest() == first, "a second pack differs"
    release = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, release)
    listed = release.manifest.artifact("node-package")
    assert listed.sha256 == first and listed.platform == "any"
    assert npm_package(release.directory).read_bytes() == (release.directory / listed.location).read_bytes()
    (release.directory / listed.location).write_bytes(b"not the package")
    with pytest.raises(Exception, match="is not the npm package the manifest lists"):
        npm_package(release.directory)
