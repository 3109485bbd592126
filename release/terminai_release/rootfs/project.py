"""The project layer and the root image: the finished base tree + agent +
survival kit + init, byte-compiled for the guest's Python, packed into a
read-only image. The optional layers (``layer``) go over it at boot.

Changing only the agent rebuilds this layer alone (the base comes from the
cache) and never touches the network.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_shim.layout import rootfs_file

from ..cache import RECORD, StepCache, StepOutputs, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_file, sha256_tree
from ..errors import BuildError
from ..proc import run_logged, tool_version
from ..sde import source_date_epoch
from ..version import release_version
from . import finish
from .base import build_base, load_base_spec
from .image import FORMATS, mkfs_argv, mkfs_env
from .kit import KitOverride, build_kit_wheel
from .mkosi import FullTree
from .sbom import write_sbom

RECIPE = 4
# The guest agent's packages: the agent and the protocol it shares with the shim
# (which lives with the shim, so the shim's own distribution carries it).
AGENT_PACKAGES = ("images/agent/terminai_agent", "shim/terminai_protocol")


def agent_pythonpath(repo: Path) -> str:
    """The PYTHONPATH that runs the agent from a checkout as the guest runs it."""
    return os.pathsep.join(str(repo / Path(package).parent) for package in AGENT_PACKAGES)


@dataclass(frozen=True)
class RootfsArtifacts(StepOutputs):
    @property
    def image(self) -> Path:
        return self.output("image")

    @property
    def sbom(self) -> Path:
        return self.output("sbom")


def build_rootfs(
    ctx: BuildContext,
    *,
    fmt: str = "squashfs",
    kit: KitOverride | None = None,
    cache: StepCache | None = None,
) -> RootfsArtifacts:
    if fmt not in FORMATS:
        raise BuildError(f"unknown image format {fmt!r}", hint=f"choose one of {FORMATS}")
    cache = cache or ctx.cache
    base = build_base(ctx, cache=cache)
    wheel = build_kit_wheel(ctx, kit, cache=cache)
    project = ctx.repo / "images/rootfs/project"
    version = release_version(ctx.repo)
    sde = source_date_epoch(ctx.repo, "images", "pyproject.toml")
    tool = tool_version(["mksquashfs", "-version"] if fmt == "squashfs" else ["mkfs.erofs", "--version"])
    inputs = {
        "recipe": RECIPE,
        "base": base.key,
        "removals": canonical_json(dataclasses.asdict(load_base_spec(ctx.repo).removals)).decode(),
        "finish": sha256_file(Path(finish.__file__)),
        "kit": sha256_file(wheel),
        "agent": digest_inputs({package: sha256_tree(ctx.repo / package) for package in AGENT_PACKAGES}),
        "project": sha256_tree(project),
        "version": version,
        "format": fmt,
        "tool": tool,
        "source_date_epoch": sde,
    }
    key = digest_inputs(inputs)
    entry, cached = cache.obtain(
        "rootfs", key, lambda staging: _build_into(ctx, cache, key, inputs, base, wheel, staging)
    )
    if cached:
        ctx.reporter.done("rootfs", f"root image from cache ({key[:12]})")
    return RootfsArtifacts(entry, cache.record("rootfs", key), cached=cached)


def _build_into(
    ctx: BuildContext,
    cache: StepCache,
    key: str,
    inputs: dict[str, Any],
    base: FullTree,
    wheel: Path,
    staging: Path,
) -> None:
    rep = ctx.reporter
    work = cache.work_dir("rootfs", key)
    log = work / "build.log"
    tree = work / "tree"
    sde = int(inputs["source_date_epoch"])
    version = str(inputs["version"])

    rep.info("rootfs", "assembling the project layer on the base tree")
    run_logged(["cp", "-a", "--reflink=auto", str(base.tree), str(tree)], log=log, reporter=rep, step="rootfs")
    installed = finish.installed_packages(tree)
    finish.prune(tree, load_base_spec(ctx.repo).removals, installed)
    shipped = [p.as_sbom() for p in finish.shipped_packages(tree, installed)]
    run_logged(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
         "--disable-pip-version-check",
         "--target", str(tree / "usr/lib/python3/dist-packages"), str(wheel)],
        log=log, reporter=rep, step="rootfs",
    )  # fmt: skip
    _drop_direct_url(tree / "usr/lib/python3/dist-packages")
    lib = tree / "usr/lib/terminai"
    for package in AGENT_PACKAGES:
        source = ctx.repo / package
        shutil.copytree(source, lib / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    project = ctx.repo / "images/rootfs/project"
    shutil.copy2(project / "init", lib / "init")
    os.chmod(lib / "init", 0o755)
    shutil.copytree(project / "files", tree, dirs_exist_ok=True)
    (tree / "workspace").mkdir(exist_ok=True)
    (tree / "etc/terminai-release").write_text(f"TERMINAI_VERSION={version}\n")

    rep.info("rootfs", "byte-compiling Python for the guest (unchecked-hash .pyc)")
    finish.compile_python(tree, [d for d in finish.PY_DIRS if (tree / d.lstrip("/")).exists()], sde=sde, log=log,
                          reporter=rep, step="rootfs")  # fmt: skip
    finish.clamp_times(tree, sde)

    fmt = str(inputs["format"])
    image = staging / rootfs_file(version, fmt)
    stored = [_interpreter(tree)] if fmt == "squashfs" else []
    rep.info("rootfs", f"packing the {fmt} image")
    run_logged(
        mkfs_argv(fmt, tree, image, sde, _actions(work, stored)), log=log, reporter=rep, step="rootfs",
        env=mkfs_env(fmt),
    )  # fmt: skip
    sbom = staging / f"rootfs-{version}.spdx.json"
    write_sbom(sbom, name=f"terminai-rootfs-{version}", version=version, sde=sde, debian=shipped, tree=tree)
    digest, size = sha256_file(image), image.stat().st_size
    outputs = {
        "image": {"file": image.name, "sha256": digest, "size": size, "format": fmt, "uncompressed": stored},
        "sbom": {"file": sbom.name, "sha256": sha256_file(sbom), "size": sbom.stat().st_size},
    }
    tree_size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())
    record = {"artifact": "rootfs", "key": key, "inputs": inputs, "outputs": outputs, "tree_bytes": tree_size}
    write_atomic(staging / RECORD, canonical_json(record))
    shutil.rmtree(work, ignore_errors=True)
    rep.done("rootfs", f"built {image.name}: {outputs['image']['size']} bytes (tree {tree_size} bytes)")


def _drop_direct_url(site: Path) -> None:
    """pip records the wheel's build-cache path (PEP 610 direct_url.json):
    meaningless in the image and different on every machine, so remove it."""
    for info in site.glob("*.dist-info"):
        direct = info / "direct_url.json"
        if direct.exists():
            direct.unlink()
            record = info / "RECORD"
            lines = [ln for ln in record.read_text().splitlines() if not ln.startswith(f"{info.name}/direct_url.json,")]
            record.write_text("\n".join(lines) + "\n")


def _interpreter(tree: Path) -> str:
    """The guest's Python binary, relative to the tree (``usr/bin/python3``
    is a symbolic link to it, relative or absolute within the guest)."""
    link = tree / "usr/bin/python3"
    target = os.readlink(link) if link.is_symlink() else "python3"
    path = os.path.normpath(os.path.join("/usr/bin", target)).lstrip("/")
    if not (tree / path).is_file():
        raise BuildError(f"the guest's python3 ({path}) is not in the tree", hint="check the base layer's packages")
    return path


def _actions(work: Path, stored: list[str]) -> Path | None:
    """mksquashfs actions that store ``stored`` uncompressed.

    Every boot reads the whole interpreter (6.8 MB) before the agent can
    answer, and under TCG the guest kernel's zstd decompresses it at a few
    tens of MB/s: stored as is, boot-to-ready is about 0.4 s shorter for
    4 MB more image. Only the interpreter: storing libc, libm and the boot
    modules too saves another 0.1 s but breaks the 30 MB size budget."""
    if not stored:
        return None
    path = work / "mksquashfs.actions"
    expr = " || ".join(f"pathname({p})" for p in stored)
    path.write_text(f"uncompressed @ {expr}\n")
    return path
