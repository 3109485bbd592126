"""``inv bench --parts latency``: what the CLI and a person feel, each
figure against a baseline measured in the same run.

- a warm ``terminai-shim run -- true``, the whole process, against the
  restore-to-ready that same process reports (``--verbose``);
- ``execute true`` in a held session (``serve``), against the bare protocol
  over a hand-made QEMU, the same agent on the host, and the floor inside
  the guest (``posix_spawn`` and ``waitpid`` of ``/bin/true`` in its Python);
- ``healthCheck`` after the first;
- stdout through ``serve``, against the bare protocol and the rate at which
  the guest itself produces the text (into ``/dev/null``);
- ``initialize`` from a warm pool, against one that restores, and what a
  waiting VM costs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..context import BuildContext
from ..kernel import build_kernel
from ..rootfs.project import agent_pythonpath, build_rootfs
from .measure import SHIM, RawAgent, Serve, summary, text_stream, timed

TARGETS = {
    "warm_run_seconds": 0.5,
    "warm_run_ratio_vs_restore": 2.0,
    "execute_true_p50_seconds": 0.030,
    "health_check_later_seconds": 0.100,
    "stdout_mb_s": 50.0,
    "pool_initialize_seconds": 0.050,
}
STDOUT_BYTES = 20 << 20
# Inside the guest: how long posix_spawn and waitpid of /bin/true take there, with no agent in between.
GUEST_FLOOR = """
import os, statistics, time
samples = []
for _ in range(31):
    start = time.monotonic()
    os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
    samples.append(time.monotonic() - start)
