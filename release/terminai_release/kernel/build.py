"""Build the guest kernel, reproducibly and cached by the digest of its inputs.

Inputs: the verified source tarball, the fragments (in merge order), the
config version, the architecture, the toolchain versions and the source date.
Outputs in the cache entry: ``vmlinux-<name>`` (PVH direct boot),
``bzImage-<name>``, ``config-<name>`` and ``build-record.json``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_shim.layout import kernel_file

from ..cache import RECORD, StepCache, StepOutputs, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_file
from ..errors import BuildError
from ..proc import run_logged, tool_version
from ..sde import source_date_epoch
from .fragments import Fragment, check_known, dropped_settings, known_symbols, load_fragments, read_config
from .source import KernelSource, fetch_source, load_source
from .versions import current_version

# Bump when the build procedure itself changes in a way that changes bytes.
RECIPE = 1
KBUILD_USER = "terminai"
KBUILD_HOST = "terminai-build"
_MAKE_PROGRESS = re.compile(r"^\s+(CC|AS|LD|AR|OBJCOPY|GEN|HOSTCC)\s")
_KARCH = {"x86_64": "x86_64"}
_BZIMAGE = {"x86_64": "arch/x86/boot/bzImage"}


@dataclass(frozen=True)
class KernelPlan:
    source: KernelSource
    fragments: list[Fragment]
    config_version: int
    arch: str
    toolchain: dict[str, str]
    source_date_epoch: int

    @property
    def name(self) -> str:
        return f"{self.source.kernel_version}-tai{self.config_version}"

    def inputs(self) -> dict[str, Any]:
        return {
            "recipe": RECIPE,
            "source": self.source.identity(),
            "fragments": [[f.name, f.sha256] for f in self.fragments],
            "config_version": self.config_version,
            "arch": self.arch,
            "toolchain": self.toolchain,
            "source_date_epoch": self.source_date_epoch,
        }

    @property
    def key(self) -> str:
        return digest_inputs(self.inputs())


@dataclass(frozen=True)
class KernelArtifacts(StepOutputs):
    @property
    def vmlinux(self) -> Path:
        return self.output("vmlinux")

    @property
    def bzimage(self) -> Path:
        return self.output("bzImage")


def plan_kernel(ctx: BuildContext, arch: str = "x86_64") -> KernelPlan:
    if arch not in _KARCH:
        raise BuildError(f"unsupported architecture {arch}", hint=f"choose one of {sorted(_KARCH)}")
    config_dir = ctx.repo / "kernel-config"
    return KernelPlan(
        source=load_source(config_dir / "source.toml"),
        fragments=load_fragments(config_dir, arch),
        config_version=current_version(config_dir),
        arch=arch,
        toolchain={
            "cc": tool_version(["gcc", "--version"]),
            "ld": tool_version(["ld", "--version"]),
            "make": tool_version(["make", "--version"]),
        },
        source_date_epoch=source_date_epoch(ctx.repo, "kernel-config"),
    )


def build_kernel(ctx: BuildContext, arch: str = "x86_64", *, cache: StepCache | None = None) -> KernelArtifacts:
    """Return the kernel for the current inputs, building it only if not cached."""
    cache = cache or ctx.cache
    plan = plan_kernel(ctx, arch)
    key = plan.key
    entry, cached = cache.obtain("kernel", key, lambda staging: _build_into(ctx, cache, plan, staging))
    if cached:
        ctx.reporter.done("kernel", f"linux {plan.name} from cache ({key[:12]})")
    return KernelArtifacts(entry, cache.record("kernel", key), cached=cached)


def _build_into(ctx: BuildContext, cache: StepCache, plan: KernelPlan, staging: Path) -> None:
    rep = ctx.reporter
    work = cache.work_dir("kernel", plan.key)
    src = work / "src"
    src.mkdir(parents=True)
    log = work / "build.log"

    rep.info("kernel", f"verifying source {plan.source.kind} {plan.source.kernel_version}")
    tarball = fetch_source(plan.source, cache)
    rep.info("kernel", "extracting source")
    run_logged(
        ["tar", "-xf", str(tarball), "-C", str(src), "--strip-components=1"], log=log, reporter=rep, step="kernel"
    )
    check_known(plan.fragments, known_symbols(src))

    karch = _KARCH[plan.arch]
    env = _build_env(plan)
    make = ["make", f"ARCH={karch}", f"LOCALVERSION=-tai{plan.config_version}"]
    rep.info("kernel", "configuring: tinyconfig + fragments")
    run_logged([*make, "tinyconfig"], cwd=src, env=env, log=log, reporter=rep, step="kernel")
    run_logged(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", *(str(f.path) for f in plan.fragments)],
        cwd=src,
        env=env,
        log=log,
        reporter=rep,
        step="kernel",
    )
    run_logged([*make, "olddefconfig"], cwd=src, env=env, log=log, reporter=rep, step="kernel")
    dropped = dropped_settings(plan.fragments, read_config(src / ".config"))
    if dropped:
        lines = [
            f"  {s.fragment}:{s.line}: CONFIG_{s.symbol}={s.value} became {'unset' if v == 'n' else v}"
            for s, v in dropped
        ]
        raise BuildError(
            "requested kernel options did not survive olddefconfig (a dependency is missing):\n" + "\n".join(lines),
            log=str(log),
            hint="add the missing dependency to the fragment; `make menuconfig` in the kept tree shows it",
        )

    rep.info("kernel", f"compiling with {ctx.jobs} jobs (log: {log})")
    run_logged(
        [*make, f"-j{ctx.jobs}", "bzImage", "vmlinux"],
        cwd=src,
        env=env,
        log=log,
        reporter=rep,
        step="kernel",
        progress_re=_MAKE_PROGRESS,
        hint="read the log; a compiler error usually means a bad option combination",
    )

    outputs: dict[str, dict[str, Any]] = {}
    for output, rel in (("vmlinux", "vmlinux"), ("bzImage", _BZIMAGE[plan.arch]), ("config", ".config")):
        name = kernel_file(plan.name) if output == "vmlinux" else f"{output}-{plan.name}"
        shutil.copyfile(src / rel, staging / name)
        outputs[output] = {"file": name, "sha256": sha256_file(staging / name), "size": (staging / name).stat().st_size}
    release = subprocess.run(
        ["make", "-s", f"ARCH={karch}", f"LOCALVERSION=-tai{plan.config_version}", "kernelrelease"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    record = {
        "artifact": "kernel",
        "name": f"linux-{plan.name}",
        "kernel_release": release,
        "key": plan.key,
        "inputs": plan.inputs(),
        "fragments": {f.name: f.sha256 for f in plan.fragments},
        "outputs": outputs,
    }
    write_atomic(staging / RECORD, canonical_json(record))
    shutil.rmtree(work, ignore_errors=True)
    rep.done(
        "kernel",
        f"built linux {release}: vmlinux {outputs['vmlinux']['size']} B, bzImage {outputs['bzImage']['size']} B",
    )


def _build_env(plan: KernelPlan) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "KBUILD_BUILD_TIMESTAMP": time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(plan.source_date_epoch)),
            "KBUILD_BUILD_USER": KBUILD_USER,
            "KBUILD_BUILD_HOST": KBUILD_HOST,
            "KBUILD_BUILD_VERSION": "1",
            "LC_ALL": "C",
            "TZ": "UTC",
        }
    )
    env.pop("KCONFIG_CONFIG", None)
    return env
