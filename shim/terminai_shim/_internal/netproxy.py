"""The host-side proxy that enforces a session's network allowlist.

HTTP CONNECT (for HTTPS and anything tunnelled) and plain HTTP requests in
absolute form. Each connection's target is decided by ``netpolicy.decide``
(name on the list, resolved address public or explicitly listed), then the
proxy connects to exactly the address it checked and relays bytes. Every
decision is one JSON line in the session's log, with the session id.

One long-lived ``ProxyServer`` per session, started before the guest runs,
inside the shim's own process: a guest connection never makes the host
import, execute or read anything, so a workspace full of the guest's files
(``terminai_shim/__init__.py`` included) changes nothing on the host. QEMU's
restricted user networking cannot hand several guest connections to one
listener, so for each guest connection it starts ``CONNECTOR``: the
system's Python in isolated mode (``-I -S``: no current directory, no
site packages, no environment), from the session's private directory, with
its code inline. It passes the connection's descriptor to the server over
a Unix socket and exits; the server counts it against the session's limit
before doing anything else.

``--listen HOST:PORT CONFIG`` runs the same server on TCP (tests, and a
proxy in front of a container).

When the host itself sits behind a proxy (``upstream``, taken from the
shim's own ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``), allowed
connections go through it; a name the host cannot resolve is then left to
the upstream proxy to resolve.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any

from .httphead import MAX_HEAD, HeadError, RequestHead, parse_request_head, split_head
from .netpolicy import Allowlist, Decision, decide, decide_name

BUFFER = 256 << 10
MAX_CONNECTIONS = 64  # per session, counted before any work: a guest cannot make the host spend without bound
HEAD_TIMEOUT = 30.0  # to send a whole request head
IDLE_TIMEOUT = 300.0  # a relayed connection with no byte either way for this long is closed
_BARE = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")  # a line ending that is not CRLF (a trailing CR may still be one)
CONNECT_PORT = 443  # CONNECT is a raw tunnel: to 443 only, unless an entry names another port itself

# Run by QEMU for each guest connection (argv, no shell): pass our stdin, the
# guest's connection, to the session's server, wait until it has it, exit.
CONNECTOR = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n"
    "s.settimeout(10)\n"
    "s.connect(sys.argv[1])\n"
    "socket.send_fds(s,[b'c'],[0])\n"
    "s.recv(1)\n"
)
# The standalone shim is its own connector (no Python on the host to start):
# `terminai-shim --proxy-connector SOCKET` runs CONNECTOR, the same code.
PROXY_CONNECTOR_FLAG = "--proxy-connector"


def run_connector(argv: list[str]) -> int:
    """``--proxy-connector SOCKET``: CONNECTOR itself, run by the standalone shim."""
    if len(argv) != 1:
        print("usage: terminai-shim --proxy-connector SOCKET (QEMU starts it; not for people)", file=sys.stderr)
        return 2
    sys.argv = ["connector", *argv]
    exec(CONNECTOR, {"__name__": "connector"})
    return 0


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
        fd = os.open(config.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)  # one write with O_APPEND: lines from concurrent connections never interleave
        finally:
            os.close(fd)
    else:
        sys.stderr.buffer.write(line)


def _read_head(conn: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """The request head (strictly delimited) and what followed it, within
    ``deadline``. The buffer is searched only where new bytes arrived, so a
    head sent a byte at a time costs linear, not quadratic, work."""
    data = bytearray()
    while True:
        start = max(0, len(data) - 3)
        left = deadline - time.monotonic()
        if left <= 0:
            raise HeadError("408 Request Timeout", "the request head did not arrive in time")
        conn.settimeout(left)
        chunk = conn.recv(8192)
        if not chunk:
            raise ConnectionError("the client closed before sending a request")
        data += chunk
        if data.find(b"\r\n\r\n", start) >= 0 or len(data) > MAX_HEAD or _BARE.search(data, max(0, start - 1)):
            found = split_head(bytes(data))  # raises on a bare CR or LF: refused at once, not at the timeout
            if found is not None:
                return found


def _reply(conn: socket.socket, status: str, text: str) -> None:
    body = (text + "\n").encode()
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)  # fmt: skip


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
    try:
        head, rest = _read_head(sock, time.monotonic() + 30)
    except (HeadError, OSError) as exc:
        sock.close()
        raise ConnectionError(f"the upstream proxy did not answer CONNECT {authority}: {exc}") from None
    first = head.split(b"\r\n", 1)[0]
    status = first.split()
    if len(status) < 2 or status[1] != b"200" or rest:
        sock.close()
        raise ConnectionError(f"the upstream proxy refused {host}:{port}: {first!r}")
    return sock


def _relay(a: socket.socket, b: socket.socket, idle: float = IDLE_TIMEOUT) -> None:
    """Bytes both ways on one thread until both sides have finished, or
    nothing moved for ``idle`` seconds. (poll, not select: a shim serving
    many sessions has descriptors above 1024.)"""
    peer = {a.fileno(): (a, b), b.fileno(): (b, a)}
    open_ends = set(peer)
    poller = select.poll()
    for fd in open_ends:
        poller.register(fd, select.POLLIN)
    for s in (a, b):
        s.setblocking(False)
    while open_ends:
        ready = poller.poll(idle * 1000)
        if not ready:
            return
        for fd, _ in ready:
            src, dst = peer[fd]
            try:
                chunk = src.recv(BUFFER)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                open_ends.discard(fd)
                poller.unregister(fd)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            try:
                dst.settimeout(idle)
                dst.sendall(chunk)
            except OSError:
                return
            finally:
                dst.setblocking(False)


def _connect_allowed(req: RequestHead, config: ProxyConfig) -> Decision:
    """The policy's answer for this request: name first (an unlisted name is
    never even looked up: a lookup alone could carry data out through DNS),
    then every address the name resolves to."""
    if (
        req.method == "CONNECT"
        and req.port != CONNECT_PORT
        and not any(e.explicit_port and e.matches(req.host, req.port) for e in config.allowlist.entries)
    ):
        return Decision(False, f"CONNECT to port {req.port} needs an entry that names the port")
    decision = decide_name(config.allowlist, req.host, req.port)
    if decision.allowed:
        addresses = _resolve(req.host, req.port)
        if addresses or not _upstream(req, config):
            decision = decide(config.allowlist, req.host, req.port, addresses)
        # else: the host cannot resolve it; the upstream proxy will (name rule only, documented)
    return decision


def _upstream(req: RequestHead, config: ProxyConfig) -> str | None:
    if _bypasses(config.upstream, req.host):
        return None
    return config.upstream.get("https" if req.method == "CONNECT" else "http")


def handle(conn: socket.socket, config: ProxyConfig) -> None:
    """One guest connection: one request (or one tunnel), then close."""
    try:
        head, rest = _read_head(conn, time.monotonic() + HEAD_TIMEOUT)
        req = parse_request_head(head)
    except HeadError as exc:
        _reply(conn, exc.status, f"terminai proxy: {exc.message}")
        return
    except (ConnectionError, OSError):
        return
    decision = _connect_allowed(req, config)
    _log(config, decision, req.method, req.host, req.port)
    if not decision.allowed:
        _reply(conn, "403 Forbidden", f"terminai proxy: refused: {decision.reason}")
        return
    if req.chunked:
        _reply(conn, "411 Length Required", "terminai proxy: chunked request bodies are not proxied over plain http")
        return
    upstream = _upstream(req, config)
    try:
        target_address = decision.address or req.host
        if upstream:  # connect through the host's proxy to the address checked here, not a fresh lookup
            server = _connect_upstream(upstream, target_address, req.port)
        else:
            server = socket.create_connection((target_address, req.port), timeout=30)
    except OSError as exc:
        _reply(conn, "502 Bad Gateway", f"terminai proxy: cannot reach {req.host}:{req.port}: {exc}")
        return
    with server:
        if req.method == "CONNECT":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                server.sendall(rest)
            _relay(conn, server)
            return
        # Plain HTTP: exactly one request, to the host that was checked. The
        # Host header is the checked one (no virtual host behind the same
        # address), the body is its declared length, and nothing the client
        # sends after it reaches the server (no pipelined second request).
        hop = ("proxy-connection", "proxy-authorization", "connection", "host", "keep-alive", "te", "upgrade")
        kept = [f"{name}: {value}" for name, value in req.headers if name.lower() not in hop]
        authority = f"[{req.host}]" if ":" in req.host else req.host
        head_lines = [f"{req.method} {req.path} {req.version}",
                      f"Host: {authority}" + (f":{req.port}" if req.port != 80 else ""), *kept,
                      "Connection: close"]  # fmt: skip
        server.sendall(("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1"))
        sent = rest[: req.content_length]
        server.sendall(sent)
        remaining = req.content_length - len(sent)
        conn.settimeout(IDLE_TIMEOUT)
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
        server.settimeout(IDLE_TIMEOUT)
        while chunk := server.recv(BUFFER):
            conn.sendall(chunk)


def _stream_socket(fd: int) -> socket.socket | None:
    """The passed descriptor as a stream socket, or None (and closed) if it is anything else."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket at all
        os.close(fd)
        return None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


