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

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass
