"""`inv publish` and `inv promote`: put a signed release in a store, safely.

Order is what makes it safe to interrupt and to repeat:

1. the local release verifies completely (signature of the expected signer,
   expiry, every artifact's digest), or nothing is uploaded;
2. every blob, skipped when already present with the same size and sha256
   (re-publishing uploads zero blob bytes), refused when a content-addressed
   key holds anything else;
3. the release folder, ``manifest.json`` last (write-once: a different
   manifest under a published version is refused);
4. the channel pointer: its bundle under a name derived from its digest,
   then the pointer itself in one conditional write that fails if anyone
   changed it since it was read.

A reader following a channel therefore never finds a pointer to a release
whose blobs or signatures are not all in place; a killed publish leaves the
channel as it was, and running it again completes it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from terminai_shim import verify as shim_verify
from terminai_shim.layout import (
    BUNDLE_SUFFIX,
    MANIFEST,
    MANIFEST_BUNDLE,
    MANIFEST_MEDIA_TYPE,
    NOTES_MEDIA_TYPE,
    PROVENANCE,
    RELEASE_NOTES,
    SIGSTORE_BUNDLE_MEDIA_TYPE,
    blob_key,
    channel_key,
    pointer_bundle_key,
    release_key,
)
from terminai_shim.manifest import ChannelPointer, Manifest, ManifestError

from ..context import BuildContext
from ..digest import sha256_bytes, sha256_file
from ..errors import BuildError
from ..signing.session import Signer, signer
from .store import IMMUTABLE, SHORT_LIVED, Headers, Store, StoreError
from .stores import open_store

DAY = 86400
# A release folder's files, in upload order: manifest.json goes last, so a
# manifest is visible only when what it refers to already is.
RELEASE_FILES = (
    (RELEASE_NOTES, NOTES_MEDIA_TYPE),
    (PROVENANCE, SIGSTORE_BUNDLE_MEDIA_TYPE),
    (MANIFEST_BUNDLE, SIGSTORE_BUNDLE_MEDIA_TYPE),
    (MANIFEST, MANIFEST_MEDIA_TYPE),
)


@dataclass(frozen=True)
class PublishResult:
    store: str
    release: str
    channel: str
    serial: int
    blobs_uploaded: int
    bytes_uploaded: int
    pointer_written: bool

    def describe(self) -> str:
        pointer = f"channel {self.channel} -> {self.release} (serial {self.serial})" if self.pointer_written else (
            f"channel {self.channel} already pointed at {self.release}")  # fmt: skip
        sent = f"{self.blobs_uploaded} blobs, {self.bytes_uploaded} bytes uploaded"
        return f"published to {self.store}: {sent}; {pointer}"


@contextlib.contextmanager
def _policy(s: Signer, channel: str) -> Iterator[shim_verify.TrustPolicy]:
    """Who must have signed what we publish or promote.

    The development identity when signing locally; in CI the identity pinned
    in the shim for that channel, so a release the shim would refuse is
    never published; with a custom trust config, the signer's own identity."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "trusted-root.json"
        if s.dev_trusted_root is not None:
            root.write_text(json.dumps(s.dev_trusted_root))
            yield shim_verify.TrustPolicy(root, shim_verify.DEV_IDENTITY, shim_verify.DEV_ISSUER)
        elif s.custom_trusted_root is not None:
            root.write_text(json.dumps(s.custom_trusted_root))
            yield shim_verify.TrustPolicy(root, s.identity, s.issuer)
        else:
            yield shim_verify.pinned_policy(channel)


def _verify_local(directory: Path, policy: shim_verify.TrustPolicy) -> Manifest:
    try:
        # the channel it names: the publisher chose the policy, and which channel a release goes to is checked
        # by the shim against what its user asked for
        manifest = Manifest.from_json((directory / MANIFEST).read_bytes())
        return shim_verify.check_release(directory, policy, manifest.channel)
    except Exception as exc:  # ShimError, OSError and anything sigstore raises
        raise BuildError(f"refusing to publish {directory}: {exc}",
                         hint="sign it again with `inv release`; nothing was uploaded") from None  # fmt: skip


def _read_pointer(
    store: Store, channel: str, policy: shim_verify.TrustPolicy
) -> tuple[ChannelPointer | None, str | None]:
    """The channel's current pointer (verified) and its version token."""
    found = store.read(channel_key(channel))
    if found is None:
        return None, None
    data, version = found
    bundle = store.read(pointer_bundle_key(sha256_bytes(data)))
    try:
        if bundle is None:
            raise ManifestError("its signature bundle is missing")
        shim_verify.check_signature(data, bundle[0].decode(), policy, what=channel_key(channel))
        return ChannelPointer.from_json(data), version
    except Exception as exc:
        raise StoreError(f"the store's pointer for channel {channel} does not verify: {exc}",
                         hint="inspect the store; it was written by another signer or damaged") from None  # fmt: skip


