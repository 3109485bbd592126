"""The Debian base layer: mkosi builds a directory tree, cached by the digest
of the rendered configuration (which holds every input: release, packages,
removals, seed, source date, mirrors and the pinned mkosi)."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ..cache import RECORD, StepCache, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_bytes
from ..errors import BuildError
from ..proc import run_logged
from ..sde import source_date_epoch
from .aptsources import host_acquire_options, host_mirrors
from .mkosi import Mkosi, ensure_mkosi, load_pin

RECIPE = 1


@dataclass(frozen=True)
class BaseLayer:
    directory: Path
    record: dict[str, Any]
    cached: bool

    @property
    def tree(self) -> Path:
        return self.directory / "tree"

    @property
    def packages(self) -> list[dict[str, str]]:
        data: list[dict[str, str]] = json.loads((self.directory / "packages.json").read_text())
        return data


@dataclass(frozen=True)
class BasePlan:
    conf: str  # mkosi.conf with placeholders for machine-local paths
    sources: str
    apt_conf: str
    mkosi: Mkosi
    source_date_epoch: int

    @property
    def key(self) -> str:
        return digest_inputs(
            {
                "recipe": RECIPE,
                "conf": sha256_bytes(self.conf.encode()),
                "sources": sha256_bytes(self.sources.encode()),
                "apt_conf": sha256_bytes(self.apt_conf.encode()),
                "mkosi": self.mkosi.pin.sha256,
            }
        )


def plan_base(ctx: BuildContext) -> BasePlan:
    layer_dir = ctx.repo / "images/rootfs/base"
    layer = tomllib.loads((layer_dir / "layer.toml").read_text())
    sde = source_date_epoch(ctx.repo, "images/rootfs/base", "images/rootfs/mkosi.toml")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    template = env.from_string((layer_dir / "mkosi.conf.j2").read_text())
    conf = template.render(
        release=layer["release"],
        packages=layer["packages"],
        remove_files=layer["remove_files"],
        seed=layer["seed"],
        source_date_epoch=sde,
        output_dir="@OUTPUT@",
        sandbox_dir="@SANDBOX@",
        package_cache="@PKGCACHE@",
    )
    mirrors = host_mirrors()
    mkosi = ensure_mkosi(ctx.cache, load_pin(ctx.repo / "images/rootfs/mkosi.toml"))
    return BasePlan(conf, mirrors.sources(layer["release"]), host_acquire_options(), mkosi, sde)


def build_base(ctx: BuildContext, *, cache: StepCache | None = None) -> BaseLayer:
    cache = cache or ctx.cache
    plan = plan_base(ctx)
    key = plan.key
    entry, cached = cache.obtain("rootfs-base", key, lambda staging: _build_into(ctx, cache, plan, staging))
    if cached:
        ctx.reporter.done("rootfs-base", f"Debian base layer from cache ({key[:12]})")
    return BaseLayer(entry, cache.record("rootfs-base", key), cached=cached)


def _build_into(ctx: BuildContext, cache: StepCache, plan: BasePlan, staging: Path) -> None:
    rep = ctx.reporter
    work = cache.work_dir("rootfs-base", plan.key)
    (work / "sandbox/etc/apt/sources.list.d").mkdir(parents=True)
    (work / "sandbox/etc/apt/apt.conf.d").mkdir(parents=True)
    (work / "sandbox/etc/apt/sources.list.d/mkosi.sources").write_text(plan.sources)
    (work / "sandbox/etc/apt/apt.conf.d/50host.conf").write_text(plan.apt_conf)
    pkgcache = cache.root / "mkosi-packages"
    pkgcache.mkdir(parents=True, exist_ok=True)
    conf = (
        plan.conf.replace("@OUTPUT@", str(work / "out"))
        .replace("@SANDBOX@", str(work / "sandbox"))
        .replace("@PKGCACHE@", str(pkgcache))
    )
    (work / "mkosi.conf").write_text(conf)
    log = work / "build.log"
    rep.info("rootfs-base", f"building the Debian base layer with mkosi {plan.mkosi.pin.version} (log: {log})")
    run_logged(
        plan.mkosi.argv("--force", "build"),
        cwd=work,
        env=plan.mkosi.env(),
        log=log,
        reporter=rep,
        step="rootfs-base",
        progress_re=__import__("re").compile(r"^(Get:|Unpacking|Setting up|‣)"),
        hint="read the log; apt errors usually mean the host mirror is unreachable",
    )
    out = work / "out"
    manifest = json.loads((out / "base.manifest").read_text())
    packages = sorted(
        (
            {"name": p["name"], "version": p["version"], "architecture": p["architecture"]}
            for p in manifest.get("packages", [])
        ),
        key=lambda p: p["name"],
    )
    if not any(p["name"] == "python3" for p in packages):
        raise BuildError("the base layer has no python3 package", log=str(log))
    os.rename(out / "base", staging / "tree")
    write_atomic(staging / "packages.json", canonical_json(packages))
    record = {
        "artifact": "rootfs-base",
        "key": plan.key,
        "mkosi": {"version": plan.mkosi.pin.version, "sha256": plan.mkosi.pin.sha256},
        "source_date_epoch": plan.source_date_epoch,
        "packages": len(packages),
    }
    write_atomic(staging / RECORD, canonical_json(record))
    shutil.rmtree(work, ignore_errors=True)
    rep.done("rootfs-base", f"built the Debian base layer: {len(packages)} packages")
