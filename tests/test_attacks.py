"""Attacks on the isolation boundary, each from where the attacker sits.

Every test here reproduces a way out that was found (docs/security.md lists
them) and asserts the host is untouched: no file outside the workspace
changed, no setuid file or foreign owner in it, no host process started
from a place the guest can write, the shim's memory bounded, timeouts
honoured. The guest side runs in real VMs under TCG (and the container
tier where it applies). Network attacks stay on loopback. A fixed attack
stays here for good.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import pty
import pwd
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from shimproc import SHIM, ShimProc, run_settings

pytestmark = pytest.mark.attack

UNPRIVILEGED = "terminai-attack"  # a host user the tests create, to attack as and to run the shim as


def sh(session, script: str, user: str = "user", timeout: float = 120):
    status, out, err = session.client.run(["sh", "-c", script], user=user, timeout=timeout)
    return status.exit_code, out.decode(errors="replace"), err.decode(errors="replace")


def py(session, code: str, user: str = "user", timeout: float = 120):
    status, out, err = session.client.run(["python3", "-c", code], user=user, timeout=timeout)
    return status.exit_code, out.decode(errors="replace"), err.decode(errors="replace")


def boot(boot_config, **changes):
    from terminai_shim.session import Session

    return Session.boot(dataclasses.replace(boot_config, **changes))


def qemu_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def unprivileged_user() -> pwd.struct_passwd:
    """A real, unprivileged host user (created once; the tests attack as it and run the shim as it)."""
    try:
        return pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", UNPRIVILEGED],
                       check=True)  # fmt: skip
        return pwd.getpwnam(UNPRIVILEGED)


def as_user(user: pwd.struct_passwd, argv: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True,
                          text=True, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def readable_artifacts(boot_config):
    """The kernel and root image where any user can read them (the build cache is root's).
    Outside pytest's own temporary tree, which each pytest run makes private again."""
    d = Path(tempfile.mkdtemp(prefix="attack-artifacts-"))
    d.chmod(0o755)
    kernel, rootfs = d / boot_config.kernel.name, d / boot_config.rootfs.name
    shutil.copy(boot_config.kernel, kernel)
    shutil.copy(boot_config.rootfs, rootfs)
    kernel.chmod(0o644)
    rootfs.chmod(0o644)
    yield kernel, rootfs
    shutil.rmtree(d, ignore_errors=True)


# -- 1: the allowlist proxy never runs code from where the guest writes -----------------------------------
@pytest.mark.vm
def test_proxy_never_imports_or_runs_from_the_workspace(boot_config, tmp_path):
    """The shim serves from inside the workspace; the guest plants a package named
    like the shim's and connects to the proxy. Nothing of it runs on the host."""
    ws = tmp_path / "ws"
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').write('host code execution')\n"
    ws.mkdir()
    shim = ShimProc(env=dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache")), cwd=str(ws))
    try:
        shim.result("initialize", {"kernel": str(boot_config.kernel), "rootfs": str(boot_config.rootfs),
                                   "backend": "qemu", "workspace": str(ws),
                                   "network": {"mode": "allowlist", "allow": ["127.0.0.1:9"]}})  # fmt: skip
        plant = ("mkdir -p /workspace/terminai_shim/_internal && for m in terminai_shim/__init__ "
                 "terminai_shim/_internal/__init__ terminai_shim/_internal/netproxy socket json encodings site; do "
                 f"printf %s {json.dumps(payload)} > /workspace/$m.py; done")  # fmt: skip
        assert shim.result("execute", {"command": "sh", "args": ["-c", plant]})["exitCode"] == 0
        code = ("import socket\nfor i in range(3):\n s=socket.create_connection(('10.0.2.100',3128),timeout=20)\n"
                " s.sendall(b'CONNECT 127.0.0.1:9 HTTP/1.1\\r\\n\\r\\n'); print(s.recv(100)); s.close()")  # fmt: skip
        # -I: commands start in the workspace, where the planted modules would shadow the probe's own
        out = shim.result("execute", {"command": "python3", "args": ["-I", "-c", code]})
        assert "HTTP/1.1" in out["stdout"], out
        qemu = [p for p in children(shim.proc.pid) if b"qemu" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert qemu and all(not os.readlink(f"/proc/{p}/cwd").startswith(str(ws)) for p in qemu)
    finally:
        shim.close()
    assert not marker.exists(), "code the guest wrote ran on the host"


# -- 2: no setuid files, foreign owners or special files in the workspace ------------------------------------
PLANT_SETUID = """
cp /bin/sh /workspace/rootshell && chown 0:0 /workspace/rootshell && chmod 4755 /workspace/rootshell
cp /bin/sh /workspace/groupshell && chmod 2755 /workspace/groupshell
touch /workspace/foreign && chown 4321:4321 /workspace/foreign
mknod /workspace/mem c 1 1; mknod /workspace/blk b 7 0; mkfifo /workspace/fifo
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("/workspace/sock")'
ls -ln /workspace
"""


def _assert_plain_files(ws: Path, owner: int) -> None:
    for entry in ws.iterdir():
        st = entry.lstat()
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), f"{entry.name} is a special file on the host"
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), f"{entry.name} is setuid/setgid on the host"
        assert st.st_uid == owner, f"{entry.name} is owned by uid {st.st_uid} on the host"


@pytest.mark.vm
def test_guest_root_cannot_make_setuid_or_foreign_files_on_the_host(boot_config, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    with boot(boot_config, workspace=ws, snapshots="off") as s:
        _code, out, err = sh(s, PLANT_SETUID, user="root")
        assert "rootshell" in out, err
    _assert_plain_files(ws, os.getuid())


@pytest.mark.vm
def test_as_an_unprivileged_host_user_guest_files_stay_that_users(readable_artifacts, tmp_path):
    """The shim run by an ordinary user; the guest, as root with every
    capability, tries to give that user's workspace a setuid-root shell."""
    user = unprivileged_user()
    kernel, rootfs = readable_artifacts
    home = Path(tempfile.mkdtemp(prefix="attack-home-"))
    ws = home / "ws"
    ws.mkdir()
    for p in (home, ws):
        os.chown(p, user.pw_uid, user.pw_gid)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERMINAI_CACHE": str(home / "cache"), **run_settings()}
    try:
        argv = [SHIM, "run", "--kernel", str(kernel), "--rootfs", str(rootfs), "--workspace", str(ws), "--cold",
                "--user", "root", "--", "sh", "-c", PLANT_SETUID]  # fmt: skip
        done = as_user(user, argv, env, timeout=300)
        assert "rootshell" in done.stdout, done.stderr
        _assert_plain_files(ws, user.pw_uid)
        runtime = Path(tempfile.gettempdir()) / f"terminai-{user.pw_uid}"
        assert runtime.is_dir() and stat.S_IMODE(runtime.stat().st_mode) & 0o022 == 0
    finally:
        shutil.rmtree(home, ignore_errors=True)


# i386 `fchmod(fd, 04755)` through int 0x80 from a 64-bit process: another system call table.
I386_FCHMOD = r"""
import ctypes, mmap, os, sys
fd = os.open("/workspace/abi", os.O_CREAT | os.O_WRONLY, 0o755)
code = (b"\xb8\x5e\x00\x00\x00" + b"\xbb" + fd.to_bytes(4, "little") + b"\xb9\xed\x09\x00\x00"
        + b"\x53\xcd\x80\x5b\xc3")  # mov eax,94; mov ebx,fd; mov ecx,04755; push rbx; int 0x80; pop rbx; ret
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
print("i386 fchmod returned", fn())
"""
# The agent's own socket, from a command of the same uid: ask the agent to write a setuid file.
AGENT_SOCKET = r"""
import socket, sys
sys.path.insert(0, "/usr/lib/terminai")
from terminai_protocol import protocol as P
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("/run/terminai/agent.sock")
    s.sendall(P.request(1, "hello", versions=[1]) + P.request(2, "write", b"x", path="/workspace/viaagent",
              mode=0o4755, truncate=True))
    s.settimeout(5)
    print("agent answered", s.recv(100))
except OSError as e:
    print("agent refused", e)
"""


@pytest.mark.vm
def test_container_tier_refuses_setuid_bits_in_the_workspace(container_image, tmp_path):
    from terminai_shim.models import BootConfig
    from terminai_shim.session import Session

    ws = tmp_path / "ws"
    ws.mkdir()
    config = BootConfig(image=container_image.archive, backend="container", workspace=ws)
    with Session.boot(config) as s:
        _code, out, err = sh(s, "cp /bin/sh /workspace/shell; chmod 4755 /workspace/shell; chmod g+s /workspace/shell;"
                               "python3 -c 'import os; os.open(\"/workspace/made\", os.O_CREAT|os.O_WRONLY, 0o4755)';"
                               " ls -ln /workspace")  # fmt: skip
        assert "Operation not permitted" in err, (out, err)
        assert sh(s, "chmod 755 /workspace/shell && echo plain-chmod-ok")[1].strip() == "plain-chmod-ok"
        out = py(s, I386_FCHMOD)[1]
        assert "returned -38" in out, out  # ENOSYS: the i386 table is closed
        out = py(s, AGENT_SOCKET)[1]
        assert "agent refused" in out or "agent answered b''" in out, out  # closed at once: not the host
    assert not (ws / "viaagent").exists()
    for entry in ws.iterdir():
        assert not entry.stat().st_mode & (stat.S_ISUID | stat.S_ISGID), entry


# -- 3: a local user who plants the runtime directory gets nothing -------------------------------------------
@pytest.mark.unit
def test_runtime_base_refuses_a_directory_another_user_planted(tmp_path, monkeypatch):
    from terminai_shim import session

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    tmp_path = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short, as a real TMPDIR is
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"terminai-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    with pytest.warns(UserWarning, match="not a private directory"):
        base = session.runtime_base()
    assert base != planted and stat.S_IMODE(base.stat().st_mode) == 0o700
    planted.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    planted.symlink_to(elsewhere)
    with pytest.warns(UserWarning):
        assert session.runtime_base() not in (planted, elsewhere)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.vm
def test_planted_runtime_directory_is_never_used_by_a_booting_shim(boot_config, tmp_path):
    """Another user creates /tmp/terminai-<uid> first and fills it with links;
    the shim boots anyway and touches none of it."""
    user = unprivileged_user()
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: socket paths live below it
    tmp.chmod(0o1777)
    planted = tmp / f"terminai-{os.geteuid()}"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted.mkdir(mode=0o777)
    for i in range(64):
        (planted / f"vm-{i}").symlink_to(victim)
    os.chown(planted, user.pw_uid, user.pw_gid)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env.update(TMPDIR=str(tmp), TERMINAI_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs),
                           "--", "echo", "booted"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.stdout.strip() == "booted", done.stderr
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in planted.iterdir()) == sorted(f"vm-{i}" for i in range(64))


# -- 4: QEMU is confined ---------------------------------------------------------------------------------------
@pytest.mark.vm
def test_qemu_runs_under_seccomp_and_without_root_powers(boot_config, tmp_path):
    from terminai_shim._internal.backends.vmmprocess import CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER

    if os.geteuid() != 0:
        pytest.skip("the privilege drop is what happens when the shim is started as root")
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, 4321, 4321)
    rootws = tmp_path / "rootws"
    rootws.mkdir()
    file_caps = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_FOWNER)
    for workspace, uid, caps in ((None, 65534, 0), (owned, 4321, 0), (rootws, 0, file_caps)):
        with boot(boot_config, workspace=workspace, snapshots="off") as s:
            st = qemu_status(s.machine.pid)
            assert st["Seccomp"] == "2", "QEMU runs under its seccomp filter"
            assert st["Uid"].split() == [str(uid)] * 4, (workspace, st["Uid"])
            assert int(st["CapEff"], 16) == caps and int(st["CapPrm"], 16) == caps, (workspace, st["CapEff"])
            assert st["NoNewPrivs"] == "1"
            assert sh(s, "echo ok")[1].strip() == "ok"