print(statistics.median(samples[1:]))
"""


def bench_latency(ctx: BuildContext, runs: int, work: Path) -> dict[str, Any]:
    kern, root = build_kernel(ctx), build_rootfs(ctx)
    env = dict(os.environ, TERMINAI_CACHE=str(work / "latency-cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    repo = Path(__file__).resolve().parents[3]
    # As an installed wheel is: its modules compiled (a checkout may forbid writing them).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "shim")], check=True, capture_output=True)
    boot = ["--kernel", str(kern.vmlinux), "--rootfs", str(root.image), "--accel", "tcg"]
    subprocess.run([SHIM, "snapshot", "create", *boot], env=env, check=True, capture_output=True)
    params = {"kernel": str(kern.vmlinux), "rootfs": str(root.image), "accel": "tcg", "backend": "qemu"}
    out: dict[str, Any] = {"targets": TARGETS}
    out["warm_run_true"] = _warm_run(boot, env, max(runs, 5))
    out.update(_held_session(params, env, work, repo))
    out["pool"] = _pool(params, env, max(runs, 5))
    w, t = out["warm_run_true"], TARGETS
    out["met"] = {
        "warm_run": w["whole_process"]["median"] <= t["warm_run_seconds"]
        and w["ratio_vs_restore"] <= t["warm_run_ratio_vs_restore"],
        "execute_true": out["execute_true"]["shim"]["median"] <= t["execute_true_p50_seconds"],
        "health_check_later": out["health_check"]["later"]["median"] <= t["health_check_later_seconds"],
        "stdout": out["stdout_mb_s"]["shim"] >= t["stdout_mb_s"],
        "pool_initialize": out["pool"]["initialize_pooled"]["median"] <= t["pool_initialize_seconds"],
    }
    return out


def _warm_run(boot: list[str], env: dict[str, str], runs: int) -> dict[str, Any]:
    whole, ready = [], []
    for _ in range(runs):
        start = time.monotonic()
        done = subprocess.run([SHIM, "run", "--verbose", *boot, "--", "true"], env=env, capture_output=True, text=True)
        whole.append(time.monotonic() - start)
        found = re.search(r"ready in ([0-9.]+)s", done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"warm run failed: {done.stderr[-500:]}")
        ready.append(float(found.group(1)))
    w, r = summary(whole), summary(ready)
    return {"whole_process": w, "restore_to_ready_reported": r, "ratio_vs_restore": w["median"] / r["median"]}


def _held_session(params: dict[str, Any], env: dict[str, str], work: Path, repo: Path) -> dict[str, Any]:
    from terminai_shim.models import BootConfig
    from terminai_shim.parts import AgentClient

    serve = Serve(env)
    serve.call("initialize", **params)
    raw = RawAgent(BootConfig(kernel=Path(params["kernel"]), rootfs=Path(params["rootfs"]), accel="tcg"))
    path = work / "latency-agent.sock"
    agent_env = dict(os.environ, PYTHONPATH=agent_pythonpath(repo))
    agent = subprocess.Popen([sys.executable, "-m", "terminai_agent", f"--channel=unix:{path}"], env=agent_env)
    try:
        while not path.exists():
            time.sleep(0.01)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        host = AgentClient(sock)
        host.hello()
        samples: dict[str, list[float]] = {"shim": [], "bare": [], "host_agent": []}
        for _ in range(60):  # interleaved: drift hits all three alike
            samples["shim"].append(timed(lambda: serve.call("execute", command="true")))
            samples["bare"].append(timed(lambda: raw.run(["true"])))
            samples["host_agent"].append(timed(lambda: host.run(["true"])))
        floor = float(serve.call("execute", command="python3", args=["-c", GUEST_FLOOR])["stdout"])
        first_health = timed(lambda: serve.call("healthCheck"))
        later_health = summary([timed(lambda: serve.call("healthCheck")) for _ in range(20)])
        gen = text_stream(STDOUT_BYTES)
        rates: dict[str, list[float]] = {"shim": [], "bare": [], "guest_alone": []}
        for _ in range(3):
            rates["shim"].append(STDOUT_BYTES / timed(lambda: serve.call(
                "execute", command=gen[0], args=gen[1:], outputCap=STDOUT_BYTES + 1)))  # fmt: skip
            rates["bare"].append(STDOUT_BYTES / timed(lambda: raw.run(gen)))
            rates["guest_alone"].append(STDOUT_BYTES / timed(lambda: serve.call(
                "execute", command="sh", args=["-c", f"{gen[2]} > /dev/null"])))  # fmt: skip
        host.close()
    finally:
        agent.kill()
        agent.wait()
        serve.close()
        raw.close()
    execute = {name: summary(values) for name, values in samples.items()}
    mb = {name: statistics.median(values) / 1e6 for name, values in rates.items()}
    return {
        "execute_true": {**execute, "guest_spawn_floor_seconds": floor},
        "execute_true_ratio_vs_bare": execute["shim"]["median"] / execute["bare"]["median"],
        "health_check": {"first": first_health, "later": later_health},
        "stdout_mb_s": mb,
        "stdout_ratio_vs_guest_alone": mb["shim"] / mb["guest_alone"],
    }


def _pool(params: dict[str, Any], env: dict[str, str], runs: int) -> dict[str, Any]:
    """initialize from a warm pool against an initialize that restores, alternating."""
    pooled, restored = [], []
    with_pool = Serve(env)
    try:
        with_pool.call("pool.warm", params=params)
        status = _ready(with_pool)
        for _ in range(runs):
            start = time.monotonic()
            result = with_pool.call("initialize", **params)
            pooled.append(time.monotonic() - start)
            assert result["pooled"], result
            with_pool.call("dispose")
            status = _ready(with_pool)  # refilled, so that it does not compete with the baseline
            plain = Serve(env)
            restored.append(timed(lambda plain=plain: plain.call("initialize", **params)))
            plain.close()
        record = Path(env["TERMINAI_CACHE"]) / "pool-idle.json"
        deadline = time.monotonic() + 30
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        idle = json.loads(record.read_text()) if record.exists() else None
    finally:
        with_pool.close()
    p, r = summary(pooled), summary(restored)
    return {
        "initialize_pooled": p,
        "initialize_restored": r,
        "pooled_ratio_vs_restored": p["median"] / r["median"],
        "waiting_vm_rss_kib": status["vms"][0].get("rssKib"),
        "idle": idle,
    }


def _ready(serve: Serve, seconds: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status: dict[str, Any] = serve.call("pool.status")
        if status["vms"] and all(vm["ready"] for vm in status["vms"]):
            return status
        time.sleep(0.1)
    raise RuntimeError(f"the pool did not become ready: {status}")
