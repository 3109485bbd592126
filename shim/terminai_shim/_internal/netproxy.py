"""The host-side proxy that enforces a session's network allowlist.

HTTP CONNECT (for HTTPS and anything tunnelled) and plain HTTP requests in
absolute form. Each connection's target is decided by ``netpolicy.decide``
(name on the list, resolved address public or explicitly listed), then the
proxy connects to exactly the address it checked and relays bytes. Every
decision is one JSON line in the session's log, with the session id.

Two ways to run it, both standard library only:

- ``--inetd CONFIG``: one connection on stdin. QEMU's restricted user
  networking spawns this for every guest connection to the proxy address
  (``guestfwd=...-cmd:``), so the guest reaches nothing else at all.
- ``--listen HOST:PORT CONFIG``: a small threaded server (tests; a proxy in
  front of a container).

When the host itself sits behind a proxy (``upstream`` in the config, taken
from the shim's own ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``), allowed
connections go through it; a name the host cannot resolve is then left to
the upstream proxy to resolve.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .netpolicy import Allowlist, Decision, decide, decide_name

MAX_HEADER = 64 << 10
BUFFER = 256 << 10


@dataclass(frozen=True)
class ProxyConfig:
    session: str
    allowlist: Allowlist
    log: str | None
    upstream: dict[str, str]

    @classmethod
    def load(cls, path: str) -> ProxyConfig:
        with open(path) as f:
            doc = json.load(f)
        return cls(str(doc.get("session", "?")), Allowlist.parse(doc.get("allow", [])), doc.get("log"),
                   dict(doc.get("upstream") or {}))  # fmt: skip


def upstream_from_env(env: dict[str, str]) -> dict[str, str]:
    """The host's own proxy settings, to chain through."""
    out = {}
    for key in ("https", "http", "no"):
        value = env.get(f"{key}_proxy") or env.get(f"{key.upper()}_PROXY")
        if value:
            out[key] = value
    return out


def _bypasses(upstream: dict[str, str], host: str) -> bool:
    for item in (x.strip().lower() for x in upstream.get("no", "").split(",")):
        if item and (item == "*" or host == item.lstrip(".") or host.endswith("." + item.lstrip("."))):
            return True
    return False


def _log(config: ProxyConfig, decision: Decision, method: str, host: str, port: int) -> None:
    record = {"time": round(time.time(), 3), "session": config.session, "decision":
              "allow" if decision.allowed else "refuse", "method": method, "host": host, "port": port,
              "address": decision.address, "reason": decision.reason}  # fmt: skip
    line = (json.dumps(record) + "\n").encode()
    if config.log:
        fd = os.open(config.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write with O_APPEND: lines from concurrent connections never interleave
        finally:
            os.close(fd)
    else:
        sys.stderr.buffer.write(line)


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(8192)
        if not chunk:
            raise ConnectionError("the client closed before sending a request")
        data += chunk
        if len(data) > MAX_HEADER:
            raise ValueError("request header too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _reply(conn: socket.socket, status: str, text: str) -> None:
    body = (text + "\n").encode()
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)  # fmt: skip


def _target(method: str, target: str) -> tuple[str, int, str]:
    """host, port and the origin-form path for a request line's target."""
    if method == "CONNECT":
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"CONNECT target {target!r} is not HOST:PORT")
        return host.strip("[]"), int(port), ""
    url = urllib.parse.urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"only absolute http:// URLs and CONNECT are proxied, not {target!r}")
    path = url.path or "/"
    return url.hostname, url.port or 80, path + (f"?{url.query}" if url.query else "")


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError, UnicodeError):
        return []
    seen: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in seen:
            seen.append(addr)
    return seen


def _connect_upstream(proxy: str, host: str, port: int) -> socket.socket:
    url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 3128), timeout=30)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head, rest = _read_head(sock)
    first = head.split(b"\r\n", 1)[0]
    status = first.split()
    if len(status) < 2 or status[1] != b"200" or rest:
        sock.close()
        raise ConnectionError(f"the upstream proxy refused {host}:{port}: {first!r}")
    return sock


def _splice(a: socket.socket, b: socket.socket) -> None:
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(BUFFER):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join()


