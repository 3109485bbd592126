"""The release's SLSA v1 provenance: what was built, by which builder, from
which inputs, each named so that someone else can fetch it and check its
digest. The build type and the local builder are documented in
docs/manifest.md ("Provenance"): their URIs point there.

Nothing here guesses: the source is the repository the build ran from (CI's
repository, else the checkout's ``origin``, else the checkout itself as a
``file://`` URL) at the commit it ran from; the builder is the workflow
that ran (the same identity that signs, keylessly) or the local builder."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from terminai_shim.manifest import Manifest

from .digest import sha256_file
from .rootfs.mkosi import load_pin

SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
UPSTREAM = "https://github.com/terminai/terminai-runtime"
BUILD_TYPE = f"{UPSTREAM}/blob/main/docs/manifest.md#build-type-release-v1"
LOCAL_BUILDER = f"{UPSTREAM}/blob/main/docs/manifest.md#builder-local-v1"
# The lockfiles that pin every tool and package a release is built with.
LOCKFILES = (
    "requirements.lock",  # the pipeline's Python tooling (sigstore, mkosi's driver, boto3, ...)
    "shim/requirements.lock",  # what the standalone shim freezes
    "clients/node/package-lock.json",  # the client's compiler and type definitions
    "release/npm/package-lock.json",  # the npm that publishes
)


def _git(repo: Path, *args: str) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _https(url: str) -> str:
    """``git@host:owner/name.git`` and ``ssh://git@host/owner/name`` as the https URL they name."""
    scp = re.fullmatch(r"[\w.-]+@([\w.-]+):(.+?)(\.git)?", url)
    if scp:
        return f"https://{scp.group(1)}/{scp.group(2)}"
    ssh = re.fullmatch(r"ssh://[\w.-]+@([\w.-]+)(?::\d+)?/(.+?)(\.git)?", url)
    if ssh:
        return f"https://{ssh.group(1)}/{ssh.group(2)}"
    if url.startswith("/"):
        return Path(url).as_uri()
    return url.removesuffix(".git")


def repository(repo: Path, env: Mapping[str, str]) -> tuple[str, str | None]:
    """The repository URL a build came from, and the ref it built."""
    if env.get("GITHUB_SERVER_URL") and env.get("GITHUB_REPOSITORY"):
        return f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_REPOSITORY']}", env.get("GITHUB_REF")
    origin = _git(repo, "remote", "get-url", "origin")
    url = _https(origin) if origin else repo.resolve().as_uri()
    return url, _git(repo, "symbolic-ref", "-q", "HEAD")


def builder(env: Mapping[str, str], keyless: bool) -> dict[str, Any]:
    """The workflow that ran (as GitHub's OIDC names it, the signer), or this machine's ``inv release``."""
    if keyless and env.get("GITHUB_SERVER_URL") and env.get("GITHUB_WORKFLOW_REF"):
        return {"id": f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_WORKFLOW_REF']}"}
    return {"id": LOCAL_BUILDER}


def _invocation(env: Mapping[str, str]) -> dict[str, str]:
    if env.get("GITHUB_SERVER_URL") and env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        run = f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
        return {"invocationId": f"{run}/attempts/{env.get('GITHUB_RUN_ATTEMPT', '1')}"}
    return {}


def _deb(package: str, version: str, arch: str = "all") -> str:
    return f"pkg:deb/debian/{package}@{version}?arch={arch}"


def dependencies(repo: Path, m: Manifest, url: str, ref: str | None) -> list[dict[str, Any]]:
    """Every pinned input, by digest: the source, the lockfiles, the kernel
    source and configuration, mkosi, and what the root image was made of."""
    at = f"git+{url}@{m.git_commit}"
    deps: list[dict[str, Any]] = [
        {"uri": f"git+{url}@{ref}" if ref else at, "digest": {"gitCommit": m.git_commit}, "name": "source"}
    ]
    deps += [
        {"name": path, "uri": f"{at}#{path}", "digest": {"sha256": sha256_file(repo / path)}}
        for path in LOCKFILES
        if (repo / path).is_file()
    ]
    kernel = m.artifact("kernel").build
    source = kernel.get("source") or {}
    if source:
        uri = (
            _deb(source["package"], source["version"]) if source.get("kind") == "debian-package" else source.get("url")
        )
        tarball = "the source tarball (a Debian package's, as it installs it)"
        deps.append({"name": "kernel-source", "uri": uri, "digest": {"sha256": source.get("sha256")},
                     "annotations": {"kernelVersion": source.get("kernel_version"), "what": tarball}})  # fmt: skip
    deps += [
        {"name": f"kernel-config/{name}", "uri": f"{at}#kernel-config/{name}", "digest": {"sha256": digest}}
        for name, digest in kernel.get("fragments", [])
    ]
    mkosi = load_pin(repo / "images/rootfs/mkosi.toml")
    deps.append({"name": "mkosi", "uri": _deb(mkosi.package, mkosi.version), "digest": {"sha256": mkosi.sha256}})
    rootfs = m.artifact("rootfs").build
    what = {"base": "the Debian base tree's cache key", "kit": "the survival kit wheel",
            "agent": "the guest agent's packages", "project": "images/rootfs/project"}  # fmt: skip
    deps += [
        {"name": f"rootfs-{k}", "digest": {"sha256": rootfs[k]}, "annotations": {"what": what[k]}}
        for k in what
        if k in rootfs
    ]
    return deps


def provenance(repo: Path, m: Manifest, keyless: bool, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SLSA v1 predicate the release's attestation carries."""
    env = os.environ if env is None else env
    url, ref = repository(repo, env)
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "release": m.release,
                "channel": m.channel,
                "serial": m.serial,
                "source": {"uri": url, "ref": ref},
            },
            "internalParameters": {"sourceDateEpoch": m.created},
            "resolvedDependencies": dependencies(repo, m, url, ref),
        },
        "runDetails": {"builder": builder(env, keyless), "metadata": _invocation(env)},
    }
