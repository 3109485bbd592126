"""The shim's parts, one at a time: for measuring each against a baseline
(``inv bench`` times the agent client on a bare socket, QEMU's command line
without the session around it, the blob fetcher against curl, the hash
against sha256sum). A product starts VMs through ``launch``, not these.

This is the one public door to the pieces under ``_internal``; nothing
outside the shim imports ``_internal`` itself.
"""

from __future__ import annotations

from ._internal.backends.qemu import QemuBackend
from ._internal.backends.qemu import command_line as qemu_command_line
from ._internal.client import AgentClient, Pty
from ._internal.fetch import BlobCache, Source
from ._internal.fsutil import sealed_copy, sha256_file
from ._internal.snapshot import SnapshotStore

__all__ = [
    "AgentClient",
    "BlobCache",
    "Pty",
    "QemuBackend",
    "SnapshotStore",
    "Source",
    "qemu_command_line",
    "sealed_copy",
    "sha256_file",
]
