"""The Windows brain tier. The broker core runs here against the real
``agent-brain.js`` under Node over a Unix socket (Node's net module speaks
to named pipes on Windows and Unix sockets elsewhere with the same API).
The Win32 calls (AppContainer, the pipe's DACL in effect, the launch, AMSI)
can only run on Windows: those tests are skipped here, with that reason,
and run by the Windows job of release/github/release.yml."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from shimproc import SHIM
from terminai_shim.windows import win32
from terminai_shim.windows.broker import Broker, BrokerConfig
from terminai_shim.windows.bundle import BundleError, open_bundle, verify_zip

REPO = Path(__file__).resolve().parents[1]
BRAIN = REPO / "images/brain/agent-brain.js"
TOKEN = "t" * 12 + os.urandom(12).hex()
UNIX_SOCKETS = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"),
    reason="these drive the broker over a Unix socket; on Windows it serves a named pipe (the Windows-only test)",
)
WINDOWS_ONLY = pytest.mark.skipif(
    sys.platform != "win32",
    reason="AppContainers, named pipes with DACLs and AMSI exist only on Windows: "
    "the Windows job of release/github/release.yml runs these",
)


# -- pure Win32 helpers, tested everywhere --------------------------------------------------------
@pytest.mark.unit
def test_pipe_name_and_sddl():
    assert win32.pipe_name("abcdef123456") == r"\\.\pipe\terminai-abcdef123456"
    for bad in ("short", "has space here", "../../x", "a" * 65):
        with pytest.raises(ValueError):
            win32.pipe_name(bad)
    user = "S-1-5-21-1004336348-1177238915-682003330-512"
    ac = "S-1-15-2-1430448594-2639229838-973813799-439329657-1197984847-4069167804-1277922394"
    sddl = win32.pipe_sddl(user, ac)
    # Protected DACL: the user (all access) and the AppContainer (read/write), nobody else; low integrity label.
    assert sddl == f"D:P(A;;GA;;;{user})(A;;GRGW;;;{ac})S:(ML;;NW;;;LW)"
    assert "WD" not in sddl and "AU" not in sddl and "AC)" not in sddl
    with pytest.raises(ValueError):
        win32.pipe_sddl("Everyone", ac)


def _argv_from_command_line(line: str) -> list[str]:
    """CommandLineToArgvW's documented rules, as a reference for the tests."""
    args, cur, i, quoted, have = [], "", 0, False, False
    while i < len(line):
        c = line[i]
        if c == "\\":
            j = i
            while j < len(line) and line[j] == "\\":
                j += 1
            n = j - i
            if j < len(line) and line[j] == '"':
                cur += "\\" * (n // 2)
                if n % 2:
                    cur += '"'
                    i = j + 1
                else:
                    i = j
                have = True
                continue
            cur += "\\" * n
            i = j
            have = True
            continue
        if c == '"':
            quoted = not quoted
            have = True
        elif c in " \t" and not quoted:
            if have:
                args.append(cur)
            cur, have = "", False
        else:
            cur += c
            have = True
        i += 1
    if have:
        args.append(cur)
    return args


@pytest.mark.unit
@pytest.mark.parametrize("argv", [
    ["node", "agent-brain.js", "--pipe=\\\\.\\pipe\\terminai-abc"],
    ["C:\\Program Files\\node\\node.exe", "a b", ""],
    ["x", 'say "hi"', "trailing\\", 'back\\"slash', "tab\there", "\\\\server\\share\\"],
])  # fmt: skip
def test_command_line_quoting_round_trips(argv):
    assert _argv_from_command_line(win32.command_line(argv)) == argv


@pytest.mark.unit
def test_environment_block_and_what_the_brain_inherits():
    block = win32.environment_block({"b": "2", "A": "1", "Path": "C:\\x"})
    assert block == "A=1\0b=2\0Path=C:\\x\0\0"
    for bad in ({"A=B": "x"}, {"A": "nul\0"}, {"": "x"}):
        with pytest.raises(ValueError):
            win32.environment_block(bad)
    env = win32.brain_environment({"PATH": "C:\\bin", "AWS_SECRET_ACCESS_KEY": "s3cret", "SystemRoot": "C:\\W"},
                                  r"\\.\pipe\terminai-x", TOKEN, "C:\\ws", "1.2.3")  # fmt: skip
    assert env["TERMINAI_BROKER_PIPE"] == r"\\.\pipe\terminai-x" and env["TERMINAI_HANDSHAKE_TOKEN"] == TOKEN
    assert env["TERMINAI_WORKSPACE_PATH"] == "C:\\ws" and env["TERMINAI_CLI_VERSION"] == "1.2.3"
    assert "AWS_SECRET_ACCESS_KEY" not in env and env["SystemRoot"] == "C:\\W"


@pytest.mark.unit
def test_security_capabilities_structure_layout():
    import ctypes

    pointer = ctypes.sizeof(ctypes.c_void_p)
    assert ctypes.sizeof(win32.SID_AND_ATTRIBUTES) == 2 * pointer
    assert ctypes.sizeof(win32.SECURITY_CAPABILITIES) == 2 * pointer + 8
    assert win32.CAPABILITIES == {"internetClient": "S-1-15-3-1", "privateNetworkClientServer": "S-1-15-3-3"}


@pytest.mark.unit
def test_job_object_limits_layout():
    """The structure SetInformationJobObject reads (x64 layout, from the
    documented definitions), and the limits: the whole tree dies with the job."""
    import ctypes

    if ctypes.sizeof(ctypes.c_void_p) == 8:
        assert ctypes.sizeof(win32.JOBOBJECT_BASIC_LIMIT_INFORMATION) == 64
        assert ctypes.sizeof(win32.IO_COUNTERS) == 48
        assert ctypes.sizeof(win32.JOBOBJECT_EXTENDED_LIMIT_INFORMATION) == 144
        assert win32.JOBOBJECT_BASIC_LIMIT_INFORMATION.LimitFlags.offset == 16
    flags = win32.job_limits().BasicLimitInformation.LimitFlags
    assert flags & win32.JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE and flags & 0x400


@WINDOWS_ONLY
@pytest.mark.windows
def test_a_commands_descendants_die_with_its_job_on_windows(tmp_path):  # pragma: no cover - Windows job
    """Finding 5: Windows kept only the brain's own process handle, so what a
    command started outlived it. A grandchild started by a timed-out command
    must be gone once the broker answers."""
    from terminai_shim.windows.broker import Broker

    broker = Broker(BrokerConfig(token=TOKEN, workspace=tmp_path, allow_shell=True))
    child = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
        "time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)"
    )
    try:
        result = broker.op_execute({"command": sys.executable, "args": ["-c", child], "timeout": 3000})
        assert result["timedOut"]
        grandchild = result["stdout"].split()[0]
        listed = subprocess.run(["tasklist", "/FI", f"PID eq {grandchild}"], capture_output=True, text=True).stdout
        assert grandchild not in listed, listed
    finally:
        broker.stop()