def handle(conn: socket.socket, config: ProxyConfig) -> None:
    conn.settimeout(60)
    try:
        head, rest = _read_head(conn)
        request_line, _, headers = head.partition(b"\r\n")
        method, target, version = request_line.decode("latin-1").split(" ", 2)
        host, port, path = _target(method, target)
    except (ValueError, ConnectionError, OSError) as exc:
        try:
            _reply(conn, "400 Bad Request", f"terminai proxy: {exc}")
        except OSError:
            pass
        return
    host = host.lower().rstrip(".")
    upstream = None if _bypasses(config.upstream, host) else config.upstream.get("https" if method == "CONNECT"
                                                                                 else "http")  # fmt: skip
    # The name rule first: a name that is not listed is never even looked up
    # (a lookup alone could carry data out through DNS).
    decision = decide_name(config.allowlist, host, port)
    if decision.allowed:
        addresses = _resolve(host, port)
        if addresses or not upstream:
            decision = decide(config.allowlist, host, port, addresses)
        # else: the host cannot resolve it; the upstream proxy will (name rule only, documented)
    _log(config, decision, method, host, port)
    if not decision.allowed:
        _reply(conn, "403 Forbidden", f"terminai proxy: refused: {decision.reason}")
        return
    length = 0
    if method != "CONNECT":
        fields = _fields(headers)
        if "chunked" in fields.get("transfer-encoding", "").lower():
            _reply(
                conn, "411 Length Required", "terminai proxy: chunked request bodies are not proxied over plain http"
            )
            return
        length = int(fields["content-length"]) if fields.get("content-length", "").isdigit() else -1
        if length < 0 and "content-length" in fields:
            _reply(conn, "400 Bad Request", "terminai proxy: bad Content-Length")
            return
        length = max(length, 0)
    try:
        target_address = decision.address or host
        if upstream:  # connect through the host's proxy to the address checked here, not a fresh lookup
            server = _connect_upstream(upstream, target_address, port)
        else:
            server = socket.create_connection((target_address, port), timeout=30)
    except OSError as exc:
        _reply(conn, "502 Bad Gateway", f"terminai proxy: cannot reach {host}:{port}: {exc}")
        return
    conn.settimeout(None)
    server.settimeout(None)
    with server:
        if method == "CONNECT":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                server.sendall(rest)
            _splice(conn, server)
            return
        # Plain HTTP: exactly one request, to the host that was checked. The
        # Host header is the checked one (no virtual host behind the same
        # address), the body is its declared length, and nothing the client
        # sends after it reaches the server (no pipelined second request).
        kept = [h.decode("latin-1") for h in headers.split(b"\r\n")
                if h and not h.lower().startswith((b"proxy-", b"connection:", b"host:", b"keep-alive:"))]  # fmt: skip
        authority = f"[{host}]" if ":" in host else host
        head_lines = [f"{method} {path} {version}", f"Host: {authority}" + (f":{port}" if port != 80 else ""),
                      *kept, "Connection: close"]  # fmt: skip
        server.sendall(("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1"))
        sent = rest[:length]
        server.sendall(sent)
        remaining = length - len(sent)
        while remaining > 0:
            chunk = conn.recv(min(BUFFER, remaining))
            if not chunk:
                break
            server.sendall(chunk)
            remaining -= len(chunk)
        try:
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while chunk := server.recv(BUFFER):
            conn.sendall(chunk)


def _fields(headers: bytes) -> dict[str, str]:
    out = {}
    for line in headers.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


MAX_CONNECTIONS = 64  # per session: a guest cannot make the host spawn proxies without bound


@contextlib.contextmanager
def _slot(config_path: str) -> Iterator[bool]:
    """One of MAX_CONNECTIONS lock files beside the session's config, or none."""
    import fcntl

    base = os.path.dirname(config_path)
    for i in range(MAX_CONNECTIONS):
        fd = os.open(os.path.join(base, f".proxy-slot-{i}"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            yield True
        finally:
            os.close(fd)
        return
    yield False


def serve(address: tuple[str, int], config: ProxyConfig, ready: Any = None) -> None:
    listener = socket.create_server(address)
    if ready is not None:
        ready(listener.getsockname())
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=lambda c=conn: _handle_closing(c, config), daemon=True).start()


def _handle_closing(conn: socket.socket, config: ProxyConfig) -> None:
    with conn:
        handle(conn, config)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--inetd":
        # QEMU hands the guest's connection over as stdin, stdout and stderr:
        # nothing but protocol bytes may ever be written to it.
        conn = socket.socket(fileno=os.dup(0))
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        with conn:
            try:
                config = ProxyConfig.load(argv[1])
                with _slot(argv[1]) as free:
                    if free:
                        handle(conn, config)
                    else:
                        _reply(conn, "503 Service Unavailable", "terminai proxy: too many connections at once")
            except BaseException:
                pass  # the guest sees the connection close; it never sees a traceback
        return 0
    if len(argv) == 3 and argv[0] == "--listen":
        host, _, port = argv[1].rpartition(":")
        serve((host, int(port)), ProxyConfig.load(argv[2]),
              ready=lambda a: print(f"listening {a[0]}:{a[1]}", flush=True))  # fmt: skip
        return 0
    print("usage: python -m terminai_shim._internal.netproxy --inetd CONFIG | --listen HOST:PORT CONFIG",
          file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
