"""Verify a signed brain bundle before a single file of it is unpacked.

Order: the zip's sigstore signature against the identity policy; then
``bundle.json`` inside it must list exactly the zip's other members (an
extra or a missing file is refused), every path must be a plain relative
path (no ``..``, no absolute or drive paths, no backslashes, no links), and
every file's size and sha256 must match while it is read. Only then is it
unpacked, under a temporary name renamed into place, into a per-version
directory of the shim's cache; nothing not listed in ``bundle.json`` is
ever run from there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._internal.fsutil import cache_root, file_digest, locked
from ..errors import ShimError

BUNDLE_JSON = "bundle.json"
MEDIA_TYPE = "application/vnd.terminai.brain-bundle.v1+json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")


class BundleError(ShimError):
    code = "BUNDLE_INVALID"


@dataclass(frozen=True)
class BrainBundle:
    directory: Path
    doc: dict[str, Any]

    def path(self, relative: str) -> Path:
        """A listed file; anything else is refused."""
        if relative not in {f["path"] for f in self.doc["files"]}:
            raise BundleError(f"{relative} is not listed in bundle.json: refusing to use it")
        return self.directory / relative

    @property
    def entrypoint(self) -> Path:
        return self.path(str(self.doc["entrypoint"]))

    @property
    def module(self) -> Path | None:
        return self.path(str(self.doc["module"])) if self.doc.get("module") else None

    @property
    def node(self) -> Path | None:
        bundled = self.doc.get("node", {}).get("bundled")
        return self.path(str(bundled)) if bundled else None


# Names Windows gives to devices in every directory, with or without an extension.
_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", *(f"COM{i}" for i in "123456789¹²³"),
                      *(f"LPT{i}" for i in "123456789¹²³")})  # fmt: skip
_FORBIDDEN = frozenset('<>:"|?*\\') | frozenset(map(chr, range(32)))


def check_name(name: str) -> str:
    """A member name with exactly one spelling on every file system the brain
    unpacks to; returns its collision key (case-folded, as NTFS compares).

    Refused: empty, ``.`` or ``..`` components (``./x`` is ``x``, ``a//b`` is
    ``a/b``), absolute and drive paths, backslashes and the other characters
    Windows forbids, components ending in a dot or a space (Windows drops
    them: ``x.js.`` is ``x.js``), and device names (``CON.js`` opens the console)."""
    parts = name.split("/")
    problem = next((why for why in (
        "it is empty or absolute" if not name or name.startswith("/") else "",
        "it has an empty, '.' or '..' component" if any(p in ("", ".", "..") for p in parts) else "",
        "it holds a character Windows forbids (\\, :, <, >, \", |, ?, *, or a control character)"
        if any(c in _FORBIDDEN for c in name) else "",
        "a component ends in a dot or a space, which Windows drops" if any(p[-1:] in (".", " ") for p in parts)
        else "",
        "a component is a Windows device name" if any(p.split(".")[0].rstrip(" ").upper() in _DEVICES for p in parts)
        else "",
    ) if why), None)  # fmt: skip
    if problem:
        raise BundleError(f"bundle member {name!r} is not a plain relative path: {problem}",
                          hint="the bundle is not safe to unpack")  # fmt: skip
    return name.casefold()


def _one_spelling(names: list[str], what: str) -> None:
    """No two names that are one file on Windows (case) or on disk."""
    seen: dict[str, str] = {}
    for name in names:
        key = check_name(name)
        if key in seen:
            raise BundleError(f"{what} {seen[key]!r} and {name!r} name the same file",
                              hint="the bundle is not safe to unpack")  # fmt: skip
        seen[key] = name


def read_manifest(zf: zipfile.ZipFile) -> dict[str, Any]:
    try:
        doc = json.loads(zf.read(BUNDLE_JSON))
    except KeyError:
        raise BundleError("the bundle has no bundle.json") from None
    except ValueError as exc:
        raise BundleError(f"bundle.json is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("mediaType") != MEDIA_TYPE or doc.get("schemaVersion") != 1:
        raise BundleError("bundle.json is not a version 1 brain bundle description")
    if not _VERSION.match(str(doc.get("version", ""))):
        raise BundleError(f"bundle.json's version {doc.get('version')!r} is not a release version")
    files = doc.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
        and _SHA256.match(str(f.get("sha256", ""))) for f in files
    ):  # fmt: skip
        raise BundleError("bundle.json's files must each have a path, a size and a sha256")
    listed = [f["path"] for f in files]
    _one_spelling([BUNDLE_JSON, *listed], "bundle.json lists")
    for required in ("entrypoint", "module"):
        if doc.get(required) and doc[required] not in listed:
            raise BundleError(f"bundle.json's {required} {doc[required]!r} is not one of its files")
    return doc


def verify_zip(source: Path | bytes) -> dict[str, Any]:
    """The contents check (no signature): names, listing, sizes, digests."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"the bundle is not a zip archive: {exc}") from None
    with zf:
        _one_spelling([info.filename for info in zf.infolist()], "the zip holds")
        for info in zf.infolist():
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"bundle member {info.filename!r} is a symbolic link")
        doc = read_manifest(zf)
        expected = {f["path"]: f for f in doc["files"]}
        present = [i.filename for i in zf.infolist() if i.filename != BUNDLE_JSON]
        if len(present) != len(set(present)):
            raise BundleError("the bundle holds a member twice")
        extra, missing = set(present) - set(expected), set(expected) - set(present)
        if extra:
            raise BundleError(f"the bundle holds files bundle.json does not list: {sorted(extra)}")
        if missing:
            raise BundleError(f"files listed in bundle.json are missing: {sorted(missing)}")
        for name, entry in sorted(expected.items()):
            h, size = hashlib.sha256(), 0
            with zf.open(name) as member:
                while chunk := member.read(1 << 20):
                    size += len(chunk)
                    if size > entry["size"]:
                        raise BundleError(f"{name} is larger than the {entry['size']} bytes bundle.json lists")
                    h.update(chunk)
            if size != entry["size"] or h.hexdigest() != entry["sha256"]:
                raise BundleError(f"{name} has sha256 {h.hexdigest()} ({size} bytes); bundle.json lists "
                                  f"{entry['sha256']} ({entry['size']} bytes)",
                                  hint="the bundle was altered; fetch it again")  # fmt: skip
    return doc


