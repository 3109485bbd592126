"""Signatures and trust: who must have signed a release, and whether they did.

In order: the sigstore signature of ``manifest.json`` against a trust root
and an identity policy (who must have signed, from which OIDC issuer); the
manifest's schema, compatibility and expiry; that it was signed for the
channel the caller asked for; then the size and sha256 of every artifact
that will be used. Each failure names what failed. Fetching, the rollback
state and the cache live in ``_internal.releases``; ``launch`` ties them
together.

sigstore is imported only here: the shim's other commands never load it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terminai_protocol import protocol as P

from . import __version__
from .errors import ConfigError, ShimError
from .layout import DEV_TRUSTED_ROOT, MANIFEST, MANIFEST_BUNDLE
from .manifest import Artifact, Manifest

# The local development signing identity (terminai_release.signing.devstack).
# Accepted only with an explicit --dev, against the developer's own trust
# root: never trusted by default, never from beside a release.
DEV_IDENTITY = "dev-release@terminai.invalid"
DEV_ISSUER = "https://oidc.terminai.invalid/dev"
DEFAULT_CHANNEL = "stable"
DEV_CHANNEL = "dev"  # what `inv release` signs for unless told otherwise


class VerificationFailed(ShimError):
    code = "VERIFICATION_FAILED"


class RollbackRefused(VerificationFailed):
    code = "ROLLBACK_REFUSED"


class ChannelRefused(VerificationFailed):
    """A release signed for another channel than the one asked for: a
    mirror must not serve a ``dev`` build to someone following ``stable``."""

    code = "WRONG_CHANNEL"


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
    from ._internal.fsutil import config_root

    return config_root() / DEV_TRUSTED_ROOT


def dev_policy() -> TrustPolicy:
    """The local development identity, against the developer's own trust root."""
    root = dev_trust_root()
    if not root.is_file():
        raise ConfigError(
            f"--dev needs the development trust root, and {root} does not exist",
            hint="sign a release with `inv release` (it writes that file), or pass --trusted-root",
        )
    return TrustPolicy(root, DEV_IDENTITY, DEV_ISSUER)


def check_signature(data: bytes, bundle_json: str, policy: TrustPolicy, what: str = MANIFEST) -> None:
    """The bundle signs ``data`` for the policy's signer under its trust root.
    Verified in full once per exact set of bytes; a record of that (bound to
    every byte of data, bundle, trust root and policy) saves the next run
    from doing it again (``_internal/sigrecords.py`` says what it covers)."""
    from ._internal.sigrecords import SignatureRecords

    try:
        trust_root = Path(policy.trusted_root).read_bytes()
    except OSError as exc:
        raise VerificationFailed(
            f"the trust root {policy.trusted_root} cannot be read: {exc.strerror or exc}",
            hint="pass --trusted-root with an existing sigstore trusted_root.json",
        ) from None
    records = SignatureRecords()
    key = records.key(data, bundle_json, trust_root,
                      (policy.issuer, policy.identity or "", policy.identity_pattern or "", what))  # fmt: skip
    if records.known(key):
        return
    _verify_bundle(data, bundle_json, policy, what)
    records.remember(key)


def _verify_bundle(data: bytes, bundle_json: str, policy: TrustPolicy, what: str) -> None:
    try:
        from sigstore.errors import Error as SigstoreError
        from sigstore.models import Bundle, TrustedRoot
        from sigstore.verify import Verifier
        from sigstore.verify import policy as sigstore_policy
    except ImportError:
        raise VerificationFailed("the sigstore library is not installed", hint="pip install sigstore") from None
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


def bundle_text(raw: bytes, what: str = MANIFEST_BUNDLE) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationFailed(f"{what} is not UTF-8 JSON: not a sigstore bundle",
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
    """Size and sha256 of the file at ``path``. The digest is remembered per
    file and stamp (``fsutil.fd_digest``: a write moves the file's ctime), so
    an unchanged release is not hashed again on every run; what boots is
    checked once more on the descriptor QEMU or Docker is handed."""
    from ._internal.fsutil import fd_digest

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise VerificationFailed(f"artifact {artifact.name} ({artifact.kind}) is missing at {path}") from None
    try:
        size = os.fstat(fd).st_size
        if size != artifact.size:
            raise VerificationFailed(f"artifact {artifact.name} is {size} bytes; the manifest says {artifact.size}")
        digest = fd_digest(fd)
    finally:
        os.close(fd)
    if digest != artifact.sha256:
        raise VerificationFailed(
            f"artifact {artifact.name} has sha256 {digest}; the manifest says {artifact.sha256}",
            hint="the file was altered or swapped; fetch the release again",
        )


def check_artifacts(directory: Path, manifest: Manifest, kinds: tuple[str, ...]) -> None:
    """The artifacts of these kinds, where a release directory keeps them."""
    for selector in kinds:
        for artifact in manifest.select(selector):
            check_artifact(directory / artifact.location, artifact)


def every_kind(manifest: Manifest) -> tuple[str, ...]:
    """Every artifact the manifest lists, in its order: by kind, or
    ``kind@variant`` for the kinds there is one of per layer."""
    return tuple(dict.fromkeys(a.selector for a in manifest.artifacts))


def read_release(directory: Path) -> tuple[bytes, str]:
    """A release directory's manifest and its signature bundle."""
    try:
        return (directory / MANIFEST).read_bytes(), bundle_text((directory / MANIFEST_BUNDLE).read_bytes())
    except OSError as exc:
        raise VerificationFailed(f"release in {directory} is incomplete: {exc}") from None


def policy_for(channel: str, explicit: TrustPolicy | None) -> TrustPolicy:
    """The caller's policy, or the signer pinned for the channel asked for
    (never the one the manifest names: that is what is being checked)."""
    return explicit if explicit is not None else pinned_policy(channel)


def check_channel(manifest: Manifest, channel: str) -> None:
    if manifest.channel != channel:
        raise ChannelRefused(
            f"release {manifest.release} was signed for channel {manifest.channel}, not {channel}",
            hint=f"ask for channel {manifest.channel} explicitly if you mean to run it (--channel)",
        )


def check_manifest(
    data: bytes, bundle_json: str, policy: TrustPolicy, channel: str, now: float | None = None
) -> Manifest:
    """A signed manifest, checked for everything but rollback and artifacts:
    signer, schema, compatibility with this shim, expiry, channel."""
    check_signature(data, bundle_json, policy)
    manifest = Manifest.from_json(data)
    manifest.check_usable(__version__, P.AGENT_PROTOCOL_VERSION, time.time() if now is None else now)
    check_channel(manifest, channel)
    return manifest


def check_release(directory: Path, policy: TrustPolicy, channel: str, kinds: tuple[str, ...] | None = None) -> Manifest:
    """A release directory, whole (every listed artifact unless ``kinds``
    narrows it), without touching any rollback state: what a publisher
    checks before uploading, with the policy it signed under."""
    manifest = check_manifest(*read_release(directory), policy, channel)
    check_artifacts(directory, manifest, kinds if kinds is not None else every_kind(manifest))
    return manifest


__all__ = [
    "DEFAULT_CHANNEL",
    "DEV_CHANNEL",
    "DEV_IDENTITY",
    "DEV_ISSUER",
    "ChannelRefused",
    "RollbackRefused",
    "TrustPolicy",
    "VerificationFailed",
    "bundle_text",
    "check_artifact",
    "check_artifacts",
    "check_channel",
    "check_manifest",
    "check_release",
    "check_signature",
    "dev_policy",
    "dev_trust_root",
    "every_kind",
    "pinned_policy",
    "policy_for",
    "read_release",
]