# -- 5: commands cannot speak for the agent; the host checks what the agent says -------------------------------
# What the attack scripts below share: each attempt prints "refused" or "SUCCEEDED".
ATTEMPTS = r"""
import ctypes, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, fn):
    try:
        fn(); print(name, "SUCCEEDED")
    except OSError as e:
        print(name, "refused", e.errno)
def pidfd_getfd(pid):
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pidfd < 0: raise OSError(ctypes.get_errno(), "pidfd_open")
    for target in range(3, 64):
        fd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd
        if fd >= 0: return
    raise OSError(ctypes.get_errno(), "pidfd_getfd")
"""
REACH_PID1 = (
    ATTEMPTS
    + r"""
def reboot():
    if libc.reboot(0xCDEF0123) != 0: raise OSError(ctypes.get_errno(), "reboot")
def mount():
    if libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) != 0: raise OSError(ctypes.get_errno(), "mount")
def delroute():
    import fcntl
    with socket.socket() as s: fcntl.ioctl(s, 0x890C, b"\0" * 120)
attempt("vport", lambda: os.open("/dev/vport0p1", os.O_RDWR))
attempt("pidfd_getfd", lambda: pidfd_getfd(1))
def proc_fd():
    for name in os.listdir("/proc/1/fd"):  # the numbers are visible; the descriptors must not be
        try:
            os.close(os.open(f"/proc/1/fd/{name}", os.O_RDWR))
            return
        except OSError as e:
            err = e
    raise err
attempt("proc_fd", proc_fd)
attempt("proc_mem", lambda: open("/proc/1/mem", "rb").read(1))
attempt("sysctl", lambda: open("/proc/sys/kernel/hostname", "w").write("x"))
attempt("sysfs", lambda: open("/sys/kernel/uevent_helper", "w").write("/tmp/x"))
attempt("agent_code", lambda: open("/usr/lib/terminai/terminai_agent/server.py", "a").write("#"))
attempt("stdlib", lambda: open("/usr/lib/python3.11/socket.py", "a").write("#"))
attempt("reboot", reboot)
attempt("mount", mount)
attempt("route", delroute)
"""
)


@pytest.mark.vm
def test_commands_cannot_reach_pid1_or_the_kernel(vm):
    _code, out, err = py(vm, REACH_PID1)
    results = dict(line.split(" ", 1) for line in out.splitlines())
    assert len(results) == 11, (out, err)
    assert not [k for k, v in results.items() if "SUCCEEDED" in v], out
    # ...and the agent still answers truthfully.
    assert sh(vm, "exit 7")[0] == 7
    assert vm.client.ping()["pong"]


@pytest.mark.vm
def test_root_on_request_is_root(vm):
    """The opposite check: ``user: root`` keeps every capability (so the default is a real restriction)."""
    assert sh(vm, "grep CapEff /proc/self/status", user="root")[1].split()[1] != "0000000000000000"
    assert sh(vm, "grep CapEff /proc/self/status")[1].split()[1] == "0000000000000000"


REACH_LAUNCHER = (
    ATTEMPTS
    + r"""
import signal
def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()
# The root launcher: init's child that keeps every capability (it is not this command's ancestor).
mine = {os.getpid(), os.getppid()}
init = open("/proc/1/cmdline", "rb").read()
launcher = next(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine and stat(p)[1] == "1"
                and open(f"/proc/{p}/cmdline", "rb").read() == init)
def ptrace():
    if libc.ptrace(16, launcher, 0, 0) != 0: raise OSError(ctypes.get_errno(), "ptrace attach")
def proc_fd():
    for name in os.listdir(f"/proc/{launcher}/fd"):
        os.close(os.open(f"/proc/{launcher}/fd/{name}", os.O_RDWR))
        return
attempt("pidfd_getfd", lambda: pidfd_getfd(launcher))
attempt("ptrace", ptrace)
attempt("proc_fd", proc_fd)
attempt("proc_mem", lambda: open(f"/proc/{launcher}/mem", "rb").read(1))
os.kill(launcher, signal.SIGKILL)  # what a command can do: stop it
print("killed", launcher)
"""
)


