"""`terminai-shim serve`: faults, bad input and lifecycle, with real VMs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from shimproc import SHIM, ShimProc

pytestmark = pytest.mark.vm


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def qemu_of(shim: ShimProc) -> int:
    for kid in children(shim.proc.pid):
        if b"qemu-system" in Path(f"/proc/{kid}/cmdline").read_bytes():
            return kid
    raise AssertionError("no QEMU child")


def gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def runtime_dir_of(qemu_pid: int) -> Path:
    cmd = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().split(b"\0")
    sock = next(a for a in cmd if a.startswith(b"socket,id=agent,path="))
    return Path(sock.split(b"path=")[1].split(b",")[0].decode()).parent.parent  # <runtime>/vmm/agent.sock


@pytest.fixture
def shim():
    s = ShimProc()
    yield s
    s.close()


def init_params(boot_config, **extra):
    return {"kernel": str(boot_config.kernel), "rootfs": str(boot_config.rootfs), "backend": "qemu", **extra}


def test_initialize_boots_only_verified_or_explicit_artifacts(shim, ctx, kernel, rootfs, tmp_path):
    from terminai_release.release import build_release, sign_release

    err = shim.call("initialize", {})["error"]
    assert err["code"] == "INVALID_CONFIG" and "manifest" in err["message"]
    release = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, release)
    blob = release.directory / release.manifest.artifact("kernel").location
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))
    err = shim.call("initialize", {"manifest": str(release.directory), "dev": True, "backend": "qemu"})["error"]
    assert err["code"] == "VERIFICATION_FAILED" and "the manifest says" in err["message"]
    err = shim.call("initialize", {"manifest": str(release.directory), "backend": "qemu"})["error"]
    assert err["code"] == "VERIFICATION_FAILED", "the pinned production signer refuses a dev-signed release"
    assert not children(shim.proc.pid), "nothing was booted"


def test_errors_faults_and_clean_exit_on_stdin_close(shim, boot_config, tmp_path):
    assert shim.result("healthCheck")["ok"] is False
    assert shim.call("execute", {"command": "true"})["error"]["code"] == "NOT_INITIALIZED"
    bad = shim.call("initialize", init_params(boot_config, workspace=str(tmp_path / "missing")))
    assert bad["error"]["code"] == "INVALID_CONFIG" and "missing" in bad["error"]["message"]
    info = shim.result("initialize", init_params(boot_config, workspace=str(tmp_path)))
    assert info["type"] == "microvm" and info["isIsolated"] is True
    again = shim.call("initialize", init_params(boot_config))
    assert again["error"]["code"] == "ALREADY_INITIALIZED"

    shim.send_line("{not json")
    assert shim.unmatched.get(timeout=10)["error"]["code"] == "PARSE_ERROR"
    shim.send_line("[1, 2]")
    assert shim.unmatched.get(timeout=10)["error"]["code"] == "INVALID_REQUEST"
    assert shim.call("no.such")["error"]["code"] == "METHOD_NOT_FOUND"

    slow = shim.result("execute", {"command": "sleep", "args": ["1000"], "timeout": 1000})
    assert slow["timedOut"] is True and slow["exitCode"] == 137
    missing = shim.result("execute", {"command": "/no/such/tool"})
    assert missing["exitCode"] == 127 and missing["runtimeError"]["agentCode"] == "SPAWN_FAILED"
    assert missing["runtimeError"]["ran"] is False
    piped = shim.result("execute", {"command": "echo a | tr a b"})
    assert piped["stdout"] == "a | tr a b\n", "no implicit shell"
    shelled = shim.result("execute", {"command": "echo a | tr a b", "shell": True})
    assert shelled["stdout"] == "b\n"

    spawned = shim.result("spawn", {"command": "sleep", "args": ["1000"]})
    shim.result("process.kill", {"processId": spawned["processId"], "signal": "SIGTERM"})
    exit_note = shim.notifications.get(timeout=30)
    assert exit_note["method"] == "process.exit" and exit_note["params"]["signal"] == 15

    pending = [shim.start("execute", {"command": "sh", "args": ["-c", f"sleep 0.3; echo {i}"]}) for i in range(8)]
    assert [q.get(timeout=120)["result"]["stdout"] for q in pending] == [f"{i}\n" for i in range(8)]

    qemu = qemu_of(shim)
    runtime = runtime_dir_of(qemu)
    assert runtime.is_dir()
    assert shim.proc.stdin is not None
    shim.proc.stdin.close()
    assert shim.proc.wait(30) == 0
    assert gone(qemu), "QEMU outlived the shim"
    assert not runtime.exists(), "runtime directory left behind"


def test_vmm_killed_mid_command_then_sigterm(boot_config):
    first, second = ShimProc(), ShimProc()
    try:
        # Two VMs side by side, no clashes.
        qa = first.start("initialize", init_params(boot_config))
        qb = second.start("initialize", init_params(boot_config))
        a, b = qa.get(timeout=300)["result"], qb.get(timeout=300)["result"]
        assert a["session"] != b["session"]
        pending = first.start("execute", {"command": "sleep", "args": ["60"]})
        time.sleep(1)
        qemu = qemu_of(first)
        os.kill(qemu, signal.SIGKILL)
        err = pending.get(timeout=60)["error"]
        assert err["code"] == "VM_GONE" and err["ran"] is True
        health = first.result("healthCheck")
        assert health["ok"] is False
        assert first.result("dispose") == {}
        assert first.proc.wait(30) == 0

        assert second.result("execute", {"command": "echo", "args": ["still fine"]})["stdout"] == "still fine\n"
        qemu_b = qemu_of(second)
        runtime_b = runtime_dir_of(qemu_b)
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
        assert gone(qemu_b) and not runtime_b.exists()
    finally:
        first.close()
        second.close()


def test_shim_sigkill_takes_the_vm_with_it(shim, boot_config):
    from terminai_shim.session import clean_stale_runtime_dirs, runtime_base

    shim.result("initialize", init_params(boot_config))
    qemu = qemu_of(shim)
    runtime = runtime_dir_of(qemu)
    shim.proc.send_signal(signal.SIGKILL)
    shim.proc.wait(10)
    assert gone(qemu), "QEMU outlived a SIGKILLed shim"
    assert runtime in clean_stale_runtime_dirs(runtime_base())
    assert not runtime.exists()


def test_kernel_panic_at_boot_is_a_clear_error(shim, boot_config, tmp_path):
    junk = tmp_path / "junk.squashfs"
    junk.write_bytes(os.urandom(4 << 20))
    err = shim.call("initialize", {"kernel": str(boot_config.kernel), "rootfs": str(junk)})["error"]
    assert err["code"] == "BOOT_FAILED" and err["ran"] is False
    assert "Kernel panic" in err["message"] or "VFS" in err["message"], err["message"]
    assert not children(shim.proc.pid), "a failed boot left a process behind"
    info = shim.result("initialize", init_params(boot_config))
    assert info["type"] == "microvm"
    assert shim.result("dispose") == {}
    assert shim.proc.wait(30) == 0


@pytest.mark.unit
def test_params_are_checked_by_name_and_errors_never_show_python(shim):
    """A typo never boots a VM without what was meant; a missing or wrong
    parameter is named, never shown as Python's KeyError."""
    err = shim.call("initialize", {"kernel": "/k", "rootfs": "/r", "worksapce": "/tmp"})["error"]
    assert err["code"] == "INVALID_PARAMS" and "'worksapce'" in err["message"] and "workspace" in err["message"]
    assert not children(shim.proc.pid), "nothing was booted"
    typos = (("execute", {"command": "true", "cmd": "x"}), ("process.kill", {"pid": 1}),
             ("fs.readFile", {"path": "/x", "enc": "utf8"}), ("healthCheck", {"deep": True}))  # fmt: skip
    for method, params in typos:
        err = shim.call(method, params)["error"]
        assert err["code"] == "INVALID_PARAMS" and method in err["message"], (method, err)
    shim.send_line('{"id": 1.5, "method": "healthCheck"}')
    assert shim.unmatched.get(timeout=10)["error"]["code"] == "INVALID_REQUEST"
    err = shim.call("process.write", {"processId": "p1"})["error"]
    assert err["code"] == "NOT_INITIALIZED"
    for method, params in (("cancel", {}), ("fs.stat", {})):
        err = shim.call(method, params)["error"]
        assert "KeyError" not in err["message"] and "Traceback" not in err["message"], err
        assert err["code"] in ("INVALID_PARAMS", "NOT_INITIALIZED"), err