@WINDOWS_ONLY
@pytest.mark.windows
def test_appcontainer_profile_pipe_and_launch_on_windows(tmp_path):  # pragma: no cover - Windows job
    from terminai_shim.windows.bundle import BrainBundle
    from terminai_shim.windows.launch import launch

    sid = win32.ensure_profile()
    assert sid.startswith("S-1-15-2-") and win32.ensure_profile() == sid  # created once, then found
    (tmp_path / "agent-brain.js").write_bytes(BRAIN.read_bytes())
    doc = {"files": [{"path": "agent-brain.js"}], "entrypoint": "agent-brain.js", "version": "test"}
    brain = launch(BrainBundle(tmp_path, doc), workspace=tmp_path)
    try:
        assert brain.isolation == "appcontainer" and brain.health()["ok"]
    finally:
        brain.stop()


# -- the broker against the real brain ------------------------------------------------------------
class BrokerOnSocket:
    def __init__(self, tmp: Path, **config) -> None:
        self.log: list[dict] = []
        self.broker = Broker(BrokerConfig(token=TOKEN, metadata={"session": "test-session", "runtime": "brain"},
                                          **config), log=self.log.append)  # fmt: skip
        self.path = str(tmp / "pipe")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(64)
        threading.Thread(target=self.broker.serve, args=(self.listener,), daemon=True).start()

    def brain(self, *args: str, token: str = TOKEN, env: dict | None = None) -> subprocess.Popen:
        node = shutil.which("node")
        assert node, "node is installed by bootstrap.sh"
        return subprocess.Popen([node, str(BRAIN), f"--pipe={self.path}", *args], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "TERMINAI_HANDSHAKE_TOKEN": token, **(env or {})})  # fmt: skip

    def raw(self) -> RawClient:
        return RawClient(self.path)

    def close(self) -> None:
        self.broker.stop()
        self.listener.close()


class RawClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(20)
        self.buf = b""

    def send(self, obj) -> None:
        self.sock.sendall((obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n")

    def recv(self) -> dict | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def hello(self, token: str = TOKEN) -> dict | None:
        self.send({"id": 0, "method": "hello", "params": {"token": token}})
        return self.recv()


@pytest.fixture
def broker(tmp_path):
    (tmp_path / "ws").mkdir()
    b = BrokerOnSocket(tmp_path, workspace=tmp_path / "ws", handshake_timeout=1.0)
    yield b
    b.close()


@UNIX_SOCKETS
@pytest.mark.unit
def test_hundreds_in_flight_never_cross_and_the_policy_decides(broker, tmp_path):
    brain = broker.brain(f"--module={REPO / 'tests/node/brain-load.js'}")
    out, err = brain.communicate(timeout=120)
    assert brain.returncode == 0, err
    result = json.loads(out)
    assert result["n"] == 300 and result["crossed"] == 0
    # Shells need an approval nobody can give here; leaving the workspace is refused outright.
    assert (result["shell"], result["shellByArgv"]) == ("APPROVAL_DENIED",) * 2
    assert (result["outside"], result["escape"]) == ("POLICY_DENIED",) * 2
    assert result["back"] == "written by the brain" and result["listing"] == ["from-brain.txt"]
    assert result["timedOut"] is True
    assert (tmp_path / "ws/notes/from-brain.txt").read_text() == "written by the brain"
    assert not (tmp_path / "escape.txt").exists()
    decisions = [r for r in broker.log if r.get("event") == "decision"]
    assert len(decisions) >= 300 and all(r["session"] == "test-session" and r["runtime"] == "brain" for r in decisions)
    assert any(not r["allowed"] and r["level"] == "C" and "shell" in r["reason"] for r in decisions)
    assert all(r["level"] == "A" and r["approval"] == "none" for r in decisions if r["allowed"])


@UNIX_SOCKETS
@pytest.mark.unit
def test_shell_only_when_allowed(tmp_path):
    b = BrokerOnSocket(tmp_path, allow_shell=True)
    try:
        c = b.raw()
        assert c.hello()["success"]
        c.send({"id": 1, "method": "execute", "params": {"command": "echo a | tr a b", "mode": "shell"}})
        assert c.recv()["data"]["stdout"] == "b\n"
        c.send({"id": 2, "method": "execute", "params": {"command": "echo", "args": ["a | tr a b"]}})
        assert c.recv()["data"]["stdout"] == "a | tr a b\n", "argv: no shell unless asked for"
    finally:
        b.close()


@UNIX_SOCKETS
@pytest.mark.unit
def test_handshake_rules(broker):
    # Nothing is served before hello.
    c = broker.raw()
    c.send({"id": 1, "method": "ping"})
    assert c.recv()["code"] == "HANDSHAKE_REQUIRED"
    # A wrong token: refused and disconnected.
    wrong = c.hello(token="x" * 32)
    assert wrong["code"] == "HANDSHAKE_FAILED" and c.recv() is None
    # A client that never says hello is dropped after the handshake timeout.
    silent = broker.raw()
    assert silent.recv() is None
    assert any(r.get("code") == "HANDSHAKE_REQUIRED" and "timeout" in r.get("reason", "") for r in broker.log)
    # The real brain with a wrong token exits (and never retries).
    brain = broker.brain(token="w" * 32)
    assert brain.wait(30) == 3 and "refused the handshake" in brain.stderr.read()


@UNIX_SOCKETS
@pytest.mark.unit
def test_bad_messages_are_refused_and_the_broker_serves_on(broker):
    c = broker.raw()
    assert c.hello()["success"]
    c.send(b"{not json")
    assert c.recv()["code"] == "INVALID_REQUEST"
    c.send(b'{"id": 5, "method": "ping", "params": [1]}')
    assert c.recv()["code"] == "INVALID_REQUEST"
    c.send(b'{"id": 6, "params": {}, "method": "x"' + b" " * (2 << 20) + b"}")
    assert "larger than" in c.recv()["error"]
    c.send({"id": 7, "method": "no.such"})
    assert c.recv()["code"] == "INVALID_REQUEST"
    # Duplicate ids while the first is in flight.
    c.send({"id": 8, "method": "execute", "params": {"command": "sleep", "args": ["1"]}})
    c.send({"id": 8, "method": "ping"})
    dup = c.recv()
    assert dup["id"] == 8 and dup["code"] == "INVALID_REQUEST" and "in flight" in dup["error"]
    assert c.recv()["data"]["exitCode"] == 0
    c.send({"id": 9, "method": "ping"})
    assert c.recv()["data"]["pong"] is True
    other = broker.raw()
    assert other.hello()["success"], "another client is served all along"


@UNIX_SOCKETS
@pytest.mark.unit
def test_broker_pings_the_brain_reconnects_and_shuts_it_down(broker):
    brain = broker.brain()
    assert broker.broker.handshake.wait(30)
    assert broker.broker.ping()["pong"] is True
    # The pipe drops: the brain reconnects with backoff and says hello again.
    broker.broker.handshake.clear()
    broker.broker.clients[0].close()
    assert broker.broker.handshake.wait(30)
    assert sum(1 for r in broker.log if r.get("event") == "handshake") == 2
    assert broker.broker.ping()["pong"] is True
    broker.broker.call_brain("shutdown")
    assert brain.wait(30) == 0


# -- the bundle -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(ctx):
    from terminai_release.brain import build_brain

    return build_brain(ctx)


@pytest.mark.build
def test_bundle_is_deterministic_and_lists_every_file(ctx, built, tmp_path):
    import dataclasses

    from terminai_release.brain import build_brain
    from terminai_release.cache import StepCache

    again = build_brain(dataclasses.replace(ctx, cache=StepCache(tmp_path / "cache")))
    assert again.zip.read_bytes() == built.zip.read_bytes(), "two clean builds differ"
    doc = verify_zip(built.zip)
    assert doc["entrypoint"] == "agent-brain.js" and doc["brokerProtocol"] == 1
    assert doc["appContainerProfile"] == "TerminAI_Brain_Sandbox"
    assert [c["sid"] for c in doc["capabilities"]] == ["S-1-15-3-1", "S-1-15-3-3"]
    assert any(f["path"].startswith("wheels/terminai_apts-") for f in doc["files"])
    with zipfile.ZipFile(built.zip) as zf:
        assert {i.date_time for i in zf.infolist()} == {zf.infolist()[0].date_time}


def _rewrite(src: Path, out: Path, change) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
        for name, data in change(members).items():
            zout.writestr(name, data)
    return out


@pytest.mark.build
@pytest.mark.parametrize("case, change, message", [
    ("tampered file", lambda m: {**m, "agent-brain.js": m["agent-brain.js"][:-1] + b"X"}, "has sha256"),
    ("grown file", lambda m: {**m, "agent-brain.js": m["agent-brain.js"] + b"//x"}, "larger than"),
    ("extra file", lambda m: {**m, "extra.js": b"1"}, "does not list"),
    ("dot-dot path", lambda m: {**m, "../evil.js": b"1"}, "not a plain relative path"),
    ("absolute path", lambda m: {**m, "/etc/evil": b"1"}, "not a plain relative path"),
    ("missing file", lambda m: {k: v for k, v in m.items() if k != "agent-brain.js"}, "missing"),
    ("lying bundle.json", lambda m: {**m, "bundle.json": m["bundle.json"].replace(
        json.loads(m["bundle.json"])["files"][0]["sha256"].encode(), b"0" * 64)}, "has sha256"),
])  # fmt: skip
def test_bad_bundles_are_refused_before_unpacking(built, tmp_path, case, change, message):
    bad = _rewrite(built.zip, tmp_path / "bad.zip", change)
    with pytest.raises(BundleError, match=message):
        verify_zip(bad)


@pytest.mark.build
def test_signed_bundle_verifies_then_unpacks_and_a_changed_one_does_not(ctx, built, tmp_path, monkeypatch):
    from terminai_release.signing.session import signer
    from terminai_shim.verify import DEV_IDENTITY, DEV_ISSUER, TrustPolicy, VerificationFailed

    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "cache"))
    with signer(ctx) as s:
        signature = s.sign(built.zip.read_bytes())
    (tmp_path / "sig.json").write_text(signature)
    (tmp_path / "root.json").write_text(json.dumps(s.dev_trusted_root))
    policy = TrustPolicy(tmp_path / "root.json", DEV_IDENTITY, DEV_ISSUER)
    bundle = open_bundle(built.zip, tmp_path / "sig.json", policy)
    assert bundle.entrypoint.read_bytes() == BRAIN.read_bytes()
    with pytest.raises(BundleError, match="not listed"):
        bundle.path("anything-else.js")
    changed = _rewrite(built.zip, tmp_path / "changed.zip", lambda m: {**m, "extra.js": b"1"})
    before = sorted((tmp_path / "cache/brain").iterdir())
    with pytest.raises(VerificationFailed, match="does not verify"):
        open_bundle(changed, tmp_path / "sig.json", policy)
    assert sorted((tmp_path / "cache/brain").iterdir()) == before, "nothing unverified was unpacked"
    # The unpacked tree changed in the cache (a planted line, an extra file): never launched as it is.
    bundle.entrypoint.write_bytes(BRAIN.read_bytes() + b"\nrequire('child_process').execSync('touch /tmp/x');\n")
    (bundle.directory / "planted.js").write_text("1")
    again = open_bundle(built.zip, tmp_path / "sig.json", policy)
    assert again.entrypoint.read_bytes() == BRAIN.read_bytes() and not (again.directory / "planted.js").exists()
    # The CLI: verify, then a real health check through the broker (a plain child here, not an AppContainer).
    shim = SHIM
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"))
    trust = ["--signature", str(tmp_path / "sig.json"), "--dev", "--trusted-root", str(tmp_path / "root.json")]
    health = subprocess.run([shim, "brain", "health", str(built.zip), *trust], capture_output=True, text=True,
                            env=env, timeout=60)  # fmt: skip
    assert health.returncode == 0, health.stderr
    info = json.loads(health.stdout)
    assert info["ok"] is True and info["isolation"] == "none"


