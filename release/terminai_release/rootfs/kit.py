"""The survival kit wheel that goes into the image.

By default it is built from ``images/survival-kit``; a release engineer can
point the build at another wheel or source tree, pinned by sha256 (of the
wheel file, or of the tree as computed by ``digest.sha256_tree``).
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import RECORD, StepCache, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_file, sha256_tree
from ..errors import BuildError
from ..proc import run_logged
from ..sde import source_date_epoch
from ..version import release_version

RECIPE = 1


@dataclass(frozen=True)
class KitOverride:
    path: Path
    sha256: str


def build_kit_wheel(ctx: BuildContext, override: KitOverride | None = None, *, cache: StepCache | None = None) -> Path:
    cache = cache or ctx.cache
    version = release_version(ctx.repo)
    if override is not None:
        source = override.path
        actual = sha256_file(source) if source.is_file() else sha256_tree(source)
        if actual != override.sha256.lower():
            raise BuildError(
                f"survival kit {source} has sha256 {actual}, but {override.sha256} was pinned",
                hint="pin the digest of exactly the wheel or tree you mean to ship",
            )
        if source.is_file():
            return _check_wheel(source, version)
    else:
        source = ctx.repo / "images/survival-kit"
    sde = (
        source_date_epoch(ctx.repo, "images/survival-kit")
        if override is None
        else int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    )
    from importlib.metadata import version as dist_version

    backend = {name: dist_version(name) for name in ("setuptools", "wheel")}
    key = digest_inputs(
        {"recipe": RECIPE, "tree": sha256_tree(source), "sde": sde, "python": sys.version, "backend": backend}
    )

    def build(staging: Path) -> None:
        work = cache.work_dir("kit-wheel", key)
        shutil.copytree(
            source, work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests")
        )
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(sde))
        run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-w",
                str(staging),
                str(work / "src"),
            ],
            log=work / "build.log",
            reporter=ctx.reporter,
            step="kit",
            env=env,
        )
        wheels = list(staging.glob("*.whl"))
        write_atomic(
            staging / RECORD,
            canonical_json(
                {"artifact": "kit-wheel", "key": key, "wheel": wheels[0].name, "sha256": sha256_file(wheels[0])}
            ),
        )
        shutil.rmtree(work, ignore_errors=True)

    entry, _ = cache.obtain("kit-wheel", key, build)
    wheel = entry / cache.record("kit-wheel", key)["wheel"]
    return _check_wheel(wheel, version)


def _check_wheel(wheel: Path, version: str) -> Path:
    parts = wheel.name.split("-")
    if len(parts) < 2 or parts[0] != "terminai_apts":
        raise BuildError(f"{wheel.name} is not a terminai_apts wheel")
    if parts[1] != version:
        raise BuildError(
            f"survival kit version {parts[1]} differs from the release version {version}",
            hint="the kit's __version__ must equal the version in pyproject.toml",
        )
    with zipfile.ZipFile(wheel) as zf:
        if "terminai_apts/__init__.py" not in zf.namelist():
            raise BuildError(f"{wheel.name} does not contain terminai_apts/__init__.py")
    return wheel