class ProxyServer:
    """One session's proxy: a listener, a bounded number of connections,
    each handled on its own thread; ``close`` ends the listener."""

    def __init__(self, config: ProxyConfig, max_connections: int = MAX_CONNECTIONS) -> None:
        self.config = config
        self.max_connections = max_connections
        self.active = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._closed = False

    def set_session(self, session: str, log: str) -> None:
        """The session id is known once the agent answered (before any command runs)."""
        self.config = replace(self.config, session=session, log=log)

    def listen_unix(self, path: str) -> None:
        """Connectors hand guest connections over this socket (descriptor passing)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
        self._start(listener, self._take_passed)

    def listen_tcp(self, address: tuple[str, int]) -> tuple[str, int]:
        listener = socket.create_server(address)
        self._start(listener, lambda conn: self._admit(conn))
        name: tuple[str, int] = listener.getsockname()[:2]
        return name

    def _start(self, listener: socket.socket, take: Any) -> None:
        self._listener = listener

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed
                try:
                    take(conn)
                except Exception:
                    conn.close()

        self._thread = threading.Thread(target=loop, name="netproxy", daemon=True)
        self._thread.start()

    def _take_passed(self, carrier: socket.socket) -> None:
        """A connector's hand-over, on its own thread (a silent one must not
        hold up the others): one descriptor, which must be a stream socket."""

        def take() -> None:
            with carrier:
                carrier.settimeout(5)
                try:
                    _, fds, _, _ = socket.recv_fds(carrier, 1, 4)
                except OSError:
                    return
                conn = _stream_socket(fds[0]) if fds else None
                for extra in fds[1:]:
                    os.close(extra)
                if conn is None:
                    return
                try:
                    carrier.sendall(b"k")
                except OSError:
                    pass
            self._admit(conn)

        threading.Thread(target=take, name="netproxy-handover", daemon=True).start()

    def _admit(self, conn: socket.socket) -> None:
        with self._lock:  # counted and tracked together: close() sees every connection it counted
            full = self.active >= self.max_connections or self._closed
            if full:
                self.refused += 1
            else:
                self.active += 1
                self._conns.add(conn)
        if full:
            with conn:
                try:
                    conn.setblocking(False)
                    conn.send(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass
            return
        threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                handle(conn, self.config)
        except Exception:
            pass  # the guest sees the connection close; it never sees a traceback
        finally:
            with self._lock:
                self.active -= 1
                self._conns.discard(conn)

    def close(self) -> None:
        """The listener, and every connection still relayed: nothing of the session outlives it."""
        with self._lock:
            self._closed = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--listen":
        host, _, port = argv[1].rpartition(":")
        server = ProxyServer(ProxyConfig.load(argv[2]))
        bound = server.listen_tcp((host, int(port)))
        print(f"listening {bound[0]}:{bound[1]}", flush=True)
        threading.Event().wait()
        return 0
    print("usage: python -m terminai_shim._internal.netproxy --listen HOST:PORT CONFIG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
