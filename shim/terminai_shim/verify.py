"""Verify a release before anything in it is booted.

In order: the sigstore signature of ``manifest.json`` against a trust root
and an identity policy (who must have signed, from which OIDC issuer); the
manifest's schema, compatibility and expiry; its serial against the highest
one accepted before for the channel (rollback); then the size and sha256 of
every artifact that will be used. Each failure names what failed.

sigstore is imported only here: the shim's other commands never load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_agent import protocol as P

from . import __version__
from ._internal.fetch import BlobCache, Progress, Source
from ._internal.fsutil import cache_root, locked, write_atomic
from .errors import ConfigError, ShimError
from .manifest import (
    BUNDLE_SUFFIX,
    Artifact,
    ChannelPointer,
    Manifest,
    channel_key,
    pointer_bundle_key,
    release_key,
)
from .models import BootConfig, NetworkPolicy

MANIFEST = "manifest.json"
BUNDLE = MANIFEST + BUNDLE_SUFFIX
# The local development signing identity (terminai_release.signing.devstack).
# Accepted only with an explicit --dev, together with the trust root written
# beside the release: never trusted by default.
DEV_TRUSTED_ROOT = "dev-trusted-root.json"
DEV_IDENTITY = "dev-release@terminai.invalid"
DEV_ISSUER = "https://oidc.terminai.invalid/dev"


VM_KINDS = ("kernel", "rootfs")
CONTAINER_KINDS = ("container-image",)
# Which artifacts to verify (and fetch): fixed, or chosen once the verified
# manifest shows what the release offers (``auto`` picks a backend by it).
Kinds = tuple[str, ...] | Callable[[Manifest], tuple[str, ...]]


def _kinds(kinds: Kinds, manifest: Manifest) -> tuple[str, ...]:
    return kinds(manifest) if callable(kinds) else kinds


class VerificationFailed(ShimError):
    code = "VERIFICATION_FAILED"


class RollbackRefused(VerificationFailed):
    code = "ROLLBACK_REFUSED"


@dataclass(frozen=True)
class TrustPolicy:
    """Which trust root, and who must have signed: the OIDC issuer, and the
    signer's identity either exactly or as a full-match regular expression
    (release workflows sign as a URI that names the tag)."""

    trusted_root: Path
    identity: str | None
    issuer: str
    identity_pattern: str | None = None

    def describe(self) -> str:
        who = self.identity if self.identity is not None else f"an identity matching {self.identity_pattern}"
        return f"{who} from {self.issuer}"


def pinned_policy(channel: str) -> TrustPolicy:
    """The shipped default: Sigstore's public-good root and the release workflow's identity."""
    from importlib.resources import files

    trust = files("terminai_shim") / "trust"
    doc = json.loads((trust / "policy.json").read_text())
    if channel not in doc["channels"]:
        raise VerificationFailed(
            f"no signer is pinned for channel {channel!r}", hint=f"known channels: {sorted(doc['channels'])}"
        )
    root = Path(str(trust / doc["trustedRoot"]))
    return TrustPolicy(root, None, doc["issuer"], doc["channels"][channel]["identityPattern"])


def dev_trust_root() -> Path:
    """Where the developer's own development trust root lives: written by
    ``inv release`` when it signs with the local development stack, read by
    ``--dev``. Never the release's directory or store: a trust root is not
    taken from the place it is meant to check."""
    explicit = os.environ.get("TERMINAI_DEV_TRUSTED_ROOT")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "terminai" / DEV_TRUSTED_ROOT


def dev_policy() -> TrustPolicy:
    """The local development identity, against the developer's own trust root."""
    root = dev_trust_root()
    if not root.is_file():
        raise ConfigError(
            f"--dev needs the development trust root, and {root} does not exist",
            hint="sign a release with `inv release` (it writes that file), or pass --trusted-root",
        )
    return TrustPolicy(root, DEV_IDENTITY, DEV_ISSUER)


@dataclass(frozen=True)
class VerifiedRelease:
    manifest: Manifest
    directory: Path
    kinds: tuple[str, ...] = VM_KINDS  # the artifacts verified: only these may be used

    def path(self, kind: str) -> Path:
        return self.directory / self.manifest.artifact(kind).location


def check_signature(data: bytes, bundle_json: str, policy: TrustPolicy, what: str = MANIFEST) -> None:
    try:
        from sigstore.errors import Error as SigstoreError
        from sigstore.models import Bundle, TrustedRoot
        from sigstore.verify import Verifier
        from sigstore.verify import policy as sigstore_policy
    except ImportError:
        raise VerificationFailed("the sigstore library is not installed", hint="pip install sigstore") from None
    try:
        Path(policy.trusted_root).read_bytes()
    except OSError as exc:
        raise VerificationFailed(
            f"the trust root {policy.trusted_root} cannot be read: {exc.strerror or exc}",
            hint="pass --trusted-root with an existing sigstore trusted_root.json",
        ) from None
    try:
        root = TrustedRoot.from_file(str(policy.trusted_root))
        bundle = Bundle.from_json(bundle_json)
        rule: Any
        if policy.identity is not None:
            rule = sigstore_policy.Identity(identity=policy.identity, issuer=policy.issuer)
        else:
            rule = sigstore_policy.AllOf(
                [sigstore_policy.OIDCIssuer(policy.issuer), _IdentityPattern(str(policy.identity_pattern))]
            )
        Verifier(trusted_root=root).verify_artifact(data, bundle, rule)
    except (SigstoreError, ValueError) as exc:
        raise VerificationFailed(
            f"signature of {what} does not verify: {exc}",
            hint=f"check the trust root ({policy.trusted_root}) and the expected signer, {policy.describe()}; "
            "never boot an unverified release",
        ) from None


