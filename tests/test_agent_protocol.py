"""The agent and its wire protocol, against the real agent on a Unix socket."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from terminai_protocol import protocol as P
from terminai_release.rootfs.project import agent_pythonpath
from terminai_shim._internal.client import AgentClient
from terminai_shim.errors import AgentError

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.unit
PY = sys.executable


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# -- framing ---------------------------------------------------------------------
def test_decoder_roundtrip_in_pieces():
    frames = P.request(1, "ping") + P.result(2, b"\x00\xffbinary", size=3) + P.event(3, "stdout", b"x" * 1000)
    dec = P.Decoder()
    out = []
    for i in range(len(frames)):
        out += dec.feed(frames[i : i + 1])
    assert [f.header["kind"] for f in out] == ["req", "res", "evt"]
    assert out[1].body == b"\x00\xffbinary"
    assert out[2].body == b"x" * 1000


def test_decoder_resyncs_after_garbage():
    dec = P.Decoder()
    out = dec.feed(b"garbage!!" + P.request(7, "ping"))
    assert isinstance(out[0], P.ProtocolError) and out[0].code == P.BAD_FRAME
    assert isinstance(out[1], P.Frame) and out[1].id == 7


def test_decoder_refuses_oversized_and_bad_headers():
    dec = P.Decoder(max_frame=4096)
    huge = struct.pack("!4sII", P.MAGIC, 1 << 30, 10)
    bad_json = struct.pack("!4sII", P.MAGIC, 3, 3) + b"{{{"
    not_object = struct.pack("!4sII", P.MAGIC, 2, 2) + b"[]"
    out = dec.feed(huge + bad_json + not_object + P.request(1, "ping"))
    codes = [x.code for x in out if isinstance(x, P.ProtocolError)]
    assert P.FRAME_TOO_LARGE in codes and codes.count(P.BAD_FRAME) >= 2
    assert isinstance(out[-1], P.Frame) and out[-1].header["op"] == "ping"


HEADERS = [
    {"kind": "req", "id": 1, "op": "exec", "argv": ["echo", "a b", "'q'", '"dq"', "\\", "\u00e9\u4e2d\U0001f600"]},
    {"id": 2**62, "neg": -7, "f": 1.5, "e": 1e-300, "t": True, "n": None, "empty": {}, "list": [[], [{}]]},
    {"ctl": "\x00\x1f\x7f", "key with space": "v", "1": 1, "nested": {"a": {"b": {"c": [1, 2, 3]}}}},
]


@pytest.mark.parametrize("header", HEADERS)
def test_header_codec_matches_the_json_package(header):
    """The C-level codec the agent uses must write and read exactly what
    the json package does, and the fallback must agree with it."""
    text = P.dumps_header(header)
    assert text == json.dumps(header, separators=(",", ":"))
    assert P.loads_header(text.encode()) == header == json.loads(text)
    spaced = json.dumps(header, indent=2).encode()
    assert P.loads_header(b" \n" + spaced + b"\r\n\t") == header


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"{", b'{"a":1} x', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":"\x01"}', b"\xff\xfe{}", b"[1,]"],
)
def test_header_codec_refuses_what_is_not_strict_json(raw):
    with pytest.raises(ValueError):
        P.loads_header(raw)


def test_header_codec_refuses_unencodable_values():
    with pytest.raises(ValueError):
        P.dumps_header({"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON serializable"):
        P.dumps_header({"x": b"bytes"})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        P.dumps_header(loop)


def test_header_codec_fallback_without_the_c_module(monkeypatch):
    """An interpreter without ``_json`` gets the json package: same bytes."""
    monkeypatch.setitem(sys.modules, "_json", None)
    dumps, loads = P._json_codec()
    for header in HEADERS:
        assert dumps(header) == P.dumps_header(header)
        assert loads(dumps(header).encode()) == header
    with pytest.raises(ValueError):
        dumps({"x": float("inf")})


def test_agent_boot_path_imports_no_heavy_modules():
    """Every module the agent imports before it serves is boot time under
    TCG: the import chain must stay free of json/re/enum/typing."""
    agent = agent_pythonpath(REPO).split(os.pathsep)
    code = f"import sys; sys.path.extend({agent!r}); import terminai_agent.main; print(*sys.modules)"
    out = subprocess.run([PY, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "terminai_agent.server" in loaded
    assert not loaded & {"json", "re", "enum", "functools", "collections", "typing", "signal", "socket"}, loaded


def test_encode_refuses_oversized():
    with pytest.raises(P.ProtocolError):
        P.encode({"kind": "req"}, b"x" * 5000, max_frame=4096)


# -- the agent ----------------------------------------------------------------------
def test_hello_required_and_unknown_op(host_agent):
    c = AgentClient(host_agent.connect())
    with pytest.raises(AgentError) as e:
        c.ping()
    assert e.value.agent_code == P.HELLO_REQUIRED
    info = c.hello()
    assert info["version"] == P.AGENT_PROTOCOL_VERSION and len(info["session"]) == 32
    with pytest.raises(AgentError) as e:
        c.call("format_disk")
    assert e.value.agent_code == P.UNKNOWN_OP
    assert c.ping()["pong"] is True


def test_version_mismatch(host_agent):
    c = AgentClient(host_agent.connect())
    with pytest.raises(AgentError) as e:
        c.call("hello", versions=[99])
    assert e.value.agent_code == P.VERSION_MISMATCH


def test_garbage_then_ping(host_agent):
    c = host_agent.client()
    c.send_raw(b"\x00\x01 this is not a frame \xff" * 10)
    c.send_raw(struct.pack("!4sII", P.MAGIC, 1 << 31, 4) + b"junk")
    c.send_raw(struct.pack("!4sII", P.MAGIC, 5, 5) + b"nope!")
    assert c.ping()["pong"] is True
    time.sleep(0.1)
    assert any("not a frame" in e for e in c.protocol_errors)
    assert any("refused" in e for e in c.protocol_errors)


def test_argv_is_not_shell_interpreted(host_agent):
    c = host_agent.client()
    args = ["a b", "it's", '"q"', "$HOME", "; rm -rf /", "*"]
    status, out, _ = c.run([PY, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *args])
    assert status.exit_code == 0
    assert json.loads(out) == args


def test_shell_only_when_asked(host_agent):
    c = host_agent.client()
    with pytest.raises(AgentError) as e:
        c.call("exec", command="echo hi")
    assert e.value.agent_code == P.BAD_REQUEST
    status, out, _ = c.run(command="echo $((6*7))", shell=True)
    assert out == b"42\n" and status.exit_code == 0


def test_never_ran_is_distinguished(host_agent):
    c = host_agent.client()
    with pytest.raises(AgentError) as e:
        c.exec(["/no/such/binary"])
    assert e.value.agent_code == P.SPAWN_FAILED and e.value.ran is False
    with pytest.raises(AgentError) as e:
        c.exec(["true"], cwd="/no/such/dir")
    assert e.value.agent_code == P.SPAWN_FAILED
    status, _, _err = c.run([PY, "-c", "import sys; sys.exit(7)"])
    assert status.exit_code == 7 and status.code == 7


def test_timeout_kills_the_whole_group(host_agent):
    c = host_agent.client()
    started = time.monotonic()
    status, out, _ = c.run(["sh", "-c", "sleep 100 & echo $!; sleep 100"], timeout=1)
    assert status.timed_out and status.signal == 9
    assert time.monotonic() - started < 20
    child = int(out.split()[0])
    assert wait_gone(child), f"background child {child} survived the timeout"


def test_background_children_die_with_the_command(host_agent):
    c = host_agent.client()
    status, out, _ = c.run(["sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $!"])
    assert status.exit_code == 0
    child = int(out)
    assert wait_gone(child), "a background child outlived its command"


def test_stdin_body_and_streamed(host_agent):
    c = host_agent.client()
    _, out, _ = c.run(["cat"], stdin=b"fed once\n")
    assert out == b"fed once\n"
    proc = c.exec(["cat"], stdin_open=True)
    proc.write_stdin(b"one ")
    proc.write_stdin(b"two")
    proc.close_stdin()
    chunks = b"".join(chunk for _, chunk in proc.output())
    assert chunks == b"one two" and proc.wait().exit_code == 0
    big = os.urandom(3 << 20)
    _status, out, _ = c.run(["cat"], stdin=big)
    assert out == big


def test_output_cap_truncates(host_agent):
    c = host_agent.client()
    status, out, err = c.run(
        [PY, "-c", "import sys; sys.stdout.write('x'*100000); sys.stderr.write('e'*10)"], output_cap=1000
    )
    assert len(out) == 1000 and err == b"e" * 10
    assert status.truncated == ["stdout"] and status.exit_code == 0


def test_signal_and_concurrency(host_agent):
    c = host_agent.client()
    proc = c.exec(["sleep", "100"])
    proc.signal("TERM")
    assert proc.wait(10).signal == 15
    results = {}

    def one(i):
        status, out, _ = c.run([PY, "-c", f"print('job-{i}' * 1000)"])
        results[i] = (status.exit_code, out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 32
    for i, (code, out) in results.items():
        assert code == 0 and out == f"job-{i}".encode() * 1000 + b"\n"


def test_no_such_process(host_agent):
    c = host_agent.client()
    with pytest.raises(AgentError) as e:
        c.call("signal", target=12345)
    assert e.value.agent_code == P.NO_SUCH_PROCESS


def test_file_operations(host_agent, tmp_path):
    c = host_agent.client()
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = str(tmp_path / "sub" / "f.bin")
    c.write_file(path, data, create_dirs=True)
    assert (tmp_path / "sub" / "f.bin").read_bytes() == data
    assert not (tmp_path / "sub" / "f.bin.terminai-tmp").exists()
    assert c.read_file(path) == data
    st = c.stat(path)
    assert st["type"] == "file" and st["size"] == len(data)
    c.mkdir(str(tmp_path / "d" / "e"))
    names = [e["name"] for e in c.listdir(str(tmp_path))]
    assert names == ["agent.sock", "d", "sub"]
    c.remove(str(tmp_path / "d"), recursive=True)
    with pytest.raises(AgentError) as e:
        c.stat(str(tmp_path / "d"))
    assert e.value.agent_code == P.NOT_FOUND
    with pytest.raises(AgentError) as e:
        c.call("read", path=str(tmp_path))
    assert e.value.agent_code == P.IO_ERROR
    with pytest.raises(AgentError) as e:
        c.call("read")
    assert e.value.agent_code == P.BAD_REQUEST


def test_client_disconnect_kills_its_commands(host_agent):
    c = host_agent.client()
    proc = c.exec(["sh", "-c", "echo $$; exec sleep 100"])
    pid = int(next(proc.output())[1])
    c.close()
    assert wait_gone(pid), "a command outlived its connection"
    assert host_agent.client().ping()["pong"]


def test_stdin_is_paced_by_the_command(host_agent, tmp_path):
    """A command that does not read its stdin makes the writer wait instead of
    growing the agent's buffer; once it reads, everything arrives."""
    from terminai_shim._internal.client import STDIN_HIGH_WATER

    c = host_agent.client()
    flag = tmp_path / "go"
    proc = c.exec(["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; exec wc -c"], stdin_open=True)
    data = os.urandom(STDIN_HIGH_WATER * 3)
    writer = threading.Thread(target=lambda: (proc.write_stdin(data), proc.close_stdin()))
    writer.start()
    writer.join(1.0)
    # The command reads nothing until the flag exists, so the writer cannot be done.
    assert writer.is_alive(), "the writer should wait while the command does not read"
    flag.touch()
    writer.join(60)
    out = b"".join(chunk for _, chunk in proc.output())
    assert int(out) == len(data)


