"""Guest networking under a policy, with real VMs and servers on loopback only.

Nothing here sends a packet beyond this machine: the servers are on
127.0.0.1 and 127.0.0.2, and the private-range and public-address rules are
tested on the decision function alone."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from shimproc import SHIM, ShimProc
from terminai_shim._internal.netpolicy import Allowlist, decide
from terminai_shim.errors import ConfigError

PAYLOAD = os.urandom(3 << 20)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
# The guest's tools bypass the proxy for guest-local names; these reach the host's loopback, so the test clears it.
THROUGH_PROXY = {"NO_PROXY": "", "no_proxy": ""}
FETCH = """
import os, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler(
    {"http": os.environ["HTTP_PROXY"], "https": os.environ["HTTPS_PROXY"]}) if len(sys.argv) < 3 else
    urllib.request.ProxyHandler({}))
try:
    body = opener.open(sys.argv[1], timeout=30).read()
    import hashlib; print("OK", hashlib.sha256(body).hexdigest())
except urllib.error.HTTPError as e:
    print("HTTP", e.code, e.read().decode().strip())
except Exception as e:
    print("FAIL", type(e).__name__, e)
"""
DIRECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close(); print("CONNECTED")
except OSError as e:
    print("FAIL", e)
"""


# -- the decision function: every rule, no traffic -----------------------------------------------
@pytest.mark.unit
def test_allowlist_decisions():
    policy = Allowlist.parse(["example.com", "*.pkg.example.org:8443", "10.1.2.3:80", "192.168.0.0/16"])
    public = ["93.184.215.14"]
    assert decide(policy, "example.com", 443, public).allowed
    assert decide(policy, "EXAMPLE.com.", 80, public).allowed
    assert not decide(policy, "example.com", 22, public).allowed, "only 80 and 443 unless a port is named"
    assert not decide(policy, "evil-example.com", 443, public).allowed
    assert decide(policy, "a.pkg.example.org", 8443, public).allowed
    assert not decide(policy, "pkg.example.org", 8443, public).allowed, "*. means subdomains only"
    assert not decide(policy, "a.pkg.example.org", 443, public).allowed
    for internal in ("127.0.0.1", "10.0.0.5", "172.16.1.1", "169.254.169.254", "100.64.0.1", "::1", "fe80::1",
                     "fc00::1", "224.0.0.1", "0.0.0.0"):  # fmt: skip
        refused = decide(policy, "example.com", 443, [internal])
        assert not refused.allowed and "not listed" in refused.reason, internal
    assert not decide(policy, "example.com", 443, ["93.184.215.14", "10.0.0.5"]).allowed, "every address counts"
    assert decide(policy, "10.1.2.3", 80, ["10.1.2.3"]).allowed, "an IP entry lists its own address and port"
    assert not decide(Allowlist.parse(["10.1.2.3:80", "internal.test:81"]), "internal.test", 81, ["10.1.2.3"]).allowed
    assert decide(Allowlist.parse(["example.com", "192.168.0.0/16"]), "example.com", 443, ["192.168.4.4"]).allowed
    assert not decide(policy, "example.com", 443, []).allowed
    decision = decide(policy, "example.com", 443, public)
    assert decision.address == public[0], "the proxy connects to the address it checked"
    for bad in ("exa mple.com", "*example.com", "host:99999", "10.0.0.0/99", "user@host"):
        with pytest.raises(ConfigError):
            Allowlist.parse([bad])


@pytest.mark.unit
def test_malformed_names_never_match_a_wildcard():
    policy = Allowlist.parse(["*.example.com"])
    for sneaky in ("evil.com/.example.com", "evil.com#.example.com", "evil.com .example.com", "a_b.example.com"):
        assert not decide(policy, sneaky, 443, ["93.184.215.14"]).allowed, sneaky


