"""The CI release workflow and the signer identities the shim pins must agree:
every ref the workflow publishes from signs with an identity that the
pinned policy accepts for exactly the channel that ref publishes to."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from terminai_release.ci import plan, set_version
from terminai_release.errors import BuildError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "release/github/release.yml"
POLICY = json.loads((REPO / "shim/terminai_shim/trust/policy.json").read_text())


def _workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return doc


def _identity(ref: str) -> str:
    """The SAN GitHub's OIDC issuer gives this workflow's run for ``ref``."""
    repo = re.search(r"github\.repository == '([^']+)'", WORKFLOW.read_text())
    assert repo, "the workflow must be guarded to run only in the upstream repository"
    return f"https://github.com/{repo.group(1)}/.github/workflows/{WORKFLOW.name}@{ref}"


@pytest.mark.parametrize(
    "ref, channel",
    [("refs/heads/main", "dev"), ("refs/tags/v0.1.0", "stable"), ("refs/tags/v0.1.0-rc.1", "beta"),
     ("refs/tags/v0.1.0-beta.12", "beta")],
)  # fmt: skip
def test_each_ref_signs_only_for_its_own_channel(ref, channel):
    assert plan(ref, "0.1.0", 1700000000).channel == channel
    identity = _identity(ref)
    for name, rule in POLICY["channels"].items():
        matches = re.fullmatch(rule["identityPattern"], identity) is not None
        assert matches == (name == channel), f"{identity} vs channel {name}"


def test_refs_that_publish_nothing_and_tags_for_another_version_are_refused():
    for ref in ("refs/heads/feature", "refs/tags/v0.1", "refs/tags/0.1.0", "refs/pull/1/merge"):
        with pytest.raises(BuildError):
            plan(ref, "0.1.0", 1)
    with pytest.raises(BuildError, match="does not match the project version"):
        plan("refs/tags/v0.2.0", "0.1.0", 1)
    assert plan("refs/heads/main", "0.1.0", 42).version == "0.1.0.dev42"


def test_workflow_signs_keylessly_publishes_and_smoke_tests_with_the_pinned_policy():
    doc = _workflow()
    assert POLICY["issuer"] == "https://token.actions.githubusercontent.com"
    assert doc["on"]["push"]["branches"] == ["main"] and doc["on"]["push"]["tags"] == ["v*"]
    assert doc["permissions"] == {"contents": "read"}  # least privilege by default
    release = doc["jobs"]["release"]
    assert release["permissions"]["id-token"] == "write"
    runs = "\n".join(step.get("run", "") for step in release["steps"])
    assert "terminai_release.ci plan" in runs and "inv set-version" in runs
    assert re.search(r"inv release --keyless --channel", runs)
    assert re.search(r"inv publish --keyless", runs)
    assert "terminai-shim verify" in runs and "--dev" not in runs and "--trusted-root" not in runs
    assert "aws-token" in runs and release["env"]["AWS_WEB_IDENTITY_TOKEN_FILE"]
    assert "${{ secrets." not in WORKFLOW.read_text()  # short-lived credentials only
    for job in doc["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                assert re.search(r"@[0-9a-f]{40}$", step["uses"]), f"{step['uses']} is not pinned by commit"
    npm = next(step for step in release["steps"] if "npm publish" in step.get("run", ""))
    assert npm["if"] == "startsWith(github.ref, 'refs/tags/v')" and "--provenance" in npm["run"]
    assert "ci npm-package" in npm["run"], "npm gets the tarball the signed manifest lists"
    promote = doc["jobs"]["promote"]
    assert "channel=stable" in "\n".join(step.get("run", "") for step in promote["steps"])


def test_set_version_changes_every_version_line_together(tmp_path):
    import json

    from terminai_release.ci import NPM_VERSION_FILES, VERSION_FILES

    names = [name for name, _ in VERSION_FILES] + [name for name, _, _ in NPM_VERSION_FILES]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    assert len(set_version(tmp_path, "0.1.0.dev7")) == len(names)
    for name, pattern in VERSION_FILES:
        assert pattern.search((tmp_path / name).read_text()).group(0).endswith('0.1.0.dev7"')
    package = json.loads((tmp_path / "clients/node/package.json").read_text())
    lock = json.loads((tmp_path / "clients/node/package-lock.json").read_text())
    assert package["version"] == lock["version"] == lock["packages"][""]["version"] == "0.1.0-dev.7"  # npm's spelling
    assert lock["packages"]["node_modules/typescript"]["version"] != "0.1.0-dev.7", "dependencies are left alone"
    with pytest.raises(BuildError):
        set_version(tmp_path, "latest")


def test_every_platforms_standalone_shim_is_built_signed_in_published_and_smoke_tested():
    """linux-x64 is built and tested by `inv test` in the release job; the other
    platforms are built and smoke-tested on their own runners only (this machine
    cannot run them), then signed into the same manifest and published to npm."""
    from terminai_shim.layout import STANDALONE_PLATFORMS

    doc = _workflow()
    jobs = doc["jobs"]
    others = sorted(set(STANDALONE_PLATFORMS) - {"linux-x64"})
    for name in ("shim-dist", "shim-smoke"):
        assert sorted(m["platform"] for m in jobs[name]["strategy"]["matrix"]["include"]) == others, name
    dist = "\n".join(step.get("run", "") for step in jobs["shim-dist"]["steps"])
    assert "python -m terminai_release.standalone" in dist and "--version --json" in dist and "doctor" in dist
    release = jobs["release"]
    assert release["needs"] == "shim-dist"
    runs = "\n".join(step.get("run", "") for step in release["steps"])
    assert re.search(r"inv release --keyless .*\n?.*--shim-dists build/other-shims", runs)
    npm = next(step for step in release["steps"] if "--kind shim-npm-package" in step.get("run", ""))
    assert npm["if"] == "startsWith(github.ref, 'refs/tags/v')" and "--provenance" in npm["run"]
    smoke = "\n".join(step.get("run", "") for step in jobs["shim-smoke"]["steps"])
    assert jobs["shim-smoke"]["needs"] == "release" and "verify release" in smoke and "--dev" not in smoke


NPM_TOOL = REPO / "release/npm"
TRUSTED_PUBLISHING_NPM = (11, 5, 1)  # the first npm that publishes with the workflow's OIDC identity, no token


def _steps(doc: dict) -> list[tuple[str, dict]]:
    return [(name, step) for name, job in doc["jobs"].items() for step in job["steps"]]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)\.(\d+)", text).groups())


def test_the_workflow_is_clean_under_zizmor_as_an_auditor():
    """zizmor from the hash-locked toolchain, offline, with the persona that
    reports everything (false positives included): nothing may be found."""
    import subprocess
    import sys

    zizmor = Path(sys.executable).with_name("zizmor")
    done = subprocess.run([str(zizmor), "--persona", "auditor", "--offline", "--no-progress", "--format", "json",
                           str(WORKFLOW)], capture_output=True, text=True, timeout=120)  # fmt: skip
    findings = json.loads(done.stdout or "[]")
    assert not findings, [(f["ident"], f["locations"][0]["symbolic"]["annotation"]) for f in findings]
    assert done.returncode == 0, done.stderr[-2000:]


def test_images_are_pinned_by_digest_and_checkouts_keep_no_token():
    doc = _workflow()
    images = {job["container"]["image"] for job in doc["jobs"].values() if "container" in job}
    assert len(images) == 1, f"every job builds in the same image: {images}"
    assert re.fullmatch(r"debian:12@sha256:[0-9a-f]{64}", images.pop())
    checkouts = [step for _, step in _steps(doc) if step.get("uses", "").startswith("actions/checkout@")]
    assert checkouts and all(step["with"]["persist-credentials"] is False for step in checkouts)
    for name, step in _steps(doc):
        assert "${{" not in step.get("run", ""), f"{name}: {step.get('name')} pastes an expression into its script"


def test_npm_publishes_with_a_pinned_npm_that_can_on_a_node_it_supports():
    """Debian 12's npm (9.2) has neither --provenance (9.5) nor trusted
    publishing (11.5.1): the workflow installs the npm release/npm's
    lockfile pins, by integrity, and publishes with that one only."""
    lock = json.loads((NPM_TOOL / "package-lock.json").read_text())
    npm = lock["packages"]["node_modules/npm"]
    assert _version(npm["version"]) >= TRUSTED_PUBLISHING_NPM
    assert npm["integrity"].startswith("sha512-")
    assert json.loads((NPM_TOOL / "package.json").read_text())["devDependencies"]["npm"] == npm["version"]

    steps = _workflow()["jobs"]["release"]["steps"]
    node = next(i for i, s in enumerate(steps) if s.get("uses", "").startswith("actions/setup-node@"))
    install = next(i for i, s in enumerate(steps) if "npm ci --prefix release/npm" in s.get("run", ""))
    publishes = [i for i, s in enumerate(steps) if "npm publish" in s.get("run", "")]
    assert publishes and node < install < min(publishes)
    for i in publishes:
        run = steps[i]["run"]
        assert run.count("npm publish") == run.count("release/npm/node_modules/.bin/npm publish"), run
        assert "--provenance" in run
    node_version = _version(steps[node]["with"]["node-version"])
    engines = npm["engines"]["node"]
    allowed = [re.match(r"(\^|>=)(\d+\.\d+\.\d+)$", part.strip()).groups() for part in engines.split("||")]
    assert any(node_version >= _version(low) and (op == ">=" or node_version[0] == _version(low)[0])
               for op, low in allowed), f"node {node_version} is outside npm's engines {engines}"  # fmt: skip


@pytest.mark.build
def test_the_pinned_npm_installs_from_its_lockfile_and_would_publish_the_package_with_provenance(ctx, tmp_path):
    """The workflow's two npm steps, here: `npm ci` of release/npm, then a
    dry run of publishing the packed @terminai/runtime with that npm (no
    registry account is involved in a dry run)."""
    import subprocess

    from terminai_release.client import pack_client
    from terminai_release.release import release_version

    tool = tmp_path / "npm"
    tool.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(NPM_TOOL / name, tool / name)
    subprocess.run(["npm", "ci", "--prefix", str(tool), "--ignore-scripts", "--no-audit", "--no-fund"], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    npm = tool / "node_modules/.bin/npm"
    pinned = json.loads((NPM_TOOL / "package.json").read_text())["devDependencies"]["npm"]
    assert subprocess.run([str(npm), "--version"], capture_output=True, text=True).stdout.strip() == pinned
    tarball = pack_client(ctx, release_version(ctx.repo))
    done = subprocess.run([str(npm), "publish", str(tarball), "--dry-run", "--provenance", "--access", "public",
                           "--tag", "next"], capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "+ @terminai/runtime@" in done.stdout
