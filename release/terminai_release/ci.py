"""What the release workflow (release/github/release.yml) asks the pipeline.

``plan``: which channel and version a git ref publishes. The shim pins one
signer identity per channel (shim/terminai_shim/trust/policy.json); this
mapping must send every ref only to the channel whose identity that ref's
workflow run signs with (tests/test_workflow.py checks both agree).

``aws-token``: CI's OIDC token for AWS (audience sts.amazonaws.com),
written 0600 where boto3's web-identity provider reads it
(``AWS_WEB_IDENTITY_TOKEN_FILE`` with ``AWS_ROLE_ARN``): short-lived
credentials, no stored secrets. The token is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .sde import source_date_epoch
from .version import release_version

STABLE = re.compile(r"^refs/tags/v(\d+\.\d+\.\d+)$")
BETA = re.compile(r"^refs/tags/v(\d+\.\d+\.\d+-(?:beta|rc)\.\d+)$")
MAIN = "refs/heads/main"


@dataclass(frozen=True)
class Plan:
    channel: str
    version: str


def plan(ref: str, base_version: str, source_date: int) -> Plan:
    """Tags vX.Y.Z publish to stable, vX.Y.Z-beta.N / -rc.N to beta, main to dev
    (as X.Y.Z.dev<source date>, so every commit is a distinct version)."""
    for pattern, channel in ((STABLE, "stable"), (BETA, "beta")):
        match = pattern.match(ref)
        if match:
            version = match.group(1)
            if version.split("-")[0] != base_version:
                raise BuildError(
                    f"tag {ref} does not match the project version {base_version}",
                    hint="bump the version in pyproject.toml (inv set-version) and tag that commit",
                )
            return Plan(channel, version)
    if ref == MAIN:
        return Plan("dev", f"{base_version}.dev{source_date}")
    raise BuildError(f"{ref} does not publish a release", hint="releases come from main and from v* tags")


VERSION_FILES = (
    ("pyproject.toml", re.compile(r'^(version = ")[^"]*(")', re.M)),
    ("images/survival-kit/terminai_apts/__init__.py", re.compile(r'^(__version__ = ")[^"]*(")', re.M)),
    ("images/agent/terminai_agent/__init__.py", re.compile(r'^(__version__ = ")[^"]*(")', re.M)),
    ("shim/terminai_shim/__init__.py", re.compile(r'^(__version__ = ")[^"]*(")', re.M)),
)


# The CLI's package says the same version in npm's (semver) spelling: in its
# package.json, and twice in its lockfile (the root and its own entry).
NPM_VERSION_FILES = (
    ("clients/node/package.json", re.compile(r'^(  "version": ")[^"]*(")', re.M), 1),
    ("clients/node/package-lock.json", re.compile(r'^(  "version": "|      "version": ")[^"]*(")', re.M), 2),
)


def npm_version(version: str) -> str:
    """X.Y.Z.devN (PEP 440) is X.Y.Z-dev.N for npm; X.Y.Z and X.Y.Z-rc.N are the same in both."""
    return re.sub(r"\.dev(\d+)$", r"-dev.\1", version)


def set_version(repo: Path, version: str) -> list[Path]:
    """One version for the runtime, the agent, the shim, the kit and the CLI's package."""
    if not re.match(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$", version):
        raise BuildError(f"{version!r} is not a release version", hint="use X.Y.Z, X.Y.Z-rc.N or X.Y.Z.devN")
    files = [(name, pattern, 1, version) for name, pattern in VERSION_FILES]
    files += [(name, pattern, count, npm_version(version)) for name, pattern, count in NPM_VERSION_FILES]
    changed = []
    for name, pattern, expected, value in files:
        path = repo / name
        text = path.read_text()
        new, count = pattern.subn(lambda m, v=value: f"{m.group(1)}{v}{m.group(2)}", text, count=expected)
        if count != expected:
            raise BuildError(f"no version line in {name}")
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def npm_package(release: Path) -> Path:
    """The ``node-package`` blob of a signed release directory, after its size
    and sha256 were checked against the manifest: what npm publishes is what
    the release signed."""
    (path,) = npm_packages(release, "node-package")
    return path


def npm_packages(release: Path, kind: str) -> list[Path]:
    """Every npm package of a kind (``shim-npm-package``: one per platform), checked the same way,
    as a copy under ``<release>/npm/`` named as npm packed it: npm takes a path for
    a tarball only when it ends in .tgz, and a blob is named by its digest."""
    from terminai_shim.layout import MANIFEST
    from terminai_shim.manifest import Manifest, ManifestError

    from .digest import sha256_file

    try:
        manifest = Manifest.from_json((release / MANIFEST).read_bytes())
        artifacts = [a for a in manifest.artifacts if a.kind == kind] or [manifest.artifact(kind)]
    except (OSError, ManifestError) as exc:
        raise BuildError(f"no npm package in {release}: {exc}", hint="build the release with `inv release`") from None
    paths = []
    for artifact in artifacts:
        blob, copy = release / artifact.location, release / "npm" / artifact.name
        copy.parent.mkdir(exist_ok=True)
        tmp = copy.with_name(f".{copy.name}.tmp{os.getpid()}")
        try:  # the copy is what gets checked, and what npm reads
            shutil.copyfile(blob, tmp)
            if tmp.stat().st_size != artifact.size or sha256_file(tmp) != artifact.sha256:
                raise OSError("its size or sha256 differs")
        except OSError:
            tmp.unlink(missing_ok=True)
            raise BuildError(
                f"{blob} is not the npm package the manifest lists", hint="build the release again"
            ) from None
        os.replace(tmp, copy)
        paths.append(copy)
    return paths


def write_aws_token(out: Path) -> None:
    url = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
    bearer = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not url or not bearer:
        raise BuildError("no OIDC token endpoint", hint="the workflow job needs `permissions: id-token: write`")
    sep = "&" if "?" in url else "?"
    request = urllib.request.Request(f"{url}{sep}audience={urllib.parse.quote('sts.amazonaws.com')}",
                                     headers={"Authorization": f"Bearer {bearer}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as resp:
        token = json.load(resp)["value"]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def main(argv: list[str] | None = None) -> int:
    from .context import repo_root

    parser = argparse.ArgumentParser(prog="python -m terminai_release.ci")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="channel and version for a git ref, as GITHUB_OUTPUT lines")
    p.add_argument("--ref", required=True)
    n = sub.add_parser("npm-package", help="the path of a release's npm package, checked against its manifest")
    n.add_argument("--release", type=Path, required=True)
    n.add_argument("--kind", default="node-package", choices=("node-package", "shim-npm-package"),
                   help="shim-npm-package: every platform's standalone shim package, one path a line")  # fmt: skip
    v = sub.add_parser("set-version", help="`inv set-version` for runners without the project's tools")
    v.add_argument("version")
    t = sub.add_parser("aws-token", help="write CI's OIDC token for AWS web-identity role assumption")
    t.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "plan":
            repo = repo_root()
            result = plan(args.ref, release_version(repo).split(".dev")[0], source_date_epoch(repo, "."))
            print(f"channel={result.channel}\nversion={result.version}")
        elif args.cmd == "set-version":
            for path in set_version(repo_root(), args.version):
                print(f"set {args.version} in {path}")
        elif args.cmd == "npm-package":
            print(*npm_packages(args.release, args.kind), sep="\n")
        else:
            write_aws_token(args.out)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
