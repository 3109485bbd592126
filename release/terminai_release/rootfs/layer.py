"""An optional layer of the guest root filesystem, from its packages to a
signed-to-be squashfs of what it adds.

Two cached steps. The *full tree* (``rootfs-layer-<name>``): mkosi installs
the layer's packages on the full tree below it (the base's, or the layer
it depends on), keyed by its configuration and that tree's key. The
*layer image* (``rootfs-layer``): both trees finished by the shipping rules
(``finish``), their difference (``delta``) with its Python byte-compiled,
packed as squashfs with an SBOM of exactly the packages it adds. Changing
one layer rebuilds it and the layers above it; the ones below come from the
cache, and the base image never depends on a layer.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_shim.layout import layer_file

from ..cache import RECORD, StepCache, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_file
from ..errors import BuildError
from ..proc import run_logged, tool_version
from ..sde import source_date_epoch
from ..version import release_version
from . import finish
from .base import BASE_DIR, build_base, load_base_spec, render, tree_plan
from .delta import write_delta
from .image import LAYER_LEVEL, mkfs_argv, mkfs_env
from .mkosi import FullTree, TreePlan, build_tree
from .project import RootfsArtifacts
from .sbom import write_sbom
from .stack import LAYERS_FILE, Stack, load_stack

RECIPE = 1
LAYER_DIR = "images/rootfs/layer"
# What the project adds to the base image; a layer that touched these would
# hide the agent's own files under it.
PROJECT_PATHS = ("/usr/lib/terminai", "/etc/hosts", "/etc/hostname", "/etc/terminai-release", "/workspace")


@dataclass(frozen=True)
class LayerArtifacts(RootfsArtifacts):
    """A layer's image and SBOM, as the root image's (``image``, ``sbom``)."""

    name: str = ""

    @property
    def depends(self) -> list[str]:
        return list(self.record["depends"])


def removals_for(ctx: BuildContext, stack: Stack, chain: tuple[str, ...]) -> finish.Removals:
    """The base's removals, less what the layers of ``chain`` restore."""
    restored = [r for name in chain for r in stack.layers[name].restore]
    return load_base_spec(ctx.repo).removals.without(restored)


def build_full_tree(ctx: BuildContext, cache: StepCache, stack: Stack, name: str) -> FullTree:
    """The full tree of ``name`` on top of the full tree below it (recursively)."""
    spec = stack.layers[name]
    lower = build_full_tree(ctx, cache, stack, spec.depends[0]) if spec.depends else build_base(ctx, cache=cache)
    return build_tree(ctx, cache, plan_full_tree(ctx, stack, name, lower))


def plan_full_tree(ctx: BuildContext, stack: Stack, name: str, lower: FullTree) -> TreePlan:
    spec = stack.layers[name]
    base = load_base_spec(ctx.repo)
    # Not layers.toml's commit time: editing one layer there must not move every layer's key.
    sde = source_date_epoch(ctx.repo, BASE_DIR, LAYER_DIR, "images/rootfs/mkosi.toml")
    conf = render(ctx.repo / LAYER_DIR / "mkosi.conf.j2", release=base.release, packages=spec.packages,
                  seed=base.seed, source_date_epoch=sde)  # fmt: skip
    return tree_plan(ctx, f"rootfs-layer-{name}", f"the {name} layer's tree", conf, sde, lower)


def build_layer(ctx: BuildContext, name: str, *, cache: StepCache | None = None) -> LayerArtifacts:
    cache = cache or ctx.cache
    stack = load_stack(ctx.repo)
    if name not in stack.layers:
        raise BuildError(f"unknown layer {name!r}", hint=f"the layers are {', '.join(stack.layers)}")
    chain = (*stack.below(name), name)
    upper = build_full_tree(ctx, cache, stack, name)
    spec = stack.layers[name]
    lower = build_full_tree(ctx, cache, stack, spec.depends[0]) if spec.depends else build_base(ctx, cache=cache)
    version = release_version(ctx.repo)
    inputs = {
        "recipe": RECIPE,
        "name": name,
        "depends": list(spec.depends),
        "upper": upper.key,
        "lower": lower.key,
        "removals_upper": dataclasses.asdict(removals_for(ctx, stack, chain)),
        "removals_lower": dataclasses.asdict(removals_for(ctx, stack, chain[:-1])),
        "version": version,
        "tool": tool_version(["mksquashfs", "-version"]),
        "level": LAYER_LEVEL,
        "code": digest_inputs({f: sha256_file(Path(__file__).with_name(f)) for f in ("finish.py", "delta.py")}),
        "source_date_epoch": upper.record["source_date_epoch"],
    }
    key = digest_inputs(inputs)
    step = "rootfs-layer"

    def build(staging: Path) -> None:
        _build_into(ctx, cache, key, inputs, stack, chain, upper, lower, staging)

    entry, cached = cache.obtain(step, key, build)
    if cached:
        ctx.reporter.done(f"layer-{name}", f"the {name} layer from cache ({key[:12]})")
    return LayerArtifacts(entry, cache.record(step, key), cached, name)


