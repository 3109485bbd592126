"""The release manifest: its schema, its reader, and `inv release`."""

from __future__ import annotations

import hashlib
import json
import time

import jsonschema
import pytest
from conftest import REPO
from terminai_shim.manifest import (
    Artifact,
    BootDefaults,
    Manifest,
    ManifestError,
    ManifestExpired,
    NeedsNewerShim,
    UnsupportedSchema,
)

SCHEMA = json.loads((REPO / "manifests/manifest.schema.json").read_text())
SHA = "a" * 64


def _manifest(**kw):
    fields = dict(
        release="1.2.3", channel="beta", serial=7, created=1_700_000_000, expires=1_700_000_000 + 86400,
        git_commit="0123abc", min_shim_version="0.1.0", agent_protocol=1, boot=BootDefaults(("quiet",)),
        artifacts=(Artifact("vmlinux-x", "kernel", "linux/amd64", 10, SHA, "application/x", f"blobs/sha256/{SHA}",
                            {"inputs": 1}),),
    )  # fmt: skip
    fields.update(kw)
    return Manifest(**fields)


@pytest.mark.unit
def test_roundtrip_and_schema():
    m = _manifest()
    data = m.to_json()
    jsonschema.validate(json.loads(data), SCHEMA)
    assert Manifest.from_json(data) == m
    assert data == Manifest.from_json(data).to_json(), "writing is deterministic"
    assert m.artifact("kernel").sha256 == SHA
    with pytest.raises(ManifestError, match="0 artifacts of kind 'rootfs'"):
        m.artifact("rootfs")


def _doc(**changes):
    doc = json.loads(_manifest().to_json())
    for path, value in changes.items():
        target = doc
        *parents, last = path.split(".")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return json.dumps(doc).encode()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"schemaVersion": 2}, UnsupportedSchema, "schema version 2 is not supported"),
        ({"mediaType": "text/plain"}, ManifestError, "mediaType"),
        ({"serial": -1}, ManifestError, "'serial'"),
        ({"created": "yesterday"}, ManifestError, "'created' is not a UTC time"),
        ({"artifacts.0.sha256": "XYZ"}, ManifestError, "'sha256' is not valid"),
        ({"artifacts.0.location": "elsewhere"}, ManifestError, "location must be blobs/sha256"),
        ({"artifacts.0.kind": "virus"}, ManifestError, "kind 'virus'"),
        ({"compatibility": None}, ManifestError, "'compatibility'"),
        ({"expires": "2000-01-01T00:00:00Z"}, ManifestError, "expires before it was created"),
    ],
)
def test_bad_manifests_are_named(changes, error, message):
    data = _doc(**changes)
    with pytest.raises(error, match=message):
        Manifest.from_json(data)
    if error is not UnsupportedSchema and "created" not in changes and "expires" not in changes:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(data), SCHEMA)


@pytest.mark.unit
def test_compatibility_and_expiry():
    m = _manifest(min_shim_version="9.0.0")
    with pytest.raises(NeedsNewerShim, match=r"needs terminai-shim >= 9\.0\.0"):
        m.check_usable("0.1.0", 1, now=1_700_000_001)
    with pytest.raises(NeedsNewerShim, match="agent protocol 2"):
        _manifest(agent_protocol=2).check_usable("0.1.0", 1, now=1_700_000_001)
    with pytest.raises(ManifestExpired, match="expired at 2023-11-15T22:13:20Z"):
        _manifest().check_usable("0.1.0", 1, now=time.time())
    _manifest().check_usable("0.1.0", 1, now=1_700_000_001)
    with pytest.raises(ManifestError, match="twice"):
        art = _manifest().artifacts[0]
        Manifest.from_json(_manifest(artifacts=(art, art)).to_json())


@pytest.mark.build
def test_release_writes_verified_content_addressed_blobs(ctx, kernel, rootfs, tmp_path):
    from terminai_release.digest import sha256_file
    from terminai_release.release import build_release

    rel = build_release(ctx, channel="dev", out=tmp_path / "a")
    data = rel.manifest_path.read_bytes()
    jsonschema.validate(json.loads(data), SCHEMA)
    m = Manifest.from_json(data)
    assert {a.kind for a in m.artifacts} == {
        "kernel",
        "rootfs",
        "sbom",
        "survival-kit-wheel",
        "container-image",
        "brain-bundle",
        "node-package",
        "shim-standalone",
        "shim-npm-package",
        "rootfs-layer",
        "layer-sbom",
    }
    from terminai_release.rootfs.stack import load_stack

    stack = load_stack(REPO)
    assert m.rootfs.profiles == stack.profiles and m.rootfs.default_profile == "standard"
    assert {a.variant for a in m.artifacts if a.kind in ("rootfs-layer", "layer-sbom")} == set(stack.layers)
    assert m.rootfs.order(["node"]) == ("tools", "build", "node")
    from terminai_shim.layout import manifest_platform, standalone_platform

    here = manifest_platform(standalone_platform())
    assert {(a.kind, a.platform) for a in m.artifacts if a.kind.startswith("shim-")} == {
        ("shim-standalone", here),
        ("shim-npm-package", here),
    }
    assert len(m.artifact("shim-standalone", here).build["digest"]) == 64
    for a in m.artifacts:
        blob = rel.directory / a.location
        assert sha256_file(blob) == a.sha256 and blob.stat().st_size == a.size
    assert m.artifact("kernel").sha256 == kernel.record["outputs"]["vmlinux"]["sha256"]
    assert "vmlinux-" in (rel.directory / "RELEASE-NOTES.md").read_text()
    again = build_release(ctx, channel="dev", out=tmp_path / "b")
    assert again.manifest_path.read_bytes() == data, "the manifest of one commit is reproducible"

    from terminai_release.release import sign_release
    from terminai_release.signing.devstack import DEFAULT_IDENTITY, ISSUER
    from terminai_release.signing.sign import verify_bytes, verify_statement

    sign_release(ctx, rel)
    root = rel.directory / "dev-trusted-root.json"
    verify_bytes(data, (rel.directory / "manifest.json.sigstore.json").read_text(), root, DEFAULT_IDENTITY, ISSUER)
    statement = verify_statement(
        (rel.directory / "provenance.sigstore.json").read_text(), root, DEFAULT_IDENTITY, ISSUER
    )
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects == {a.name: a.sha256 for a in m.artifacts} | {"manifest.json": hashlib.sha256(data).hexdigest()}
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert any(d.get("name", "").startswith("kernel-source") for d in deps)


@pytest.mark.unit
def test_release_refuses_a_validity_that_ends_within_a_day(ctx, tmp_path):
    """Checked before anything is built: a manifest dated from an old commit
    with a short validity would be signed already expired."""
    from terminai_release.errors import BuildError
    from terminai_release.release import build_release

    with pytest.raises(BuildError, match="less than a day from now"):
        build_release(ctx, valid_days=-1, out=tmp_path)
    assert list(tmp_path.iterdir()) == []
