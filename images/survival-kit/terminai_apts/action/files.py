"""File actions with bounded cost and no exceptions escaping to the caller.

Every function returns a dict; on failure it has an ``error`` key with a
message a person can act on. Paths that are not valid UTF-8 are reported
with backslash escapes rather than crashing JSON encoding.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable

from ._paths import describe, error, show

MAX_READ_BYTES = 10 * 1024 * 1024
MAX_SEARCH_FILE_BYTES = 5 * 1024 * 1024
MAX_MATCHES = 1000


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _check_encoding(encoding: str) -> str | None:
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        return f"unknown encoding {encoding!r}"
    return None


def delete_files(paths: Iterable[str] | str, recursive: bool = False, dry_run: bool = True) -> dict[str, object]:
    """Delete files (and directories when ``recursive``); by default only report.

    A symlink is removed itself, never what it points to.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]  # type: ignore[list-item]
    done: list[str] = []
    failed: list[dict[str, str]] = []
    for path in paths:
        try:
            st = os.lstat(path)
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and not recursive:
                failed.append({"path": show(path), "error": "is a directory; pass recursive=True"})
                continue
            if not dry_run:
                if is_dir:
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            done.append(show(path))
        except OSError as exc:
            failed.append({"path": show(path), "error": describe(exc)})
        except (TypeError, ValueError) as exc:
            failed.append({"path": repr(path), "error": f"invalid path: {exc}"})
    result: dict[str, object] = {"dry_run": dry_run, ("would_delete" if dry_run else "deleted"): done, "failed": failed}
    if failed and not done:
        result["error"] = f"nothing deleted: {failed[0]['error']}"
    return result


def list_directory(path: str, offset: int = 0, limit: int = 100) -> dict[str, object]:
    """One page of a directory's entries, sorted by name."""
    if offset < 0 or limit < 0:
        return error("offset and limit must be >= 0", path=show(path))
    try:
        with os.scandir(path) as it:
            names = sorted(entry.name for entry in it)
    except OSError as exc:
        return error(f"cannot list {show(path)}: {describe(exc)}", path=show(path))
    except (TypeError, ValueError) as exc:
        return error(f"invalid path: {exc}", path=repr(path))
    entries = []
    for name in names[offset : offset + limit]:
        full = os.path.join(path, name)
        try:
            st = os.lstat(full)
            entries.append(
                {"name": show(name), "type": _kind(st.st_mode), "size": st.st_size, "mtime": int(st.st_mtime)}
            )
        except OSError as exc:
            entries.append({"name": show(name), "type": "unknown", "error": describe(exc)})
    return {"path": show(path), "entries": entries, "total": len(names), "offset": offset, "limit": limit}


def read_file(path: str, encoding: str = "utf-8") -> dict[str, object]:
    """Read a text file of at most 10 MiB."""
    if problem := _check_encoding(encoding):
        return error(problem, path=show(path))
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_READ_BYTES + 1)
    except OSError as exc:
        return error(f"cannot read {show(path)}: {describe(exc)}", path=show(path))
    except (TypeError, ValueError) as exc:
        return error(f"invalid path: {exc}", path=repr(path))
    if len(data) > MAX_READ_BYTES:
        return error(f"{show(path)} is larger than {MAX_READ_BYTES} bytes", path=show(path))
    try:
        content = data.decode(encoding)
    except UnicodeDecodeError as exc:
        return error(f"{show(path)} is not valid {encoding}: {exc.reason} at byte {exc.start}", path=show(path))
    return {"path": show(path), "content": content, "encoding": encoding, "size": len(data)}


def write_file(path: str, content: str, encoding: str = "utf-8", overwrite: bool = False) -> dict[str, object]:
    """Write a text file atomically: readers see the old file or the whole new one."""
    if problem := _check_encoding(encoding):
        return error(problem, path=show(path))
    try:
        data = content.encode(encoding)
    except (UnicodeEncodeError, AttributeError) as exc:
        return error(f"cannot encode content as {encoding}: {exc}", path=show(path))
    try:
        if os.path.lexists(path) and not overwrite:
            return error(f"{show(path)} exists; pass overwrite=True", path=show(path))
        if os.path.isdir(path):
            return error(f"{show(path)} is a directory", path=show(path))
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        return error(f"cannot write {show(path)}: {describe(exc)}", path=show(path))
    except (TypeError, ValueError) as exc:
        return error(f"invalid path: {exc}", path=repr(path))
    return {"path": show(path), "bytes_written": len(data), "encoding": encoding}


def search_files(query: str, path: str, recursive: bool = False, file_pattern: str = "*") -> dict[str, object]:
    """Find ``query`` in file names and text contents under ``path``.

    Symlinked directories are not followed (no loops); binary and very large
    files are skipped; at most 1000 matches are returned.
    """
    if not query:
        return error("query must not be empty", path=show(path))
    if not os.path.isdir(path):
        return error(f"{show(path)} is not a directory", path=show(path))
    needle = query.lower()
    matches: list[dict[str, object]] = []
    skipped: list[str] = []
    truncated = False

    def walk() -> Iterable[tuple[str, list[str]]]:
        if recursive:
            for root, _dirs, files in os.walk(
                path, followlinks=False, onerror=lambda e: skipped.append(show(e.filename))
            ):
                yield root, files
        else:
            try:
                with os.scandir(path) as it:
                    yield path, [e.name for e in it if e.is_file(follow_symlinks=False)]
            except OSError as exc:
                skipped.append(f"{show(path)}: {describe(exc)}")

    for root, files in walk():
        for name in sorted(files):
            if not fnmatch.fnmatch(name, file_pattern):
                continue
            full = os.path.join(root, name)
            if needle in name.lower():
                matches.append({"path": show(full), "kind": "name"})
            try:
                st = os.stat(full, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SEARCH_FILE_BYTES:
                    continue
                with open(full, "rb") as f:
                    data = f.read()
            except OSError as exc:
                skipped.append(f"{show(full)}: {describe(exc)}")
                continue
            if b"\0" in data[:8192]:
                continue
            for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
                if needle in line.lower():
                    matches.append({"path": show(full), "kind": "content", "line": number, "text": line[:500]})
                    if len(matches) >= MAX_MATCHES:
                        break
            if len(matches) >= MAX_MATCHES:
                truncated = True
                break
        if truncated:
            break
    return {"query": query, "path": show(path), "matches": matches, "truncated": truncated, "skipped": skipped}
