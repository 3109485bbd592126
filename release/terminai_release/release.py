"""`inv release`: every artifact, content-addressed, under one manifest.

Output: ``dist/<version>/`` with ``blobs/sha256/<digest>`` (each artifact
under its digest), ``manifest.json`` (terminai_shim.manifest) and
``RELEASE-NOTES.md``. Everything derives from the pinned inputs and the
source date, so two runs of the same commit write identical bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from terminai_protocol import protocol as agent_protocol
from terminai_shim import __version__ as shim_version
from terminai_shim.layout import (
    BUNDLE_SUFFIX,
    DEV_TRUSTED_ROOT,
    MANIFEST,
    MANIFEST_BUNDLE,
    PROVENANCE,
    RELEASE_NOTES,
    manifest_platform,
    standalone_npm_package,
)
from terminai_shim.manifest import Artifact, BootDefaults, Manifest, RootfsLayers
from terminai_shim.verify import dev_trust_root

from .brain import build_brain
from .cache import write_atomic
from .ci import npm_version
from .client import pack_client
from .container import build_container
from .context import BuildContext
from .digest import sha256_bytes, sha256_file
from .errors import BuildError
from .kernel import build_kernel
from .provenance import SLSA_PROVENANCE
from .provenance import provenance as slsa_provenance
from .rootfs.kit import build_kit_wheel
from .rootfs.layer import build_layer
from .rootfs.project import build_rootfs
from .rootfs.stack import load_stack
from .sde import source_date_epoch
from .standalone import build_standalone, load_standalone
from .version import release_version

MIN_VALIDITY = 86400  # a manifest signed now must still be valid tomorrow
DAY = 86400
MEDIA = {
    "kernel": "application/vnd.terminai.kernel.vmlinux",
    "rootfs": "application/vnd.terminai.rootfs.{fmt}",
    "sbom": "application/spdx+json",
    "survival-kit-wheel": "application/vnd.python.wheel",
    "container-image": "application/vnd.oci.image.layout.v1+tar",
    "brain-bundle": "application/vnd.terminai.brain-bundle.v1+zip",
    "node-package": "application/vnd.npm.package.v1+tar+gzip",
    "shim-standalone": "application/vnd.terminai.shim-standalone.v1+tar+gzip",
    "shim-npm-package": "application/vnd.npm.package.v1+tar+gzip",
    "rootfs-layer": "application/vnd.terminai.rootfs-layer.squashfs",
    "layer-sbom": "application/spdx+json",
}


@dataclass(frozen=True)
class Release:
    directory: Path
    manifest: Manifest

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST


def _git_commit(repo: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise BuildError("cannot read the git commit", hint="build releases from a git checkout") from None


def _blob(release_dir: Path, source: Path) -> tuple[str, int]:
    digest = sha256_file(source)
    target = release_dir / "blobs" / "sha256" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        tmp = target.with_name(f".{digest}.tmp{os.getpid()}")
        shutil.copyfile(source, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    return digest, target.stat().st_size


def build_release(
    ctx: BuildContext,
    *,
    channel: str = "dev",
    serial: int | None = None,
    valid_days: int = 90,
    out: Path | None = None,
    shim_dists: tuple[Path, ...] = (),
) -> Release:
    """``shim_dists``: standalone shims built on other platforms' runners
    (`inv shim-dist` there); this machine's is built here."""
    version = release_version(ctx.repo)
    created = source_date_epoch(ctx.repo, ".")
    expires = created + valid_days * DAY
    if expires < time.time() + MIN_VALIDITY:  # the manifest dates from the commit, which may be old
        until, since = (
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(expires)),
            time.strftime("%Y-%m-%d", time.gmtime(created)),
        )
        raise BuildError(
            f"--valid-days {valid_days} makes the manifest expire at {until} UTC (it dates from the commit, "
            f"{since}): less than a day from now",
            hint="pass a --valid-days that reaches at least a day past today",
        )
    kern = build_kernel(ctx)
    root = build_rootfs(ctx)
    stack = load_stack(ctx.repo)
    layers = [build_layer(ctx, name) for name in stack.layers]
    wheel = build_kit_wheel(ctx)
    image = build_container(ctx)
    brain = build_brain(ctx)
    client = pack_client(ctx, version)
    shims = {shim.platform: shim for shim in map(load_standalone, shim_dists)}
    here = build_standalone(ctx)
    shims[here.platform] = here
    directory = (out or ctx.repo / "dist") / version
    directory.mkdir(parents=True, exist_ok=True)
    fmt = root.record["outputs"]["image"]["format"]
    sources: list[tuple[str, str, Path, dict[str, Any]] | tuple[str, str, Path, dict[str, Any], str]] = [
        ("kernel", "linux/amd64", kern.vmlinux, kern.record["inputs"]),
        ("rootfs", "linux/amd64", root.image, root.record["inputs"]),
        ("sbom", "linux/amd64", root.sbom, {"describes": root.image.name}),
        *(item for layer in layers for item in (
            ("rootfs-layer", "linux/amd64", layer.image, {**layer.record["inputs"], "packages":
                                                          layer.record["packages"]}, layer.name),
            ("layer-sbom", "linux/amd64", layer.sbom, {"describes": layer.image.name}, layer.name),
        )),
        ("survival-kit-wheel", "any", wheel, {"version": version}),
        ("container-image", "linux/amd64", image.archive,
         {**image.record["inputs"], "images": image.images}),
        ("brain-bundle", "windows", brain.zip, brain.record["inputs"]),
        ("node-package", "any", client, {"name": "@terminai/runtime", "version": npm_version(version)}),
    ]  # fmt: skip
    for platform in sorted(shims):
        shim = shims[platform]
        if shim.record["inputs"]["version"] != version:
            raise BuildError(f"the standalone shim for {platform} is version {shim.record['inputs']['version']}, "
                             f"the release is {version}", hint="build every platform from the same commit")  # fmt: skip
        built = {"platform": platform, **shim.record["outputs"]["folder"], "python": shim.record["inputs"]["python"]}
        sources += [
            ("shim-standalone", manifest_platform(platform), shim.archive, built),
            ("shim-npm-package", manifest_platform(platform), shim.npm_package,
             {"name": standalone_npm_package(platform), "version": npm_version(version)}),
        ]  # fmt: skip
    artifacts = []
    for kind, platform, path, build, *variant in sources:
        digest, size = _blob(directory, path)
        artifacts.append(
            Artifact(
                name=path.name,
                kind=kind,
                platform=platform,
                size=size,
                sha256=digest,
                media_type=MEDIA[kind].format(fmt=fmt),
                location=f"blobs/sha256/{digest}",
                build=build,
                variant=variant[0] if variant else "",
            )
        )
    manifest = Manifest(
        release=version,
        channel=channel,
        serial=serial if serial is not None else created,
        created=created,
        expires=expires,
        git_commit=_git_commit(ctx.repo),
        min_shim_version=shim_version,
        agent_protocol=agent_protocol.AGENT_PROTOCOL_VERSION,
        boot=BootDefaults(),
        artifacts=tuple(artifacts),
        rootfs=RootfsLayers(
            {n: spec.depends for n, spec in stack.layers.items()}, dict(stack.profiles), stack.default_profile
        ),
    )
    write_atomic(directory / MANIFEST, manifest.to_json())
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ctx.repo / "release/templates"), autoescape=False, keep_trailing_newline=True
    )
    notes = env.get_template("release-notes.md.j2").render(
        m=manifest, created=manifest.to_dict()["created"], expires=manifest.to_dict()["expires"]
    )
    write_atomic(directory / RELEASE_NOTES, notes.encode())
    ctx.reporter.done("release", f"release {version} ({channel}, serial {manifest.serial}) in {directory}")
    return Release(directory, manifest)