def _holds(store: Store, key: str, size: int, sha256: str) -> bool | None:
    """Whether the object at ``key`` has this size and sha256 (None: there is
    none). The recorded digest is used when the object carries one; the
    bytes are read back only when it does not."""
    info = store.head(key)
    if info is None:
        return None
    return info.size == size and (info.sha256 or store.digest(key)) == sha256


def _put_once(store: Store, key: str, path: Path, headers: Headers) -> bool:
    """Write-once: True when uploaded, False when already there with these bytes."""
    digest = sha256_file(path)
    holds = _holds(store, key, path.stat().st_size, digest)
    if holds is not None:
        if holds:
            return False
        raise StoreError(
            f"{store.url}/{key} already exists with different content: refusing to overwrite it",
            hint="a published object never changes; bump the release version, or inspect the store",
        )
    store.put_file(key, path, digest, headers)
    return True


def _published_signature_holds(store: Store, key: str, subject: Path | None, policy: shim_verify.TrustPolicy) -> bool:
    """Whether the signature already in the store verifies for the same bytes
    under the same policy (signatures differ between signing runs; the bytes
    they sign do not). Provenance is an attestation, not a trust anchor:
    an earlier run's is kept as it is."""
    found = store.read(key)
    if found is None:
        return False
    if subject is None:
        return key.endswith(PROVENANCE)
    try:
        shim_verify.check_signature(subject.read_bytes(), found[0].decode(), policy, what=key)
    except Exception:
        return False
    return True


def _fresh(pointer: ChannelPointer, valid_days: int) -> bool:
    """Still good for more than half its validity: otherwise publishing or
    promoting the same release again re-signs it with a new expiry."""
    return pointer.expires - time.time() > valid_days * DAY / 2


def _write_pointer(ctx: BuildContext, store: Store, s: Signer, pointer: ChannelPointer, replaces: str | None) -> None:
    data = pointer.to_json()
    bundle = s.sign(data).encode()
    with _policy(s, pointer.channel) as policy:  # what shims following the channel will demand
        try:
            shim_verify.check_signature(data, bundle.decode(), policy, what=channel_key(pointer.channel))
        except Exception as exc:
            raise BuildError(
                f"this signer may not sign channel {pointer.channel}: {exc}",
                hint="run the release workflow from a ref the channel's policy allows",
            ) from None
    store.put_bytes(pointer_bundle_key(sha256_bytes(data)), bundle,
                    Headers(SIGSTORE_BUNDLE_MEDIA_TYPE, IMMUTABLE), replaces=None)  # fmt: skip
    store.put_bytes(channel_key(pointer.channel), data, Headers("application/json", SHORT_LIVED), replaces=replaces)
    ctx.reporter.info("publish", f"channel {pointer.channel} -> {pointer.release} (serial {pointer.serial})",
                      key=channel_key(pointer.channel), serial=pointer.serial)  # fmt: skip


def publish(
    ctx: BuildContext,
    directory: Path,
    store_url: str,
    *,
    channel: str | None = None,
    keyless: bool = False,
    trust_config: Path | None = None,
    valid_days: int = 90,
) -> PublishResult:
    store = open_store(store_url)
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(signer(ctx, keyless=keyless, trust_config=trust_config))
        manifest_bytes = (directory / MANIFEST).read_bytes()
        manifest = Manifest.from_json(manifest_bytes)
        channel = channel or manifest.channel
        if channel != manifest.channel:
            raise BuildError(f"release {manifest.release} was built for channel {manifest.channel}, not {channel}",
                             hint=f"publish it to {manifest.channel}, then `inv promote` it")  # fmt: skip
        policy = stack.enter_context(_policy(s, channel))
        _verify_local(directory, policy)
        store.check()
        current, token = _read_pointer(store, channel, policy)
        ours = (manifest.release, sha256_bytes(manifest_bytes))
        if (
            current is not None
            and (current.release, current.manifest_sha256) != ours
            and (current.serial >= manifest.serial)
        ):
            raise StoreError(
                f"channel {channel} already points at release {current.release} with serial {current.serial}, "
                f"not lower than this release's {manifest.serial}: someone else published a newer release",
                hint="rebuild from the current commit, or promote deliberately; nothing was uploaded",
            )
        uploaded = sent = 0
        total = sum(a.size for a in manifest.artifacts)
        for index, artifact in enumerate(manifest.artifacts):
            path = directory / artifact.location
            if _put_once(store, blob_key(artifact.sha256), path, Headers(artifact.media_type, IMMUTABLE)):
                uploaded += 1
                sent += artifact.size
                ctx.reporter.info("publish", f"uploaded {artifact.name} ({artifact.size} bytes)",
                                  key=blob_key(artifact.sha256), bytes=artifact.size)  # fmt: skip
            ctx.reporter.progress("publish", index + 1, len(manifest.artifacts), f"blobs ({total} bytes in all)")
        brain = [a for a in manifest.artifacts if a.kind == "brain-bundle"]
        signatures = [(f"{a.name}{BUNDLE_SUFFIX}", SIGSTORE_BUNDLE_MEDIA_TYPE) for a in brain]
        # What each signature file signs: a signature already in the store for
        # the same bytes (an earlier, interrupted run signed them too) is kept.
        signed = {f"{a.name}{BUNDLE_SUFFIX}": directory / a.location for a in brain}
        signed[MANIFEST_BUNDLE] = directory / MANIFEST
        for name, content_type in [*signatures, *RELEASE_FILES]:
            path = directory / name
            if not (path.exists() or name == MANIFEST or name.endswith(BUNDLE_SUFFIX)):
                continue
            key = release_key(manifest.release, name)
            try:
                _put_once(store, key, path, Headers(content_type, IMMUTABLE))
            except StoreError:
                if not name.endswith(BUNDLE_SUFFIX) or not _published_signature_holds(store, key, signed.get(name),
                                                                                       policy):  # fmt: skip
                    raise
                ctx.reporter.info("publish", f"kept the signature already published for {name}")
        if current is not None and (current.release, current.manifest_sha256) == ours and _fresh(current, valid_days):
            result = PublishResult(store.url, manifest.release, channel, current.serial, uploaded, sent, False)
        else:
            now = int(time.time())
            serial = max(manifest.serial, (current.serial + 1) if current else 0)
            pointer = ChannelPointer(channel, manifest.release, serial, now, now + valid_days * DAY,
                                     sha256_bytes(manifest_bytes), len(manifest_bytes))  # fmt: skip
            _write_pointer(ctx, store, s, pointer, token)
            result = PublishResult(store.url, manifest.release, channel, serial, uploaded, sent, True)
    ctx.reporter.done("publish", result.describe())
    return result


