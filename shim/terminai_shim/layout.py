"""Release layout: the names of a release's files, the keys of a store, and
their media types. The pipeline writes these names and the shim reads them;
both import them from here, so a name is defined once.

One layout for every store (S3, a CDN in front of it, a ``file://`` mirror)::

    blobs/sha256/<digest>                   every artifact, immutable
    releases/<version>/manifest.json        + manifest.json.sigstore.json, provenance, notes
    channels/<channel>.json                 the pointer; its bundle at channels/bundles/<sha256 of it>

A release directory written by ``inv release`` is a one-release store whose
manifest sits at its root; artifact locations are relative to the store root.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
BUNDLE_SUFFIX = ".sigstore.json"  # a sigstore bundle sits beside what it signs
MANIFEST_BUNDLE = MANIFEST + BUNDLE_SUFFIX
PROVENANCE = "provenance.sigstore.json"
RELEASE_NOTES = "RELEASE-NOTES.md"
# The local development Sigstore's trust root: written by `inv release` into
# the developer's configuration (and, as a copy for people, beside the
# release). The shim reads it only from the developer's configuration.
DEV_TRUSTED_ROOT = "dev-trusted-root.json"

MANIFEST_MEDIA_TYPE = "application/vnd.terminai.manifest.v1+json"
CHANNEL_MEDIA_TYPE = "application/vnd.terminai.channel.v1+json"
SIGSTORE_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
NOTES_MEDIA_TYPE = "text/markdown; charset=utf-8"


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


def release_key(version: str, name: str = MANIFEST) -> str:
    return f"releases/{version}/{name}"


def channel_key(channel: str) -> str:
    return f"channels/{channel}.json"


def pointer_bundle_key(pointer_sha256: str) -> str:
    """A pointer's sigstore bundle, named by the pointer's digest: written
    before the pointer itself, so swapping the pointer is one atomic write
    and an interrupted publish never leaves a pointer without its bundle."""
    return f"channels/bundles/{pointer_sha256}{BUNDLE_SUFFIX}"


# The standalone shim (`inv shim-dist`): the record of its build, inside its
# `_internal/` folder, and the release archive of the folder for each platform.
STANDALONE_BUILD_INFO = "terminai-shim-build.json"
# Every platform a standalone shim is built for (release/github/release.yml
# builds each on its own runner), in Node's spelling; each has its npm package.
STANDALONE_PLATFORMS = ("linux-x64", "linux-arm64", "darwin-arm64", "darwin-x64", "win32-x64")
_NODE_OS = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}
_NODE_CPU = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}


def standalone_platform(system: str | None = None, machine: str | None = None) -> str:
    """This machine in Node's spelling (``process.platform-process.arch``),
    which names the per-platform npm package: ``linux-x64``, ``win32-x64``."""
    import platform

    system, machine = system or platform.system(), (machine or platform.machine()).lower()
    return f"{_NODE_OS.get(system, system.lower())}-{_NODE_CPU.get(machine, machine)}"


def standalone_archive_name(version: str, platform: str) -> str:
    return f"terminai-shim-{version}-{platform}.tar.gz"


def standalone_npm_package(platform: str) -> str:
    """The per-platform npm package (an optional dependency of @terminai/runtime)."""
    return f"@terminai/shim-{platform}"


def manifest_platform(platform: str) -> str:
    """A standalone platform (``linux-x64``) as the manifest spells platforms (``linux/amd64``)."""
    system, cpu = platform.split("-", 1)
    return f"{'windows' if system == 'win32' else system}/{'amd64' if cpu == 'x64' else cpu}"


# A developer's build outputs: `inv kernel rootfs layers container` point
# `build/<output>` (in the checkout) at their cache entries, each holding its
# files and a build record; the shim takes what it was not given from there.
BUILD_DIR = "build"
BUILD_RECORD = "build-record.json"
KERNEL_OUTPUT, ROOTFS_OUTPUT, CONTAINER_OUTPUT = "kernel", "rootfs", "container"
ROOTFS_FORMATS = ("squashfs", "erofs")


def layer_output(name: str) -> str:
    return f"layer-{name}"


def kernel_file(name: str) -> str:
    """``vmlinux-<arch>-<version>``: the kernel QEMU boots directly (PVH)."""
    return f"vmlinux-{name}"


def rootfs_file(version: str, fmt: str) -> str:
    return f"rootfs-{version}.{fmt}"


def layer_file(name: str, version: str) -> str:
    return f"layer-{name}-{version}.squashfs"


def container_archive(version: str) -> str:
    return f"terminai-runtime-{version}.oci.tar"


KERNEL_GLOB = kernel_file("*")
ROOTFS_GLOBS = tuple(rootfs_file("*", fmt) for fmt in ROOTFS_FORMATS)
CONTAINER_GLOB = container_archive("*")

__all__ = [
    "BUILD_DIR",
    "BUILD_RECORD",
    "BUNDLE_SUFFIX",
    "CHANNEL_MEDIA_TYPE",
    "CONTAINER_GLOB",
    "CONTAINER_OUTPUT",
    "DEV_TRUSTED_ROOT",
    "KERNEL_GLOB",
    "KERNEL_OUTPUT",
    "MANIFEST",
    "MANIFEST_BUNDLE",
    "MANIFEST_MEDIA_TYPE",
    "NOTES_MEDIA_TYPE",
    "PROVENANCE",
    "RELEASE_NOTES",
    "ROOTFS_FORMATS",
    "ROOTFS_GLOBS",
    "ROOTFS_OUTPUT",
    "SIGSTORE_BUNDLE_MEDIA_TYPE",
    "STANDALONE_BUILD_INFO",
    "STANDALONE_PLATFORMS",
    "blob_key",
    "channel_key",
    "container_archive",
    "kernel_file",
    "layer_file",
    "layer_output",
    "manifest_platform",
    "pointer_bundle_key",
    "release_key",
    "rootfs_file",
    "standalone_archive_name",
    "standalone_npm_package",
    "standalone_platform",
]