def keep_dev_trust_root(root: dict[str, Any], beside: Path) -> Path:
    """The local development Sigstore's trust root, where `terminai-shim --dev`
    reads it (the developer's own configuration), and a copy beside what was
    signed for people who pass it with --trusted-root. The shim never takes
    it from beside a release.

    The developer's file keeps every development identity it held (another
    checkout's development stack has its own keys): its logs and authorities
    are merged, not replaced, so signing in one checkout never breaks
    ``--dev`` for another's releases."""
    path = dev_trust_root()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:  # two checkouts signing at once merge both
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_atomic(path, json.dumps(merge_trust_roots(_read_json(path), root), indent=2).encode())
    write_atomic(beside / DEV_TRUSTED_ROOT, json.dumps(root, indent=2).encode())
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def merge_trust_roots(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with every log and authority of ``old`` that it lacks (same media type only)."""
    if old is None or old.get("mediaType") != new.get("mediaType"):
        return new
    merged = dict(new)
    for field in ("tlogs", "certificateAuthorities", "ctlogs", "timestampAuthorities"):
        entries = list(new.get(field, []))
        entries += [e for e in old.get(field, []) if e not in entries]
        merged[field] = entries
    return merged


def sign_release(ctx: BuildContext, rel: Release, *, keyless: bool = False, trust_config: Path | None = None) -> Path:
    """Sign manifest.json and its provenance; both verify before they are written.

    Keyless (CI): the ambient OIDC identity against ``trust_config``
    (Sigstore's public-good instance when not given). Otherwise the local
    development stack, whose trust root goes to the developer's own
    configuration (``terminai_shim.verify.dev_trust_root``, what ``--dev``
    trusts) and, as a copy, beside the manifest as ``dev-trusted-root.json``:
    never trusted unless a verifier is told to use that file.
    """
    from .signing.session import signer

    data = rel.manifest_path.read_bytes()
    with signer(ctx, keyless=keyless, trust_config=trust_config) as s:
        bundle = s.sign(data)
        subjects = {a.name: a.sha256 for a in rel.manifest.artifacts} | {MANIFEST: sha256_bytes(data)}
        provenance = s.attest(subjects, SLSA_PROVENANCE, slsa_provenance(ctx.repo, rel.manifest, keyless))
        # The brain bundle carries its own signature too: a Windows broker
        # verifies the zip it launches, not a Linux release manifest.
        brains = {a.name: s.sign((rel.directory / a.location).read_bytes())
                  for a in rel.manifest.artifacts if a.kind == "brain-bundle"}  # fmt: skip
    for name, signature in brains.items():
        write_atomic(rel.directory / f"{name}{BUNDLE_SUFFIX}", signature.encode())
    root_path = keep_dev_trust_root(s.dev_trusted_root, rel.directory) if s.dev_trusted_root is not None else None
    write_atomic(rel.directory / PROVENANCE, provenance.encode())
    out = rel.directory / MANIFEST_BUNDLE
    write_atomic(out, bundle.encode())
    ctx.reporter.done(
        "sign", f"signed {rel.manifest_path.name} ({s.kind})" + (f"; dev trust root {root_path}" if root_path else "")
    )
    return out
