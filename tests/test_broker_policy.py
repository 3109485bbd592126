"""The Windows tier's broker policy and approvals, attacked from the brain's side.

The broker runs here against raw clients on a Unix socket (the protocol core
is platform-neutral); what only Windows has (AppContainers, job objects) is
tested by the release workflow's Windows job.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from terminai_shim.windows.broker import Approval, ApprovalRequest
from terminai_shim.windows.policy import Policy, PolicyFileError
from test_brain import UNIX_SOCKETS, BrokerOnSocket

pytestmark = pytest.mark.unit
POLICY = Policy.load()


@pytest.mark.attack
@pytest.mark.parametrize("argv", [
    ["sh", "-c", "cat ~/.ssh/id_rsa"],
    ["/bin/bash", "-lc", "id"],
    ["env", "sh", "-c", "id"],                         # finding 2: the wrapper hid the shell
    ["env", "-i", "FOO=1", "/usr/bin/env", "bash"],
    ["env", "-S", "sh -c id"],
    ["env", "--split-string=python3 -c 1"],
    ["nice", "-n", "5", "nohup", "dash"],
    ["timeout", "-s", "KILL", "5", "zsh"],
    ["sudo", "-u", "root", "sh"],
    ["xargs", "-0", "sh", "-c", "id"],
    ["busybox", "sh"],
    ["stdbuf", "-o0", "busybox", "ash"],
    ["python3", "-c", "open('/etc/shadow').read()"],   # finding 1: an interpreter given code
    ["python", "-Bc", "import os"],
    ["python3.exe", "-c", "1"],
    ["node", "-e", "require('child_process')"],
    ["node", "--eval=1"],
    ["perl", "-e", "exec 'sh'"],
    ["ruby", "-e", "1"],
    ["php", "-r", "system('id');"],
    ["C:\\Windows\\System32\\CMD.EXE", "/c", "whoami"],
    ["cmd", "/d", "/s", "/c", "dir"],
    ["powershell", "-Command", "Get-Item"],
    ["pwsh.exe", "-EncodedCommand", "AAAA"],
    ["script.bat"],
    ["C:\\tools\\setup.CMD", "x"],
    ["run.ps1"],
    ["find", ".", "-exec", "sh", "-c", "id", ";"],
    ["git", "-c", "core.pager=sh -c id", "log"],
    ["tar", "--to-command=sh", "-xf", "a.tar"],
    ["awk", "BEGIN{system(\"id\")}"],
    ["npm", "run", "build"],
    ["make", "all"],
    ["vim", "-c", ":!id"],
])  # fmt: skip
def test_shell_equivalents_need_the_approval_of_a_shell(argv):
    """A shell in all but name is a shell: wrappers are looked through, and
    interpreters given code, script files and programs told to run another
    command are level C, as `mode: "shell"` is."""
    verdict = POLICY.command(argv)
    assert verdict.level == "C", (argv, verdict)
    assert POLICY.command(["echo"], shell_mode=True).level == "C"


@pytest.mark.parametrize("argv, level", [
    (["echo", "hi"], "A"), (["ls", "-la"], "A"), (["/usr/bin/grep", "-rn", "x", "."], "A"), (["sleep", "1"], "A"),
    (["cat", "notes.txt"], "A"), (["cat", "src/../notes.txt"], "B"), (["timeout", "5", "sleep", "1"], "A"),
    (["env", "FOO=1", "echo", "hi"], "B"),
    (["python3", "script.py"], "B"), (["node", "app.js"], "B"), (["git", "status"], "B"), (["curl", "x"], "B"),
    (["find", ".", "-name", "*.py"], "B"), (["unknown-tool"], "B"), (["env"], "B"),
])  # fmt: skip
def test_everyday_commands_keep_their_level(argv, level):
    """Safe operations stay easy (A runs without a prompt); what the policy does
    not know is asked about (B), not forbidden."""
    assert POLICY.command(argv).level == level, POLICY.command(argv)


@pytest.mark.attack
@pytest.mark.parametrize("argv, env, level", [
    (["cat", "/home/user/.ssh/id_rsa"], {}, "B"),            # a level-A program reading outside the workspace
    (["cat", "~/.aws/credentials"], {}, "B"),
    (["grep", "-r", "key", "../../.."], {}, "B"),
    (["grep", "--file=/etc/shadow", "x"], {}, "B"),
    (["ls", "C:\\Users\\me"], {}, "B"),
    (["echo", "hi"], {"LD_PRELOAD": "ws/evil.so"}, "C"),    # a variable that loads the brain's own code
    (["echo", "hi"], {"Path": "ws"}, "C"),                   # Windows: names are case-insensitive
    (["env", "NODE_OPTIONS=--require=./x.js", "echo"], {}, "C"),
    (["git", "status"], {"GIT_CONFIG_PARAMETERS": "'core.pager=sh'"}, "C"),
    (["echo", "hi"], {"LANG": "C"}, "B"),
    (["sort", "--compress-program=sh", "big.txt"], {}, "C"),
    (["rg", "--pre", "./run", "x"], {}, "C"),
])  # fmt: skip
def test_safe_programs_are_safe_only_with_safe_arguments_and_environment(argv, env, level):
    """Level A must not be a way round the ladder: `cat ~/.ssh/id_rsa` reads a
    secret as surely as `python3 -c` does, and LD_PRELOAD or PATH make any
    program run code the brain wrote into the workspace."""
    verdict = POLICY.judge("execute", {"command": argv[0], "args": argv[1:], "env": env})
    assert verdict.level == level, verdict


def test_the_policy_is_data_people_can_read_and_replace(tmp_path):
    doc = json.loads(POLICY.doc and json.dumps(POLICY.doc))
    assert set(doc["levels"]) == {"A", "B", "C"} and doc["schemaVersion"] == 1
    doc["programs"]["git"] = "A"
    mine = tmp_path / "policy.json"
    mine.write_text(json.dumps(doc))
    assert Policy.load(mine).command(["git", "status"]).level == "A"
    assert Policy.load(mine).command(["git", "-c", "x=y", "log"]).level == "C", "flags that run commands still do"
    mine.write_text(json.dumps({**doc, "unknownProgram": "Z"}))
    with pytest.raises(PolicyFileError, match="levels are A, B or C"):
        Policy.load(mine)


class _Cli:
    """A stand-in for the CLI's side of an approval (the serve protocol carries
    it to the real CLI): answers as told, and records what it was asked."""

    def __init__(self, answer: Approval | None, delay: float = 0.0) -> None:
        self.answer, self.delay = answer, delay
        self.asked: list[ApprovalRequest] = []

    def __call__(self, request: ApprovalRequest, timeout: float) -> Approval | None:
        self.asked.append(request)
        if self.answer is None:
            time.sleep(min(timeout, 0.2))  # nobody answers: the broker's timeout passes
            return None
        time.sleep(self.delay)
        return self.answer


def _broker(tmp_path, cli: _Cli | None, **config) -> BrokerOnSocket:
    (tmp_path / "ws").mkdir(exist_ok=True)
    own = tmp_path / f"broker-{len(list(tmp_path.glob('broker-*')))}"  # each broker its own socket
    own.mkdir()
    b = BrokerOnSocket(own, workspace=tmp_path / "ws", **config)
    b.broker.approver = cli
    return b


def _ask(b: BrokerOnSocket, params: dict, rid: int = 1) -> dict:
    c = b.raw()
    assert c.hello()["success"]
    c.send({"id": rid, "method": "execute", "params": params})
    return c.recv()


@UNIX_SOCKETS
@pytest.mark.attack
def test_a_level_b_or_c_request_runs_only_once_the_cli_allows_it(tmp_path):
    marker = tmp_path / "ws" / "ran"
    deny = _Cli(Approval(False))
    b = _broker(tmp_path, deny)
    try:
        reply = _ask(b, {"command": "python3", "args": ["-c", f"open({str(marker)!r}, 'w')"]})
        assert reply["code"] == "APPROVAL_DENIED" and "denied by the user" in reply["error"]
        assert not marker.exists(), "nothing runs before (or without) the answer"
        (request,) = deny.asked
        assert (request.level, request.method, request.subject) == ("C", "execute", "python3")
        assert request.summary.startswith("python3 -c ")
    finally:
        b.close()
    allow = _Cli(Approval(True))
    b = _broker(tmp_path, allow)
    try:
        reply = _ask(b, {"command": "python3", "args": ["-c", f"open({str(marker)!r}, 'w')"]})
        assert reply["success"] and marker.exists()
        assert _ask(b, {"command": "python3", "args": ["-c", "1"]}, 2)["success"]
        assert len(allow.asked) == 2, "an answer without 'for this session' covers one request"
    finally:
        b.close()


@UNIX_SOCKETS
@pytest.mark.attack
def test_no_answer_is_a_denial_and_nobody_to_ask_is_too(tmp_path):
    silent = _Cli(None)
    b = _broker(tmp_path, silent, approval_timeout=0.2)
    try:
        reply = _ask(b, {"command": "git", "args": ["status"]})
        assert reply["code"] == "APPROVAL_DENIED" and "no answer" in reply["error"]
    finally:
        b.close()
    b = _broker(tmp_path, None)
    try:
        reply = _ask(b, {"command": "sh", "args": ["-c", "id"]})
        assert reply["code"] == "APPROVAL_DENIED" and "nobody can be asked" in reply["error"]
        decisions = [r for r in b.log if r.get("event") == "decision"]
        assert decisions[-1]["approval"] == "unavailable" and decisions[-1]["level"] == "C"
    finally:
        b.close()


@UNIX_SOCKETS
def test_level_a_runs_without_a_prompt_and_session_approvals_are_remembered(tmp_path):
    cli = _Cli(Approval(True, session=True))
    b = _broker(tmp_path, cli)
    try:
        assert _ask(b, {"command": "echo", "args": ["a"]})["data"]["stdout"] == "a\n"
        assert cli.asked == [], "level A never asks"
        assert _ask(b, {"command": "git", "args": ["--version"]}, 2)["success"]
        assert _ask(b, {"command": "git", "args": ["--version"]}, 3)["success"]
        assert len(cli.asked) == 1, "allowed for this session: the same program at the same level is not asked again"
        assert _ask(b, {"command": "sh", "args": ["-c", "true"]}, 4)["success"]
        assert [r.level for r in cli.asked] == ["B", "C"], "a grant at B does not cover C"
        decisions = [r for r in b.log if r.get("event") == "decision"]
        assert [(r["level"], r["approval"]) for r in decisions] == [("A", "none"), ("B", "allowed"),
                                                                    ("B", "session"), ("C", "allowed")]  # fmt: skip
        assert all(r["session"] == "test-session" and r["runtime"] == "brain" for r in decisions)
        assert any(r.get("event") == "approval-request" and r["level"] == "B" for r in b.log)
    finally:
        b.close()


@UNIX_SOCKETS
def test_waiting_for_one_approval_does_not_hold_up_other_requests(tmp_path):
    slow = _Cli(Approval(True), delay=1.5)
    b = _broker(tmp_path, slow)
    try:
        c = b.raw()
        assert c.hello()["success"]
        c.send({"id": 1, "method": "execute", "params": {"command": "git", "args": ["--version"]}})
        started = time.monotonic()
        c.send({"id": 2, "method": "execute", "params": {"command": "echo", "args": ["fast"]}})
        first = c.recv()
        assert first["id"] == 2 and time.monotonic() - started < 1.5, "level A answered while B waited"
        assert c.recv()["id"] == 1
    finally:
        b.close()


@UNIX_SOCKETS
@pytest.mark.attack
def test_leaving_the_workspace_is_refused_never_asked(tmp_path):
    cli = _Cli(Approval(True, session=True))
    b = _broker(tmp_path, cli)
    try:
        c = b.raw()
        assert c.hello()["success"]
        for rid, (method, params) in enumerate([
            ("readFile", {"path": "/etc/passwd"}), ("writeFile", {"path": "../x", "content": "x"}),
            ("listDir", {"path": "/"}), ("execute", {"command": "ls", "cwd": "/"}),
        ]):  # fmt: skip
            c.send({"id": rid, "method": method, "params": params})
            assert c.recv()["code"] == "POLICY_DENIED", (method, params)
        assert cli.asked == []
    finally:
        b.close()


def test_concurrent_approvals_get_distinct_ids(tmp_path):
    from terminai_shim.windows.broker import Broker, BrokerConfig

    cli = _Cli(Approval(True))
    broker = Broker(BrokerConfig(token="t" * 32, workspace=tmp_path), approver=cli)
    try:
        threads = [threading.Thread(target=broker.decide, args=("execute", {"command": "git"})) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({r.id for r in cli.asked}) == 20
    finally:
        broker.stop()


@UNIX_SOCKETS
@pytest.mark.build
@pytest.mark.attack
def test_approvals_travel_through_serve_to_a_node_cli(ctx, tmp_path):
    """The round trip the CLI makes: a signed bundle whose brain asks for one
    thing at each level, launched by `terminai-shim serve`, and a Node.js
    client answering the approval requests (allow, deny, and none)."""
    import os
    import shutil
    import subprocess

    from conftest import REPO
    from shimproc import SHIM
    from terminai_release.brain import BrainInputs, PinnedInput, build_brain
    from terminai_release.digest import sha256_file
    from terminai_release.signing.session import signer

    module = REPO / "tests/node/brain-approvals.js"
    bundle = build_brain(ctx, BrainInputs(module=PinnedInput(module, sha256_file(module)))).zip
    with signer(ctx) as s:
        (tmp_path / "bundle.sigstore.json").write_text(s.sign(bundle.read_bytes()))
        (tmp_path / "root.json").write_text(json.dumps(s.dev_trusted_root))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    node = shutil.which("node")
    assert node, "node is installed by bootstrap.sh"
    env = dict(os.environ, SHIM=SHIM, BUNDLE=str(bundle), SIGNATURE=str(tmp_path / "bundle.sigstore.json"),
               TRUSTED_ROOT=str(tmp_path / "root.json"), WORKSPACE=str(workspace),
               TERMINAI_CACHE=str(tmp_path / "cache"))  # fmt: skip
    done = subprocess.run([node, "--test", str(REPO / "tests/node/brain-approvals.test.mjs")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# pass 1" in done.stdout and "# fail 0" in done.stdout


@UNIX_SOCKETS
def test_an_answered_id_can_be_used_again_at_once(tmp_path):
    """An id is in flight until its answer is sent, not until some time after:
    a client reusing it right away was refused as a duplicate now and then."""
    b = _broker(tmp_path, None)
    try:
        c = b.raw()
        assert c.hello()["success"]
        for _ in range(3000):
            c.send({"id": 7, "method": "ping", "params": {}})
            assert c.recv()["success"]
    finally:
        b.close()


@pytest.mark.attack
def test_another_runners_build_record_cannot_name_a_file_outside_its_folder(tmp_path):
    """`inv release --shim-dists` signs what other runners' records name: a
    record naming /etc/passwd (with that file's digest) must not get it signed."""
    import hashlib

    from terminai_release.errors import BuildError
    from terminai_release.standalone import load_standalone

    secret = tmp_path / "secret"
    secret.write_bytes(b"not a shim")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    folder = tmp_path / "dist"
    folder.mkdir()
    for name, platform in ((str(secret), "darwin-arm64"), ("../secret", "darwin-arm64"), ("x.tgz", "plan9-x64")):
        (folder / "x.tgz").write_bytes(b"not a shim")
        listed = {"file": name, "sha256": digest, "size": 10}
        record = {"inputs": {"platform": platform}, "outputs": {"archive": listed, "npmPackage": listed}}
        (folder / "build-record.json").write_text(json.dumps(record))
        with pytest.raises(BuildError, match=r"not a file beside it|not one of"):
            load_standalone(folder)
