"""Drive `terminai-shim serve` over its JSON-lines stdio, as the CLI does."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jsonschema

# The shim under test: this environment's console script or, under
# `pytest --standalone-shim` (conftest.py), the standalone build of `inv shim-dist`.
SHIM = os.environ.get("TERMINAI_TEST_SHIM") or str(Path(sys.executable).with_name("terminai-shim"))
# The settings of this test run that every shim it starts must see, even one
# given an environment of its own (conftest.py lowers the disk floor on a host
# already below the default one).
RUN_SETTINGS = ("TERMINAI_DISK_FLOOR",)


def run_settings() -> dict[str, str]:
    return {name: os.environ[name] for name in RUN_SETTINGS if name in os.environ}


SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs/shim-protocol.schema.json").read_text())


class ShimProc:
    def __init__(self, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen([SHIM, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=cwd,
                                     text=True, bufsize=1)  # fmt: skip
        self.ids = itertools.count(1)
        self.responses: dict[Any, queue.Queue[dict[str, Any]]] = {}
        self.notifications: queue.Queue[dict[str, Any]] = queue.Queue()
        self.progress: queue.Queue[dict[str, Any]] = queue.Queue()  # initialize.progress, apart from process events
        self.unmatched: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        self.schema_errors: list[str] = []
        self.validator = jsonschema.Draft202012Validator(SCHEMA)
        self.methods: dict[Any, str] = {}  # request id -> method, to check each result against its method's schema
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            # Every message the shim writes must match the documented schema.
            self.schema_errors += [f"{e.message} in {line.strip()}" for e in self.validator.iter_errors(msg)]
            method = self.methods.get(msg.get("id"))
            if "result" in msg and method in SCHEMA["$defs"]["results"]:
                result_schema = {"$ref": f"#/$defs/results/{method}", "$defs": SCHEMA["$defs"]}
                errors = jsonschema.Draft202012Validator(result_schema).iter_errors(msg["result"])
                self.schema_errors += [f"{method} result: {e.message} in {line.strip()}" for e in errors]
            if msg.get("method") == "initialize.progress":
                self.progress.put(msg["params"])
                continue
            if "method" in msg:
                self.notifications.put(msg)
                continue
            with self.lock:
                q = self.responses.get(msg.get("id"))
            (q or self.unmatched).put(msg)

    def check_schema(self) -> None:
        assert not self.schema_errors, self.schema_errors[:3]

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def start(self, method: str, params: dict[str, Any] | None = None) -> queue.Queue[dict[str, Any]]:
        rid = next(self.ids)
        self.last_id = rid  # the id of the request just sent (for `cancel`)
        self.methods[rid] = method
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self.lock:
            self.responses[rid] = q
        self.send_line(json.dumps({"id": rid, "method": method, "params": params or {}}))
        return q

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 300) -> dict[str, Any]:
        return self.start(method, params).get(timeout=timeout)

    def result(self, method: str, params: dict[str, Any] | None = None, timeout: float = 300) -> Any:
        msg = self.call(method, params, timeout)
        assert "result" in msg, msg
        return msg["result"]

    def close(self) -> None:
        self.check_schema()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ShimProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