@pytest.mark.unit
def test_proxy_looks_up_only_listed_names_and_forwards_one_request_to_the_checked_host(tmp_path, monkeypatch):
    """The proxy in-process against a loopback server that records what reaches it."""
    from terminai_shim._internal import netproxy

    seen: list[tuple[str, str]] = []

    class Recorder(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Host", ""), self.headers.get("Connection", "")))
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(body)

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port = origin.server_address[1]
    looked_up: list[str] = []
    real = netproxy._resolve
    monkeypatch.setattr(netproxy, "_resolve", lambda host, p: looked_up.append(host) or real(host, p))
    config = netproxy.ProxyConfig("unit", Allowlist.parse([f"127.0.0.1:{port}"]), str(tmp_path / "log"), {})
    server = netproxy.ProxyServer(config)
    address = [server.listen_tcp(("127.0.0.1", 0))]

    def exchange(raw: bytes) -> bytes:
        import socket

        with socket.create_connection(address[0], timeout=10) as c:
            c.sendall(raw)
            out = b""
            while chunk := c.recv(65536):
                out += chunk
            return out

    refused = exchange(b"CONNECT exfiltrated-data.attacker.invalid:443 HTTP/1.1\r\n\r\n")
    assert b"403" in refused.split(b"\r\n")[0] and looked_up == [], "an unlisted name is never resolved"
    # A pipelined second request, and a Host header naming another virtual host: neither gets through.
    two = (f"GET http://127.0.0.1:{port}/first HTTP/1.1\r\nHost: other-site.invalid\r\n\r\n"
           f"GET /second HTTP/1.1\r\nHost: other-site.invalid\r\n\r\n").encode()  # fmt: skip
    assert exchange(two).startswith(b"HTTP/1.0 200")
    origin.shutdown()
    assert seen == [("/first", f"127.0.0.1:{port}", "close")], "one well-formed request, to the checked host"
    log = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert [r["decision"] for r in log] == ["refuse", "allow"] and all(r["session"] == "unit" for r in log)


# -- real VMs ------------------------------------------------------------------------------------
class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "file.bin").write_bytes(PAYLOAD)
    started = []
    for host in ("127.0.0.1", "127.0.0.2"):
        httpd = ThreadingHTTPServer((host, 0), functools.partial(Quiet, directory=str(root)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
    yield [(h.server_address[0], h.server_address[1]) for h in started]
    for h in started:
        h.shutdown()


def _vm(shim: ShimProc, boot_config, network, **extra):
    return shim.result("initialize", {"kernel": str(boot_config.kernel), "rootfs": str(boot_config.rootfs),
                                      "backend": "qemu", "network": network, **extra})  # fmt: skip


def _py(shim: ShimProc, code: str, *args: str, env=None) -> str:
    out = shim.result("execute", {"command": "python3", "args": ["-c", code, *args], "env": env or {}})
    return out["stdout"].strip() + out["stderr"].strip()


def _log_lines(cache: Path, session: str) -> list[dict]:
    lines = (cache / "logs/network.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["session"] == session]


@pytest.mark.vm
def test_none_has_no_interface_but_lo(boot_config, tmp_path):
    shim = ShimProc(env=dict(os.environ, TERMINAI_CACHE=str(tmp_path)))
    try:
        info = shim.result("initialize", {"kernel": str(boot_config.kernel), "rootfs": str(boot_config.rootfs),
                                          "backend": "qemu"})  # fmt: skip
        assert info["network"] == {"mode": "none", "allow": []}
        assert shim.result("execute", {"command": "ls", "args": ["/sys/class/net"]})["stdout"].split() == ["lo"]
    finally:
        shim.close()


@pytest.mark.vm
def test_allowlist_is_enforced_on_the_host(boot_config, servers, tmp_path):
    (a_host, a_port), (b_host, b_port) = servers
    shim = ShimProc(env=dict(os.environ, TERMINAI_CACHE=str(tmp_path)))
    try:
        allow = [f"{a_host}:{a_port}", f"localhost:{b_port}"]
        info = _vm(shim, boot_config, {"mode": "allowlist", "allow": allow})
        assert info["network"] == {"mode": "allowlist", "allow": allow}
        session = info["session"]
        env = shim.result("execute", {"command": "env"})["stdout"]
        assert "HTTPS_PROXY=http://10.0.2.100:3128" in env and "NO_PROXY=localhost,127.0.0.1,::1" in env
        # Through the proxy: the listed server works...
        assert _py(shim, FETCH, f"http://{a_host}:{a_port}/file.bin", env=THROUGH_PROXY) == f"OK {DIGEST}"
        # ...the one on another loopback address does not...
        b = _py(shim, FETCH, f"http://{b_host}:{b_port}/file.bin", env=THROUGH_PROXY)
        assert b.startswith("HTTP 403") and "not on the allowlist" in b
        # ...nor a listed name that resolves to a loopback address not on the list.
        local = _py(shim, FETCH, f"http://localhost:{b_port}/file.bin", env=THROUGH_PROXY)
        assert local.startswith("HTTP 403") and "loopback address" in local
        # Directly, nothing at all: the host alias, the server's own address, DNS, the proxy's other ports.
        for target in (("10.0.2.2", a_port), (a_host, a_port), ("10.0.2.3", 53), ("10.0.2.100", 80)):
            assert _py(shim, DIRECT, *map(str, target)).startswith("FAIL"), target
        assert "nameserver" not in shim.result("execute", {"command": "cat", "args": ["/etc/resolv.conf"]})["stdout"]
    finally:
        shim.close()
    decisions = [(r["decision"], r["host"], r["port"]) for r in _log_lines(tmp_path, session) if "host" in r]
    assert decisions == [("allow", a_host, a_port), ("refuse", b_host, b_port), ("refuse", "localhost", b_port)]


@pytest.mark.vm
def test_open_reaches_what_the_host_reaches_and_is_logged(boot_config, servers, tmp_path):
    (_, a_port), _ = servers
    shim = ShimProc(env=dict(os.environ, TERMINAI_CACHE=str(tmp_path)))
    try:
        # The host's loopback is 10.0.2.2 to the guest (QEMU's user networking): refused unless listed.
        info = _vm(shim, boot_config, {"mode": "open", "allow": ["127.0.0.1"]})
        assert info["network"]["mode"] == "open"
        assert _py(shim, FETCH, f"http://10.0.2.2:{a_port}/file.bin", "direct") == f"OK {DIGEST}"
        resolv = shim.result("execute", {"command": "cat", "args": ["/etc/resolv.conf"]})["stdout"]
        assert "nameserver 10.0.2.3" in resolv
        assert "HTTP_PROXY" not in shim.result("execute", {"command": "env"})["stdout"]
    finally:
        shim.close()
    (record,) = _log_lines(tmp_path, info["session"])
    assert record["mode"] == "open" and record["decision"] == "network"
    assert "network open" in shim.proc.stderr.read()


@pytest.mark.vm
def test_allowlist_chains_through_the_hosts_own_proxy(boot_config, servers, tmp_path):
    """The host sits behind a proxy (here: another netproxy on loopback); allowed
    traffic goes through it, and it sees the request."""
    (a_host, a_port), _ = servers
    upstream_config = tmp_path / "upstream.json"
    upstream_log = tmp_path / "upstream.log"
    upstream_config.write_text(json.dumps({"session": "upstream", "allow": [f"{a_host}:{a_port}"],
                                           "log": str(upstream_log)}))  # fmt: skip
    upstream = subprocess.Popen([sys.executable, "-m", "terminai_shim._internal.netproxy", "--listen", "127.0.0.1:0",
                                 str(upstream_config)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert upstream.stdout is not None
        address = upstream.stdout.readline().split()[1]
        env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"), HTTP_PROXY=f"http://{address}",
                   HTTPS_PROXY=f"http://{address}", NO_PROXY="")  # fmt: skip
        shim = ShimProc(env=env)
        try:
            _vm(shim, boot_config, {"mode": "allowlist", "allow": [f"{a_host}:{a_port}"]})
            assert _py(shim, FETCH, f"http://{a_host}:{a_port}/file.bin", env=THROUGH_PROXY) == f"OK {DIGEST}"
        finally:
            shim.close()
    finally:
        upstream.kill()
        upstream.wait()
    (seen,) = [json.loads(line) for line in upstream_log.read_text().splitlines()]
    assert (seen["decision"], seen["method"], seen["port"]) == ("allow", "CONNECT", a_port)


@pytest.mark.vm
def test_container_tier_network_modes(boot_config, container_image, tmp_path):
    params = {"backend": "container", "image": str(container_image.archive)}
    shim = ShimProc(env=dict(os.environ, TERMINAI_CACHE=str(tmp_path)))
    try:
        err = shim.call("initialize", {**params, "network": {"mode": "allowlist", "allow": ["example.com"]}})
        assert err["error"]["code"] == "INVALID_CONFIG" and "not allowlist" in err["error"]["message"]
        assert "microVM" in err["error"]["hint"]
        info = shim.result("initialize", {**params, "network": "open"})
        assert info["type"] == "container" and info["network"]["mode"] == "open"
        nets = shim.result("execute", {"command": "ls", "args": ["/sys/class/net"]})["stdout"].split()
        assert "eth0" in nets and "lo" in nets
    finally:
        shim.close()


@pytest.mark.unit
def test_the_shim_is_the_allowlist_connector_qemu_starts(tmp_path):
    """`terminai-shim --proxy-connector SOCKET` (what QEMU starts per guest
    connection when the shim is the standalone build) hands its stdin, the
    guest's connection, to the session's proxy and nothing else: the same
    CONNECTOR code the Python package runs inline."""
    import socket

    path = str(tmp_path / "proxy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    guest, host_end = socket.socketpair()
    with server, guest, host_end:
        connector = subprocess.Popen([SHIM, "--proxy-connector", path], stdin=host_end, stderr=subprocess.PIPE)
        host_end.close()
        server.settimeout(20)
        conn, _ = server.accept()
        with conn:
            msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
            assert msg == b"c" and len(fds) == 1
            with socket.socket(fileno=fds[0]) as handed:
                guest.sendall(b"from the guest")
                assert handed.recv(64) == b"from the guest"
            conn.sendall(b"k")
        assert connector.wait(timeout=20) == 0, connector.stderr.read()
    refused = subprocess.run([SHIM, "--proxy-connector"], capture_output=True, text=True)
    assert refused.returncode == 2 and "not for people" in refused.stderr


@pytest.mark.unit
def test_the_standalone_connector_is_used_only_where_qemus_user_can_run_it():
    import shutil
    import tempfile

    from terminai_shim._internal.backends.vmmprocess import can_run as _can_run

    tmp_path = Path(tempfile.mkdtemp(prefix="connector-"))  # pytest's own directories are private
    try:
        _check_can_run(tmp_path, _can_run)
    finally:
        shutil.rmtree(tmp_path)


def _check_can_run(tmp_path, _can_run):
    folder = tmp_path / "private" / "terminai-shim"
    (folder / "_internal").mkdir(parents=True)
    program = folder / "terminai-shim"
    program.write_bytes(b"")
    program.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "private").chmod(0o700)  # like /root: nobody cannot search it
    nobody = (65534, 65534)
    assert not _can_run(program, *nobody)
    (tmp_path / "private").chmod(0o755)
    assert _can_run(program, *nobody)
    (folder / "_internal").chmod(0o700)
    assert not _can_run(program, *nobody)
    assert _can_run(program, 0, 0)
