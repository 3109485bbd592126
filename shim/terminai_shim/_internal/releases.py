"""Getting a verified release onto this host: a local directory checked in
place, or a URL or store fetched into the content-addressed cache; the
rollback state (the highest serial accepted per channel); cache GC.

Every path here runs ``verify.check_manifest`` before a single artifact
byte is read or fetched, and records a serial only after the whole release
verified. ``launch`` is the only caller that boots what this returns.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ShimError
from ..layout import MANIFEST, MANIFEST_BUNDLE, channel_key, pointer_bundle_key, release_key
from ..manifest import ChannelPointer, Manifest
from ..verify import (
    RollbackRefused,
    TrustPolicy,
    VerificationFailed,
    bundle_text,
    check_artifacts,
    check_manifest,
    check_signature,
    policy_for,
    read_release,
)
from .fsutil import cache_root, locked, write_atomic

if TYPE_CHECKING:
    from .fetch import Progress, Source

# Which artifacts to verify (and fetch): fixed, or chosen once the verified
# manifest shows what the release offers (``auto`` picks a tier by it).
Kinds = tuple[str, ...] | Callable[[Manifest], tuple[str, ...]]


def _kinds(kinds: Kinds, manifest: Manifest) -> tuple[str, ...]:
    return kinds(manifest) if callable(kinds) else kinds


@dataclass(frozen=True)
class VerifiedRelease:
    manifest: Manifest
    directory: Path
    kinds: tuple[str, ...]  # the artifacts verified: only these may be used

    def path(self, kind: str) -> Path:
        if kind not in self.kinds:
            raise VerificationFailed(f"artifact {kind} was not verified; it cannot be used")
        return self.directory / self.manifest.artifact(kind).location


class SerialState:
    """The highest serial accepted per channel, kept across runs: for
    manifests (keyed by the channel they were signed for, which is the
    channel asked for) and for channel pointers."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_root() / "state" / "serials.json"

    def _load(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def check(self, manifest: Manifest) -> None:
        what = f"manifest serial {manifest.serial} for channel {manifest.channel}"
        self._check(manifest.channel, manifest.serial, what)

    def record(self, manifest: Manifest) -> None:
        self._record(manifest.channel, manifest.serial)

    def check_pointer(self, pointer: ChannelPointer) -> None:
        self._check(f"pointer:{pointer.channel}", pointer.serial,
                    f"channel pointer serial {pointer.serial} for {pointer.channel}")  # fmt: skip

    def record_pointer(self, pointer: ChannelPointer) -> None:
        self._record(f"pointer:{pointer.channel}", pointer.serial)

    def _check(self, key: str, serial: int, what: str) -> None:
        highest = self._load().get(key, -1)
        if serial < highest:
            raise RollbackRefused(
                f"{what} is lower than {highest}, accepted before: refusing a rollback",
                hint="fetch the current release of the channel; a stale mirror or cache may be in the way",
            )

    def _record(self, key: str, serial: int) -> None:
        with locked(self.path.with_name(".serials.lock")):
            known = self._load()
            if serial > known.get(key, -1):
                known[key] = serial
                write_atomic(self.path, json.dumps(known, indent=2).encode())


def verify_directory(
    directory: Path,
    policy: TrustPolicy | None,
    channel: str,
    *,
    kinds: Kinds,
    state: SerialState | None = None,
    now: float | None = None,
) -> VerifiedRelease:
    """A local release directory, verified in place (what boots from it is
    then opened once and checked again on the descriptor QEMU is handed)."""
    data, bundle = read_release(directory)
    manifest = check_manifest(data, bundle, policy_for(channel, policy), channel, now)
    state = state or SerialState()
    state.check(manifest)
    chosen = _kinds(kinds, manifest)
    check_artifacts(directory, manifest, chosen)
    state.record(manifest)  # only a release that verified completely moves the serial
    return VerifiedRelease(manifest, directory, chosen)


def fetch_release(
    url: str,
    policy: TrustPolicy | None,
    channel: str,
    *,
    allow_http: bool = False,
    kinds: Kinds,
    state: SerialState | None = None,
    now: float | None = None,
    progress: Progress | None = None,
) -> VerifiedRelease:
    """Download a release directory (manifest at its root) into the cache.

    The manifest is verified (signature, signer, schema, compatibility,
    expiry, channel, serial) before a single artifact byte is fetched;
    artifacts are fetched in parallel into the content-addressed cache,
    each checked for size and sha256 as it streams.
    """
    from .fetch import Source  # a local release needs no HTTP stack

    source = Source(url, allow_http=allow_http)
    return _fetch(source, source, policy, channel, kinds=kinds, state=state or SerialState(), now=now,
                  progress=progress)  # fmt: skip


def fetch_channel(
    store: str,
    channel: str,
    policy: TrustPolicy | None,
    *,
    version: str | None = None,
    allow_http: bool = False,
    kinds: Kinds,
    state: SerialState | None = None,
    now: float | None = None,
    progress: Progress | None = None,
) -> VerifiedRelease:
    """The release a published store (a URL, or a local directory) channel points at (or a named version).

    The channel pointer is verified like a manifest (signature of the
    channel's signer, expiry, serial never lower than seen before), and the
    manifest it names must have exactly the digest the pointer records. A
    named version skips the pointer, not the channel: its manifest must be
    signed by the channel's signer, for that channel, and pass its rollback
    state."""
    from .fetch import Source

    if "://" not in store:
        store = Path(store).resolve().as_uri()
    source = Source(store, allow_http=allow_http)
    state = state or SerialState()
    now = time.time() if now is None else now
    pointer = None
    if version is None:
        data = source.read(channel_key(channel))
        bundle = bundle_text(source.read(pointer_bundle_key(hashlib.sha256(data).hexdigest())), channel_key(channel))
        check_signature(data, bundle, policy_for(channel, policy), what=channel_key(channel))
        pointer = ChannelPointer.from_json(data)
        pointer.check_current(channel, now)
        state.check_pointer(pointer)
        version = pointer.release
    manifest_source = Source(source.join(release_key(version, "")).rstrip("/"), allow_http=allow_http)
    release = _fetch(manifest_source, source, policy, channel, kinds=kinds, state=state, now=now, progress=progress,
                     pointer=pointer)  # fmt: skip
    if pointer is not None:
        state.record_pointer(pointer)
    return release


def _fetch(
    manifest_source: Source,
    blob_source: Source,
    policy: TrustPolicy | None,
    channel: str,
    *,
    kinds: Kinds,
    state: SerialState,
    now: float | None,
    progress: Progress | None,
    pointer: ChannelPointer | None = None,
) -> VerifiedRelease:
    from concurrent.futures import ThreadPoolExecutor

    data = manifest_source.read(MANIFEST)
    if pointer is not None and (hashlib.sha256(data).hexdigest(), len(data)) != (
        pointer.manifest_sha256,
        pointer.manifest_size,
    ):
        raise VerificationFailed(
            f"release {pointer.release}'s manifest is not the one channel {pointer.channel} points at "
            f"(sha256 {hashlib.sha256(data).hexdigest()}, pointer says {pointer.manifest_sha256})",
            hint="the store is being published right now or was tampered with; try again shortly",
        )
    bundle = bundle_text(manifest_source.read(MANIFEST_BUNDLE))
    manifest = check_manifest(data, bundle, policy_for(channel, policy), channel, now)
    state.check(manifest)
    from .fetch import BlobCache

    root = cache_root()
    blobs = BlobCache(root / "blobs" / "sha256")
    chosen = _kinds(kinds, manifest)
    wanted = [artifact for selector in chosen for artifact in manifest.select(selector)]
    with locked(root / ".gc.lock", shared=True):  # `cache gc` waits until the release is recorded
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(blobs.fetch, blob_source, a.location, a.sha256, a.size, progress) for a in wanted]
            for future in futures:
                future.result()
        release_dir = root / "releases" / hashlib.sha256(data).hexdigest()
        release_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(release_dir / MANIFEST, data)
        write_atomic(release_dir / MANIFEST_BUNDLE, bundle.encode())
    state.record(manifest)
    return VerifiedRelease(manifest, root, chosen)


