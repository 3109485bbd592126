"""The broker's questions, carried to the CLI over ``terminai-shim serve``.

A level B or C request from the brain becomes an ``approval.request``
notification; the broker's worker waits (never the serve loop) until the
CLI answers with ``approval.respond``, or the timeout passes, which is a
denial (and an ``approval.expired`` notification, so the CLI can take its
prompt down). When the session ends, every open question is denied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .broker import Approval, ApprovalRequest


class PendingApprovals:
    def __init__(self, notify: Callable[[str, dict[str, Any]], None]) -> None:
        self._notify = notify
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[Approval]]] = {}
        self._closed = False

    def __call__(self, request: ApprovalRequest, timeout: float) -> Approval | None:
        event, answer = threading.Event(), list[Approval]()
        with self._lock:
            if self._closed:
                return Approval(False)
            self._pending[request.id] = (event, answer)
        try:
            self._notify("approval.request", {
                "approvalId": request.id, "level": request.level, "method": request.method,
                "summary": request.summary, "reason": request.reason, "subject": request.subject,
                "cwd": request.cwd, "timeoutMs": int(timeout * 1000),
            })  # fmt: skip
            if not event.wait(timeout):
                self._notify("approval.expired", {"approvalId": request.id})
                return None
            return answer[0]
        finally:
            with self._lock:
                self._pending.pop(request.id, None)

    def respond(self, approval_id: str, allow: bool, session: bool = False) -> bool:
        """False when no question with that id is open (answered, expired, or never asked)."""
        with self._lock:
            found = self._pending.pop(approval_id, None)
        if found is None:
            return False
        event, answer = found
        answer.append(Approval(allow, session))
        event.set()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        for event, answer in pending.values():
            answer.append(Approval(False))
            event.set()


__all__ = [
    "PendingApprovals",
]
