"""A Docker engine for the test suite: started if none answers, stopped after.

Debian's ``docker.io`` has no running daemon on a fresh machine without
systemd as PID 1 (CI containers, this project's machines), so ``inv test``
starts ``dockerd`` itself, waits until it answers ``/_ping``, and stops it
at the end if it was the one that started it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from terminai_shim.probes import engine_answers

from .errors import BuildError


@dataclass
class Engine:
    proc: subprocess.Popen[bytes] | None  # None: it was already running; not ours to stop
    log: Path | None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and cleans up
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ensure_engine(log: Path, timeout: float = 90.0) -> Engine:
    if engine_answers()[0]:
        return Engine(None, None)
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise BuildError("dockerd is not installed", hint="run ./bootstrap.sh (it installs docker.io)")
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("ab")
    proc = subprocess.Popen([dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not engine_answers()[0]:
        if proc.poll() is not None or time.monotonic() > deadline:
            Engine(proc, log).stop()
            raise BuildError("dockerd did not start", log=str(log), hint="read its log; is another daemon running?")
        time.sleep(0.2)
    return Engine(proc, log)
