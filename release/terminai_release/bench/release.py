"""``inv bench --parts release``: the path the CLI really takes, a signed
release, against ``docker run --rm`` of the same profile's image on the same
machine, alternated in one run.

- ``terminai-shim run --manifest <release> --dev -- true`` on the microVM
  (warm: restored from the snapshot), through the Python package and the
  standalone shim, and on the container tier;
- ``docker run --rm --network none --entrypoint /bin/true <image>``, the
  yardstick, with the image the release's archive loads for that profile;
- ``serve``'s ``initialize`` of the release (restored from the snapshot,
  and handed over from the warm pool), each with the first ``execute``
  after it;
- the cold imports of ``run``, ``serve`` and ``--version`` as ``python -X
  importtime`` lists them, with their total.

The first run of each verifies the release in full and saves the VM; what
is timed is every run after that, the one a user repeats.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..context import BuildContext
from .measure import SHIM, Serve, summary, timed

TARGETS = {
    "microvm_run_vs_docker": 1.5,
    "container_run_vs_docker": 1.2,
    "pool_initialize_seconds": 0.050,
    "first_execute_seconds": 0.030,
}
PROFILE = "minimal"


def bench_release(ctx: BuildContext, runs: int, work: Path) -> dict[str, Any]:
    from ..container import build_container
    from ..container.build import load_into_engine
    from ..release import build_release, sign_release
    from ..standalone import build_standalone

    rel = build_release(ctx, channel="dev")
    sign_release(ctx, rel)
    directory = rel.manifest_path.parent
    image = build_container(ctx)
    load_into_engine(image)
    image_id = image.images[PROFILE]
    standalone = build_standalone(ctx).executable
    env = dict(os.environ, TERMINAI_CACHE=str(work / "release-cache"))
    common = ["run", "--manifest", str(directory), "--dev", "--profile", PROFILE]
    commands = {
        "docker_run_rm": ["docker", "run", "--rm", "--network", "none", "--entrypoint", "/bin/true", image_id],
        "microvm_run": [SHIM, *common, "--backend", "qemu", "--", "true"],
        "microvm_run_standalone": [str(standalone), *common, "--backend", "qemu", "--", "true"],
        "container_run": [SHIM, *common, "--backend", "container", "--", "true"],
    }
    for argv in commands.values():  # verify once, save the VM, load the image: then what a user repeats
        subprocess.run(argv, env=env, check=True, capture_output=True)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(max(runs, 7)):
        for name, argv in commands.items():
            times[name].append(timed(lambda argv=argv: subprocess.run(argv, env=env, check=True, capture_output=True)))
    out: dict[str, Any] = {name: summary(samples) for name, samples in times.items()}
    docker = out["docker_run_rm"]["median"]
    out["ratio_vs_docker"] = {name: out[name]["median"] / docker for name in commands if name != "docker_run_rm"}
    out["targets"] = TARGETS
    out["serve"] = _serve(directory, env, max(runs, 5))
    out["met"] = {
        "microvm_run": out["ratio_vs_docker"]["microvm_run"] <= TARGETS["microvm_run_vs_docker"],
        "container_run": out["ratio_vs_docker"]["container_run"] <= TARGETS["container_run_vs_docker"],
        "pool_initialize": out["serve"]["initialize_pooled"]["median"] <= TARGETS["pool_initialize_seconds"],
        "first_execute": out["serve"]["first_execute_pooled"]["median"] <= TARGETS["first_execute_seconds"],
    }
    out["imports"] = {
        "run": _import_times([*common, "--backend", "qemu", "--", "true"], env),
        "serve": _import_times(["serve"], env, stdin=b""),
        "version": _import_times(["--version"], env),
    }
    return out


def _serve(directory: Path, env: dict[str, str], runs: int) -> dict[str, Any]:
    """``initialize`` of the signed release and the first ``execute`` after it:
    restored (a new ``serve`` each time) and from the warm pool (one ``serve``
    that keeps a VM waiting), alternated."""
    from .latency import _ready

    params = {"manifest": str(directory), "dev": True, "profile": PROFILE, "backend": "qemu"}
    times: dict[str, list[float]] = {k: [] for k in ("initialize_restored", "first_execute_restored",
                                                      "initialize_pooled", "first_execute_pooled")}  # fmt: skip
    pool = Serve(env)
    try:
        pool.call("pool.warm", params=params)
        _ready(pool)
        for _ in range(runs):
            plain = Serve(env)
            times["initialize_restored"].append(timed(lambda plain=plain: plain.call("initialize", **params)))
            times["first_execute_restored"].append(timed(lambda plain=plain: plain.call("execute", command="true")))
            plain.close()
            start = time.monotonic()
            assert pool.call("initialize", **params)["pooled"]
            times["initialize_pooled"].append(time.monotonic() - start)
            times["first_execute_pooled"].append(timed(lambda: pool.call("execute", command="true")))
            pool.call("dispose")
            _ready(pool)
    finally:
        pool.close()
    return {name: summary(samples) for name, samples in times.items()}


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _import_times(args: list[str], env: dict[str, str], stdin: bytes | None = None) -> dict[str, Any]:
    """What ``python -X importtime`` says one shim command imports: the total
    and the ten costliest top-level imports (cumulative microseconds)."""
    code = "import sys; from terminai_shim.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-X", "importtime", "-c", code, *args]
    done = subprocess.run(argv, env=env, input=stdin, capture_output=True)
    total, top = 0, []
    for line in done.stderr.decode(errors="replace").splitlines():
        m = _IMPORT_LINE.match(line)
        if m:
            total += int(m[1])
            if len(m[3]) == 1:  # a top-level import
                top.append((int(m[2]), m[4]))
    top.sort(reverse=True)
    return {"total_ms": total / 1000, "modules_top": [{"module": n, "ms": c / 1000} for c, n in top[:10]]}
