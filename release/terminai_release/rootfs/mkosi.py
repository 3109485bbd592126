"""The pinned mkosi: fetched as a .deb from the host's own mirror, checked by
sha256, unpacked (not installed: its package would drag in a newer systemd)
and run with the host's python3.

Debian 12's own mkosi (v14) is not reproducible; 25.x from the next Debian
release is pure Python and runs here unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import RECORD, StepCache, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_bytes, sha256_file
from ..errors import BuildError
from ..proc import run_logged
from .aptsources import host_acquire_options, host_mirrors

HOST_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class MkosiPin:
    package: str
    version: str
    suite: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version}_all.deb"


def load_pin(path: Path) -> MkosiPin:
    data = tomllib.loads(path.read_text())["mkosi"]
    return MkosiPin(data["package"], data["version"], data["suite"], data["sha256"].lower(), int(data["size"]))


@dataclass(frozen=True)
class Mkosi:
    root: Path  # the unpacked package
    pin: MkosiPin

    @property
    def pythonpath(self) -> Path:
        return self.root / "usr/lib/python3/dist-packages"

    def argv(self, *args: str) -> list[str]:
        return [HOST_PYTHON, "-m", "mkosi", *args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PYTHONPATH"] = str(self.pythonpath)
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return env


def ensure_mkosi(cache: StepCache, pin: MkosiPin) -> Mkosi:
    entry = cache.root / "tools" / f"mkosi-{pin.sha256[:16]}"
    if (entry / ".complete").is_file():
        return Mkosi(entry, pin)
    with cache.lock("tools", f"mkosi-{pin.sha256[:16]}"):
        if (entry / ".complete").is_file():
            return Mkosi(entry, pin)
        deb = _download(cache, pin)
        tmp = entry.with_name(entry.name + ".staging")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        (tmp / ".complete").write_text(pin.sha256 + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
    return Mkosi(entry, pin)


def _download(cache: StepCache, pin: MkosiPin) -> Path:
    apt = cache.root / "tools" / f"apt-{pin.suite}"
    target = apt / pin.filename
    if target.is_file() and sha256_file(target) == pin.sha256:
        return target
    for d in ("lists/partial", "archives/partial", "etc/sources.list.d", "etc/apt.conf.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    mirrors = host_mirrors()
    (apt / "etc/sources.list.d/tools.sources").write_text(
        mirrors.sources(pin.suite, with_security=False).replace(
            f"Suites: {pin.suite} {pin.suite}-updates", f"Suites: {pin.suite}"
        )
    )
    (apt / "etc/apt.conf.d/host.conf").write_text(host_acquire_options())
    opts = [
        "-oDir::Etc::SourceList=/dev/null",
        f"-oDir::Etc::SourceParts={apt}/etc/sources.list.d",
        f"-oDir::Etc::Parts={apt}/etc/apt.conf.d",
        f"-oDir::State::Lists={apt}/lists",
        f"-oDir::Cache={apt}",
        "-oDir::State::Status=/dev/null",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=root",
    ]
    for args in (["update"], ["download", f"{pin.package}={pin.version}"]):
        proc = subprocess.run(["apt-get", *opts, *args], cwd=apt, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(
                f"cannot fetch {pin.filename} from the {pin.suite} suite: {proc.stderr.strip()[-500:]}",
                hint="check that apt-get works on this host; the mirror comes from /etc/apt",
            )
    actual = sha256_file(target)
    if actual != pin.sha256 or target.stat().st_size != pin.size:
        target.unlink()
        raise BuildError(
            f"{pin.filename} has sha256 {actual}, but images/rootfs/mkosi.toml pins {pin.sha256}",
            hint="the mirror served different bytes; if a new mkosi is intended, update the pin",
        )
    return target


@dataclass(frozen=True)
class TreePlan:
    """One mkosi build of a full tree: the base, or a layer on the full tree
    below it. The rendered configuration holds every input but the
    machine-local paths (``@OUTPUT@``, ``@SANDBOX@``, ``@PKGCACHE@``,
    ``@LOWER@``), so its digest, with the lower tree's key, is the key."""

    step: str  # the cache step: rootfs-base, rootfs-layer-<name>
    title: str  # for messages: "the Debian base layer"
    conf: str
    sources: str
    apt_conf: str
    mkosi: Mkosi
    source_date_epoch: int
    lower: FullTree | None = None

    @property
    def key(self) -> str:
        return digest_inputs(
            {
                "recipe": TREE_RECIPE,
                "conf": sha256_bytes(self.conf.encode()),
                "sources": sha256_bytes(self.sources.encode()),
                "apt_conf": sha256_bytes(self.apt_conf.encode()),
                "mkosi": self.mkosi.pin.sha256,
                "lower": self.lower.key if self.lower else None,
            }
        )


TREE_RECIPE = 2
_PROGRESS = re.compile(r"^(Get:|Unpacking|Setting up|‣)")


@dataclass(frozen=True)
class FullTree:
    """A cached full tree: the installed system with its package database."""

    directory: Path
    record: dict[str, Any]
    cached: bool

    @property
    def key(self) -> str:
        return str(self.record["key"])

    @property
    def tree(self) -> Path:
        return self.directory / "tree"


def build_tree(ctx: BuildContext, cache: StepCache, plan: TreePlan) -> FullTree:
    key = plan.key
    entry, cached = cache.obtain(plan.step, key, lambda staging: _build_tree_into(ctx, cache, plan, key, staging))
    if cached:
        ctx.reporter.done(plan.step, f"{plan.title} from cache ({key[:12]})")
    return FullTree(entry, cache.record(plan.step, key), cached=cached)


def _build_tree_into(ctx: BuildContext, cache: StepCache, plan: TreePlan, key: str, staging: Path) -> None:
    rep = ctx.reporter
    work = cache.work_dir(plan.step, key)
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
        .replace("@LOWER@", str(plan.lower.tree) if plan.lower else "")
    )
    (work / "mkosi.conf").write_text(conf)
    log = work / "build.log"
    rep.info(plan.step, f"building {plan.title} with mkosi {plan.mkosi.pin.version} (log: {log})")
    run_logged(
        plan.mkosi.argv("--force", "build"), cwd=work, env=plan.mkosi.env(), log=log, reporter=rep,
        step=plan.step, progress_re=_PROGRESS,
        hint="read the log; apt errors usually mean the host mirror is unreachable",
    )  # fmt: skip
    out = work / "out"
    # mkosi's manifest names what this build installed: the whole system for
    # the base, the new packages for a layer. (The SBOMs come from the dpkg
    # database of the finished trees: ``finish``.)
    packages = json.loads((out / "tree.manifest").read_text()).get("packages", [])
    if plan.lower is None and not any(p["name"] == "python3" for p in packages):
        raise BuildError(f"{plan.title} has no python3 package", log=str(log))
    os.rename(out / "tree", staging / "tree")
    record = {
        "artifact": plan.step,
        "key": key,
        "lower": plan.lower.key if plan.lower else None,
        "mkosi": {"version": plan.mkosi.pin.version, "sha256": plan.mkosi.pin.sha256},
        "source_date_epoch": plan.source_date_epoch,
        "packages": len(packages),
    }
    write_atomic(staging / RECORD, canonical_json(record))
    shutil.rmtree(work, ignore_errors=True)
    rep.done(plan.step, f"built {plan.title}: {len(packages)} packages")