def test_output_cap_cancel_and_control_never_queue_behind_commands(shim, boot_config):
    shim.result("initialize", init_params(boot_config))
    # The cap is per stream and keeps the first bytes; a character it would cut is dropped whole.
    capped = shim.result("execute", {"command": "python3", "args": ["-c", "print('é' * 100)"], "outputCap": 11})
    assert capped["stdout"] == "é" * 5 and capped["truncated"] == ["stdout"], capped
    # 70 long commands: more than the command workers; a health check and cancels still go through at once.
    running = []
    for _ in range(70):
        q = shim.start("execute", {"command": "sleep", "args": ["300"]})
        running.append((shim.last_id, q))
    time.sleep(2)
    health = shim.result("healthCheck")
    assert health["ok"] is True, health
    assert all(q.empty() for _, q in running), "a health check waited for the commands"
    answered: dict[int, dict] = {}
    deadline = time.monotonic() + 240
    while len(answered) < len(running):
        assert time.monotonic() < deadline, f"{len(running) - len(answered)} executes never ended"
        for rid, q in running:
            if rid in answered:
                continue
            if not q.empty():
                answered[rid] = q.get()
                continue
            shim.call("cancel", {"id": rid})  # a queued one is not running yet: NO_SUCH_REQUEST, tried again
        time.sleep(0.2)
    results = [m["result"] for m in answered.values()]
    assert all(r["signal"] == 9 and r["exitCode"] == 137 for r in results), results[:3]
    assert shim.call("cancel", {"id": 999})["error"]["code"] == "NO_SUCH_REQUEST"