def test_restore_requests_go_out_behind_hello(host_agent, tmp_path):
    """hello, freshen and mount are sent before any answer; the agent runs
    them in order. The host agent is not PID 1: freshen sets the session id
    and leaves this machine's clock, host name and entropy pool alone."""
    import socket as socketlib
    from types import SimpleNamespace

    from terminai_shim._internal.client import AgentClient
    from terminai_shim.errors import AgentError
    from terminai_shim.models import BootConfig
    from terminai_shim.session import _Restore

    hostname = socketlib.gethostname()
    client = AgentClient(host_agent.connect())
    restore = _Restore(BootConfig(workspace=tmp_path))
    restore.greet(client, time.monotonic() + 10)
    assert client.hello_info["version"] == P.AGENT_PROTOCOL_VERSION
    assert [c.op for c in restore.calls] == ["freshen", "mount"]
    with pytest.raises(AgentError, match="init only"):  # refused on the host; the error reaches the caller
        restore.finish(SimpleNamespace(client=client), 10)
    assert client.ping()["session"] == restore.session_id
    assert socketlib.gethostname() == hostname
    client.close()


def test_prepare_changes_nothing_outside_a_vms_init_and_a_large_output_arrives_whole(host_agent):
    """``prepare`` is init's (the network, the root launcher, the seal): an
    agent that is not a VM's init answers and runs commands as before. A
    megabyte-sized output crosses in frames of up to 1 MiB, header and body
    written as separate pieces, and arrives byte for byte."""
    c = host_agent.client()
    c.call("prepare")
    data = bytes(range(256)) * (3 << 12) + b"tail"  # 3 MiB and a bit, not a multiple of anything
    status, out, _ = c.run([PY, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"], stdin=data)
    assert status.exit_code == 0 and out == data
