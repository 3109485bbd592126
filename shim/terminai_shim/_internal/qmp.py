"""A minimal QMP client: just what snapshots need (migrate, query, cont, quit)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from ..errors import ShimError


class QmpError(ShimError):
    code = "VMM_ERROR"


class Qmp:
    def __init__(self, path: str, deadline: float) -> None:
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

    def next_event(self, timeout: float) -> str | None:
        """The name of the next event QEMU sends within ``timeout``, or None."""
        self.sock.settimeout(timeout)
        try:
            line = self.file.readline()
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(None)
        if not line:
            return "SHUTDOWN"  # QEMU closed its monitor: it is gone
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return str(msg.get("event")) if isinstance(msg, dict) and "event" in msg else None

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass
