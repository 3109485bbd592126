"""The workspace decision: may the VMM make this change to this path?

Pure functions over paths and a few facts passed in (free space, link
count), so every rule is unit-tested without a VM; ``vmmguard`` gathers the
facts from the VMM's system calls and applies the answer.

Why these rules. The host user later runs programs in the workspace, git
above all, and git runs commands named in a repository's metadata
(``core.fsmonitor``, hooks, filter drivers) the moment it reads it:
``git status`` in a directory with a ``.git`` the guest wrote runs the
guest's code on the host. A repository's metadata is found by the name
``.git`` (a directory, or a file pointing elsewhere) at any depth; the git
dirs of submodules live below the top one's ``.git/modules``; a worktree's
points outside the workspace, where the VMM cannot reach. So nothing named
``.git``, and nothing below one, may be created, written, renamed or
removed, unless the user asked for a writable git. Directories the
repository's own (trusted, pre-session) configuration runs hooks from
(``core.hooksPath`` inside the worktree) are protected the same way.

A directory shaped like a bare repository (``HEAD``, ``objects``,
``refs``) is git metadata too: git's discovery reads its ``config`` when
the user runs git inside it, so no directory gets a second of those names.

A file with more than one link shares its inode with another name, maybe
outside the workspace (pnpm's store, ``cp -al``, a local ``git clone``): a
write through the workspace's name would change that file too. Such a file
is broken into a private copy before it is opened for writing.

Below the disk floor nothing new is created (ENOSPC); the guard also stops
the session once growth of existing files crosses it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

GIT = ".git"
# What makes a directory a bare repository to git's discovery (HEAD, objects/, refs/):
# a directory never gets a second of these names (host git would read its ``config``).
BARE_SHAPE = ("HEAD", "objects", "refs")


@dataclass(frozen=True)
class Allow:
    pass


@dataclass(frozen=True)
class Deny:
    errno: int
    why: str


@dataclass(frozen=True)
class BreakLink:
    """Give the file at ``path`` its own inode (same bytes, mode, owner, times), then allow."""

    path: str


Decision = Allow | Deny | BreakLink
ALLOW = Allow()


@dataclass(frozen=True)
class WorkspacePolicy:
    root: str  # the workspace's real path on the host
    protect_git: bool = True
    protected: tuple[str, ...] = field(default=())  # further directories, relative to root (hooksPath)

    def inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root.rstrip("/") + "/")

    def relative(self, path: str) -> tuple[str, ...]:
        return tuple(p for p in path[len(self.root) :].split("/") if p)

    def is_git_metadata(self, path: str) -> bool:
        """``path`` is a git dir or file, or anything below one (any depth, any case:
        a host on a case-insensitive file system reads ``.GIT`` as ``.git``)."""
        if not self.inside(path):
            return False
        parts = self.relative(path)
        if self.protect_git and any(p.lower() == GIT for p in parts):
            return True
        joined = "/".join(parts)
        return any(joined == d or joined.startswith(d + "/") for d in self.protected)

    def change(
        self, path: str, *, creates: bool = False, below_floor: bool = False, bare_shape: bool = False
    ) -> Decision:
        """A name created, removed or renamed at ``path`` (``bare_shape``: it
        is one of ``BARE_SHAPE`` and its directory already has another)."""
        if not self.inside(path):
            return ALLOW
        if self.is_git_metadata(path) or (creates and bare_shape and self.protect_git):
            return Deny(errno.EROFS, f"git metadata is read-only in this session: {self._show(path)}")
        if creates and below_floor:
            return Deny(errno.ENOSPC, "the workspace's file system is at its disk floor")
        return ALLOW

    def write(self, path: str, *, nlink: int, regular: bool, creates: bool, below_floor: bool) -> Decision:
        """A file at ``path`` opened for writing (``nlink`` 0: it does not exist yet)."""
        decided = self.change(path, creates=creates and nlink == 0, below_floor=below_floor)
        if decided != ALLOW or not self.inside(path):
            return decided
        if regular and nlink > 1:
            if below_floor:
                return Deny(errno.ENOSPC, "no room to give a hard-linked file its own copy above the disk floor")
            return BreakLink(path)
        return ALLOW

    def _show(self, path: str) -> str:
        return os.path.join(".", *self.relative(path))


def hooks_paths(root: str) -> tuple[str, ...]:
    """The directories inside the worktree that the repository's own
    configuration runs hooks from (``core.hooksPath``, relative to the
    worktree, e.g. husky's ``.husky/_``), read from ``.git/config`` as it is
    before the session. Read by hand, not by running git in the workspace."""
    found: list[str] = []
    try:
        with open(os.path.join(root, GIT, "config"), encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return ()
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line[1 : line.find("]")].strip().lower() if "]" in line else ""
            continue
        key, sep, value = line.partition("=")
        if section == "core" and sep and key.strip().lower() == "hookspath":
            value = value.split("#", 1)[0].split(";", 1)[0].strip().strip('"')
            if not value or os.path.isabs(value) or value.startswith("~"):
                continue
            norm = os.path.normpath(value)
            if norm != "." and not norm.startswith(".."):
                found.append(norm)
    return tuple(found)