@pytest.mark.vm
def test_commands_cannot_use_the_root_launcher_and_stopping_it_only_stops_root_commands(boot_config):
    """The VM's init starts commands already confined; ``user: root``
    commands come from a launcher process that keeps every capability. A
    command cannot trace it or take its socket; it can kill it (same uid),
    and then root commands are refused with a plain error while everything
    else goes on."""
    with boot(boot_config) as s:
        assert sh(s, "grep CapEff /proc/self/status", user="root")[1].split()[1] != "0000000000000000"
        from terminai_shim.errors import AgentError

        with pytest.raises(AgentError, match="too large for a root command"):  # more than one message holds
            s.client.run(["true"], user="root", env={"BIG": "x" * 400_000})
        assert sh(s, "echo root; exit 4", user="root") == (4, "root\n", "")  # ...and the launcher still serves
        _code, out, err = py(s, REACH_LAUNCHER)
        results = dict(line.split(" ", 1) for line in out.splitlines())
        assert set(results) == {"pidfd_getfd", "ptrace", "proc_fd", "proc_mem", "killed"}, (out, err)
        assert not [k for k, v in results.items() if "SUCCEEDED" in v], out
        with pytest.raises(AgentError, match="root launcher has ended"):
            sh(s, "true", user="root")
        assert sh(s, "echo still; exit 3") == (3, "still\n", "")
        assert s.client.ping()["pong"]


class HostileAgent:
    """A test double for a compromised guest agent: the host end of a socket
    pair whose other end this test writes, frame by frame (a VM cannot be made
    to send malformed frames on demand)."""

    def __init__(self) -> None:
        from terminai_protocol import protocol as P
        from terminai_shim._internal.client import AgentClient

        self.P = P
        self.guest, host = socket.socketpair()
        self.client = AgentClient(host)
        self.decoder = P.Decoder()

    def next_request(self):
        while True:
            for item in self.decoder.feed(self.guest.recv(1 << 20)):
                if isinstance(item, self.P.Frame):
                    return item

    def greet(self) -> None:
        hello = self.client.submit_hello()
        req = self.next_request()
        self.guest.sendall(self.P.result(req.id, version=1, max_frame=1 << 40, session="x"))
        self.client.accept_hello(hello.result(5))


@pytest.mark.unit
def test_host_refuses_malformed_exit_events_without_a_traceback():
    from terminai_shim.errors import ChannelClosed

    agent = HostileAgent()
    agent.greet()
    assert agent.client.peer_max == 1 << 20, "a peer's frame limit is clamped to what this host accepts"
    for bad in ({"code": "0"}, {"code": 7.5}, {"code": 300}, {"code": None, "signal": None}, {"code": 0, "signal": 9},
                {"code": 0, "truncated": "stdout"}, {"code": 0, "timed_out": "no"}, {"code": True}):  # fmt: skip
        result: list = []
        t = threading.Thread(target=lambda result=result: result.append(agent.client.exec(["x"])))
        t.start()
        req = agent.next_request()
        agent.guest.sendall(agent.P.result(req.id, pid=5))
        t.join(5)
        agent.guest.sendall(agent.P.event(req.id, "exit", **bad))
        with pytest.raises(ChannelClosed, match="malformed exit status"):
            result[0].wait(5)


@pytest.mark.unit
def test_host_bounds_what_a_flooding_agent_can_make_it_hold():
    agent = HostileAgent()
    agent.greet()
    big = "x" * ((1 << 20) - 300)
    for _ in range(400):
        agent.guest.sendall(agent.P.encode({"kind": "err", "id": 0, "code": "X", "message": big}))
    deadline = time.monotonic() + 30
    while len(agent.client.protocol_errors) < 32 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    errors = list(agent.client.protocol_errors)
    assert len(errors) <= 32 and all(len(e) <= 1003 for e in errors)
    # Output over the cap is cut by the host, whatever the guest sends.
    result: list = []
    t = threading.Thread(target=lambda: result.append(agent.client.exec(["x"], output_cap=1000)))
    t.start()
    req = agent.next_request()
    agent.guest.sendall(agent.P.result(req.id, pid=5))
    t.join(5)
    proc = result[0]
    got = bytearray()
    proc.on_event = lambda name, value: got.extend(value) if name == "stdout" else None
    for _ in range(50):
        agent.guest.sendall(agent.P.event(req.id, "stdout", b"y" * 60000))
    agent.guest.sendall(agent.P.event(req.id, "exit", code=0, truncated=[]))
    status = proc.wait(10)
    assert len(got) == 1000 and status.truncated == ["stdout"]


# -- 6: the host's own deadline ---------------------------------------------------------------------------------
@pytest.mark.vm
@pytest.mark.parametrize("how", ["halt", "power-off"])
def test_a_guest_that_halts_itself_cannot_hang_run(boot_config, tmp_path, how):
    call = {"halt": "0xCDEF0123", "power-off": "0x4321FEDC"}[how]
    started = time.monotonic()
    done = subprocess.run([SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs),
                           "--user", "root", "--timeout", "3", "--", "python3", "-c",
                           f"import ctypes; ctypes.CDLL(None).reboot({call}); import time; time.sleep(60)"],
                          env=dict(os.environ, TERMINAI_CACHE=str(tmp_path)), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode in (124, 125), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and ("VM" in done.stderr or "timed out" in done.stderr), done.stderr
    assert took < 60, f"run took {took:.0f}s"


@pytest.mark.vm
def test_filling_every_tmpfs_leaves_the_agent_answering(vm):
    _code, out, err = sh(vm, "for d in /tmp /dev/shm /var/tmp; do dd if=/dev/zero of=$d/fill bs=1M 2>/dev/null; done;"
                            "df -m /tmp /dev/shm / | tail -n +2; echo filled", timeout=600)  # fmt: skip
    assert "filled" in out, err
    assert sh(vm, "echo alive")[1].strip() == "alive"
    sh(vm, "rm -f /tmp/fill /dev/shm/fill /var/tmp/fill")


