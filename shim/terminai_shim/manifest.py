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
    "node-package", "shim-standalone", "shim-npm-package", "rootfs-layer", "layer-sbom",
)  # fmt: skip
# Kinds there is one of per root filesystem layer: the artifact's ``variant`` names the layer.
LAYER_KINDS = ("rootfs-layer", "layer-sbom")
MINIMAL = "minimal"  # the profile with no layers, which every release has
# A layer's or profile's name, wherever one is written (layers.toml, the manifest, the shim's flags).
LAYER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
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
    variant: str = ""  # which root filesystem layer, for the layer kinds

    @property
    def selector(self) -> str:
        """``kind``, or ``kind@variant``: how a caller names the artifacts to verify."""
        return f"{self.kind}@{self.variant}" if self.variant else self.kind

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "name": self.name, "kind": self.kind, "platform": self.platform, "size": self.size,
            "sha256": self.sha256, "mediaType": self.media_type, "location": self.location, "build": self.build,
        }  # fmt: skip
        if self.variant:
            doc["variant"] = self.variant
        return doc


@dataclass(frozen=True)
class BootDefaults:
    """What a release asks of the VM by default; a caller's request wins.
    (How the host reaches the agent is not the release's to say: the boot
    contract fixes the port, the shim picks the transport the host has.)"""

    kernel_args: tuple[str, ...] = ()
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS


@dataclass(frozen=True)
class RootfsLayers:
    """The root filesystem's optional layers (each on the base or on the one
    layer it depends on) and the profiles made of them, bottom first."""

    depends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    profiles: dict[str, tuple[str, ...]] = field(default_factory=lambda: {MINIMAL: ()})
    default_profile: str = MINIMAL

    def order(self, names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """``names`` with everything they stand on, bottom first; unknown names refused."""
        chain: list[str] = []
        for name in names:
            if name not in self.depends:
                raise ManifestError(f"the release has no root filesystem layer {name!r}",
                                    hint=f"its layers are {', '.join(self.depends) or 'none'}")  # fmt: skip
            below: list[str] = []
            current: str | None = name
            while current is not None and current not in chain and current not in below:
                below.insert(0, current)
                deps = self.depends.get(current, ())
                current = deps[0] if deps else None
            chain += [n for n in below if n not in chain]
        return tuple(chain)

    def profile(self, name: str | None) -> tuple[str, ...]:
        name = name or self.default_profile
        if name not in self.profiles:
            raise ManifestError(f"the release has no profile {name!r}",
                                hint=f"its profiles are {', '.join(self.profiles)}")  # fmt: skip
        return self.profiles[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [{"name": n, "depends": list(d)} for n, d in self.depends.items()],
            "profiles": {n: list(members) for n, members in self.profiles.items()},
            "defaultProfile": self.default_profile,
        }


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
    rootfs: RootfsLayers = field(default_factory=RootfsLayers)
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
            "rootfs": self.rootfs.to_dict(),
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
                rootfs=_rootfs(doc.get("rootfs")),
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
        for layer in manifest.rootfs.depends:
            for kind in LAYER_KINDS:
                manifest.artifact(kind, variant=layer)  # exactly one of each, or it says which is missing
        stray = [a.name for a in artifacts if (a.kind in LAYER_KINDS) != bool(a.variant)
                 or (a.variant and a.variant not in manifest.rootfs.depends)]  # fmt: skip
        if stray:
            raise ManifestError(f"manifest artifacts {stray} name no listed layer, or a layer where none belongs")
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

    def select(self, selector: str) -> list[Artifact]:
        """Every artifact a selector names: a kind (all its platforms), or ``kind@variant``."""
        kind, _, variant = selector.partition("@")
        found = [a for a in self.artifacts if a.kind == kind and a.variant == variant]
        if not found:
            raise ManifestError(f"manifest has no artifact {selector!r}")
        return found

    def artifact(self, kind: str, platform: str | None = None, variant: str | None = None) -> Artifact:
        """The one artifact of a kind (of a platform, for kinds built per
        platform; of a layer, for the layer kinds). ``kind`` may be a
        selector, ``kind@variant``."""
        if "@" in kind:
            kind, variant = kind.split("@", 1)
        found = [a for a in self.artifacts
                 if a.kind == kind and platform in (None, a.platform) and (variant or "") == a.variant]  # fmt: skip
        if len(found) != 1:
            of = f" for {platform}" if platform else ""
            of += f" of layer {variant}" if variant else ""
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


def _rootfs(doc: Any) -> RootfsLayers:
    """The layers and profiles; a release without the section has the base alone."""
    if doc is None:
        return RootfsLayers()
    if not isinstance(doc, dict):
        raise TypeError("'rootfs' must be an object")
    depends: dict[str, tuple[str, ...]] = {}
    for i, layer in enumerate(_list(doc, "layers")):
        if not isinstance(layer, dict):
            raise TypeError(f"rootfs.layers[{i}] must be an object")
        name = _str(layer, "name", LAYER_NAME)
        below = tuple(_str({"depends": d}, "depends", LAYER_NAME) for d in _list(layer, "depends"))
        if len(below) > 1 or any(d not in depends for d in below) or name in depends:
            raise ValueError(f"rootfs.layers[{i}] ({name}) must stand on at most one layer listed before it, once")
        depends[name] = below
    layers = RootfsLayers(depends, {}, _str(doc, "defaultProfile", LAYER_NAME))
    for name, members in _obj(doc, "profiles").items():
        if not LAYER_NAME.match(name) or not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError(f"rootfs.profiles.{name} must be a list of layer names")
        if layers.order(members) != tuple(members):
            raise ValueError(f"rootfs.profiles.{name} must list its layers bottom first, each with what it stands on")
        layers.profiles[name] = tuple(members)
    if layers.default_profile not in layers.profiles:
        raise ValueError(f"rootfs.defaultProfile {layers.default_profile!r} is not a profile")
    return layers


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
        variant=_str(doc, "variant", LAYER_NAME) if "variant" in doc else "",
    )


__all__ = ["LAYER_NAME", "Artifact", "BootDefaults", "ChannelPointer", "Manifest", "ManifestError", "RootfsLayers"]