def _bundle_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationFailed(f"{BUNDLE} is not UTF-8 JSON: not a sigstore bundle",
                                 hint="the release is damaged or forged; never boot it") from None  # fmt: skip


class _IdentityPattern:
    """A sigstore verification policy: the certificate's SAN fully matches a pattern."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def verify(self, cert: Any) -> None:
        from cryptography import x509
        from sigstore.errors import VerificationError

        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise VerificationError("the signing certificate has no subject alternative name") from None
        names = san.get_values_for_type(x509.UniformResourceIdentifier) + san.get_values_for_type(x509.RFC822Name)
        if not any(self.pattern.fullmatch(name) for name in names):
            raise VerificationError(f"signer {names} does not match {self.pattern.pattern}")


def check_artifact(path: Path, artifact: Artifact) -> None:
    import hashlib

    try:
        size = path.stat().st_size
    except OSError:
        raise VerificationFailed(f"artifact {artifact.name} ({artifact.kind}) is missing at {path}") from None
    if size != artifact.size:
        raise VerificationFailed(f"artifact {artifact.name} is {size} bytes; the manifest says {artifact.size}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != artifact.sha256:
        raise VerificationFailed(
            f"artifact {artifact.name} has sha256 {h.hexdigest()}; the manifest says {artifact.sha256}",
            hint="the file was altered or swapped; fetch the release again",
        )


class SerialState:
    """The highest serial accepted per channel, kept across runs: for
    manifests (keyed by the channel they name) and for channel pointers."""

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


def _choose(policy: TrustPolicy | None, data: bytes) -> TrustPolicy:
    """The given policy, or the pinned one for the channel the manifest names.

    The channel is read before the signature is checked, but it is inside
    the signed bytes: a manifest that lies about it fails verification."""
    if policy is not None:
        return policy
    try:
        channel = str(json.loads(data)["channel"])
    except (ValueError, KeyError, TypeError):
        raise VerificationFailed("manifest.json names no channel to choose a signer for") from None
    return pinned_policy(channel)


def verify_release(
    directory: Path,
    policy: TrustPolicy | None,
    *,
    kinds: Kinds = VM_KINDS,
    state: SerialState | None = None,
    now: float | None = None,
) -> VerifiedRelease:
    try:
        data = (directory / MANIFEST).read_bytes()
        bundle = _bundle_text((directory / BUNDLE).read_bytes())
    except OSError as exc:
        raise VerificationFailed(f"release in {directory} is incomplete: {exc}") from None
    check_signature(data, bundle, _choose(policy, data))
    manifest = Manifest.from_json(data)
    manifest.check_usable(__version__, P.PROTOCOL_VERSION, time.time() if now is None else now)
    state = state or SerialState()
    state.check(manifest)
    for kind in _kinds(kinds, manifest):
        artifact = manifest.artifact(kind)
        check_artifact(directory / artifact.location, artifact)
    state.record(manifest)  # only a release that verified completely moves the serial
    return VerifiedRelease(manifest, directory, _kinds(kinds, manifest))


def fetch_release(
    url: str,
    policy: TrustPolicy | None,
    *,
    allow_http: bool = False,
    kinds: Kinds = VM_KINDS,
    state: SerialState | None = None,
    now: float | None = None,
    progress: Progress | None = None,
) -> VerifiedRelease:
    """Download a release directory (manifest at its root) into the cache.

    The manifest is verified (signature, signer, schema, compatibility,
    expiry, serial) before a single artifact byte is fetched; artifacts are
    fetched in parallel into the content-addressed cache, each checked for
    size and sha256 as it streams.
    """
    source = Source(url, allow_http=allow_http)
    return _fetch(source, source, policy, kinds=kinds, state=state or SerialState(), now=now, progress=progress)


def fetch_channel(
    store: str,
    channel: str,
    policy: TrustPolicy | None,
    *,
    version: str | None = None,
    allow_http: bool = False,
    kinds: Kinds = VM_KINDS,
    state: SerialState | None = None,
    now: float | None = None,
    progress: Progress | None = None,
) -> VerifiedRelease:
    """The release a published store's channel points at (or a named version).

    The channel pointer is verified like a manifest (signature of the
    channel's signer, expiry, serial never lower than seen before), and the
    manifest it names must have exactly the digest the pointer records."""
    source = Source(store, allow_http=allow_http)
    state = state or SerialState()
    now = time.time() if now is None else now
    pointer = None
    if version is None:
        data = source.read(channel_key(channel))
        bundle = _bundle_text(source.read(pointer_bundle_key(hashlib.sha256(data).hexdigest())))
        check_signature(data, bundle, policy or pinned_policy(channel), what=channel_key(channel))
        pointer = ChannelPointer.from_json(data)
        pointer.check_current(channel, now)
        state.check_pointer(pointer)
        version = pointer.release
    manifest_source = Source(source.join(release_key(version, "")).rstrip("/"), allow_http=allow_http)
    release = _fetch(manifest_source, source, policy, kinds=kinds, state=state, now=now, progress=progress,
                     pointer=pointer)  # fmt: skip
    if pointer is not None:
        state.record_pointer(pointer)
    return release


def _fetch(
    manifest_source: Source,
    blob_source: Source,
    policy: TrustPolicy | None,
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
    bundle = _bundle_text(manifest_source.read(BUNDLE))
    check_signature(data, bundle, _choose(policy, data))
    manifest = Manifest.from_json(data)
    manifest.check_usable(__version__, P.PROTOCOL_VERSION, time.time() if now is None else now)
    state.check(manifest)
    root = cache_root()
    blobs = BlobCache(root / "blobs" / "sha256")
    chosen = _kinds(kinds, manifest)
    wanted = [manifest.artifact(kind) for kind in chosen]
    with locked(root / ".gc.lock", shared=True):  # `cache gc` waits until the release is recorded
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(blobs.fetch, blob_source, a.location, a.sha256, a.size, progress) for a in wanted]
            for future in futures:
                future.result()
        release_dir = root / "releases" / hashlib.sha256(data).hexdigest()
        release_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(release_dir / MANIFEST, data)
        write_atomic(release_dir / BUNDLE, bundle.encode())
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


def kinds_for(backend: str, accel: str = "auto", network: str = "none") -> Kinds:
    """The artifacts a backend needs; for ``auto``, decided by what the
    verified manifest offers and what this host can run."""
    if backend == "container":
        return CONTAINER_KINDS
    if backend == "all":  # verify and fetch: every artifact the manifest lists, whatever boots it or not
        return lambda m: tuple(dict.fromkeys(a.kind for a in m.artifacts))
    if backend != "auto":
        return VM_KINDS

    def choose(manifest: Manifest) -> tuple[str, ...]:
        from ._internal.accel import choose_accel
        from ._internal.backends import choose_backend

        has_image = any(a.kind == "container-image" for a in manifest.artifacts)
        name = choose_backend(choose_accel(accel), "auto", has_image=has_image, network=network).name
        return CONTAINER_KINDS if name == "container" else VM_KINDS

    return choose


def open_release(
    target: str,
    policy: TrustPolicy | None,
    *,
    allow_http: bool = False,
    progress: Progress | None = None,
    kinds: Kinds = VM_KINDS,
) -> VerifiedRelease:
    """A local release directory is verified in place; a URL is fetched into the cache."""
    if "://" in target:
        return fetch_release(target, policy, allow_http=allow_http, progress=progress, kinds=kinds)
    directory = Path(target).resolve()
    if directory.name == MANIFEST:
        directory = directory.parent
    return verify_release(directory, policy, kinds=kinds)


def open_store(
    store: str,
    channel: str,
    policy: TrustPolicy | None,
    *,
    version: str | None = None,
    allow_http: bool = False,
    progress: Progress | None = None,
    kinds: Kinds = VM_KINDS,
) -> VerifiedRelease:
    """A published store (URL or local directory): the channel's release, or a named version."""
    if "://" not in store:
        store = Path(store).resolve().as_uri()
    return fetch_channel(store, channel, policy, version=version, allow_http=allow_http, progress=progress,
                         kinds=kinds)  # fmt: skip


def boot_config(
    release: VerifiedRelease,
    *,
    workspace: Path | None = None,
    memory_mib: int | None = None,
    cpus: int | None = None,
    accel: str = "auto",
    snapshots: str = "auto",
    backend: str = "auto",
    network: NetworkPolicy | None = None,
) -> BootConfig:
    """Boot settings for a verified release: the artifacts that were verified, and its boot defaults."""
    m = release.manifest
    vm = all(k in release.kinds for k in VM_KINDS)
    container = "container-image" in release.kinds
    if backend == "auto" and container and not vm:
        backend = "container"
    return BootConfig(
        kernel=release.path("kernel") if vm else None,
        rootfs=release.path("rootfs") if vm else None,
        rootfs_format=m.artifact("rootfs").media_type.rsplit(".", 1)[-1],
        image=release.path("container-image") if container else None,
        image_sha256=m.artifact("container-image").sha256 if container else None,
        kernel_sha256=m.artifact("kernel").sha256 if vm else None,
        rootfs_sha256=m.artifact("rootfs").sha256 if vm else None,
        backend=backend,
        network=network or NetworkPolicy(),
        memory_mib=memory_mib or m.boot.memory_mib,
        cpus=cpus or m.boot.cpus,
        workspace=workspace,
        accel=accel,
        snapshots=snapshots,
        kernel_args=m.boot.kernel_args,
    )
