"""Reproducibility check: build again from clean, in a separate cache and a
different directory, and compare the bytes with the cached build.

The cached build was itself a clean build (every build starts from an empty
work directory), so one more build proves two clean builds agree.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import StepCache
from .context import BuildContext


@dataclass(frozen=True)
class ReproResult:
    artifact: str
    first: dict[str, str]
    second: dict[str, str]

    @property
    def identical(self) -> bool:
        return self.first == self.second

    def describe(self) -> str:
        lines = [f"{self.artifact}: {'identical' if self.identical else 'DIFFERENT'}"]
        for name in sorted(set(self.first) | set(self.second)):
            a, b = self.first.get(name), self.second.get(name)
            lines.append(f"  {name}: {a}" + ("" if a == b else f" != {b}"))
        return "\n".join(lines)


def _digests(record: dict[str, object], names: tuple[str, ...]) -> dict[str, str]:
    outputs = record["outputs"]
    assert isinstance(outputs, dict)
    return {n: str(outputs[n]["sha256"]) for n in names}


def check(ctx: BuildContext, artifact: str, scratch: Path | None = None, reuse: tuple[str, ...] = ()) -> ReproResult:
    """``reuse``: cache steps whose entries the second build takes from the
    first cache instead of building them again (the test suite's shortcut
    for a layer: its mkosi trees, built by the same code as the base's tree,
    whose reproducibility the root image's check proves from clean)."""
    from .container import build_container
    from .errors import BuildError
    from .kernel import build_kernel
    from .rootfs.layer import build_layer
    from .rootfs.project import build_rootfs
    from .rootfs.stack import load_stack
    from .standalone import build_standalone

    builders = {
        "kernel": (lambda cache: build_kernel(ctx, cache=cache).record, ("vmlinux", "bzImage", "config")),
        "rootfs": (lambda cache: build_rootfs(ctx, cache=cache).record, ("image", "sbom")),
        "container": (lambda cache: build_container(ctx, cache=cache).record, ("archive",)),
        "shim-dist": (lambda cache: build_standalone(ctx, cache=cache).record, ("archive", "npmPackage")),
    }
    for name in load_stack(ctx.repo).layers:  # the base's and the layer's trees are built again too
        builders[f"layer-{name}"] = (lambda cache, n=name: build_layer(ctx, n, cache=cache).record, ("image", "sbom"))
    if artifact not in builders:
        raise BuildError(f"unknown artifact {artifact!r}", hint=f"choose one of {', '.join(builders)}")
    build, names = builders[artifact]
    first = _digests(build(ctx.cache), names)
    root = Path(tempfile.mkdtemp(prefix=f"repro-{artifact}-", dir=scratch))
    try:
        clean = StepCache(root / "cache")
        clean.link_from(ctx.cache, reuse)
        second = _digests(build(clean), names)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return ReproResult(artifact, first, second)
