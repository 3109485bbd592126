"""The provenance resolves: its source is the repository and commit the
build ran from, its builder the workflow that ran (or the documented local
builder), its build type a documented URI, and every pinned input (the
lockfiles, the kernel source and configuration, mkosi, what the root image
was assembled from) is named with the digest the build used."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from terminai_release.provenance import BUILD_TYPE, LOCAL_BUILDER, LOCKFILES, builder, repository
from terminai_release.provenance import provenance as slsa_provenance

REPO = Path(__file__).resolve().parents[1]
POLICY = json.loads((REPO / "shim/terminai_shim/trust/policy.json").read_text())
CI = {
    "GITHUB_SERVER_URL": "https://github.com",
    "GITHUB_REPOSITORY": "terminai/terminai-runtime",
    "GITHUB_REF": "refs/tags/v0.1.0",
    "GITHUB_WORKFLOW_REF": "terminai/terminai-runtime/.github/workflows/release.yml@refs/tags/v0.1.0",
    "GITHUB_RUN_ID": "123",
    "GITHUB_RUN_ATTEMPT": "2",
}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "--allow-empty", "-m", "x")
    return repo


@pytest.mark.unit
def test_the_source_is_where_the_build_came_from_never_the_folder_name(checkout):
    assert repository(checkout, CI) == ("https://github.com/terminai/terminai-runtime", "refs/tags/v0.1.0")
    url, ref = repository(checkout, {})
    assert url == checkout.resolve().as_uri() and ref == "refs/heads/main", "no remote: the checkout itself"
    for remote, https in [("git@github.com:someone/fork.git", "https://github.com/someone/fork"),
                          ("ssh://git@github.com/someone/fork.git", "https://github.com/someone/fork"),
                          ("https://github.com/someone/fork.git", "https://github.com/someone/fork"),
                          ("/srv/mirror/runtime", "file:///srv/mirror/runtime")]:  # fmt: skip
        subprocess.run(["git", "-C", str(checkout), "remote", "remove", "origin"], capture_output=True)
        _git(checkout, "remote", "add", "origin", remote)
        assert repository(checkout, {})[0] == https, remote
    _git(checkout, "checkout", "-q", "--detach")
    assert repository(checkout, {})[1] is None, "a detached head names no ref: the commit says it all"


@pytest.mark.unit
def test_the_builder_is_the_workflow_that_signs_or_the_documented_local_builder():
    ci = builder(CI, keyless=True)["id"]
    assert ci == "https://github.com/terminai/terminai-runtime/.github/workflows/release.yml@refs/tags/v0.1.0"
    assert re.fullmatch(POLICY["channels"]["stable"]["identityPattern"], ci), "the builder is the pinned signer"
    assert builder(CI, keyless=False)["id"] == LOCAL_BUILDER, "a local signature vouches for the machine only"
    assert builder({}, keyless=True)["id"] == LOCAL_BUILDER
    docs = (REPO / "docs/manifest.md").read_text()
    for uri in (BUILD_TYPE, LOCAL_BUILDER):
        page, anchor = uri.split("#")
        assert page.endswith("/blob/main/docs/manifest.md") and f'<a id="{anchor}"></a>' in docs, uri


@pytest.fixture(scope="module")
def signed_release(ctx, tmp_path_factory):
    from terminai_release.release import build_release, sign_release

    rel = build_release(ctx, channel="dev", out=tmp_path_factory.mktemp("dist"))
    sign_release(ctx, rel)
    return rel


@pytest.mark.build
def test_every_dependency_of_a_real_release_is_the_one_its_build_used(ctx, signed_release):
    import tomllib

    from terminai_release.digest import sha256_file
    from terminai_release.signing.devstack import DEFAULT_IDENTITY, ISSUER
    from terminai_release.signing.sign import verify_statement

    rel = signed_release
    statement = verify_statement((rel.directory / "provenance.sigstore.json").read_text(),
                                 rel.directory / "dev-trusted-root.json", DEFAULT_IDENTITY, ISSUER)  # fmt: skip
    predicate = statement["predicate"]
    assert predicate == json.loads(json.dumps(slsa_provenance(ctx.repo, rel.manifest, keyless=False)))
    definition = predicate["buildDefinition"]
    assert definition["buildType"] == BUILD_TYPE and predicate["runDetails"]["builder"]["id"] == LOCAL_BUILDER
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert all(d["digest"] and all(d["digest"].values()) for d in deps.values()), "every input has its digest"

    commit = _git(ctx.repo, "rev-parse", "HEAD")
    url = definition["externalParameters"]["source"]["uri"]
    assert deps["source"]["digest"] == {"gitCommit": commit} == {"gitCommit": rel.manifest.git_commit}
    assert deps["source"]["uri"].startswith(f"git+{url}@") and not url.startswith(f"git+{ctx.repo.name}")
    for path in LOCKFILES:
        assert deps[path]["digest"]["sha256"] == sha256_file(ctx.repo / path), path
        assert deps[path]["uri"] == f"git+{url}@{commit}#{path}"

    source = tomllib.loads((ctx.repo / "kernel-config/source.toml").read_text())
    assert deps["kernel-source"]["digest"]["sha256"] == source["sha256"]
    assert deps["kernel-source"]["uri"] == f"pkg:deb/debian/{source['package']}@{source['version']}?arch=all"
    config = ctx.repo / "kernel-config"
    fragments = sorted(config.glob("fragments/*.conf")) + sorted(config.glob("arch/*.conf"))
    for fragment in fragments:
        name = f"kernel-config/{fragment.relative_to(config)}"
        assert deps[name]["digest"]["sha256"] == sha256_file(fragment), name
        assert deps[name]["uri"] == f"git+{url}@{commit}#{name}"
    mkosi = tomllib.loads((ctx.repo / "images/rootfs/mkosi.toml").read_text())["mkosi"]
    assert deps["mkosi"]["digest"]["sha256"] == mkosi["sha256"]

    from terminai_release.rootfs.base import build_base
    from terminai_release.rootfs.kit import build_kit_wheel

    assert deps["rootfs-base"]["digest"]["sha256"] == build_base(ctx).key
    assert deps["rootfs-kit"]["digest"]["sha256"] == sha256_file(build_kit_wheel(ctx))
