"""The shim's front door: one request in, one resolved and verified launch out.

``cli`` and ``serve`` only parse their input into a ``LaunchRequest`` and
render what comes back; everything between (trust, the channel, fetching
and verifying the release, deciding the tier, the accelerator and engine
probes, the boot configuration) happens here, once, in this order:

1. the request is checked as a whole (nothing has started);
2. the accelerator is probed, once;
3. the release's manifest is verified (signer for the channel asked for,
   expiry, compatibility, channel, rollback) before any artifact byte is
   read or fetched; the tier is decided by what the verified manifest
   offers and what the host runs, once;
4. exactly the artifacts that tier boots are verified (fetched into the
   content-addressed cache for a URL or store), and the boot configuration
   carries their digests, which the backend checks again on the very
   descriptors it hands to QEMU or the engine.

Every failure is a ``ShimError`` with a code; a bad request is a
``ConfigError`` whichever door it came through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from terminai_protocol import bootcontract as boot

from . import layout
from ._internal.accel import choose_accel
from ._internal.backends import NAMES, BackendChoice, choose_backend, make_backend
from ._internal.backends.base import Backend
from ._internal.fsutil import config_root
from ._internal.netpolicy import Allowlist, open_mode_allows
from .errors import ConfigError
from .manifest import LAYER_NAME, Manifest, ManifestError
from .models import DEFAULT_CPUS, DEFAULT_MEMORY_MIB, AccelChoice, BootConfig, NetworkPolicy, RootLayer
from .options import GUEST_USERS, NETWORK_MODES, ROOTFS_FORMATS
from .verify import DEFAULT_CHANNEL, DEV_CHANNEL, DEV_IDENTITY, DEV_ISSUER, TrustPolicy, dev_policy, every_kind

if TYPE_CHECKING:
    from ._internal.fetch import Progress
    from ._internal.releases import Kinds, VerifiedRelease
    from .session import Session

VM_KINDS = ("kernel", "rootfs")
CONTAINER_KINDS = ("container-image",)
SNAPSHOT_MODES = ("auto", "off")


@dataclass(frozen=True)
class Trust:
    """Who must have signed. Nothing given: the signer pinned in the shim for
    the channel asked for. ``dev``: the local development identity, against
    the developer's own trust root (``verify.dev_trust_root``) or an explicit
    ``trusted_root``, never one found beside a release. Otherwise all three
    of ``trusted_root``, ``identity`` and ``issuer``."""

    trusted_root: Path | None = None
    identity: str | None = None
    issuer: str | None = None
    dev: bool = False

    def policy(self) -> TrustPolicy | None:
        if self.dev:
            if self.trusted_root is not None:
                return TrustPolicy(self.trusted_root, DEV_IDENTITY, DEV_ISSUER)
            return dev_policy()
        given = [self.trusted_root, self.identity, self.issuer]
        if not any(given):
            return None
        if self.trusted_root is None or self.identity is None or self.issuer is None:
            raise ConfigError("an explicit trust policy needs all of trustedRoot, identity and issuer "
                              "(--trusted-root, --identity, --issuer)",
                              hint="or none of them, to use the signer pinned for the channel")  # fmt: skip
        return TrustPolicy(self.trusted_root, self.identity, self.issuer)

    @property
    def default_channel(self) -> str:
        """``stable``; ``dev`` for the development identity, which signs dev builds."""
        return DEV_CHANNEL if self.dev else DEFAULT_CHANNEL


@dataclass(frozen=True)
class ReleaseSource:
    """Where a signed release comes from: a release directory or URL
    (``manifest``), or a published ``store`` followed by ``channel`` (a
    ``release`` names a version instead of the channel's current one). The
    channel asked for is enforced either way."""

    manifest: str | None = None
    store: str | None = None
    channel: str | None = None
    release: str | None = None
    allow_http: bool = False


@dataclass(frozen=True)
class LocalArtifacts:
    """A developer's own, unsigned build outputs (``inv kernel rootfs
    container``). Never mixed with a release; ``image_sha256`` binds the
    image to its build record when known."""

    kernel: Path | None = None
    rootfs: Path | None = None
    rootfs_format: str | None = None
    image: Path | None = None
    image_sha256: str | None = None
    layers: tuple[RootLayer, ...] = ()  # bottom first, as the developer names them


@dataclass(frozen=True)
class LaunchRequest:
    source: ReleaseSource | None = None
    trust: Trust = field(default_factory=Trust)
    local: LocalArtifacts | None = None
    backend: str = "auto"
    accel: str = "auto"
    require_microvm: bool = False
    memory_mib: int | None = None
    cpus: int | None = None
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    workspace: Path | None = None
    # Where the guest sees the workspace (absolute): default, the host's own path
    # (or /workspace when that path is one of the guest's system directories).
    workspace_mount: str | None = None
    snapshots: str = "auto"
    user: str = "user"
    writable_git: bool = False
    force_workspace: bool = False  # share a workspace ``dangerous_workspace`` refuses
    # The root filesystem a release boots: a profile it lists (None: its
    # default), or its layers by name (each with what it stands on).
    profile: str | None = None
    layers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Launch:
    """A request resolved: what boots, on which tier, and why."""

    config: BootConfig
    accel: AccelChoice
    choice: BackendChoice
    backend: Backend
    release: VerifiedRelease | None

    def boot(self) -> Session:
        from .session import Session

        return Session.boot(self.config, backend=self.backend, accel=self.accel)


def channel_of(source: ReleaseSource, trust: Trust) -> str:
    return source.channel or trust.default_channel


def verify(source: ReleaseSource, trust: Trust, progress: Progress | None = None) -> VerifiedRelease:
    """Every artifact the release lists, whatever would boot it: ``verify`` and ``fetch``."""
    _check_source(source)
    return _open(source, trust, every_kind, progress)


def resolve(request: LaunchRequest, progress: Progress | None = None) -> Launch:
    _check(request)
    accel = choose_accel(request.accel)
    if request.source is not None:
        chosen: list[tuple[BackendChoice, tuple[str, ...]]] = []

        def kinds(manifest: Manifest) -> tuple[str, ...]:
            chosen.append(_release_tier(request, accel, manifest))
            layers = chosen[-1][1]
            if chosen[-1][0].name == "container":
                return CONTAINER_KINDS
            return VM_KINDS + tuple(f"rootfs-layer@{name}" for name in layers)

        release = _open(request.source, request.trust, kinds, progress)
        choice, layers = chosen[-1]
        config = _release_config(request, release, choice.name, layers)
    else:
        local = request.local or LocalArtifacts()
        choice = _local_tier(request, accel, local)
        release = None
        config = _local_config(request, local, choice.name)
    return Launch(config, accel, choice, make_backend(choice.name), release)  # Session.boot checks it against config


@dataclass(frozen=True)
class Readiness:
    """Whether a launch of this request would start here, and why not."""

    ready: bool
    reason: str
    backend: str | None = None
    code: str | None = None  # the ShimError code a launch would fail with


def ready(request: LaunchRequest) -> Readiness:
    """A launch's own steps up to the boot, without booting: the request
    checked as a whole, the accelerator probed, the release's manifest
    verified (signature, signer, channel, expiry, serial: a signature this
    host verified before is remembered, so asking again is cheap), the tier
    decided where a launch decides it, and that tier's program or engine
    asked whether it answers. Not done: fetching and hashing the artifacts,
    which the launch does with progress; a release whose files changed since
    it was signed still fails there."""
    from .errors import ShimError

    try:
        _check(request)
        accel = choose_accel(request.accel)
        if request.source is not None:
            m = _open(request.source, request.trust, (), None).manifest
            choice, _ = _release_tier(request, accel, m)
            what = f"release {m.release} ({m.channel})"
        else:
            local = request.local or LocalArtifacts()
            choice = _local_tier(request, accel, local)
            what = "your own build outputs"
        backend = make_backend(choice.name)
        if request.source is None:
            backend.check(_local_config(request, local, choice.name))  # the files a boot opens are there
        if not backend.available():
            raise ConfigError(f"the {choice.name} backend cannot start here ({choice.reason})",
                              hint="install it (doctor says what is missing), or choose another tier")  # fmt: skip
    except ShimError as exc:
        return Readiness(False, str(exc), code=exc.code)
    return Readiness(True, f"{what} on {choice.name}: {choice.reason}", choice.name)


# Directories a workspace must not be (or, for the first group, be inside):
# the guest would read every secret there and write where the host runs programs from.
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/boot", "/run")
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr", "/usr/local", "/usr/bin", "/usr/lib",
               "/usr/local/bin", "/var", "/var/lib", "/opt", "/srv", "/tmp", "/var/tmp", "/home", "/root", "/mnt",
               "/media", "/snap")  # fmt: skip


def dangerous_workspace(path: Path) -> str | None:
    """Why ``path`` is no workspace (None: it may be one): ``/``, a system
    directory, the home directory of this user (or a parent of it), any
    user's home directory itself, or the user's configuration directory
    (``~/.config``, TerminAI's inside it, or anything holding that). A
    project inside any of the first ones is fine."""
    import pwd

    real = os.path.realpath(path)
    if real == "/":
        return "the root directory"
    if any(real == t or real.startswith(t + "/") for t in SYSTEM_TREES) or real in SYSTEM_DIRS:
        return "a system directory"
    homes = {os.path.realpath(os.path.expanduser("~"))}
    try:
        homes.update(os.path.realpath(u.pw_dir) for u in pwd.getpwall() if u.pw_dir not in ("", "/"))
    except OSError:
        pass
    if real in homes:
        return "a home directory itself"
    if os.path.realpath(os.path.expanduser("~")).startswith(real + "/"):
        return "a parent of your home directory"
    # The user's configuration: git's there runs commands, and TerminAI's names the
    # trust root and the default release the next launch boots.
    config = os.path.realpath(config_root())
    if real == os.path.dirname(config) or real == config or real.startswith(config + "/") or \
            config.startswith(real + "/"):  # fmt: skip
        return "your configuration directory (or holds it)"
    return None


def start(request: LaunchRequest, progress: Progress | None = None) -> Session:
    """Resolve, verify and boot: the VM (or container) answers when this returns."""
    return resolve(request, progress).boot()


# -- the request as a whole ------------------------------------------------------


def _check(request: LaunchRequest) -> None:
    if (request.source is None) == (request.local is None):
        raise ConfigError(
            "a launch needs a release (a manifest directory or URL, or a store and channel) or a developer's own "
            "artifacts (kernel and rootfs, or image), not both and not neither; no default release is configured",
            hint="pass manifest: <release URL or directory> (--manifest), or store and channel (--store); or "
            "configure a default (TERMINAI_RELEASE, ~/.config/terminai/release.json, or `inv release` for a "
            "development one)",
        )
    if request.source is not None:
        _check_source(request.source)
    if request.profile is not None and request.layers is not None:
        raise ConfigError("name a profile or a list of layers, not both (--profile, --layers)")
    if request.local is not None and request.layers is not None:
        raise ConfigError(
            "named layers come from a release; a developer's own layers are files",
            hint="pass --layer NAME=FILE for each, bottom first, or boot a release (--manifest)",
        )
    if request.local is not None:
        _check_own_layers(request.local.layers)
        if request.local.rootfs_format not in (None, *ROOTFS_FORMATS):
            raise ConfigError(f"unknown root image format {request.local.rootfs_format!r}",
                              hint=f"use {', '.join(ROOTFS_FORMATS)}")  # fmt: skip
    if request.backend not in NAMES:
        raise ConfigError(f"unknown backend {request.backend!r}", hint=f"choose one of {', '.join(NAMES)}")
    if request.user not in GUEST_USERS:
        raise ConfigError(f"unknown guest user {request.user!r}", hint="use user (the default) or root")
    if request.snapshots not in SNAPSHOT_MODES:
        raise ConfigError(f"unknown snapshot mode {request.snapshots!r}", hint="use auto or off")
    for name, value in (("memory", request.memory_mib), ("cpus", request.cpus)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive whole number, not {value!r}")
    _check_network(request.network)
    if request.workspace is not None and not Path(request.workspace).is_dir():
        raise ConfigError(f"workspace {request.workspace} is not a directory", hint="create it or pass an existing one")
    if request.workspace is not None and not request.force_workspace:
        why = dangerous_workspace(Path(request.workspace))
        if why is not None:
            raise ConfigError(f"workspace {request.workspace} is {why}: the guest could read and write all of it",
                              hint="share the project's own directory; --force-workspace (forceWorkspace) if you "
                              "really mean it")  # fmt: skip
    if request.workspace_mount is not None:
        mount = request.workspace_mount
        if request.workspace is None:
            raise ConfigError("workspaceMount needs a workspace (--workspace-mount needs --workspace)")
        if not mount.startswith("/") or os.path.normpath(mount) != mount or boot.workspace_target(mount) != mount:
            raise ConfigError(f"workspaceMount {mount!r} must be a normalised absolute path outside the guest's system "
                              f"directories ({', '.join(boot.GUEST_SYSTEM_DIRS)})")  # fmt: skip


def _check_own_layers(layers: tuple[RootLayer, ...]) -> None:
    names = [layer.name for layer in layers]
    for layer in layers:
        if not LAYER_NAME.match(layer.name) or names.count(layer.name) > 1:
            raise ConfigError(f"layer name {layer.name!r} must be lower-case letters, digits and -, used once")
        if not Path(layer.path).is_file():
            raise ConfigError(f"layer {layer.name}: {layer.path} is not a file", hint="build it with `inv layers`")
    if len(layers) > boot.MAX_LAYERS:
        raise ConfigError(f"{len(layers)} layers; at most {boot.MAX_LAYERS} can be mounted")


def _check_source(source: ReleaseSource) -> None:
    if bool(source.manifest) == bool(source.store):
        raise ConfigError("name one release: a directory or URL (--manifest), or a store (--store) and its channel")
    if source.release and not source.store:
        raise ConfigError("a release version (--release) names one in a store", hint="pass --store as well")
    if source.channel is not None and not source.channel:
        raise ConfigError("the channel is empty", hint="omit it for stable, or name one (stable, beta, dev)")


def _check_network(policy: NetworkPolicy) -> None:
    if policy.mode not in NETWORK_MODES:
        raise ConfigError(f"unknown network mode {policy.mode!r}", hint=f"use {', '.join(NETWORK_MODES)}")
    if policy.allow and policy.mode == "none":
        raise ConfigError("--allow needs --network allowlist (or open, to lift its loopback or link-local block)")
    if policy.mode == "allowlist":
        Allowlist.parse(policy.allow)  # a bad entry is refused before anything starts
    elif policy.mode == "open":
        open_mode_allows(policy.allow)


# -- the tier, once ----------------------------------------------------------------


def decide_tier(request: LaunchRequest, accel: AccelChoice, *, has_image: bool, layers: bool) -> BackendChoice:
    """The one place a tier is decided: a launch asks it with what the
    verified release (or the developer's files) offers; ``doctor`` asks it
    the question a launch without options would; ``backend_for`` asks it for
    a boot configuration built without ``launch`` (tests, the benchmark)."""
    return choose_backend(accel, request.backend, has_image=has_image, network=request.network.mode,
                          require_microvm=request.require_microvm, layers=layers)  # fmt: skip


def _release_tier(
    request: LaunchRequest, accel: AccelChoice, manifest: Manifest
) -> tuple[BackendChoice, tuple[str, ...]]:
    """The tier for what a verified release offers, and the layers it boots there."""
    layers = release_layers(request, manifest)
    has_image = any(a.kind == "container-image" for a in manifest.artifacts)
    return decide_tier(request, accel, has_image=has_image, layers=bool(layers)), layers


def _local_tier(request: LaunchRequest, accel: AccelChoice, local: LocalArtifacts) -> BackendChoice:
    return decide_tier(request, accel, has_image=local.image is not None, layers=bool(local.layers))


def backend_for(config: BootConfig, accel: AccelChoice) -> Backend:
    """The backend for a boot configuration that did not come from ``resolve``."""
    request = LaunchRequest(backend=config.backend, require_microvm=config.require_microvm, network=config.network)
    return make_backend(
        decide_tier(request, accel, has_image=config.image is not None, layers=bool(config.layers)).name
    )


def release_layers(request: LaunchRequest, manifest: Manifest) -> tuple[str, ...]:
    """The layers a request boots from this release, bottom first; a
    profile or layer the release lacks is the caller's error."""
    try:
        if request.layers is not None:
            return manifest.rootfs.order(request.layers)
        return manifest.rootfs.profile(request.profile)
    except ManifestError as exc:
        raise ConfigError(str(exc), hint=exc.hint) from None


def _open(source: ReleaseSource, trust: Trust, kinds: Kinds, progress: Progress | None) -> VerifiedRelease:
    from ._internal.releases import fetch_channel, open_release  # only a release pays for the HTTP stack

    policy = trust.policy()
    channel = channel_of(source, trust)
    if source.store:
        return fetch_channel(source.store, channel, policy, version=source.release, allow_http=source.allow_http,
                          progress=progress, kinds=kinds)  # fmt: skip
    assert source.manifest is not None
    return open_release(source.manifest, policy, channel, allow_http=source.allow_http, progress=progress,
                        kinds=kinds)  # fmt: skip


# -- the boot configuration, in one place ------------------------------------------


def _common(request: LaunchRequest, backend: str) -> dict[str, object]:
    workspace = Path(request.workspace).resolve() if request.workspace is not None else None
    mount = request.workspace_mount or (boot.workspace_target(str(workspace)) if workspace else boot.WORKSPACE_ALIAS)
    return {
        "backend": backend,
        "network": request.network,
        "workspace": workspace,
        "workspace_mount": mount,
        "accel": request.accel,
        "snapshots": request.snapshots,
        "user": request.user,
        "writable_git": request.writable_git,
        "require_microvm": request.require_microvm,
    }


def _release_config(
    request: LaunchRequest, release: VerifiedRelease, backend: str, names: tuple[str, ...]
) -> BootConfig:
    """The artifacts that were verified, with the digests the backend checks
    again on what it opens; ``names``: the release's layers the request
    boots (``release_layers``), bottom first."""
    m = release.manifest
    vm = backend != "container"
    layers: tuple[RootLayer, ...] = ()
    if not vm and request.layers is not None:
        raise ConfigError("the container tier runs one of the archive's images, one per profile",
                          hint=f"name a profile (--profile): {', '.join(m.rootfs.profiles)}")  # fmt: skip
    if vm:
        layers = tuple(RootLayer(n, release.path(f"rootfs-layer@{n}"), m.artifact("rootfs-layer", variant=n).sha256)
                       for n in names)  # fmt: skip
    return BootConfig(
        kernel=release.path("kernel") if vm else None,
        rootfs=release.path("rootfs") if vm else None,
        rootfs_format=m.artifact("rootfs").media_type.rsplit(".", 1)[-1],
        kernel_sha256=m.artifact("kernel").sha256 if vm else None,
        rootfs_sha256=m.artifact("rootfs").sha256 if vm else None,
        image=None if vm else release.path("container-image"),
        image_sha256=None if vm else m.artifact("container-image").sha256,
        memory_mib=request.memory_mib or m.boot.memory_mib,
        cpus=request.cpus or m.boot.cpus,
        kernel_args=m.boot.kernel_args,
        layers=layers,
        profile=(request.profile or m.rootfs.default_profile) if request.layers is None else None,
        **_common(request, backend),  # type: ignore[arg-type]
    )


def _local_config(request: LaunchRequest, local: LocalArtifacts, backend: str) -> BootConfig:
    if backend == "container" and local.image is None:
        raise ConfigError("no container image given", hint="pass --image, or run `inv container` first")
    if backend != "container" and (local.kernel is None or local.rootfs is None):
        raise ConfigError("no kernel or root image given",
                          hint="pass --kernel and --rootfs, or run `inv kernel rootfs` first")  # fmt: skip
    if backend != "container" and request.profile is not None:
        raise ConfigError(
            "a profile names a release's layers, or an image of a container archive",
            hint="pass --layer NAME=FILE for each of your own layers, or boot a release (--manifest)",
        )
    rootfs_format = local.rootfs_format or (local.rootfs.suffix.lstrip(".") if local.rootfs else "") or "squashfs"
    return BootConfig(
        kernel=Path(local.kernel).resolve() if local.kernel else None,
        rootfs=Path(local.rootfs).resolve() if local.rootfs else None,
        rootfs_format=rootfs_format,
        image=Path(local.image).resolve() if local.image else None,
        image_sha256=local.image_sha256,
        layers=local.layers if backend != "container" else (),
        profile=request.profile,
        memory_mib=request.memory_mib or DEFAULT_MEMORY_MIB,
        cpus=request.cpus or DEFAULT_CPUS,
        **_common(request, backend),  # type: ignore[arg-type]
    )


# -- a developer's build outputs ------------------------------------------------------


def build_dir() -> Path:
    return Path(os.environ.get("TERMINAI_BUILD_DIR", Path.cwd() / layout.BUILD_DIR))


def built_vm_artifacts() -> tuple[Path | None, Path | None]:
    """The kernel and root image ``inv kernel rootfs`` left in ``build/``, if any."""
    root = build_dir()
    try:
        kernel = next(iter(sorted((root / layout.KERNEL_OUTPUT).glob(layout.KERNEL_GLOB))), None)
        found = [p for glob in layout.ROOTFS_GLOBS for p in sorted((root / layout.ROOTFS_OUTPUT).glob(glob))]
        rootfs = next(iter(found), None)
    except OSError:  # a build directory this user cannot read: no defaults
        return None, None
    return kernel, rootfs


def built_image() -> tuple[Path | None, str | None]:
    """``build/container`` (``inv container``) and the sha256 its build record gives it."""
    import json

    try:
        image = next(iter(sorted((build_dir() / layout.CONTAINER_OUTPUT).glob(layout.CONTAINER_GLOB))), None)
    except OSError:
        return None, None
    if image is None:
        return None, None
    try:
        record = json.loads((image.parent / layout.BUILD_RECORD).read_text())
        return image.resolve(), str(record["outputs"]["archive"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return image.resolve(), None


def local_artifacts(
    kernel: Path | None = None, rootfs: Path | None = None, image: Path | None = None
) -> LocalArtifacts:
    """What the developer named, the rest from ``build/``. Naming a kernel or
    root image means a VM: no image is picked up behind their back."""
    built_kernel, built_rootfs = built_vm_artifacts()
    image_sha256 = None
    if image is None and kernel is None and rootfs is None:
        image, image_sha256 = built_image()
    return LocalArtifacts(kernel=kernel or built_kernel, rootfs=rootfs or built_rootfs, image=image,
                          image_sha256=image_sha256)  # fmt: skip


__all__ = [
    "Launch",
    "LaunchRequest",
    "LocalArtifacts",
    "Readiness",
    "ReleaseSource",
    "Trust",
    "backend_for",
    "build_dir",
    "built_image",
    "built_vm_artifacts",
    "channel_of",
    "dangerous_workspace",
    "decide_tier",
    "local_artifacts",
    "ready",
    "release_layers",
    "resolve",
    "start",
    "verify",
]
