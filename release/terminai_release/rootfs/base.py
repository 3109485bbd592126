"""The Debian base: mkosi installs it as a full tree (package database
included, so layers can be installed on it), cached by the digest of the
rendered configuration (release, packages, seed, source date, mirrors and
the pinned mkosi). What ships of it is decided later (``finish``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import jinja2

from ..cache import StepCache
from ..context import BuildContext
from ..sde import source_date_epoch
from .aptsources import host_acquire_options, host_mirrors
from .finish import Removals
from .mkosi import FullTree, TreePlan, build_tree, ensure_mkosi, load_pin

BASE_DIR = "images/rootfs/base"


@dataclass(frozen=True)
class BaseSpec:
    release: str
    seed: str
    packages: tuple[str, ...]
    removals: Removals


def load_base_spec(repo: Path) -> BaseSpec:
    data = tomllib.loads((repo / BASE_DIR / "layer.toml").read_text())
    removals = Removals(tuple(data.get("remove_packages", [])), tuple(data.get("remove_files", [])))
    return BaseSpec(data["release"], data["seed"], tuple(data["packages"]), removals)


def render(template: Path, **values: object) -> str:
    """An mkosi configuration with the machine-local paths left as placeholders."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(template.read_text()).render(
        output_dir="@OUTPUT@", sandbox_dir="@SANDBOX@", package_cache="@PKGCACHE@", lower_tree="@LOWER@", **values
    )


def tree_plan(ctx: BuildContext, step: str, title: str, conf: str, sde: int, lower: FullTree | None) -> TreePlan:
    release = load_base_spec(ctx.repo).release
    mkosi = ensure_mkosi(ctx.cache, load_pin(ctx.repo / "images/rootfs/mkosi.toml"))
    return TreePlan(step, title, conf, host_mirrors().sources(release), host_acquire_options(), mkosi, sde, lower)


def plan_base(ctx: BuildContext) -> TreePlan:
    spec = load_base_spec(ctx.repo)
    sde = source_date_epoch(ctx.repo, BASE_DIR, "images/rootfs/mkosi.toml")
    conf = render(ctx.repo / BASE_DIR / "mkosi.conf.j2", release=spec.release, packages=spec.packages,
                  seed=spec.seed, source_date_epoch=sde)  # fmt: skip
    return tree_plan(ctx, "rootfs-base", "the Debian base", conf, sde, None)


def build_base(ctx: BuildContext, *, cache: StepCache | None = None) -> FullTree:
    return build_tree(ctx, cache or ctx.cache, plan_base(ctx))