@pytest.mark.unit
def test_the_schema_and_the_server_agree_on_every_method_and_parameter():
    import json

    from terminai_shim.serve import PARAMS

    schema = json.loads((Path(__file__).resolve().parents[1] / "docs/shim-protocol.schema.json").read_text())
    documented = {m: set(s.get("properties", {})) for m, s in schema["$defs"]["params"].items()}
    assert documented == {m: set(p) for m, p in PARAMS.items()}
    assert set(schema["$defs"]["results"]) == set(PARAMS)
    assert set(schema["$defs"]["request"]["properties"]["method"]["enum"]) == set(PARAMS)


def test_later_health_checks_are_cheap_but_still_catch_a_broken_kit(shim, boot_config):
    """The kit is imported once per boot; later checks still ask the guest
    (a ping for this session and the module's stat, in one round trip), so
    they fail once the kit is gone or changed (they cannot report a stale answer)."""
    shim.result("initialize", init_params(boot_config))
    first = shim.result("healthCheck")
    assert first["ok"] is True and first["pythonPath"] == "/usr/bin/python3"
    assert shim.result("healthCheck") == first
    module = "/usr/lib/python3/dist-packages/terminai_apts/__init__.py"
    removed = shim.result("execute", {"command": "rm", "args": ["-f", module], "user": "root"})
    assert removed["exitCode"] == 0, removed
    gone = shim.result("healthCheck")
    assert gone["ok"] is False and "changed" in gone["error"], gone
    again = shim.result("healthCheck")  # the next one imports again, and that fails too
    assert again["ok"] is False and "import failed" in again["error"], again


