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
from shimproc import SHIM

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
    env = dict(os.environ, SHIM=SHIM, MANIFEST=str(release.directory),
               WORKSPACE=str(workspace), BACKEND=backend, TERMINAI_CACHE=str(tmp_path / "shim-cache"))  # fmt: skip
    env.pop("TERMINAI_SHIM", None)
    done = subprocess.run([node, "--test", "test/"], cwd=package.directory, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout and "# pass 6" in done.stdout, done.stdout[-2000:]


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


def test_the_installed_package_runs_the_standalone_shim_its_optional_dependency_brought(ctx, kernel, rootfs, tmp_path):
    """What a CLI user gets from npm: @terminai/runtime and, through its optional
    dependencies, the standalone shim for this platform, both from the signed
    release's tarballs, installed into a fresh project (offline: the other
    platforms' packages are skipped, as npm skips a foreign os/cpu). The
    package's own suite then runs there with no SHIM given and no Python
    project on PATH: the shim must be the one in node_modules."""
    import json

    from terminai_release.release import build_release, sign_release
    from terminai_release.standalone import folder_digest
    from terminai_shim.layout import manifest_platform, standalone_platform

    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are installed by bootstrap.sh"
    release = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, release)
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "consumer", "private": True, "type": "module"}))
    tarballs = []
    for kind, platform in (("node-package", None), ("shim-npm-package", manifest_platform(standalone_platform()))):
        listed = release.manifest.artifact(kind, platform)
        tarball = project / listed.name  # npm knows a tarball by its .tgz name; the blob is named by its digest
        shutil.copyfile(release.directory / listed.location, tarball)
        tarballs.append(f"./{tarball.name}")
    env = dict(os.environ, npm_config_cache=str(tmp_path / "npm-cache"))
    venv = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if d != venv)
    for name in ("TERMINAI_SHIM", "SHIM", "VIRTUAL_ENV", "TERMINAI_TEST_SHIM"):
        env.pop(name, None)
    done = subprocess.run([npm, "install", "--offline", "--no-audit", "--no-fund", *tarballs], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    installed = sorted(p.name for p in (project / "node_modules/@terminai").iterdir())
    assert installed == ["runtime", f"shim-{standalone_platform()}"], installed
    # The installed folder is the build the release signed, and says so itself.
    folder = project / "node_modules/@terminai" / f"shim-{standalone_platform()}" / "bin"
    report = json.loads(subprocess.run([str(folder / "terminai-shim"), "--version", "--json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)  # fmt: skip
    signed = release.manifest.artifact("shim-standalone", manifest_platform(standalone_platform())).build
    assert report["standalone"] and report["build"]["digest"] == signed["digest"] == folder_digest(folder)
    assert report["sigstore"] == report["build"]["sigstore"] == signed["sigstore"]
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    env.update(MANIFEST=str(release.directory), WORKSPACE=str(workspace), BACKEND="qemu",
               TERMINAI_CACHE=str(tmp_path / "shim-cache"),
               RUNTIME=str(project / "node_modules/@terminai/runtime/dist/index.js"))  # fmt: skip
    done = subprocess.run([node, "--test", str(REPO / "clients/node/test/runtime.test.mjs")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# fail 0" in done.stdout and "# pass 6" in done.stdout, done.stdout[-2000:]
