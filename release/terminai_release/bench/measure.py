"""Timing primitives shared by the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from terminai_protocol import protocol as P
from terminai_shim.models import BootConfig
from terminai_shim.parts import QemuBackend, qemu_command_line
from terminai_shim.probes import accelerator
from terminai_shim.session import new_runtime_dir

from ..rootfs.project import agent_pythonpath

SHIM = str(Path(sys.executable).with_name("terminai-shim"))


def text_stream(size: int) -> list[str]:
    """A command printing ``size`` bytes of text: what a CLI's commands print
    (binary zeros would measure JSON escaping, not the runtime)."""
    return ["sh", "-c", f"yes 'terminai benchmark output line' | head -c {size}"]


def timed(fn: Any) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


class Serve:
    """The shim's JSON-lines protocol, driven synchronously."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [SHIM, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.n = 0

    def call(self, method: str, **params: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.n += 1
        self.proc.stdin.write(json.dumps({"id": self.n, "method": method, "params": params}) + "\n")
        self.proc.stdin.flush()
        while True:
            msg = json.loads(self.proc.stdout.readline())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def close(self) -> None:
        try:
            self.call("dispose")
        finally:
            assert self.proc.stdin
            self.proc.stdin.close()  # a shim with a warm pool serves until its input ends
            self.proc.wait(30)


@contextlib.contextmanager
def host_agent(work: Path) -> Iterator[Any]:
    """The same agent on this host over a Unix socket (the container tier's
    transport): a baseline with no VM at all. Yields its AgentClient."""
    from terminai_shim.parts import AgentClient

    path = work / f"host-agent-{os.getpid()}.sock"
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=agent_pythonpath(repo))
    agent = subprocess.Popen([sys.executable, "-m", "terminai_agent", f"--channel=unix:{path}"], env=env)
    try:
        while not path.exists():
            time.sleep(0.01)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        client = AgentClient(sock)
        client.hello()
        try:
            yield client
        finally:
            client.close()
    finally:
        agent.kill()
        agent.wait()


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p99": p99, "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def repeat(runs: int, fn: Callable[[], float]) -> dict[str, Any]:
    return summary([fn() for _ in range(runs)])


def boot_to_marker(config: BootConfig, marker: bytes = b"TERMINAI-KERNEL-MARKER", timeout: float = 120) -> float:
    """QEMU start to the marker on the serial console."""
    runtime = new_runtime_dir()
    start = time.monotonic()
    machine = QemuBackend().start(config, accelerator(config.accel), runtime)
    try:
        while time.monotonic() - start < timeout:
            try:
                if marker in runtime.console_log.read_bytes():
                    return time.monotonic() - start
            except FileNotFoundError:
                pass
            if not machine.alive():
                raise RuntimeError(
                    "guest stopped before the marker: " + runtime.console_log.read_text(errors="replace")[-500:]
                )
            time.sleep(0.002)
        raise TimeoutError("no marker")
    finally:
        machine.kill()
        subprocess.run(["rm", "-rf", str(runtime.path)], check=False)


class RawAgent:
    """The bare protocol over a hand-made QEMU: the baseline the shim is compared with."""

    def __init__(self, config: BootConfig) -> None:
        self.runtime = new_runtime_dir()
        self.runtime.empty_share.mkdir(exist_ok=True)  # the 9p device needs a directory behind it
        self.runtime.vmm_dir.mkdir(exist_ok=True)
        console = os.open(os.devnull, os.O_WRONLY | os.O_APPEND)
        argv = qemu_command_line(config, accelerator(config.accel), self.runtime, console_fd=console)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(console,)
        )
        os.close(console)
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(self.runtime.agent_socket))
                break
            except OSError:
                self.sock.close()
                time.sleep(0.002)
        self.decoder = P.Decoder()
        self.pending: list[P.Frame] = []
        self.ids = 0
        self.request("hello", versions=[1])

    def _next(self) -> P.Frame:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("agent closed")
            self.pending += [f for f in self.decoder.feed(data) if isinstance(f, P.Frame)]
        return self.pending.pop(0)

    def request(self, op: str, **fields: Any) -> P.Frame:
        self.ids += 1
        self.sock.sendall(P.request(self.ids, op, **fields))
        while True:
            frame = self._next()
            if frame.id == self.ids and frame.kind in (P.RESULT, P.ERROR):
                return frame

    def run(self, argv: list[str]) -> tuple[int, int]:
        """Run to exit; returns (exit code, stdout bytes)."""
        self.ids += 1
        rid = self.ids
        self.sock.sendall(P.request(rid, "exec", argv=argv))
        received = 0
        while True:
            frame = self._next()
            if frame.id != rid:
                continue
            if frame.kind == P.EVENT and frame.header.get("event") == "stdout":
                received += len(frame.body)
            elif frame.kind == P.EVENT and frame.header.get("event") == "exit":
                return int(frame.header.get("code") or 0), received

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()
        subprocess.run(["rm", "-rf", str(self.runtime.path)], check=False)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
