"""`inv shim-dist`: the shim as a standalone executable, for machines with no Python.

The shim's own distribution (``shim/pyproject.toml``: the shim and the
protocol package, nothing of the pipeline or the agent) is installed into a
fresh environment built from ``shim/requirements.lock`` alone, and PyInstaller
freezes it in one-folder mode. A clean environment is the point: what the
executable carries is exactly what the distribution declares, never whatever
the development environment happens to hold.

Outputs (one cache entry per digest of the inputs):

- ``terminai-shim/``: the executable and its ``_internal/`` folder, with
  ``terminai-shim-build.json`` recording what went in and the digest of every
  other file (``terminai-shim --version --json`` reports it);
- ``terminai-shim-<version>-<platform>.tar.gz``: that folder, deterministically;
- ``terminai-shim-<platform>-<npm version>.tgz``: the per-platform npm package
  ``@terminai/shim-<platform>`` the CLI's package lists as an optional dependency.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_shim.layout import (
    STANDALONE_BUILD_INFO,
    STANDALONE_PLATFORMS,
    standalone_archive_name,
    standalone_npm_package,
    standalone_platform,
)

from .cache import RECORD, StepCache, StepOutputs
from .ci import npm_version
from .context import BuildContext
from .digest import digest_inputs, sha256_file, sha256_tree
from .errors import BuildError
from .proc import run_logged
from .sde import source_date_epoch
from .version import release_version

RECIPE = 3
STEP = "shim-dist"
# The freezer's entry point: the console script's, as a file PyInstaller can analyse.
ENTRY = "from terminai_shim.cli import main\nraise SystemExit(main())\n"
# Modules the shim never imports whose PyInstaller run-time hooks cost start-up:
# setuptools' hook alone took `--version` from 130 to 230 ms (measured here).
EXCLUDE = ("setuptools", "pkg_resources", "_distutils_hack", "distutils", "multiprocessing", "tkinter")


@dataclass(frozen=True)
class StandaloneShim(StepOutputs):
    @property
    def folder(self) -> Path:
        return self.directory / "terminai-shim"

    @property
    def executable(self) -> Path:
        return self.folder / ("terminai-shim.exe" if sys.platform == "win32" else "terminai-shim")

    @property
    def archive(self) -> Path:
        return self.output("archive")

    @property
    def npm_package(self) -> Path:
        return self.output("npmPackage")

    @property
    def platform(self) -> str:
        return str(self.record["inputs"]["platform"])


def folder_digest(folder: Path) -> str:
    """The digest of a standalone folder's names, modes and contents, less the
    build record inside it (which holds this digest)."""
    return sha256_tree(folder, exclude={f"_internal/{STANDALONE_BUILD_INFO}"}, sources=False)


def load_standalone(directory: Path) -> StandaloneShim:
    """A standalone build made elsewhere (another platform's runner): its
    build record, archive and npm package, as `inv shim-dist` left them."""
    try:
        record = json.loads((directory / RECORD).read_text())
        shim = StandaloneShim(directory, record, cached=True)
        for listed in (record["outputs"]["archive"], record["outputs"]["npmPackage"]):  # a name, never a path
            if Path(str(listed["file"])).name != listed["file"] or listed["file"] in ("", ".", ".."):
                raise BuildError(f"{directory}: the build record names {listed['file']!r}, not a file beside it")
        if shim.platform not in STANDALONE_PLATFORMS:
            raise BuildError(f"{directory}: the build record's platform {shim.platform!r} is not one of "
                             f"{', '.join(STANDALONE_PLATFORMS)}")  # fmt: skip
        for path, listed in (
            (shim.archive, record["outputs"]["archive"]),
            (shim.npm_package, record["outputs"]["npmPackage"]),
        ):
            if sha256_file(path) != listed["sha256"]:
                raise BuildError(f"{path} does not match the digest its build record lists",
                                 hint="download that platform's build again")  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise BuildError(f"{directory} is not a standalone shim build ({exc})",
                         hint="give the folders `inv shim-dist` wrote on each platform's runner") from None  # fmt: skip
    return shim


def build_standalone(ctx: BuildContext, cache: StepCache | None = None) -> StandaloneShim:
    repo = ctx.repo
    shim = repo / "shim"
    version = release_version(repo)
    inputs = {
        "recipe": RECIPE,
        "shim": sha256_tree(shim / "terminai_shim"),
        "protocol": sha256_tree(shim / "terminai_protocol"),
        "pyproject": sha256_file(shim / "pyproject.toml"),
        "lock": sha256_file(shim / "requirements.lock"),
        # The interpreter it freezes is this one: its version and build are inputs.
        "python": f"{platform.python_implementation()} {sys.version}",
        "platform": standalone_platform(),
        "version": version,
        "source_date_epoch": source_date_epoch(repo, "shim"),
    }
    key = digest_inputs(inputs)
    cache = cache or ctx.cache
    entry, cached = cache.obtain(
        STEP, key, lambda staging: _build_into(ctx, cache.work_dir(STEP, key), key, inputs, staging)
    )
    if cached:
        ctx.reporter.done(STEP, f"standalone shim from cache ({key[:12]})")
    return StandaloneShim(entry, cache.record(STEP, key), cached)


def _build_into(ctx: BuildContext, work: Path, key: str, inputs: dict[str, Any], staging: Path) -> None:
    rep, repo = ctx.reporter, ctx.repo
    log = work / "build.log"
    sde = int(inputs["source_date_epoch"])
    started = time.monotonic()
    # Windows needs its own environment (SystemRoot, TEMP) to run Python at all.
    env = dict(os.environ) if os.name == "nt" else {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    env.update(SOURCE_DATE_EPOCH=str(sde), PYTHONHASHSEED="0", PIP_DISABLE_PIP_VERSION_CHECK="1", LC_ALL="C.UTF-8")
    python = str(_env_tool(work / "env", "python"))

    rep.info(STEP, "a fresh environment from shim/requirements.lock (hash-checked)")
    base = Path(getattr(sys, "_base_executable", sys.executable))
    run_logged([str(base), "-m", "venv", str(work / "env")], log=log, reporter=rep, step=STEP, env=env)
    pip = [python, "-m", "pip", "install", "-q", "--no-deps"]
    run_logged([*pip, "--require-hashes", "-r", str(repo / "shim/requirements.lock")], log=log, reporter=rep,
               step=STEP, env=env, hint="the package index must be reachable; see the log")  # fmt: skip

    rep.info(STEP, "the shim's own distribution (shim/pyproject.toml: the shim and its protocol, no agent)")
    source = work / "source"
    source.mkdir()
    shutil.copy2(repo / "shim/pyproject.toml", source / "pyproject.toml")
    for package in ("terminai_shim", "terminai_protocol"):
        shutil.copytree(repo / "shim" / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    run_logged([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                "-w", str(work / "wheel"), str(source)], log=log, reporter=rep, step=STEP, env=env)  # fmt: skip
    (wheel,) = (work / "wheel").glob("terminai_shim-*.whl")
    run_logged([*pip, "--no-index", str(wheel)], log=log, reporter=rep, step=STEP, env=env)

    rep.info(STEP, "freezing it with PyInstaller (one folder)")
    (work / "entry.py").write_text(ENTRY)
    run_logged(
        [str(_env_tool(work / "env", "pyinstaller")), "--noconfirm", "--clean", "--log-level", "WARN", "--onedir",
         "--name", "terminai-shim", "--distpath", str(work / "dist"), "--workpath", str(work / "build"),
         "--specpath", str(work), "--collect-data", "terminai_shim", "--noupx",
         *(arg for module in EXCLUDE for arg in ("--exclude-module", module)), str(work / "entry.py")],
        log=log, reporter=rep, step=STEP, env=env, hint="PyInstaller failed; see the log",
    )  # fmt: skip
    folder = staging / "terminai-shim"
    shutil.copytree(work / "dist" / "terminai-shim", folder, symlinks=True)
    links = [p for p in folder.rglob("*") if p.is_symlink()]
    for link in links:  # npm packs no symbolic links: each becomes the file it names
        target = link.resolve()
        if not target.is_relative_to(folder.resolve()):
            raise BuildError(f"the frozen shim links outside itself: {link} -> {target}")
        link.unlink()
        shutil.copy2(target, link)
    # What a package's installation recorded about the build environment is not
    # the frozen folder's, and names that environment's paths (the RECORD of a
    # package with a console script hashes its shebang): two clean builds in
    # two directories differed only there.
    for meta in folder.glob("_internal/*.dist-info"):
        for name in ("RECORD", "direct_url.json"):
            (meta / name).unlink(missing_ok=True)
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (sde, sde), follow_symlinks=False)

    sigstore = _installed_version(work / "env", "sigstore")
    info = {
        "version": inputs["version"],
        "platform": inputs["platform"],
        "python": platform.python_version(),
        "sigstore": sigstore,
        "pyinstaller": _installed_version(work / "env", "pyinstaller"),
        "sourceDateEpoch": sde,
        "digest": folder_digest(folder),
    }
    build_info = folder / "_internal" / STANDALONE_BUILD_INFO
    build_info.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.utime(build_info, (sde, sde))

    archive = staging / standalone_archive_name(str(inputs["version"]), str(inputs["platform"]))
    _write_archive(folder, archive, sde)
    npm = _npm_package(ctx, folder, staging, str(inputs["version"]), str(inputs["platform"]), sde, log)
    record = {
        "key": key,
        "inputs": inputs,
        "outputs": {
            "folder": {"digest": info["digest"], "sigstore": sigstore},
            "archive": {"file": archive.name, "sha256": sha256_file(archive), "size": archive.stat().st_size},
            "npmPackage": {
                "file": npm.name,
                "sha256": sha256_file(npm),
                "size": npm.stat().st_size,
                "name": standalone_npm_package(str(inputs["platform"])),
            },
        },
        "buildSeconds": round(time.monotonic() - started, 1),
    }
    (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    took = time.monotonic() - started
    rep.done(STEP, f"standalone shim for {inputs['platform']} ({_mib(folder)} MiB) in {took:.0f} s")


def _env_tool(env: Path, name: str) -> Path:
    return env / "Scripts" / f"{name}.exe" if os.name == "nt" else env / "bin" / name


def _installed_version(env: Path, name: str) -> str:
    for meta in sorted(env.glob(f"**/site-packages/{name}-*.dist-info/METADATA")):
        for line in meta.read_text().splitlines():
            if line.startswith("Version: "):
                return line.removeprefix("Version: ")
    raise BuildError(f"{name} is not in the standalone environment", hint="run `inv lock` and build again")


def _mib(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) >> 20


def _write_archive(folder: Path, out: Path, sde: int) -> None:
    """A tar.gz that depends only on the folder's names, modes and bytes."""
    tmp = out.with_name(f".{out.name}.tmp")
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0, filename="") as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in [folder, *sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())]:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder.parent).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = sde, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() or path.stat().st_mode & 0o111 else 0o644
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    os.replace(tmp, out)


def _npm_package(ctx: BuildContext, folder: Path, staging: Path, version: str, plat: str, sde: int, log: Path) -> Path:
    """``@terminai/shim-<platform>``: the folder under ``bin/``, where the CLI's
    package looks (clients/node/src/locate.ts), with ``os``/``cpu`` so npm
    installs only the one for the machine."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm is not installed", hint="run ./bootstrap.sh (it installs nodejs and npm)")
    os_name, cpu = plat.split("-")
    package = staging / "npm"
    shutil.copytree(folder, package / "bin", symlinks=True)
    manifest = {
        "name": standalone_npm_package(plat),
        "version": npm_version(version),
        "description": f"The standalone TerminAI runtime shim for {plat} (optional dependency of @terminai/runtime).",
        "license": "Apache-2.0",
        "os": [os_name],
        "cpu": [cpu],
        "files": ["bin/"],
        "preferUnplugged": True,
    }
    (package / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in [package, *package.rglob("*")]:
        os.utime(path, (sde, sde), follow_symlinks=False)
    run_logged([npm, "pack", "--pack-destination", str(staging)], log=log, reporter=ctx.reporter, step=STEP,
               cwd=package)  # fmt: skip
    shutil.rmtree(package)
    (tarball,) = staging.glob("*.tgz")
    return tarball


def main() -> int:
    """``python -m terminai_release.standalone``: `inv shim-dist` for the release
    workflow's other runners, which have a Python but not this project's tools
    (this module and what it imports use the standard library only)."""
    from .context import BuildContext
    from .progress import Reporter

    ctx = BuildContext(reporter=Reporter.auto(False))
    try:
        shim = build_standalone(ctx)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(ctx.publish_link(STEP, shim.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