def _pool_ready(shim: ShimProc, seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = shim.result("pool.status")
        if status["vms"] and all(vm["ready"] for vm in status["vms"]):
            return status
        assert not status["errors"], status
        time.sleep(0.2)
    raise AssertionError(f"the pool never became ready: {status}")


def test_the_warm_pool_hands_each_vm_to_one_session_with_its_own_identity(shim, boot_config, tmp_path):
    """pool.warm keeps a VM restored and waiting for an initialize with the
    same parameters. Each hand-out is a different VM, with its own session
    id, host name and random stream (every pooled VM is restored from one
    snapshot), its workspace mounted; dispose keeps the shim serving, and
    an initialize with other parameters never gets a pooled VM."""
    from terminai_shim.pool import idle_record_path

    params = init_params(boot_config, workspace=str(tmp_path))
    warmed = shim.result("pool.warm", {"params": params})
    assert warmed["size"] == 1 and len(warmed["vms"]) == 1
    probe = {
        "command": "sh",
        "args": ["-c", "hostname; head -c 16 /dev/urandom | od -An -tx1; hostname > seen-$(hostname)"],
    }
    seen = []
    for _ in range(2):
        status = _pool_ready(shim)
        assert status["vms"][0]["rssKib"] > 0
        first = shim.result("initialize", params)
        assert first["pooled"] is True, first
        out = shim.result("execute", probe)
        assert out["exitCode"] == 0, out
        seen.append((first["session"], *out["stdout"].split("\n", 1)))
        shim.result("dispose")
        assert shim.proc.poll() is None  # a pool keeps the shim serving
    assert len({s[0] for s in seen}) == 2 and len({s[1] for s in seen}) == 2 and len({s[2] for s in seen}) == 2, seen
    assert len(list(tmp_path.glob("seen-*"))) == 2  # each hand-out had the workspace
    other = shim.result("initialize", init_params(boot_config))
    assert other["pooled"] is False
    shim.result("dispose")
    _pool_ready(shim)  # refilled; it records what a waiting VM costs once it has waited a while
    deadline = time.monotonic() + 60
    while not idle_record_path().exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    idle = json.loads(idle_record_path().read_text())
    assert idle["rssKib"] > 0 and idle["cpuPercent"] >= 0, idle
    doctor = subprocess.run([SHIM, "doctor", "--json"], capture_output=True, text=True)
    assert json.loads(doctor.stdout)["warm_pool"]["measured"] == idle  # doctor reports what a waiting VM costs
    shim.result("pool.warm", {"size": 0, "params": params})
    assert shim.result("pool.status")["vms"] == []


def test_pool_warm_refuses_what_initialize_would(shim, boot_config):
    """Bad parameters are refused when the pool is asked for, by name, not later in the background."""
    bad = shim.call("pool.warm", {"params": {**init_params(boot_config), "worksapce": "/tmp"}})
    assert bad["error"]["code"] == "INVALID_PARAMS" and "worksapce" in bad["error"]["message"], bad
    missing = shim.call("pool.warm", {"params": {**init_params(boot_config), "kernel": "/nonexistent/vmlinux"}})
    assert missing["error"]["code"] in ("INVALID_CONFIG", "NOT_FOUND", "ARTIFACT_MISSING"), missing
    assert shim.call("pool.warm", {"size": 9, "params": init_params(boot_config)})["error"]["code"] == "INVALID_PARAMS"


def _vms_of(shim: ShimProc) -> dict[int, bytes]:
    vms = {}
    for kid in children(shim.proc.pid):
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline:
            vms[kid] = cmdline
    return vms


def test_the_pool_leaves_no_vm_behind(shim, boot_config):
    """A pool asked for other parameters stops the VM it kept for the old
    ones, and closing the shim's input ends the shim and every VM it kept:
    a waiting VM never outlives what it waited for."""
    shim.result("pool.warm", {"params": init_params(boot_config)})
    _pool_ready(shim)
    (first,) = _vms_of(shim)
    shim.result("pool.warm", {"params": init_params(boot_config, memoryMib=384)})
    _pool_ready(shim)
    assert gone(first, 30), "the VM kept for the old parameters still runs"
    ((second, cmdline),) = _vms_of(shim).items()
    argv = cmdline.split(b"\0")
    assert argv[argv.index(b"-m") + 1] == b"384"  # the new parameters' VM
    assert shim.proc.stdin is not None
    shim.proc.stdin.close()
    assert shim.proc.wait(30) == 0
    assert gone(second, 10), "the waiting VM outlived the shim"


@pytest.mark.unit
@pytest.mark.attack
def test_every_hostile_line_gets_an_answer_and_serve_keeps_serving():
    """What a confused or hostile client writes (200k-deep JSON, a lone
    surrogate as an id, bytes that are not UTF-8): each line gets a named
    error or an answer, every answer is ASCII JSON a strict parser reads, and
    the next request is still served; closing stdin ends serve with 0."""
    import subprocess as sp

    from shimproc import SHIM

    proc = sp.Popen([SHIM, "serve"], stdin=sp.PIPE, stdout=sp.PIPE, stderr=sp.PIPE)
    lines = [b"[" * 200_000 + b"]" * 200_000, b'{"id": "\\ud800", "method": "healthCheck"}', b"\xff\xfe{}",
             b'{"id": 7, "method": "nope"}', b'{"id": 8, "method": "healthCheck"}']  # fmt: skip
    out, err = proc.communicate(b"\n".join(lines) + b"\n", timeout=60)
    answers = [json.loads(line.decode("ascii")) for line in out.splitlines()]  # ASCII, or this raises
    assert proc.returncode == 0, err
    assert [a["error"]["code"] for a in answers[:1]] == ["PARSE_ERROR"] and "deeply" in answers[0]["error"]["message"]
    by_id = {a.get("id"): a for a in answers}
    assert by_id["\ud800"]["result"]["ok"] is False, "answered, under the id it was asked with"
    assert any("not UTF-8" in a.get("error", {}).get("message", "") for a in answers)
    assert by_id[7]["error"]["code"] == "METHOD_NOT_FOUND" and "result" in by_id[8], answers
    assert b"Traceback" not in err


# The guest prepares traps for the CLI's file methods: a sparse file of 512 MiB, links to PID 1's
# environment and to the guest's /tmp, a file name that is not UTF-8, 32 MiB of control bytes.
FS_TRAPS = r"""
cd /workspace
truncate -s 512M sparse
ln -s /proc/1/environ environ
ln -s /tmp outside
python3 -c 'open(b"name-\xff", "w").write("x")'
head -c 33554432 /dev/zero | tr '\0' '\1' > controls
echo ready
"""


@pytest.mark.attack
def test_serve_file_methods_hold_against_what_the_guest_left(shim, boot_config, tmp_path):
    shim.result("initialize", init_params(boot_config, workspace=str(tmp_path)))
    assert "ready" in shim.result("execute", {"command": "sh", "args": ["-c", FS_TRAPS]})["stdout"]
    for name in ("sparse", "controls"):
        got = shim.call("fs.readFile", {"path": name})
        assert got["error"]["code"] == "FILE_TOO_LARGE", got
    rss = int(next(line.split()[1] for line in Path(f"/proc/{shim.proc.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:")))  # fmt: skip
    assert rss < 300 * 1024, f"the shim holds {rss} KiB after reading what it refused"
    leak = shim.call("fs.readFile", {"path": "environ"})
    assert "error" in leak and "PATH=" not in json.dumps(leak), leak
    wrote = shim.call("fs.writeFile", {"path": "outside/planted", "content": "x"})
    assert "error" in wrote and "symbolic link" in wrote["error"]["message"], wrote
    assert shim.result("execute", {"command": "ls", "args": ["/tmp"]})["stdout"].count("planted") == 0
    assert shim.call("fs.writeFile", {"path": "environ", "content": "replaced"}).get("result") is not None
    assert (tmp_path / "environ").read_text() == "replaced", "the link itself is replaced, nothing behind it"
    names = [e["name"] for e in shim.result("fs.list", {"path": "."})["entries"]]
    assert "name-\udcff" in names  # the reader above parsed every line as strict UTF-8 JSON
    assert shim.result("fs.readFile", {"path": "/etc/hostname"})["content"].strip()