def promote(
    ctx: BuildContext,
    store_url: str,
    version: str,
    *,
    source: str,
    target: str,
    keyless: bool = False,
    trust_config: Path | None = None,
    valid_days: int = 90,
) -> PublishResult:
    """Point ``target`` at the release ``source`` serves: nothing is uploaded
    but a newly signed pointer, and only after the release verified and
    every blob it lists was found in the store."""
    store = open_store(store_url)
    store.check()
    with signer(ctx, keyless=keyless, trust_config=trust_config) as s:
        with _policy(s, source) as policy:
            current_source, _ = _read_pointer(store, source, policy)
        if current_source is None or current_source.release != version:
            where = current_source.release if current_source else "nothing"
            raise BuildError(f"channel {source} points at {where}, not {version}: refusing to promote",
                             hint=f"promote what {source} serves, or publish {version} to {source} first")  # fmt: skip
        found_manifest = store.read(release_key(version))
        found_bundle = store.read(release_key(version, MANIFEST_BUNDLE))
        if found_manifest is None or found_bundle is None:
            raise BuildError(f"release {version} has no manifest or no signature in {store.url}",
                             hint="publish it again")  # fmt: skip
        data = found_manifest[0]
        if sha256_bytes(data) != current_source.manifest_sha256:
            raise BuildError(f"release {version}'s manifest is not the one channel {source} points at",
                             hint="inspect the store")  # fmt: skip
        try:
            manifest = Manifest.from_json(data)
            with _policy(s, manifest.channel) as policy:
                shim_verify.check_signature(data, found_bundle[0].decode(), policy)
            manifest.check_usable(manifest.min_shim_version, manifest.agent_protocol, time.time())
        except Exception as exc:
            raise BuildError(f"release {version} in the store does not verify: {exc}",
                             hint="refusing to promote it; publish a good release") from None  # fmt: skip
        missing = [f"{a.name} ({blob_key(a.sha256)})" for a in manifest.artifacts
                   if not _holds(store, blob_key(a.sha256), a.size, a.sha256)]  # fmt: skip
        if missing:
            raise BuildError(f"release {version} is incomplete in the store: {', '.join(missing)}",
                             hint="publish it again (it uploads only what is missing), then promote")  # fmt: skip
        with _policy(s, target) as policy:
            current, token = _read_pointer(store, target, policy)
        same = current is not None and (current.release, current.manifest_sha256) == (version, sha256_bytes(data))
        if current is not None and same and _fresh(current, valid_days):
            result = PublishResult(store.url, version, target, current.serial, 0, 0, False)
        else:
            now = int(time.time())
            serial = max(manifest.serial, current_source.serial, (current.serial + 1) if current else 0)
            pointer = ChannelPointer(target, version, serial, now, now + valid_days * DAY, sha256_bytes(data),
                                     len(data))  # fmt: skip
            _write_pointer(ctx, store, s, pointer, token)
            result = PublishResult(store.url, version, target, serial, 0, 0, True)
    ctx.reporter.done("promote", result.describe())
    return result
