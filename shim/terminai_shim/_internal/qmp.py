"""A minimal QMP client: what snapshots need (migrate, query, cont), and the event stream the watchdog reads."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from ..errors import ShimError

MAX_LINE = 1 << 20


class QmpError(ShimError):
    code = "VMM_ERROR"


def _check_peer(sock: socket.socket, expect_pid: int | None, path: str) -> None:
    from .process import peer_pid

    if expect_pid is not None and peer_pid(sock) != expect_pid:
        sock.close()
        raise QmpError(f"{path} is not QEMU's monitor: the runtime directory was tampered with")


class Qmp:
    def __init__(self, path: str, deadline: float, expect_pid: int | None = None) -> None:
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's control socket {path} did not open") from None
                time.sleep(0.005)
        _check_peer(self.sock, expect_pid, path)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise QmpError("QEMU closed its control socket")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"QEMU refused {command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def execute_with_fd(self, command: str, fd: int, **arguments: Any) -> Any:
        """A command that takes a file descriptor with it (``getfd``): QEMU
        then writes into a file the shim opened, and never has to start a
        process (its seccomp filter forbids that)."""
        request: dict[str, Any] = {"execute": command, "arguments": arguments}
        self.file.flush()
        socket.send_fds(self.sock, [json.dumps(request).encode() + b"\n"], [fd])
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"QEMU refused {command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class QmpEvents:
    """A second look at QEMU: its event stream alone, read with a deadline
    (the watchdog's). Its own connection, raw reads, its own line buffer."""

    def __init__(self, path: str, timeout: float = 2.0, expect_pid: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = bytearray()
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            _check_peer(self.sock, expect_pid, path)
            self.sock.setblocking(False)
            if self._reply(timeout) is None:  # the greeting
                raise QmpError("QEMU sent no greeting")
            self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            if self._reply(timeout) is None:
                raise QmpError("QEMU did not accept qmp_capabilities")
        except OSError as exc:
            self.sock.close()
            raise QmpError(f"QEMU's monitor {path}: {exc}") from None

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._message(deadline)
            if msg is None or "event" not in msg:
                return msg

    def _message(self, deadline: float) -> dict[str, Any] | None:
        import select

        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                return {"event": "SHUTDOWN"}  # a closed monitor: QEMU is gone
            self.buffer += data
            if len(self.buffer) > MAX_LINE:  # no message is this long: not QEMU speaking
                return {"event": "SHUTDOWN"}
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        try:
            msg = json.loads(line)
        except ValueError:
            return {}
        return msg if isinstance(msg, dict) else {}

    def next_event(self, timeout: float) -> str | None:
        """The name of the next event within ``timeout``, or None. A closed
        monitor reads as ``SHUTDOWN``: QEMU is gone."""
        msg = self._message(time.monotonic() + timeout)
        return str(msg["event"]) if msg and "event" in msg else None

    def close(self) -> None:
        self.sock.close()