# -- 7, 9: the proxy: request smuggling and connection floods -----------------------------------------------------
@pytest.fixture(scope="module")
def origin():
    seen: list[tuple[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Host", "")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()


SMUGGLE = r"""
import socket, sys
port = int(sys.argv[1])
def ask(raw):
    s = socket.create_connection(("10.0.2.100", 3128), timeout=30)
    s.sendall(raw); out = b""
    while chunk := s.recv(65536): out += chunk
    print(out.split(b"\r\n", 1)[0].decode())
ask(f"GET http://127.0.0.1:{port}/a HTTP/1.1\nHost: evil\n\nGET /smuggled HTTP/1.1\nHost: evil\n\n".encode())
ask(f"GET http://127.0.0.1:{port}/b HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello".encode())
ask(f"GET http://127.0.0.1:{port}/c HTTP/1.1\r\nX: y\r\n folded: z\r\n\r\n".encode())
ask(f"GET http://127.0.0.1:{port}/ok HTTP/1.1\r\nHost: evil.invalid\r\n\r\n".encode())
"""


@pytest.mark.vm
def test_proxy_refuses_smuggled_and_malformed_requests_from_the_guest(boot_config, origin, tmp_path):
    port, seen = origin
    seen.clear()
    with boot(boot_config, network=_allow(f"127.0.0.1:{port}"), snapshots="off") as s:
        _code, out, err = py_args(s, SMUGGLE, str(port))
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["400", "400", "400", "200"], (out, err)
    assert seen == [("/ok", f"127.0.0.1:{port}")], "only the well-formed request, to the checked host"


def py_args(session, code: str, *args: str):
    status, out, err = session.client.run(["python3", "-c", code, *args], timeout=300)
    return status.exit_code, out.decode(errors="replace"), err.decode(errors="replace")


def _allow(*entries: str):
    from terminai_shim.models import NetworkPolicy

    return NetworkPolicy("allowlist", tuple(entries))


FLOOD = r"""
import socket, time
held = []
for i in range(150):
    try:
        held.append(socket.create_connection(("10.0.2.100", 3128), timeout=10))
    except OSError as e:
        print("connect failed", e)
time.sleep(8)
busy = 0
for s in held:
    s.settimeout(0.2)
    try:
        busy += s.recv(100).startswith(b"HTTP/1.1 503")
    except OSError:
        pass
print("refused", busy)
"""


@pytest.mark.vm
def test_connection_flood_is_bounded_before_anything_costly(boot_config, origin, tmp_path):
    from terminai_shim._internal.netproxy import MAX_CONNECTIONS

    port, _ = origin
    with boot(boot_config, network=_allow(f"127.0.0.1:{port}"), snapshots="off") as s:
        proxy = s.machine.proxy
        peak = {"active": 0, "procs": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak["active"] = max(peak["active"], proxy.active)
                peak["procs"] = max(peak["procs"], len(children(s.machine.pid)))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            _code, out, _err = py(s, FLOOD, timeout=300)
        finally:
            stop.set()
            watcher.join()
        refused = int(out.split("refused")[1])
        assert refused >= 150 - MAX_CONNECTIONS - 5, out
        assert peak["active"] <= MAX_CONNECTIONS
        assert peak["procs"] < 40, f"{peak['procs']} host processes at once (connectors must hand over and exit)"
        # Once the guest lets go, the proxy serves again.
        again = SMUGGLE.split("\nask(")[0] + f'\nask(b"GET http://127.0.0.1:{port}/x HTTP/1.1\\r\\n\\r\\n")'
        assert "200" in py_args(s, again, str(port))[1]


# -- 8: the console cannot fill the host ---------------------------------------------------------------------------
@pytest.mark.vm
def test_console_output_is_capped(boot_config):
    from terminai_shim._internal.backends.base import ConsoleCapture

    with boot(boot_config, snapshots="off") as s:
        _code, out, err = sh(s, "head -c 3000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo done", timeout=600)
        assert out.strip() == "done", err
        console = s.runtime.console_log
        s.close()
        size = console.stat().st_size if console.exists() else 0
    capture = ConsoleCapture.__init__.__defaults__
    assert size <= capture[0] + capture[1] + 200, size


# -- 10: open mode does not reach the host's own loopback ------------------------------------------------------------
@pytest.mark.vm
def test_open_mode_refuses_host_loopback_and_link_local_unless_listed(boot_config, origin):
    from terminai_shim.models import NetworkPolicy

    port, _ = origin
    probe = ("import socket, sys\nfor h, p in (('10.0.2.2', int(sys.argv[1])), ('169.254.169.254', 80)):\n"
             " try:\n  socket.create_connection((h, p), timeout=5).close(); print(h, 'CONNECTED')\n"
             " except OSError as e: print(h, 'refused', e.errno)")  # fmt: skip
    with boot(boot_config, network=NetworkPolicy("open"), snapshots="off") as s:
        out = py_args(s, probe, str(port))[1]
        assert "CONNECTED" not in out and out.count("refused") == 2, out
    with boot(boot_config, network=NetworkPolicy("open", ("127.0.0.1",)), snapshots="off") as s:
        assert "10.0.2.2 CONNECTED" in py_args(s, probe, str(port))[1]


# -- 11: terminal escapes from the guest reach the user's terminal only as visible text ------------------------------
@pytest.mark.vm
def test_run_neutralises_escape_sequences_on_a_terminal(boot_config, tmp_path):
    master, slave = pty.openpty()
    evil = r"printf '\033]0;owned\007\033]52;c;ZWNobyBwd25lZA==\007\033[2J\233visible\n'"
    proc = subprocess.Popen([SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs),
                             "--shell", "--", evil], stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, TERMINAI_CACHE=str(tmp_path)))  # fmt: skip
    os.close(slave)
    got = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    assert proc.wait(60) == 0
    assert b"\x1b" not in got and b"\x07" not in got and b"\x9b" not in got, got
    assert b"^[]0;owned^G" in got and b"visible" in got


# -- 12: a weaker tier is never chosen silently -----------------------------------------------------------------------
@pytest.mark.vm
def test_falling_back_to_the_container_tier_is_said_and_can_be_refused(boot_config, container_image, tmp_path):
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path), TERMINAI_BACKEND_ORDER="container,microvm-tcg")
    base = [SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs),
            "--image", str(container_image.archive)]  # fmt: skip
    weaker = subprocess.run([*base, "--", "true"], env=env, capture_output=True, text=True, timeout=300)
    assert weaker.returncode == 0 and "weaker than a microVM" in weaker.stderr, weaker.stderr
    strict = subprocess.run([*base, "--require-microvm", "--", "cat", "/proc/1/cmdline"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert strict.returncode == 0 and "weaker" not in strict.stderr and "terminai" in strict.stdout, strict.stderr


# -- defence in depth: .git stays the host's ---------------------------------------------------------------------------
PLANT_HOOK = ("printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > /workspace/.git/hooks/post-checkout; "
              "git config --file /workspace/.git/config core.fsmonitor 'touch /tmp/pwned' 2>&1 || "
              "echo '[core] fsmonitor = touch /tmp/pwned' >> /workspace/.git/config; "
              "echo data > /workspace/file; cat /workspace/.git/HEAD")  # fmt: skip


def _repo(tmp_path: Path) -> Path:
    ws = tmp_path / "repo"
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (ws / ".git" / "config").write_text("[core]\n\tbare = false\n")
    return ws


@pytest.mark.vm
@pytest.mark.parametrize("tier", ["microvm", "container"])
def test_guest_cannot_plant_git_hooks_or_config(boot_config, request, tmp_path, tier):
    from terminai_shim.models import BootConfig
    from terminai_shim.session import Session

    ws = _repo(tmp_path)
    if tier == "microvm":
        config = dataclasses.replace(boot_config, workspace=ws)
    else:
        image = request.getfixturevalue("container_image")
        config = BootConfig(image=image.archive, backend="container", workspace=ws)
    with Session.boot(config) as s:
        assert s.describe()["gitReadOnly"]
        _code, out, err = sh(s, PLANT_HOOK)
        assert "refs/heads/main" in out and "Read-only file system" in (out + err), (out, err)
    assert (ws / "file").read_text() == "data\n", "the rest of the workspace stays writable"
    assert list((ws / ".git" / "hooks").iterdir()) == []
    assert (ws / ".git" / "config").read_text() == "[core]\n\tbare = false\n"
    with Session.boot(dataclasses.replace(config, writable_git=True)) as s:
        assert not s.describe()["gitReadOnly"]
        assert sh(s, "touch /workspace/.git/hooks/allowed && echo ok")[1].strip() == "ok"


class _HostSession:
    """The parts of a Session the watchdog uses, around a real agent run on the host
    (the VM's agent code; only the transport differs). ``kill`` stops that agent."""

    def __init__(self, agent, tmp: Path) -> None:
        from terminai_shim._internal.backends.base import RuntimeDir

        self.agent = agent
        self.client = agent.client()
        self.runtime = RuntimeDir(tmp)  # no QMP socket here: the watchdog pings
        self.machine = self
        self.killed = False

    def kill(self) -> None:
        self.killed = True
        self.agent.proc.kill()


@pytest.mark.vm
def test_watchdog_stops_a_frozen_agent_but_not_a_slow_reader(host_agent, tmp_path):
    """A frozen agent (SIGSTOP) ends the session within the watchdog's limits; a
    host consumer that holds the reader for longer than that (a paused pager) does not."""
    import signal

    from terminai_shim.errors import ChannelClosed
    from terminai_shim.session import Watchdog

    s = _HostSession(host_agent, tmp_path)
    dog = Watchdog(s)
    dog.start()
    try:
        held = threading.Event()

        def slow_consumer(name, value):
            if name == "stdout" and not held.is_set():
                held.set()
                time.sleep(Watchdog.PING_EVERY + Watchdog.PING_TIMEOUT + 3)

        proc = s.client.exec(["sh", "-c", "head -c 20000000 /dev/zero"], on_event=slow_consumer)
        assert proc.wait(120).exit_code == 0 and not s.killed, dog.reason
        sleeper = s.client.exec(["sleep", "60"])
        os.kill(host_agent.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ChannelClosed, match="stopped answering"):
            sleeper.wait(60)
        assert s.killed and time.monotonic() - started < Watchdog.PING_EVERY + Watchdog.PING_TIMEOUT + 5
    finally:
        dog.stop()


@pytest.mark.unit
def test_proxy_handover_takes_only_stream_sockets_and_close_ends_every_relay(tmp_path):
    """Descriptors passed to the proxy's socket that are not stream sockets are
    closed, not kept; closing the server ends the connections it relays."""
    from terminai_shim._internal.netpolicy import Allowlist
    from terminai_shim._internal.netproxy import ProxyConfig, ProxyServer

    server = ProxyServer(ProxyConfig("t", Allowlist.parse([]), str(tmp_path / "log"), {}))
    path = str(tmp_path / "p.sock")
    server.listen_unix(path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        r, w = os.pipe()
        with socket.socket(socket.AF_UNIX) as carrier:
            carrier.connect(path)
            socket.send_fds(carrier, [b"c"], [r, w])
            carrier.settimeout(5)
            carrier.recv(1)
        os.close(r)
        os.close(w)
    time.sleep(0.5)
    assert len(os.listdir("/proc/self/fd")) <= before + 2, "passed descriptors leaked"
    guest, host = socket.socketpair()
    with socket.socket(socket.AF_UNIX) as carrier:
        carrier.connect(path)
        socket.send_fds(carrier, [b"c"], [host.fileno()])
        carrier.settimeout(5)
        assert carrier.recv(1) == b"k"
    host.close()
    guest.sendall(b"CONNECT 127.0.0.1:9")  # an unfinished head: the proxy waits for the rest
    deadline = time.monotonic() + 5
    while server.active != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.active == 1
    server.close()
    guest.settimeout(5)
    assert guest.recv(100) == b"", "a relayed connection outlived its server"


# -- what was verified is what boots (issue: "verified is not what boots") --------------------------------------------
@pytest.mark.vm
def test_a_kernel_swapped_after_verification_never_boots(boot_config, tmp_path):
    """A local user who can write the release directory swaps the kernel after
    the checks passed: the digest is checked again on the very descriptor QEMU
    is handed, and QEMU never opens the path itself."""
    import hashlib

    from terminai_shim.errors import BootError

    kernel = tmp_path / "vmlinux"
    shutil.copy(boot_config.kernel, kernel)
    verified = hashlib.sha256(kernel.read_bytes()).hexdigest()
    config = dataclasses.replace(boot_config, kernel=kernel, kernel_sha256=verified, snapshots="off")
    other = tmp_path / "other"
    other.write_bytes(kernel.read_bytes()[:-4096] + os.urandom(4096))
    os.replace(other, kernel)  # the swap, between verification and boot
    with pytest.raises(BootError, match="is not the file that was verified"):
        boot(config)
    shutil.copy(boot_config.kernel, kernel)
    with boot(config) as s:
        cmdline = Path(f"/proc/{s.machine.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"-kernel") + 1].startswith(b"/proc/self/fd/"), "QEMU reopens no path"
        os.replace(tmp_path / "vmlinux", tmp_path / "moved")  # too late to matter
        assert sh(s, "uname -r")[0] == 0


@pytest.mark.unit
def test_host_bounds_error_text_and_monitor_lines_from_a_hostile_peer(tmp_path):
    """An agent's error message and a monitor's line are the peer's to choose:
    neither may make the host hold or show an unbounded amount."""
    from terminai_shim._internal.qmp import MAX_LINE, QmpEvents
    from terminai_shim.errors import AgentError

    agent = HostileAgent()
    agent.greet()
    call = agent.client.submit("ping")
    req = agent.next_request()
    agent.guest.sendall(agent.P.error(req.id, "X" * 5000, "m" * ((1 << 20) - 20000)))
    with pytest.raises(AgentError) as caught:
        call.result(10)
    assert len(caught.value.message) <= 1003 and len(caught.value.agent_code) <= 1003

    path = str(tmp_path / "qmp.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def monitor():  # a fake QEMU monitor (test double): a greeting, then a line that never ends
        conn, _ = listener.accept()
        conn.sendall(b'{"QMP": {}}\n')
        conn.recv(100)
        conn.sendall(b'{"return": {}}\n')
        try:
            for _ in range(16):  # 16 MiB without a newline, and the connection stays open
                conn.sendall(b"x" * (1 << 20))
        except OSError:
            pass
        time.sleep(15)
        conn.close()

    threading.Thread(target=monitor, daemon=True).start()
    events = QmpEvents(path)
    deadline = time.monotonic() + 10
    event = None
    while event is None and time.monotonic() < deadline:
        event = events.next_event(1.0)
    assert event == "SHUTDOWN", "an endless line is a monitor gone wrong: the VM is ended"
    assert len(events.buffer) <= MAX_LINE + 65536
    events.close()


# -- the workspace is a boundary: host git never runs what the guest left there (issue 29) ---------------------------
# Run as root in the guest, which first lifts every guest-side read-only cover of a `.git`
# (a protection the guest's root can undo is none): then every shape of git metadata that
# makes the host's next `git status`, `git commit` or `git init` run a command.
PLANT_GIT = r"""
M="$1"; cd /workspace
cfg() {
    mkdir -p "$1" 2>/dev/null
    printf '[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tfsmonitor = touch %s\n' "$M" > "$1/config" &&
        echo "planted $1/config"
}
hook() {
    mkdir -p "$1/hooks" 2>/dev/null
    printf '#!/bin/sh\ntouch %s\n' "$M" > "$1/hooks/$2" && chmod +x "$1/hooks/$2" && echo "planted $1/hooks/$2"
}
gitdir() { mkdir -p "$1/objects" "$1/refs" 2>/dev/null; echo 'ref: refs/heads/main' > "$1/HEAD"; cfg "$1"; }
python3 -c '
import ctypes; libc = ctypes.CDLL(None)
for line in reversed(open("/proc/mounts").read().splitlines()):
    where = line.split()[1]
    if where.endswith("/.git"): print("unmounted", where, libc.umount2(where.encode(), 2))'
cfg .git; hook .git pre-commit; hook .git post-checkout
mkdir -p deep/er/sub; gitdir deep/er/sub/.git
gitdir .hidden-gitdir; mkdir -p wt2; echo "gitdir: ../.hidden-gitdir" > wt2/.git && echo "planted wt2/.git"
gitdir .cache/gd; [ -f .git ] && echo "gitdir: .cache/gd" > .git && echo "planted top .git file"
[ -d lib ] && echo "gitdir: ../.hidden-gitdir" > lib/.git && echo "planted lib/.git"
cfg .git/modules/lib
mkdir -p staged; gitdir staged/x; mv staged/x deep/.git && echo "renamed into deep/.git"
mv .git .git-moved && echo "moved .git away"
ln -s .cache/gd linked 2>/dev/null; mv linked .git && echo "linked .git"
echo ordinary > ordinary.txt
echo done
"""


def _git(cwd: Path, *args: str, user: pwd.struct_passwd | None = None, home: Path) -> subprocess.CompletedProcess:
    who = {f"GIT_{role}_{what}": value for role in ("AUTHOR", "COMMITTER")
           for what, value in (("NAME", "u"), ("EMAIL", "u@example.invalid"))}  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", **who}
    argv = ["git", "-c", "protocol.file.allow=always", *args]
    if user is None:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return as_user(user, argv, env, cwd=cwd, timeout=60)


def _git_workspaces(base: Path, user: pwd.struct_passwd | None, home: Path) -> dict[str, Path]:
    """The shapes a user's workspace takes: a repository with a submodule, a
    worktree (its `.git` is a file), and a directory with no repository."""
    for d in ("libsrc", "repo", "main", "plain"):
        (base / d).mkdir(parents=True)
    if user is not None:
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(base)], check=True)

    def git(where: str, *args: str) -> None:
        done = _git(base / where, *args, user=user, home=home)
        assert done.returncode == 0, done.stderr

    for repo in ("libsrc", "repo", "main"):
        git(repo, "init", "-q", "-b", "main")
        git(repo, "commit", "-q", "--allow-empty", "-m", "first")
    git("repo", "submodule", "-q", "add", str(base / "libsrc"), "lib")
    git("repo", "commit", "-q", "-m", "submodule")
    git("main", "worktree", "add", "-q", str(base / "wt"))
    (base / "plain" / "notes.txt").write_text("mine\n")
    if user is not None:
        os.chown(base / "plain" / "notes.txt", user.pw_uid, user.pw_gid)
    return {"repo": base / "repo", "worktree": base / "wt", "plain": base / "plain"}


def _host_git_after(ws: Path, kind: str, user: pwd.struct_passwd | None, home: Path) -> None:
    """What the user does next on the host: git in every directory the guest touched."""
    if kind == "plain":
        _git(ws, "init", "-q", user=user, home=home)
    for where in (ws, ws / "deep" / "er" / "sub", ws / "deep", ws / "wt2", ws / "lib", ws / "staged"):
        if where.is_dir():
            _git(where, "status", user=user, home=home)
    _git(ws, "commit", "-q", "--allow-empty", "-m", "after", user=user, home=home)
    _git(ws, "checkout", "-q", "-b", "after-session", user=user, home=home)


@pytest.mark.vm
@pytest.mark.parametrize("host_user", ["root", "unprivileged"])
def test_host_git_never_runs_what_the_guest_planted_at_any_depth(boot_config, readable_artifacts, tmp_path, host_user):
    user = unprivileged_user() if host_user == "unprivileged" else None
    base = Path(tempfile.mkdtemp(prefix="attack-git-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    marker = home / "PWNED"
    kernel, rootfs = readable_artifacts if user is not None else (boot_config.kernel, boot_config.rootfs)
    try:
        if user is not None:
            os.chown(home, user.pw_uid, user.pw_gid)
        spaces = _git_workspaces(base / "spaces", user, home)
        configs = {k: (ws / ".git").read_bytes() if (ws / ".git").is_file() else (ws / ".git" / "config").read_bytes()
                   for k, ws in spaces.items() if (ws / ".git").exists()}  # fmt: skip
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERMINAI_CACHE": str(home / "cache"), **run_settings()}
        for kind, ws in spaces.items():
            argv = [SHIM, "run", "--kernel", str(kernel), "--rootfs", str(rootfs), "--workspace", str(ws),
                    "--user", "root", "--", "sh", "-c", PLANT_GIT, "plant", str(marker)]  # fmt: skip
            done = as_user(user, argv, env, timeout=300) if user else subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
            assert "done" in done.stdout, (kind, done.stdout, done.stderr)
            _host_git_after(ws, kind, user, home)
            assert not marker.exists(), f"host git ran the guest's command ({kind})"
            made = [line for line in done.stdout.splitlines() if line.split(" ")[0] in ("planted", "renamed", "moved",
                    "linked") and not line.endswith(("gitdir/config", "gd/config", "x/config"))]  # fmt: skip
            assert not made, (kind, done.stdout)
            for shaped in (".hidden-gitdir", ".cache/gd", "staged/x"):  # a config, never a bare repository's
                assert not all((ws / shaped / part).exists() for part in ("HEAD", "objects", "refs")), shaped
            assert "Read-only file system" in done.stderr, (kind, done.stderr)
            assert (ws / "ordinary.txt").read_text() == "ordinary\n", "the rest of the workspace stays writable"
        for kind, before in configs.items():
            ws = spaces[kind]
            now = (ws / ".git").read_bytes() if (ws / ".git").is_file() else (ws / ".git" / "config").read_bytes()
            assert now == before, kind
        assert not (spaces["plain"] / ".git" / "config").read_text().count("fsmonitor")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_as(user: pwd.struct_passwd | None, argv: list[str], env: dict[str, str], timeout: float = 300):
    if user is not None:
        return as_user(user, argv, env, timeout=timeout)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _attack_home(user: pwd.struct_passwd | None) -> Path:
    home = Path(tempfile.mkdtemp(prefix="attack-home-"))
    home.chmod(0o755)
    if user is not None:
        os.chown(home, user.pw_uid, user.pw_gid)
    return home


# Every way a command writes a file, as root in the guest, on a file hard-linked to one outside.
WRITE_LINKED = r"""
cd /workspace/node_modules
echo appended >> pkg.js
python3 -c 'f = open("other.js", "r+"); f.write("overwritten"); f.close()'
truncate -s 0 cut.js
cp /etc/hostname copied-over.js
echo done
"""


@pytest.mark.vm
@pytest.mark.parametrize("host_user", ["root", "unprivileged"])
def test_a_write_never_reaches_a_hard_linked_file_outside_the_workspace(boot_config, readable_artifacts, host_user):
    """pnpm's store, `cp -al` and local clones leave files in the workspace that
    share an inode with a file outside it: the guest's writes must stay in the
    workspace (the file gets its own copy first), never reach the other name."""
    user = unprivileged_user() if host_user == "unprivileged" else None
    home = _attack_home(user)
    kernel, rootfs = readable_artifacts if user is not None else (boot_config.kernel, boot_config.rootfs)
    store, ws = home / "store", home / "ws"
    try:
        (ws / "node_modules").mkdir(parents=True)
        store.mkdir()
        names = ("pkg.js", "other.js", "cut.js", "copied-over.js")
        for name in names:
            (store / name).write_text(f"original {name}\n")
            (store / name).chmod(0o640)
            os.link(store / name, ws / "node_modules" / name)
        if user is not None:
            subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
        before = {n: (store / n).stat() for n in names}
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERMINAI_CACHE": str(home / "cache"), **run_settings()}
        argv = [SHIM, "run", "--kernel", str(kernel), "--rootfs", str(rootfs), "--workspace", str(ws),
                "--user", "root", "--", "sh", "-c", WRITE_LINKED]  # fmt: skip
        done = _run_as(user, argv, env)
        assert "done" in done.stdout, done.stderr
        for name in names:
            outside, inside = store / name, ws / "node_modules" / name
            assert outside.read_text() == f"original {name}\n", name
            assert outside.stat().st_mtime_ns == before[name].st_mtime_ns, name
            assert inside.stat().st_ino != outside.stat().st_ino, f"{name} still shares the outside inode"
            assert stat.S_IMODE(inside.stat().st_mode) == 0o640 and inside.stat().st_uid == before[name].st_uid
        workspace = {n: (ws / "node_modules" / n).read_text() for n in names}
        assert workspace["pkg.js"] == "original pkg.js\nappended\n" and workspace["other.js"].startswith("overwritten")
        assert workspace["cut.js"] == ""
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def small_filesystem(size: str, inodes: int, owner: pwd.struct_passwd | None):
    """A tmpfs of its own, so that filling it touches nothing else of the host."""
    where = Path(tempfile.mkdtemp(prefix="attack-fs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0755", "tmpfs", str(where)],
                   check=True)  # fmt: skip
    try:
        if owner is not None:
            os.chown(where, owner.pw_uid, owner.pw_gid)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


FILL_DISK = r"""
cd /workspace
truncate -s 15T sparse && echo "sparse made"
dd if=/dev/urandom of=sparse bs=1M count=1 seek=1000000 conv=notrunc 2>/dev/null && echo "wrote into it"
dd if=/dev/zero of=big bs=1M count=4000 2>&1 | tail -1
echo "still running"
"""
FILL_INODES = r"""
cd /workspace; mkdir many; i=0
while [ $i -lt 20000 ]; do : > many/$i 2>/dev/null || { echo "refused at $i"; break; }; i=$((i+1)); done
echo "made $i"
"""


@pytest.mark.vm
@pytest.mark.parametrize("host_user", ["root", "unprivileged", "container"])
@pytest.mark.parametrize("fill", ["bytes", "inodes"])
def test_the_guest_cannot_fill_the_hosts_disk(boot_config, readable_artifacts, request, host_user, fill):
    """The workspace's file system keeps its floor: creating stops there with
    ENOSPC (microVM), and a write that grows a file past it stops the session
    with a named error, in both tiers (a sparse file costs only what is
    written into it)."""
    user = unprivileged_user() if host_user == "unprivileged" else None
    home = _attack_home(user)
    kernel, rootfs = readable_artifacts if user is not None else (boot_config.kernel, boot_config.rootfs)
    tier = ["--kernel", str(kernel), "--rootfs", str(rootfs)]
    if host_user == "container":
        tier = ["--backend", "container", "--image", str(request.getfixturevalue("container_image").archive)]
    try:
        with small_filesystem("700M", 4000, user) as fs:
            env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERMINAI_CACHE": str(home / "cache"),
                   "TERMINAI_DISK_FLOOR": "300M,10%"}  # fmt: skip
            argv = [SHIM, "run", *tier, "--workspace", str(fs), "--user",
                    "root", "--", "sh", "-c", FILL_DISK if fill == "bytes" else FILL_INODES]  # fmt: skip
            done = _run_as(user, argv, env)
            st = os.statvfs(fs)
            if fill == "bytes":
                assert "sparse made" in done.stdout and "wrote into it" in done.stdout, done.stderr
                assert done.returncode == 125 and "disk floor" in done.stderr, (done.returncode, done.stderr)
                assert "still running" not in done.stdout
                assert st.f_bavail * st.f_frsize > 200 << 20, "the floor held (within one check's worth of writes)"
            elif host_user != "container":  # the microVM's guard refuses each new name at the floor
                assert "refused at" in done.stdout or "disk floor" in done.stderr, (done.stdout, done.stderr)
                assert st.f_favail >= 300, st.f_favail
            # (the container tier only checks every 50 ms: a fast creator gets past the floor; then no new session)
            again = _run_as(user, [*argv[:-3], "true"], env, timeout=120)
            if st.f_bavail * st.f_frsize < 300 << 20 or st.f_favail < 400:
                assert again.returncode == 125 and "floor" in again.stderr, again.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


# In `open` mode the guest's reject route for the host's loopback is the guest's own: a socket
# bound to eth0 (no capability needed) ignores it. The host must refuse on QEMU's side.
BYPASS_ROUTE = r"""
import socket, sys
tcp, udp = int(sys.argv[1]), int(sys.argv[2])
for bind in (None, b"eth0"):
    s = socket.socket()
    if bind: s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind)
    s.settimeout(5)
    try: s.connect(("10.0.2.2", tcp)); print("tcp", bind, "CONNECTED")
    except OSError as e: print("tcp", bind, "refused", e.errno)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if bind: u.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind)
    try: u.sendto(b"ping", ("10.0.2.2", udp)); print("udp", bind, "sent")
    except OSError as e: print("udp", bind, "refused", e.errno)
"""


@pytest.mark.vm
def test_open_mode_cannot_reach_host_loopback_by_binding_to_the_device(boot_config):
    from terminai_shim.models import NetworkPolicy

    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    try:
        with boot(boot_config, network=NetworkPolicy("open"), snapshots="off") as s:
            code, out, err = py_args(s, BYPASS_ROUTE, str(tcp.getsockname()[1]), str(udp.getsockname()[1]))
            assert code == 0 and "CONNECTED" not in out, (out, err)
            time.sleep(1)
        with pytest.raises(TimeoutError):
            tcp.accept()
        with pytest.raises(TimeoutError):
            udp.recvfrom(10)
    finally:
        tcp.close()
        udp.close()


CHURN = r"""
import socket, time
made = failed = 0
end = time.monotonic() + 10
while time.monotonic() < end:
    try:
        socket.create_connection(("10.0.2.100", 3128), timeout=5).close(); made += 1
    except OSError:
        failed += 1
print("made", made, "failed", failed)
"""


@pytest.mark.vm
def test_connection_churn_cannot_make_the_host_start_processes_without_bound(boot_config, origin):
    """Each allowlisted guest connection makes QEMU start a connector on the
    host: a guest opening and closing connections in a loop is held to the
    guard's rate (the waiting ones wait; none run unbounded)."""
    from terminai_shim._internal.vmmguard import SPAWN_BURST, SPAWN_RATE

    port, _ = origin
    with boot(boot_config, network=_allow(f"127.0.0.1:{port}"), snapshots="off") as s:
        guard = s.machine.guard
        seen: set[int] = set()
        lag: list[float] = []
        stop = threading.Event()

        def watch():  # what the host sees, and how late a 10 ms sleep of its own wakes meanwhile
            while not stop.is_set():
                seen.update(children(s.machine.pid))
                t = time.monotonic()
                time.sleep(0.01)
                lag.append(time.monotonic() - t - 0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        try:
            _code, out, err = py(s, CHURN, timeout=300)
        finally:
            stop.set()
            watcher.join()
        elapsed = time.monotonic() - started
        made = int(out.split()[1])
        lag.sort()
        print(f"churn: {made} guest connections, {guard.spawned} connectors in {elapsed:.1f}s "
              f"({len(seen)} seen); host sleep lag p50 {lag[len(lag) // 2] * 1000:.1f} ms, "
              f"p99 {lag[int(len(lag) * 0.99)] * 1000:.1f} ms")  # fmt: skip
        assert made > 0, (out, err)
        assert guard.spawned <= SPAWN_RATE * elapsed + SPAWN_BURST, (guard.spawned, elapsed)
        assert len(seen) <= guard.spawned
        again = SMUGGLE.split("\nask(")[0] + f'\nask(b"GET http://127.0.0.1:{port}/x HTTP/1.1\\r\\n\\r\\n")'
        assert "200" in py_args(s, again, str(port))[1], "the proxy still serves"


# A process one command leaves behind watches for the next command's secrets, and the
# next command tries the same on it: /proc/<pid>/environ, its memory, ptrace.
SPY = r"""
import os, time
if os.fork():
    os._exit(0)
os.setsid()  # out of the command's process group: it outlives the command
open("/tmp/spy.pid", "w").write(str(os.getpid()))
me = os.getpid()
end = time.monotonic() + 20
while time.monotonic() < end:
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != me:
            try:
                if b"API_TOKEN=s3cr3t" in open(f"/proc/{p}/environ", "rb").read():
                    open("/tmp/found", "w").write(p)
            except OSError:
                pass
    time.sleep(0.05)
"""
VICTIM = r"""
import ctypes, os, time
time.sleep(2)
spy = int(open("/tmp/spy.pid").read())
libc = ctypes.CDLL(None, use_errno=True)
for what, attempt in (("environ", lambda: open(f"/proc/{spy}/environ", "rb").read()),
                      ("mem", lambda: open(f"/proc/{spy}/mem", "rb")),
                      ("fd", lambda: os.open(f"/proc/{spy}/fd/0", os.O_RDONLY))):
    try:
        attempt(); print(what, "OPEN")
    except OSError as e:
        print(what, "refused", e.errno)
print("ptrace", "OPEN" if libc.ptrace(16, spy, 0, 0) == 0 else f"refused {ctypes.get_errno()}")
time.sleep(1)
print("found", open("/tmp/found").read() if os.path.exists("/tmp/found") else "nothing")
"""


@pytest.mark.vm
@pytest.mark.parametrize("tier", ["microvm", "container"])
def test_commands_of_a_session_cannot_read_or_trace_one_another(boot_config, request, tier):
    from terminai_shim.models import BootConfig

    if tier == "container":
        image = request.getfixturevalue("container_image")
        config = BootConfig(image=image.archive, backend="container")
    else:
        config = dataclasses.replace(boot_config, snapshots="off")
    with boot(config) as s:
        status, _out, err = s.client.run(["python3", "-c", SPY], timeout=60)
        assert status.exit_code == 0, err
        assert sh(s, "kill -0 $(cat /tmp/spy.pid) && echo alive")[1].strip() == "alive", "the spy outlived its command"
        status, out, err = s.client.run(["python3", "-c", VICTIM], env={"API_TOKEN": "s3cr3t", "PATH": "/usr/bin:/bin"},
                                        timeout=120)  # fmt: skip
        said = out.decode()
        assert "OPEN" not in said and "found nothing" in said, (said, err)
        assert said.count("refused") == 4, said
        # within one command, its own processes still see each other (a shell and its pipeline)
        assert sh(s, "sleep 5 & cat /proc/$!/environ >/dev/null && echo own")[1].strip() == "own"
        # and a domain takes nothing else away: moving and linking a file into another directory (which
        # Landlock forbids by default inside a domain: pip builds wheels that way)
        moved = "mkdir -p /tmp/a /tmp/b && touch /tmp/a/f && mv /tmp/a/f /tmp/b/f && ln /tmp/b/f /tmp/a/g && echo moved"
        assert sh(s, moved)[1].strip() == "moved"


@pytest.mark.unit
def test_a_dangerous_workspace_is_refused_unless_forced(tmp_path):
    """`--workspace /` let the guest read the host's /etc/shadow and write its /tmp:
    /, system directories, a home directory itself and its parents are refused
    through either door, before anything boots; forcing is explicit."""
    from terminai_shim.errors import ConfigError
    from terminai_shim.launch import LaunchRequest, LocalArtifacts, dangerous_workspace, resolve

    home = Path(os.path.expanduser("~"))
    for path in ("/", "/etc", "/etc/ssh", "/usr", "/tmp", "/var/tmp", str(home), str(home.parent), "/proc/self"):
        assert dangerous_workspace(Path(path)) is not None, path
    assert dangerous_workspace(tmp_path) is None and dangerous_workspace(home / "project") is None
    # The user's configuration: a guest sharing it could name the default release and who must sign it.
    from terminai_shim._internal.fsutil import config_root

    for path in (config_root(), config_root().parent, config_root() / "sub", config_root().parent.parent):
        assert dangerous_workspace(path) is not None, path
    with pytest.MonkeyPatch.context() as env:  # where the configuration is on a machine that sets nothing
        env.delenv("XDG_CONFIG_HOME")
        assert dangerous_workspace(home / ".config") is not None
        assert dangerous_workspace(home / ".config" / "terminai") is not None
        assert dangerous_workspace(home / ".config" / "nvim") is None, "other programs' folders are the user's call"
    done = subprocess.run([SHIM, "run", "--kernel", "/dev/null", "--rootfs", "/dev/null", "--workspace", "/", "--",
                           "true"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 125 and "--force-workspace" in done.stderr and "Traceback" not in done.stderr
    shim = ShimProc()
    try:
        refused = shim.call("initialize", {"kernel": "/dev/null", "rootfs": "/dev/null", "workspace": str(home)})
        assert refused["error"]["code"] == "INVALID_CONFIG" and "could read and write all of it" in refused["error"][
            "message"]  # fmt: skip
    finally:
        shim.close()
    local = LocalArtifacts(kernel=tmp_path / "k", rootfs=tmp_path / "r")
    with pytest.raises(ConfigError, match="root directory"):
        resolve(LaunchRequest(local=local, workspace=Path("/")))
    try:
        resolve(LaunchRequest(local=local, workspace=Path("/"), force_workspace=True))
    except ConfigError as exc:  # it may fail later (no such kernel), never for the workspace
        assert "workspace" not in exc.message, exc.message


@pytest.mark.vm
def test_the_container_tier_keeps_existing_git_metadata_read_only_at_any_depth(container_image, tmp_path):
    """The container tier cannot refuse a *new* `.git` (docs/security.md says
    so), but every piece of git metadata the workspace has when the session
    starts, at any depth, is a read-only bind the container cannot unmount:
    the top-level repository, a submodule's `.git` file and its git dir, a
    worktree's `.git` file. Host git at the top then runs nothing planted."""
    from terminai_shim.models import BootConfig

    home = tmp_path / "home"
    home.mkdir()
    marker = home / "PWNED"
    spaces = _git_workspaces(tmp_path / "spaces", None, home)
    attack = (r'M="$1"; cd /workspace; for f in .git/config .git lib/.git .git/modules/lib/config; do '
              r'[ -e "$f" ] && { printf "[core]\n\tfsmonitor = touch %s\n" "$M" > "$f" && echo "wrote $f"; }; done; '
              "umount .git 2>&1; rm -rf .git 2>&1; echo done")  # fmt: skip
    for kind in ("repo", "worktree"):
        ws = spaces[kind]
        places = (ws / ".git", ws / ".git" / "config", ws / "lib" / ".git", ws / ".git" / "modules" / "lib" / "config")
        before = {p: p.read_bytes() for p in places if p.is_file()}
        config = BootConfig(image=container_image.archive, backend="container", workspace=ws)
        with boot(config) as s:
            assert s.describe()["gitReadOnly"]
            _code, out, err = sh(s, attack.replace('"$1"', f'"{marker}"'))
            assert "done" in out and "wrote" not in out, (kind, out, err)
        assert {p: p.read_bytes() for p in before} == before, kind
        _git(ws, "status", home=home)
        assert not marker.exists(), f"host git ran the guest's command ({kind})"


@pytest.mark.vm
def test_what_the_container_made_is_made_harmless_when_it_ends(container_image, tmp_path):
    """What the container tier cannot refuse while it runs, it does not leave:
    a repository, a `.git` file and a bare shape the container made are moved
    aside when the session ends, and host git then runs nothing of them; a
    FIFO and a socket it made are plain files (a host tool hung on the FIFO)."""
    from terminai_shim.models import BootConfig

    home = tmp_path / "home"
    home.mkdir()
    marker = home / "PWNED"
    ws = tmp_path / "plain"
    ws.mkdir()
    plant = (
        f'M="{marker}"; cd /workspace; mkdir -p .git sub/.git bare/objects bare/refs gd/objects gd/refs; '
        r'for d in .git sub/.git bare gd; do printf "[core]\n\tfsmonitor = touch %s\n" "$M" > $d/config; '
        "echo 'ref: refs/heads/main' > $d/HEAD; done; mkdir -p wt; echo 'gitdir: ../gd' > wt/.git; echo done"
    )
    plant += "; mkfifo fifo && python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")' && echo made"
    config = BootConfig(image=container_image.archive, backend="container", workspace=ws)
    with pytest.warns(UserWarning, match="moved aside"), boot(config) as s:
        out = sh(s, plant)[1]
        assert "done" in out and "made" in out, out
    for name in ("fifo", "sock"):  # what a host tool would hang on or connect to: a plain empty file now
        assert (ws / name).is_file() and (ws / name).stat().st_size == 0, name
    assert subprocess.run(["wc", "-c", str(ws / "fifo")], capture_output=True, timeout=10).returncode == 0
    for where in (ws, ws / "sub", ws / "wt", ws / "bare"):
        _git(where, "status", home=home)
        _git(where, "log", home=home)
    _git(ws, "init", "-q", home=home)
    _git(ws, "status", home=home)
    assert not marker.exists(), "host git ran what the container left"
    assert any(p.name.startswith(".git.terminai-untrusted-") for p in ws.iterdir())
    with boot(BootConfig(image=container_image.archive, backend="container", workspace=ws, writable_git=True)) as s:
        assert "ok" in sh(s, "cd /workspace && mkdir -p kept/.git && echo ok")[1]
    assert (ws / "kept" / ".git").is_dir(), "a writable git keeps what the guest made"


@pytest.mark.vm
def test_the_container_tier_refuses_a_workspace_with_hard_linked_files(container_image, tmp_path):
    """A write in the container would reach the other name of a hard-linked
    file (the container has no guard to copy it first): such a workspace is
    refused with the files named, and nothing outside changes."""
    store, ws = tmp_path / "store", tmp_path / "ws"
    store.mkdir()
    (ws / "node_modules").mkdir(parents=True)
    (store / "pkg.js").write_text("original\n")
    os.link(store / "pkg.js", ws / "node_modules" / "pkg.js")
    done = subprocess.run([SHIM, "run", "--backend", "container", "--image", str(container_image.archive),
                           "--workspace", str(ws), "--", "sh", "-c", "echo pwn >> node_modules/pkg.js"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 125 and "node_modules/pkg.js" in done.stderr and "microVM" in done.stderr, done.stderr
    assert (store / "pkg.js").read_text() == "original\n"