def _unpacked_differs(target: Path, doc: dict[str, Any]) -> str | None:
    """How an unpacked tree differs from the verified bundle's listing, or None.
    Checked at every launch (digests remembered per size, mtime, inode and
    ctime, so an untouched tree costs a stat per file)."""
    try:
        if json.loads((target / BUNDLE_JSON).read_bytes()) != doc:
            return "bundle.json differs from the verified one"
    except (OSError, ValueError):
        return "bundle.json is unreadable"
    listed = {f["path"]: f for f in doc["files"]}
    present = set()
    for path in target.rglob("*"):
        rel = path.relative_to(target).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            return f"{rel} is not a regular file"
        if path.is_file() and rel != BUNDLE_JSON:
            present.add(rel)
    if present != set(listed):
        return f"files differ from bundle.json: {sorted(present ^ set(listed))}"
    for rel, entry in listed.items():
        path = target / rel
        if path.stat().st_size != entry["size"] or file_digest(path) != entry["sha256"]:
            return f"{rel} does not match bundle.json"
    return None


def open_bundle(zip_path: Path, signature: Path, policy: Any) -> BrainBundle:
    """Verify (signature, then contents) and unpack into the cache; an
    earlier unpack is used only if it still matches the verified listing."""
    from ..verify import check_signature

    try:
        data = zip_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read the brain bundle: {exc}", hint="check the path") from None
    try:
        bundle_json = signature.read_bytes().decode("utf-8")
    except OSError as exc:
        raise BundleError(
            f"no signature for the brain bundle: {exc}", hint="pass the .sigstore.json beside it"
        ) from None
    except UnicodeDecodeError:
        raise BundleError(f"{signature} is not UTF-8 JSON: not a sigstore bundle") from None
    # One read: the bytes whose signature verified are the bytes checked and unpacked.
    check_signature(data, bundle_json, policy, what=zip_path.name)
    doc = verify_zip(data)
    digest = hashlib.sha256(data).hexdigest()
    target = cache_root() / "brain" / f"{doc.get('version', 'unknown')}-{digest[:16]}"
    with locked(target.with_name(f".{target.name}.lock")):
        if (target / BUNDLE_JSON).is_file() and _unpacked_differs(target, doc) is not None:
            shutil.rmtree(target, ignore_errors=True)  # changed in the cache: unpacked again from the verified bytes
        if not (target / BUNDLE_JSON).is_file():
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for name in [BUNDLE_JSON, *(f["path"] for f in doc["files"])]:
                    out = tmp / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, out.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover, never a verified unpack
            os.replace(tmp, target)
    return BrainBundle(target, doc)


__all__ = [
    "BUNDLE_JSON",
    "MEDIA_TYPE",
    "BrainBundle",
    "BundleError",
    "open_bundle",
    "read_manifest",
    "verify_zip",
]
