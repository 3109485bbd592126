"""`inv accept`: the capability corpus (release/capability/tasks.toml) on the
host, in the microVM and in the container, per profile, and the gate that
says isolation took nothing away.

Every tier runs the same bash, in a fresh directory of a workspace shared
with the guest, with the same small environment. A task passes when its
script and then its check exit 0; otherwise the reason is the first of
them that failed, with the last line it wrote. The results go to
``build/accept/results.json`` and a picture, ``results.png``.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import tempfile
import termios
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context import BuildContext
from .errors import BuildError

CORPUS = "release/capability/tasks.toml"
TIERS = ("host", "microvm", "container")
PROFILES = ("minimal", "standard", "full")
GATE_PROFILE = "standard"  # what every everyday task must pass with
FULL_PROFILE = "full"  # what compiler and Node.js tasks must pass with
WINDOW = (100, 30)  # the terminal tasks' size: cols, rows
PAYLOAD = b"served on loopback"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Task:
    id: str
    group: str
    script: str
    check: str
    needs: tuple[str, ...] = ()
    timeout: float = 120.0
    input: str = ""

    @property
    def tty(self) -> bool:
        return "tty" in self.needs


def load_corpus(repo: Path) -> list[Task]:
    data = tomllib.loads((repo / CORPUS).read_text())
    tasks = []
    for raw in data["task"]:
        unknown = set(raw) - {f.name for f in dataclasses.fields(Task)}
        if unknown:
            raise BuildError(f"{CORPUS}: task {raw.get('id')} has unknown keys {sorted(unknown)}")
        tasks.append(Task(**{**raw, "needs": tuple(raw.get("needs", ())), "timeout": float(raw.get("timeout", 120))}))
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise BuildError(f"{CORPUS}: a task id is used twice")
    return tasks


@dataclass(frozen=True)
class Outcome:
    task: str
    tier: str
    profile: str  # "-" on the host
    status: str  # pass | fail | n/a
    reason: str = ""
    seconds: float = 0.0


# -- running a script somewhere ---------------------------------------------------


@dataclass
class Ran:
    code: int
    output: str  # the last non-empty line it wrote, for the reason


# (task, the text to run, the task's directory name, on a terminal?) -> what happened
Runner = Callable[[Task, str, str, bool], Ran]


def _environment(home: str, url: str, task: Task) -> dict[str, str]:
    env = {"HOME": home, "LANG": "C.UTF-8", "PATH": PATH, "ACCEPT_URL": url}
    if "network" in task.needs:  # the guest's NO_PROXY covers its own loopback; the host's is through the proxy
        env.update(NO_PROXY="", no_proxy="")
    if task.tty:
        env["TERM"] = "xterm-256color"
    return env


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def host_runner(workspace: Path, url: str) -> Runner:
    def run(task: Task, text: str, where: str, on_tty: bool) -> Ran:
        cwd = workspace / where
        env = _environment(str(cwd / ".home"), url, task)
        if on_tty:
            return _host_pty(["bash", "-c", text], cwd, env, task)
        try:
            done = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, timeout=task.timeout)
        except subprocess.TimeoutExpired:
            return Ran(124, f"timed out after {task.timeout:.0f} s")
        return Ran(done.returncode, _last_line(done.stderr) or _last_line(done.stdout))

    return run


def _host_pty(argv: list[str], cwd: Path, env: dict[str, str], task: Task) -> Ran:
    """A command on a terminal of its own, as a person would run it."""
    master, slave = pty.openpty()
    cols, rows = WINDOW
    import fcntl

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # fmt: skip
    os.close(slave)
    if task.input:
        os.write(master, task.input.encode())
    seen = b""
    deadline = time.monotonic() + task.timeout
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                seen += os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal closed it; the process is ending
                break
    os.close(master)
    try:
        return Ran(proc.wait(timeout=max(0.1, deadline - time.monotonic())), _last_line(seen))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return Ran(124, f"timed out after {task.timeout:.0f} s")


def guest_runner(session: Any, guest_root: str, url: str) -> Runner:
    from terminai_shim.errors import ShimError
    from terminai_shim.parts import Pty

    def run(task: Task, text: str, where: str, on_tty: bool) -> Ran:
        cwd = f"{guest_root}/{where}"
        env = _environment(f"{cwd}/.home", url, task)
        try:
            status, out, err = session.client.run(
                ["bash", "-c", text], cwd=cwd, env=env, timeout=task.timeout,
                pty=Pty(*WINDOW) if on_tty else None, stdin=task.input.encode() if on_tty else b"",
            )  # fmt: skip
        except ShimError as exc:
            return Ran(125, f"{exc.code}: {exc.message}"[:200])
        if status.timed_out:
            return Ran(124, f"timed out after {task.timeout:.0f} s")
        return Ran(status.exit_code, _last_line(err) or _last_line(out))

    return run


def run_task(task: Task, runner: Runner, workspace: Path, tier: str, profile: str) -> Outcome:
    where = task.id
    directory = workspace / where
    shutil.rmtree(directory, ignore_errors=True)
    (directory / ".home").mkdir(parents=True)
    start = time.monotonic()
    done = runner(task, task.script, where, task.tty)
    if done.code == 0:
        checked = runner(task, task.check, where, False)
        status, reason = ("pass", "") if checked.code == 0 else ("fail", f"check failed: {checked.output}")
    else:
        status, reason = "fail", f"exit {done.code}: {done.output}"
    outcome = Outcome(task.id, tier, profile, status, reason, round(time.monotonic() - start, 2))
    shutil.rmtree(directory, ignore_errors=True)
    return outcome


# -- the tiers -------------------------------------------------------------------------


@contextmanager
def loopback_server() -> Iterator[str]:
    """What the network tasks download: a file on the host's loopback only."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/payload.txt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Plan:
    tiers: tuple[str, ...] = TIERS
    profiles: tuple[str, ...] = PROFILES
    only: tuple[str, ...] = ()  # task ids (empty: every task)
    # Per profile, the tasks to run there (empty: every task); the gate test
    # runs `full` only for what needs it.
    profile_tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Tasks left out of the microVM (the gate test's: npm and pip take minutes under TCG).
    not_in_microvm: tuple[str, ...] = ()


def _selected(tasks: list[Task], plan: Plan, profile: str, tier: str = "host") -> list[Task]:
    chosen = [t for t in tasks if not plan.only or t.id in plan.only]
    if tier == "microvm":
        chosen = [t for t in chosen if t.id not in plan.not_in_microvm]
    wanted = plan.profile_tasks.get(profile)
    return [t for t in chosen if not wanted or t.id in wanted]


def _by_git_access(tasks: list[Task]) -> list[tuple[bool, list[Task]]]:
    """The tasks in the tier's default session, then those that commit in a
    session with a writable git (``writable-git``), each group only if it has tasks."""
    default = [t for t in tasks if "writable-git" not in t.needs]
    writable = [t for t in tasks if "writable-git" in t.needs]
    return [(w, group) for w, group in ((False, default), (True, writable)) if group]


def run_accept(ctx: BuildContext, plan: Plan, progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    from terminai_shim.models import BootConfig, NetworkPolicy, RootLayer
    from terminai_shim.session import Session

    from .container import build_container
    from .kernel import build_kernel
    from .rootfs.layer import build_layer
    from .rootfs.project import build_rootfs
    from .rootfs.stack import load_stack

    tasks = load_corpus(ctx.repo)
    stack = load_stack(ctx.repo)
    outcomes: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if progress:
            progress(outcome)

    with tempfile.TemporaryDirectory(prefix="terminai-accept-") as tmp, loopback_server() as url:
        workspace = Path(tmp) / "workspace"
        workspace.mkdir()
        if "host" in plan.tiers:
            runner = host_runner(workspace, url)
            for task in _selected(tasks, plan, "-"):
                record(run_task(task, runner, workspace, "host", "-"))
        if "microvm" in plan.tiers:
            kern, root = build_kernel(ctx), build_rootfs(ctx)
            port = url.rsplit(":", 1)[1]
            for profile in plan.profiles:
                layers = tuple(RootLayer(n, build_layer(ctx, n).image) for n in stack.profile(profile))
                config = BootConfig(kernel=kern.vmlinux, rootfs=root.image, layers=layers, profile=profile,
                                    workspace=workspace, network=NetworkPolicy("allowlist", (f"127.0.0.1:{port}",)),
                                    memory_mib=1024)  # fmt: skip
                chosen = _selected(tasks, plan, profile, "microvm")
                for writable, group in _by_git_access(chosen):
                    session = Session.boot(dataclasses.replace(config, writable_git=writable))
                    try:
                        runner = guest_runner(session, config.workspace_mount, url)
                        for task in group:
                            record(run_task(task, runner, workspace, "microvm", profile))
                    finally:
                        session.close()
        if "container" in plan.tiers:
            image = build_container(ctx)
            for profile in plan.profiles:
                config = BootConfig(backend="container", image=image.archive,
                                    image_sha256=image.record["outputs"]["archive"]["sha256"], profile=profile,
                                    workspace=workspace, memory_mib=1024)  # fmt: skip
                for writable, group in _by_git_access(_selected(tasks, plan, profile)):
                    session = Session.boot(dataclasses.replace(config, writable_git=writable))
                    try:
                        runner = guest_runner(session, config.workspace_mount, url)
                        for task in group:
                            if "network" in task.needs:
                                record(Outcome(task.id, "container", profile, "n/a",
                                               "the container tier has no allowlist networking"))  # fmt: skip
                                continue
                            record(run_task(task, runner, workspace, "container", profile))
                    finally:
                        session.close()
    return outcomes


# -- the gate ----------------------------------------------------------------------------


def gate(tasks: list[Task], outcomes: list[Outcome], tiers: tuple[str, ...] = ("microvm", "container")) -> list[str]:
    """What isolation took away: each task that passed on the host must pass
    in every tier with ``standard`` (with ``full`` when it needs a compiler
    or Node.js). A network task is held to the microVM only: the container
    tier has no allowlist networking. Each missing or failed result is a
    violation, named with its reason."""
    found = {(o.task, o.tier, o.profile): o for o in outcomes}
    violations = []
    for task in tasks:
        host = found.get((task.id, "host", "-"))
        if host is None or host.status != "pass":
            continue
        profile = FULL_PROFILE if {"compiler", "node"} & set(task.needs) else GATE_PROFILE
        for tier in tiers:
            if tier == "container" and "network" in task.needs:
                continue
            got = found.get((task.id, tier, profile))
            if got is None:
                violations.append(f"{task.id}: no result in the {tier} with {profile}")
            elif got.status != "pass":
                violations.append(f"{task.id}: passes on the host, {got.status} in the {tier} with {profile}: "
                                  f"{got.reason}")  # fmt: skip
    return violations


def write_results(path: Path, tasks: list[Task], outcomes: list[Outcome], violations: list[str]) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "tasks": [{"id": t.id, "group": t.group, "needs": list(t.needs)} for t in tasks],
        "results": [dataclasses.asdict(o) for o in outcomes],
        "gate": {"violations": violations, "passed": not violations},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return doc


def plot(doc: dict[str, Any], path: Path) -> None:
    """The table as a picture: a row per task, a column per tier and profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({(r["tier"], r["profile"]) for r in doc["results"]},
                     key=lambda c: (TIERS.index(c[0]), (*PROFILES, "-").index(c[1])))  # fmt: skip
    tasks = [t["id"] for t in doc["tasks"]]
    status = {(r["task"], r["tier"], r["profile"]): r["status"] for r in doc["results"]}
    value = {"pass": 2, "fail": 0, "n/a": 1}
    grid = [[value.get(status.get((t, *c), ""), -1) for c in columns] for t in tasks]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(columns), 0.22 * len(tasks) + 1.5))
    cmap = matplotlib.colors.ListedColormap(["#ffffff", "#d9534f", "#cccccc", "#5cb85c"])
    ax.imshow(grid, cmap=cmap, vmin=-1.5, vmax=2.5, aspect="auto")
    ax.set_xticks(range(len(columns)), [f"{t}\n{p}" for t, p in columns], fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
    verdict = "gate passed" if doc["gate"]["passed"] else f"gate: {len(doc['gate']['violations'])} violations"
    ax.set_title(f"capability corpus: green pass, red fail, grey n/a ({verdict})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