@pytest.mark.build
def test_authenticode_signs_pe_files_before_bundling(ctx, tmp_path):
    """A PE stand-in for node.exe: pip's own Windows launcher (a real PE file
    shipped in every pip wheel), signed with a self-signed code-signing
    certificate made here, then checked with osslsigncode."""
    import datetime as dt

    import pip
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    from terminai_release.brain import BrainInputs, PinnedInput, build_brain
    from terminai_release.digest import sha256_file

    pe = Path(pip.__file__).parent / "_vendor/distlib/t64.exe"
    assert pe.read_bytes()[:2] == b"MZ"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TerminAI test code signing")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))  # fmt: skip
    inputs = BrainInputs(node_exe=PinnedInput(pe, sha256_file(pe)), sign_cert=tmp_path / "cert.pem",
                         sign_key=tmp_path / "key.pem")  # fmt: skip
    art = build_brain(ctx, inputs)
    with zipfile.ZipFile(art.zip) as zf:
        (tmp_path / "node.exe").write_bytes(zf.read("node/node.exe"))
        doc = json.loads(zf.read("bundle.json"))
    assert doc["authenticode"] is True and doc["node"]["bundled"] == "node/node.exe"
    assert (tmp_path / "node.exe").read_bytes() != pe.read_bytes()
    check = subprocess.run(["osslsigncode", "verify", "-CAfile", str(tmp_path / "cert.pem"), "-in",
                            str(tmp_path / "node.exe")], capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    unsigned = subprocess.run(["osslsigncode", "verify", "-CAfile", str(tmp_path / "cert.pem"), "-in", str(pe)],
                              capture_output=True, text=True)  # fmt: skip
    assert unsigned.returncode != 0


def _bundle_zip(path: Path, members: dict[str, bytes], listed: list[str] | None = None,
                entrypoint: str = "agent-brain.js") -> Path:  # fmt: skip
    """A minimal bundle whose bundle.json lists ``listed`` (default: every member)."""
    import hashlib

    files = [{"path": name, "size": len(members[name]), "sha256": hashlib.sha256(members[name]).hexdigest()}
             for name in (listed if listed is not None else members)]  # fmt: skip
    doc = {"mediaType": "application/vnd.terminai.brain-bundle.v1+json", "schemaVersion": 1, "version": "0.1.0",
           "files": files, "entrypoint": entrypoint}  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("bundle.json", json.dumps(doc))
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.unit
@pytest.mark.attack
@pytest.mark.parametrize("members", [
    {"agent-brain.js": b"good()", "./agent-brain.js": b"evil()"},
    {"agent-brain.js": b"1", "lib/a.js": b"good()", "lib//a.js": b"evil()"},
    {"agent-brain.js": b"1", "A.js": b"good()", "a.js": b"evil()"},
    {"agent-brain.js": b"1", "x.js": b"good()", "x.js.": b"evil()"},
    {"agent-brain.js": b"1", "x.js": b"good()", "x.js ": b"evil()"},
    {"agent-brain.js": b"1", "CON.js": b"evil()"},
    {"agent-brain.js": b"1", "lib/nul": b"evil()"},
    {"agent-brain.js": b"1", "COM\u00b9.txt": b"evil()"},
    {"agent-brain.js": b"1", "a:stream": b"evil()"},
    {"agent-brain.js": b"1", "Bundle.json": b"{}"},
])  # fmt: skip
def test_bundle_names_that_alias_one_file_are_refused(tmp_path, members):
    """Finding 4 of the Windows broker issue: two spellings of one file (or a
    device) let the unpacked entry point differ from the digest bundle.json
    lists for it. Every name must have one spelling, and no two may collide."""
    bad = _bundle_zip(tmp_path / "bad.zip", members)
    with pytest.raises(BundleError, match=r"not a plain relative path|name the same file"):
        verify_zip(bad)


@pytest.mark.unit
def test_a_bundle_of_plain_distinct_names_verifies(tmp_path):
    ok = _bundle_zip(tmp_path / "ok.zip", {"agent-brain.js": b"1", "brain/index.mjs": b"2", "wheels/a.whl": b"3"})
    assert verify_zip(ok)["entrypoint"] == "agent-brain.js"


class _Flipper:
    """A local attacker (the brain's own commands could do the same) flipping
    ``name`` in the workspace between an entry inside and a link to ``outside``,
    as fast as it can, while the broker serves requests for that name."""

    def __init__(self, ws: Path, name: str, inside: Path, outside: Path) -> None:
        self.ws, self.name, self.inside, self.outside = ws, name, inside, outside
        self.stop = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self._flip()

    def _flip(self) -> None:
        target, tmp = self.ws / self.name, self.ws / f".{self.name}.flip"
        for source in (self.inside, self.outside):
            try:
                tmp.unlink(missing_ok=True)
                if source == self.outside:
                    tmp.symlink_to(source)
                elif source.is_file():
                    os.link(source, tmp)
                else:
                    tmp.symlink_to(source.name)
                os.replace(tmp, target)
                self.flips += 1
            except OSError:
                pass

    def __enter__(self) -> _Flipper:
        self._flip()  # the name exists from the start: nothing (a mkdir) can take its place before the race
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _raced(race: _Flipper, tries: int, flips: int = 1000, seconds: float = 120) -> Iterator[int]:
    """Indices for at least ``tries`` attempts, and on until the attacker has
    flipped at least ``flips`` times (how the threads share the interpreter
    varies from run to run): a race is only a test once it really ran."""
    deadline = time.monotonic() + seconds
    i = 0
    while i < tries or race.flips < flips:
        assert time.monotonic() < deadline, f"only {race.flips} flips in {seconds:g} s"
        yield i
        i += 1


def _race_setup(tmp_path: Path) -> tuple[Path, Path]:
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir(exist_ok=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("THE SECRET")
    (ws / "plain.txt").write_text("inside")
    (ws / "sub").mkdir()
    (ws / "sub/inside-only.txt").write_text("x")
    return ws, outside


@UNIX_SOCKETS
@pytest.mark.attack
def test_a_link_flipped_between_check_and_use_never_leaks_through_the_broker(tmp_path):
    """Finding 3: the policy checked a path and the operation resolved it again,
    so a link flipped in between read a file outside (after 982 tries) and wrote
    outside (after 4). Each operation now opens its path once, beneath the
    workspace, and uses that descriptor: thousands of tries never leak."""
    ws, outside = _race_setup(tmp_path)
    b = BrokerOnSocket(tmp_path, workspace=ws)
    c = b.raw()
    try:
        assert c.hello()["success"]
        seen = set()
        with _Flipper(ws, "target", ws / "plain.txt", outside / "secret.txt") as read_race:
            for i in _raced(read_race, 3000):
                c.send({"id": i + 1, "method": "readFile", "params": {"path": "target"}})
                reply = c.recv()
                seen.add(reply["data"]["content"] if reply["success"] else reply["code"])
        assert "THE SECRET" not in seen and "inside" in seen, seen
        with _Flipper(ws, "dir", ws / "sub", outside) as write_race:
            for i in _raced(write_race, 1500):
                c.send({"id": 10_000 + i, "method": "writeFile",
                        "params": {"path": f"dir/w{i}.txt", "content": "planted"}})  # fmt: skip
                c.recv()
                c.send({"id": 20_000 + i, "method": "listDir", "params": {"path": "dir"}})
                listing = c.recv()
                if listing["success"]:
                    assert "secret.txt" not in {e["name"] for e in listing["data"]["entries"]}
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"], "a write landed outside the workspace"
        assert any((ws / "sub").glob("w*.txt")), "writes through the directory inside do land"
        for path in ("../outside/secret.txt", str(outside / "secret.txt")):
            c.send({"id": 99_999, "method": "readFile", "params": {"path": path}})
            assert c.recv()["code"] == "POLICY_DENIED"
    finally:
        b.close()


@pytest.mark.unit
@pytest.mark.attack
@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "nofollow-walk"])
def test_both_ways_of_opening_beneath_hold_against_the_race(tmp_path, openat2):
    """The same race against each strategy directly: openat2 (RESOLVE_BENEATH)
    and the component walk with O_NOFOLLOW used where the kernel has no openat2."""
    from terminai_shim.windows.confine import OutsideWorkspace, Workspace

    ws, outside = _race_setup(tmp_path)
    (ws / "sub/inner-link").symlink_to("../plain.txt")  # a link that stays inside
    area = Workspace(ws)
    area._openat2 = openat2
    try:
        if openat2:
            assert area.read("sub/inner-link") == b"inside", "openat2 follows links that stay beneath"
        else:
            with pytest.raises(OutsideWorkspace):
                area.read("sub/inner-link")  # the walk follows none
        with _Flipper(ws, "target", ws / "plain.txt", outside / "secret.txt") as race:
            for _ in _raced(race, 20_000):
                try:
                    assert area.read("target") == b"inside"
                except (OutsideWorkspace, FileNotFoundError):  # refused, or caught between unlink and rename
                    pass
        with _Flipper(ws, "dir", ws / "sub", outside) as race:
            for i in _raced(race, 5000):
                try:
                    area.write(f"dir/n{i}", b"planted", create_dirs=True)
                except (OutsideWorkspace, FileNotFoundError, NotADirectoryError):
                    pass
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    finally:
        area.close()
