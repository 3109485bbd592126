"""The capability gate: with isolation on, the agent still does what it does
on the host (release/capability/tasks.toml, `inv accept`).

The whole corpus under TCG takes long (a `python3 -m venv` alone installs
pip for minutes), so CI runs a representative part: every task on the host,
and in both tiers one or more tasks of every group with `standard`, the
compiler and Node.js tasks with `full`; the two slowest under TCG (an npm
project, 86 s; a pip install, 47 s) in the container only. `inv accept`
runs all of it in both.
"""

from __future__ import annotations

import json

import pytest
from terminai_release.accept import Outcome, Plan, Task, gate, load_corpus, plot, run_accept, write_results

REPO_TASKS = load_corpus(__import__("pathlib").Path(__file__).resolve().parents[1])
# One or more of every group, chosen for what broke before: tools missing
# from the base image, and the 9p workspace (WAL, mmap, FIFOs, sockets, locks).
REPRESENTATIVE = (
    "sed-in-place", "diff-and-patch", "perl-one-liner", "grep-recursive", "find-exec-xargs", "file-type",
    "tree-listing", "git-branch-merge", "python-csv-script", "pip-install-local-package",
    "python-sqlite-wal", "python-shared-mmap", "tar-xz", "zip-unzip", "bzip2", "jq-filter", "sha256sum-check",
    "ip-addresses", "time-zones", "utf8-file-names", "processes", "less-pager-batch", "fifo", "unix-socket",
    "flock", "rename-over-open", "curl-download", "wget-download", "prompt-reads-a-line", "isatty", "window-size",
)  # fmt: skip
NEEDS_FULL = tuple(t.id for t in REPO_TASKS if {"compiler", "node"} & set(t.needs))
# Of those, CI runs C, make, a Python extension (with pkg-config), node and npm (C++ alone takes 17 s under TCG).
FULL_IN_CI = ("c-hello", "make-project", "python-c-extension", "node-eval", "npm-run-script")
SLOW_UNDER_TCG = ("npm-run-script", "pip-install-local-package")


@pytest.mark.unit
def test_the_corpus_covers_every_day_work():
    groups = {t.group for t in REPO_TASKS}
    assert len(REPO_TASKS) >= 60
    assert {"edit", "search", "git", "python", "build", "node", "archive", "data", "system", "workspace", "network",
            "terminal"} <= groups  # fmt: skip
    assert {t.group for t in REPO_TASKS if t.id in REPRESENTATIVE} | {"build", "node"} == groups
    assert set(REPRESENTATIVE) | set(FULL_IN_CI) <= {t.id for t in REPO_TASKS} and set(FULL_IN_CI) <= set(NEEDS_FULL)


@pytest.mark.unit
def test_the_gate_names_what_isolation_took_away():
    tasks = [Task("plain", "g", "true", "true"), Task("cc", "build", "true", "true", needs=("compiler",)),
             Task("net", "network", "true", "true", needs=("network",)), Task("hostfail", "g", "x", "x")]  # fmt: skip
    ok = [Outcome("plain", "host", "-", "pass"), Outcome("cc", "host", "-", "pass"),
          Outcome("net", "host", "-", "pass"), Outcome("hostfail", "host", "-", "fail", "no such tool"),
          Outcome("plain", "microvm", "standard", "pass"), Outcome("plain", "container", "standard", "pass"),
          Outcome("cc", "microvm", "full", "pass"), Outcome("cc", "container", "full", "pass"),
          Outcome("net", "microvm", "standard", "pass"), Outcome("net", "container", "standard", "n/a")]  # fmt: skip
    assert gate(tasks, ok) == []
    broken = [o for o in ok if (o.task, o.tier) != ("cc", "container")]
    broken.append(Outcome("plain", "microvm", "minimal", "fail"))  # minimal is not held to anything
    broken[4] = Outcome("plain", "microvm", "standard", "fail", "exit 127: git: not found")
    assert gate(tasks, broken) == [
        "plain: passes on the host, fail in the microvm with standard: exit 127: git: not found",
        "cc: no result in the container with full",
    ]


@pytest.mark.unit
def test_every_task_passes_on_this_host(ctx, tmp_path):
    """The baseline: bootstrap.sh installs what the corpus uses, so a task
    that fails here is a broken task, never a silently smaller gate."""
    outcomes = run_accept(ctx, Plan(tiers=("host",)))
    failed = [f"{o.task}: {o.reason}" for o in outcomes if o.status != "pass"]
    assert len(outcomes) == len(REPO_TASKS) and not failed, failed


@pytest.mark.vm
def test_the_capability_gate_holds_in_the_microvm_and_the_container(ctx, docker_engine, tmp_path):
    plan = Plan(tiers=("host", "microvm", "container"), profiles=("standard", "full"),
                only=REPRESENTATIVE + FULL_IN_CI, profile_tasks={"standard": REPRESENTATIVE, "full": FULL_IN_CI},
                not_in_microvm=SLOW_UNDER_TCG)  # fmt: skip
    outcomes = run_accept(ctx, plan)
    chosen = [t for t in REPO_TASKS if t.id in plan.only]
    violations = gate([t for t in chosen if t.id not in SLOW_UNDER_TCG], outcomes) + gate(
        [t for t in chosen if t.id in SLOW_UNDER_TCG], outcomes, ("container",)
    )
    doc = write_results(tmp_path / "results.json", chosen, outcomes, violations)
    plot(doc, tmp_path / "results.png")
    assert json.loads((tmp_path / "results.json").read_text())["gate"]["passed"] == (not violations)
    # Not vacuous: the gate holds a task to the tiers only if it passed on the host in this run.
    assert {o.task for o in outcomes if o.tier == "host" and o.status == "pass"} == set(plan.only)
    assert not violations, "\n".join(violations)
