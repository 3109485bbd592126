"""The CLI's TypeScript package (``clients/node``): its pinned dev
dependencies installed from the lockfile and its sources compiled with
``tsc``, skipped when nothing it is built from changed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from terminai_shim.layout import STANDALONE_PLATFORMS, standalone_npm_package

from .ci import npm_version
from .context import BuildContext
from .digest import digest_inputs, sha256_file
from .errors import BuildError
from .proc import run_logged

INPUTS = ("package.json", "package-lock.json", ".npmrc", "tsconfig.json", "tsconfig.consumer.json")
STAMP = ".terminai-build"  # in node_modules: never packed


@dataclass(frozen=True)
class ClientPackage:
    directory: Path

    @property
    def dist(self) -> Path:
        return self.directory / "dist"


def _key(directory: Path) -> str:
    files = [directory / name for name in INPUTS]
    files += sorted((directory / "src").rglob("*.ts")) + sorted((directory / "test" / "fixtures").rglob("*.ts"))
    return digest_inputs({str(f.relative_to(directory)): sha256_file(f) for f in files})


@contextlib.contextmanager
def _built(ctx: BuildContext) -> Iterator[tuple[ClientPackage, str]]:
    """The package, built, and held: two builds (or a build and a pack) of one checkout take turns."""
    directory = ctx.repo / "clients" / "node"
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm is not installed", hint="run ./bootstrap.sh (it installs nodejs and npm)")
    with ctx.cache.lock("client", digest_inputs(str(directory))[:16]):
        _build(ctx, directory, npm)
        yield ClientPackage(directory), npm


def build_client(ctx: BuildContext) -> ClientPackage:
    with _built(ctx) as (package, _npm):
        return package


def _build(ctx: BuildContext, directory: Path, npm: str) -> None:
    key = _key(directory)
    stamp = directory / "node_modules" / STAMP
    if stamp.is_file() and stamp.read_text() == key and (directory / "dist" / "index.js").is_file():
        ctx.reporter.done("client", f"@terminai/runtime from cache ({key[:12]})")
        return
    log = ctx.out / "logs" / "client.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    lock = directory / "package-lock.json"
    installed = directory / "node_modules" / ".package-lock.json"
    if not installed.is_file() or installed.read_bytes() != lock.read_bytes():
        ctx.reporter.info("client", "installing the pinned dev dependencies (npm ci)")
        run_logged([npm, "ci", "--ignore-scripts"], log=log, reporter=ctx.reporter, step="client", cwd=directory,
                   hint="npm needs the package registry; see the log")  # fmt: skip
    ctx.reporter.info("client", "compiling @terminai/runtime (tsc) and type-checking a consumer of the CLI's contract")
    shutil.rmtree(directory / "dist", ignore_errors=True)
    run_logged([npm, "run", "build"], log=log, reporter=ctx.reporter, step="client", cwd=directory,
               hint="a type error: read the log")  # fmt: skip
    stamp.write_text(key)
    ctx.reporter.done("client", f"built @terminai/runtime in {directory / 'dist'}")


def pack_client(ctx: BuildContext, version: str) -> Path:
    """The package as npm would publish it: ``npm pack`` writes fixed times
    and a fixed order, so two packs of the same build are the same bytes.

    The packed manifest lists the per-platform standalone shims as optional
    dependencies at the same version (npm installs the one whose os/cpu
    match). They are added here, not in clients/node/package.json, because
    they are published with the release: the development install (npm ci
    from the lockfile) must not look for them."""
    out = ctx.out / "client"
    out.mkdir(parents=True, exist_ok=True)
    with _built(ctx) as (package, npm):
        manifest = json.loads((package.directory / "package.json").read_text())
        if manifest["version"] != npm_version(version):
            raise BuildError(f"clients/node/package.json says {manifest['version']}, the release is {version}",
                             hint=f"run `inv set-version {version}`")  # fmt: skip
        manifest["optionalDependencies"] = {
            standalone_npm_package(platform): manifest["version"] for platform in STANDALONE_PLATFORMS
        }
        staging = Path(tempfile.mkdtemp(prefix=".pack-", dir=out))
        try:
            source = staging / "package"
            source.mkdir()
            (source / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for name in ["README.md", *manifest["files"]]:
                copy = shutil.copytree if (package.directory / name).is_dir() else shutil.copy2
                copy(package.directory / name, source / name)
            run_logged([npm, "pack", "--pack-destination", str(staging)], log=ctx.out / "logs" / "client.log",
                       reporter=ctx.reporter, step="client", cwd=source)  # fmt: skip
            (tarball,) = staging.glob("*.tgz")
            target = out / tarball.name
            os.replace(tarball, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
