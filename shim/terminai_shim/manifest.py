"""The release manifest: what a release contains and how to boot it.

One module reads and writes it (the pipeline writes, the shim reads); its
JSON Schema is ``manifests/manifest.schema.json`` and the format is
described in docs/manifest.md. A manifest is only ever trusted after its
sigstore signature was verified; this module checks structure, versions,
compatibility and expiry, and names exactly what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import ShimError
from .layout import CHANNEL_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, release_key
from .models import DEFAULT_CPUS, DEFAULT_MEMORY_MIB

SCHEMA_VERSION = 1
KINDS = (
    "kernel", "rootfs", "sbom", "survival-kit-wheel", "agent", "brain-bundle", "container-image", "provenance",
    "node-package", "shim-standalone", "shim-npm-package",
)  # fmt: skip
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")


class ManifestError(ShimError):
    code = "MANIFEST_INVALID"


class UnsupportedSchema(ManifestError):
    code = "MANIFEST_UNSUPPORTED"


class NeedsNewerShim(ManifestError):
    code = "SHIM_TOO_OLD"


class ManifestExpired(ManifestError):
    code = "MANIFEST_EXPIRED"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[.+-]", v)[:3])


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str
    platform: str
    size: int
    sha256: str
    media_type: str
    location: str  # relative to the release store's root: blobs/sha256/<digest>
    build: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "platform": self.platform, "size": self.size,
            "sha256": self.sha256, "mediaType": self.media_type, "location": self.location, "build": self.build,
        }  # fmt: skip


@dataclass(frozen=True)
class BootDefaults:
    """What a release asks of the VM by default; a caller's request wins.
    (How the host reaches the agent is not the release's to say: the boot
    contract fixes the port, the shim picks the transport the host has.)"""

    kernel_args: tuple[str, ...] = ()
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS


@dataclass(frozen=True)
class Manifest:
    release: str
    channel: str
    serial: int
    created: int  # seconds since 1970, from SOURCE_DATE_EPOCH
    expires: int
    git_commit: str
    min_shim_version: str
    agent_protocol: int
    boot: BootDefaults
    artifacts: tuple[Artifact, ...]
    schema_version: int = SCHEMA_VERSION

    # -- writing ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "mediaType": MANIFEST_MEDIA_TYPE,
            "schemaVersion": self.schema_version,
            "release": self.release,
            "channel": self.channel,
            "serial": self.serial,
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "gitCommit": self.git_commit,
            "compatibility": {"minShimVersion": self.min_shim_version, "agentProtocol": self.agent_protocol},
            "boot": {
                "kernelArgs": list(self.boot.kernel_args),
                "memoryMib": self.boot.memory_mib,
                "cpus": self.boot.cpus,
            },
            "artifacts": [a.to_dict() for a in self.artifacts],
        }

    def to_json(self) -> bytes:
        """Stable bytes (sorted keys): what gets signed."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n").encode()

    # -- reading --------------------------------------------------------------
    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a JSON object")
        version = doc.get("schemaVersion")
        if version != SCHEMA_VERSION:
            raise UnsupportedSchema(
                f"manifest schema version {version!r} is not supported (this shim reads {SCHEMA_VERSION})",
                hint="upgrade terminai-shim",
            )
        try:
            compat = _obj(doc, "compatibility")
            boot = _obj(doc, "boot")
            artifacts = tuple(_artifact(a, i) for i, a in enumerate(_list(doc, "artifacts")))
            manifest = cls(
                release=_str(doc, "release", _VERSION),
                channel=_str(doc, "channel", re.compile(r"^[a-z][a-z0-9-]*$")),
                serial=_int(doc, "serial"),
                created=_time(doc, "created"),
                expires=_time(doc, "expires"),
                git_commit=_str(doc, "gitCommit", re.compile(r"^[0-9a-f]{7,40}$")),
                min_shim_version=_str(compat, "minShimVersion", _VERSION),
                agent_protocol=_int(compat, "agentProtocol"),
                boot=BootDefaults(
                    kernel_args=tuple(str(x) for x in _list(boot, "kernelArgs")),
                    memory_mib=_int(boot, "memoryMib"),
                    cpus=_int(boot, "cpus"),
                ),
                artifacts=artifacts,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest field {exc}") from None
        if doc.get("mediaType") != MANIFEST_MEDIA_TYPE:
            raise ManifestError(f"manifest mediaType {doc.get('mediaType')!r} is not {MANIFEST_MEDIA_TYPE}")
        if manifest.expires <= manifest.created:
            raise ManifestError("manifest expires before it was created")
        names = [a.name for a in artifacts]
        if len(set(names)) != len(names):
            raise ManifestError("manifest lists an artifact name twice")
        return manifest

    # -- checks -------------------------------------------------------------------
    def check_usable(self, shim_version: str, agent_protocol: int, now: float) -> None:
        if _version_tuple(self.min_shim_version) > _version_tuple(shim_version):
            raise NeedsNewerShim(
                f"release {self.release} needs terminai-shim >= {self.min_shim_version}; this is {shim_version}",
                hint="upgrade terminai-shim",
            )
        if self.agent_protocol != agent_protocol:
            raise NeedsNewerShim(
                f"release {self.release} speaks agent protocol {self.agent_protocol}; "
                f"this shim speaks {agent_protocol}",
                hint="upgrade terminai-shim",
            )
        if now >= self.expires:
            raise ManifestExpired(
                f"manifest of release {self.release} expired at {_iso(self.expires)}",
                hint="fetch the channel again; a current release replaces it",
            )

    def artifact(self, kind: str, platform: str | None = None) -> Artifact:
        """The one artifact of a kind (of a platform, for kinds built per platform)."""
        found = [a for a in self.artifacts if a.kind == kind and platform in (None, a.platform)]
        if len(found) != 1:
            of = f" for {platform}" if platform else ""
            raise ManifestError(f"manifest has {len(found)} artifacts of kind {kind!r}{of}, expected one")
        return found[0]


@dataclass(frozen=True)
class ChannelPointer:
    """Which release a channel currently serves, signed like a manifest.

    Its serial rises with every change of the channel (publish or promote);
    a client remembers the highest it accepted, and the pointer expires so a
    stale mirror cannot freeze a client on an old release forever."""

    channel: str
    release: str
    serial: int
    updated: int
    expires: int
    manifest_sha256: str
    manifest_size: int

    @property
    def manifest_location(self) -> str:
        return release_key(self.release)

    def to_json(self) -> bytes:
        doc = {
            "mediaType": CHANNEL_MEDIA_TYPE,
            "schemaVersion": SCHEMA_VERSION,
            "channel": self.channel,
            "release": self.release,
            "serial": self.serial,
            "updated": _iso(self.updated),
            "expires": _iso(self.expires),
            "manifest": {"location": self.manifest_location, "sha256": self.manifest_sha256,
                         "size": self.manifest_size},
        }  # fmt: skip
        return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ChannelPointer:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("the channel pointer is not a JSON object")
            if doc.get("schemaVersion") != SCHEMA_VERSION:
                raise UnsupportedSchema(
                    f"channel pointer schema version {doc.get('schemaVersion')!r} is not supported",
                    hint="upgrade terminai-shim",
                )
            if doc.get("mediaType") != CHANNEL_MEDIA_TYPE:
                raise ValueError(f"mediaType {doc.get('mediaType')!r} is not {CHANNEL_MEDIA_TYPE}")
            ref = _obj(doc, "manifest")
            pointer = cls(
                channel=_str(doc, "channel", re.compile(r"^[a-z][a-z0-9-]*$")),
                release=_str(doc, "release", _VERSION),
                serial=_int(doc, "serial"),
                updated=_time(doc, "updated"),
                expires=_time(doc, "expires"),
                manifest_sha256=_str(ref, "sha256", _SHA256),
                manifest_size=_int(ref, "size"),
            )
            if _str(ref, "location") != pointer.manifest_location:
                raise ValueError(f"manifest.location must be {pointer.manifest_location}")
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"channel pointer field {exc}") from None
        return pointer

    def check_current(self, channel: str, now: float) -> None:
        if self.channel != channel:
            raise ManifestError(f"the pointer for channel {channel} names channel {self.channel}",
                                hint="the store is misconfigured or tampered with")  # fmt: skip
        if now >= self.expires:
            raise ManifestExpired(
                f"channel pointer {channel} expired at {_iso(self.expires)}",
                hint="the store has not been re-published recently; ask the release engineers to promote again",
            )


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(doc: dict[str, Any], key: str) -> int:
    value = _str(doc, key)
    try:
        return int(datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError:
        raise ValueError(f"{key!r} is not a UTC time like 2026-01-31T12:00:00Z: {value!r}") from None


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc[key]
    if not isinstance(value, dict):
        raise TypeError(f"{key!r} must be an object")
    return value


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc[key]
    if not isinstance(value, list):
        raise TypeError(f"{key!r} must be a list")
    return value


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{key!r} must be a non-negative integer")
    return value


def _str(doc: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = doc[key]
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise ValueError(f"{key!r} is not valid: {value!r}")
    return value


def _artifact(doc: Any, index: int) -> Artifact:
    if not isinstance(doc, dict):
        raise TypeError(f"artifacts[{index}] must be an object")
    kind = _str(doc, "kind")
    if kind not in KINDS:
        raise ValueError(f"artifacts[{index}].kind {kind!r} is not one of {KINDS}")
    sha = _str(doc, "sha256", _SHA256)
    location = _str(doc, "location")
    if location != f"blobs/sha256/{sha}":
        raise ValueError(f"artifacts[{index}].location must be blobs/sha256/<its sha256>, not {location!r}")
    build = doc.get("build", {})
    if not isinstance(build, dict):
        raise TypeError(f"artifacts[{index}].build must be an object")
    return Artifact(
        name=_str(doc, "name", re.compile(r"^[A-Za-z0-9._+-]+$")),
        kind=kind,
        platform=_str(doc, "platform"),
        size=_int(doc, "size"),
        sha256=sha,
        media_type=_str(doc, "mediaType"),
        location=location,
        build=build,
    )


__all__ = ["Artifact", "BootDefaults", "ChannelPointer", "Manifest", "ManifestError"]