def _finished_copy(
    ctx: BuildContext, full: FullTree, removals: finish.Removals, dest: Path, log: Path
) -> list[finish.Package]:
    run_logged(["cp", "-a", "--reflink=auto", str(full.tree), str(dest)], log=log, reporter=ctx.reporter,
               step="layer")  # fmt: skip
    packages = finish.installed_packages(dest)
    finish.prune(dest, removals, packages)
    for cache_dir in sorted(dest.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache_dir)  # compiled afresh for what the layer adds
    return finish.shipped_packages(dest, packages)


def _build_into(
    ctx: BuildContext,
    cache: StepCache,
    key: str,
    inputs: dict[str, Any],
    stack: Stack,
    chain: tuple[str, ...],
    upper: FullTree,
    lower: FullTree,
    staging: Path,
) -> None:
    name = chain[-1]
    step = f"layer-{name}"
    rep = ctx.reporter
    work = cache.work_dir("rootfs-layer", key)
    log = work / "build.log"
    sde = int(inputs["source_date_epoch"])
    version = str(inputs["version"])
    rep.info(step, f"finishing the trees with and without the {name} layer")
    up_pkgs = _finished_copy(ctx, upper, removals_for(ctx, stack, chain), work / "upper", log)
    low_pkgs = _finished_copy(ctx, lower, removals_for(ctx, stack, chain[:-1]), work / "lower", log)
    delta = work / "delta"
    delta.mkdir()
    stats = write_delta(work / "upper", work / "lower", delta)
    touched = [p for p in PROJECT_PATHS if (delta / p.lstrip("/")).exists() or (delta / p.lstrip("/")).is_symlink()]
    if touched:
        raise BuildError(f"the {name} layer changes {touched}, which the project layer owns",
                         hint=f"remove what installs them from {LAYERS_FILE}")  # fmt: skip
    _compile_added_python(ctx, work / "upper", delta, sde=sde, log=log, step=step)
    finish.clamp_times(delta, sde)

    image = staging / layer_file(name, version)
    rep.info(step, f"packing the {name} layer ({stats.copied} entries, {len(stats.whiteouts)} whiteouts)")
    run_logged(mkfs_argv("squashfs", delta, image, sde, level=LAYER_LEVEL), log=log, reporter=rep, step=step,
               env=mkfs_env("squashfs"))  # fmt: skip
    below = {(p.name, p.version) for p in low_pkgs}
    added = [p.as_sbom() for p in up_pkgs if (p.name, p.version) not in below]
    sbom = staging / f"layer-{name}-{version}.spdx.json"
    write_sbom(sbom, name=f"terminai-layer-{name}-{version}", version=version, sde=sde, debian=added, tree=delta)
    outputs = {
        "image": {"file": image.name, "sha256": sha256_file(image), "size": image.stat().st_size,
                  "format": "squashfs"},
        "sbom": {"file": sbom.name, "sha256": sha256_file(sbom), "size": sbom.stat().st_size},
    }  # fmt: skip
    tree_bytes = sum(f.stat().st_size for f in delta.rglob("*") if f.is_file() and not f.is_symlink())
    record = {"artifact": "rootfs-layer", "name": name, "depends": list(stack.layers[name].depends), "key": key,
              "inputs": inputs, "outputs": outputs, "tree_bytes": tree_bytes, "packages": len(added),
              "whiteouts": stats.whiteouts}  # fmt: skip
    write_atomic(staging / RECORD, canonical_json(record))
    shutil.rmtree(work, ignore_errors=True)
    rep.done(step, f"built {image.name}: {outputs['image']['size']} bytes, {len(added)} packages")


def _compile_added_python(ctx: BuildContext, upper: Path, delta: Path, *, sde: int, log: Path, step: str) -> None:
    """Byte-compile the layer's own Python in the tree it will be seen in
    (its interpreter, its paths), and ship the ``.pyc`` with it; unchanged
    modules below keep the ones their own image has."""
    sources = sorted(
        "/" + p.relative_to(delta).as_posix()
        for d in finish.PY_DIRS
        if (delta / d.lstrip("/")).is_dir()
        for p in (delta / d.lstrip("/")).rglob("*.py")
        if p.is_file() and not p.is_symlink()
    )
    if not sources:
        return
    listing = upper / "tmp/terminai-compile.list"
    listing.write_text("\n".join(sources) + "\n")
    finish.compile_python(upper, ["-i", "/tmp/terminai-compile.list"], sde=sde, log=log, reporter=ctx.reporter,
                          step=step)  # fmt: skip
    listing.unlink()
    for src in sources:
        compiled = Path(src).parent / "__pycache__"
        for pyc in (upper / compiled.as_posix().lstrip("/")).glob(Path(src).stem + ".cpython-*.pyc"):
            target = delta / compiled.as_posix().lstrip("/")
            target.mkdir(exist_ok=True)
            shutil.copy2(pyc, target / pyc.name)