def gc(keep: int) -> list[str]:
    """Keep the newest ``keep`` cached releases (by creation) and the blobs they list."""
    root = cache_root()
    with locked(root / ".gc.lock"):
        return _gc(root, keep)


def _gc(root: Path, keep: int) -> list[str]:
    releases: list[tuple[Manifest | None, Path]] = []
    for d in (root / "releases").glob("*"):
        try:
            releases.append((Manifest.from_json((d / MANIFEST).read_bytes()), d))
        except (OSError, ShimError):
            releases.append((None, d))
    releases.sort(key=lambda item: item[0].created if item[0] else -1, reverse=True)
    removed: list[str] = []
    kept_digests: set[str] = set()
    for index, (manifest, d) in enumerate(releases):
        if manifest is not None and index < keep:
            kept_digests |= {a.sha256 for a in manifest.artifacts}
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(f"release {d.name}")
    blob_dir = root / "blobs" / "sha256"
    for blob in blob_dir.glob("*") if blob_dir.is_dir() else []:
        digest = blob.name.lstrip(".").split(".")[0]
        if digest not in kept_digests:
            with locked(blob_dir / f".{digest}.lock"):
                blob.unlink(missing_ok=True)
            if not blob.name.startswith("."):
                removed.append(f"blob {digest}")
    return removed


def open_release(
    target: str,
    policy: TrustPolicy | None,
    channel: str,
    *,
    allow_http: bool = False,
    progress: Progress | None = None,
    kinds: Kinds,
) -> VerifiedRelease:
    """A local release directory is verified in place; a URL is fetched into the cache."""
    if "://" in target:
        return fetch_release(target, policy, channel, allow_http=allow_http, progress=progress, kinds=kinds)
    directory = Path(target).resolve()
    if directory.name == MANIFEST:
        directory = directory.parent
    return verify_directory(directory, policy, channel, kinds=kinds)
