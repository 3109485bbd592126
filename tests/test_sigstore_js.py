"""Our bundles verify with sigstore-js as well as with sigstore-python.

A CLI written in Node.js verifies in Node.js: `@sigstore/verify` (the
verifier behind `npm audit signatures` and npm's provenance checks), at the
version the client's lockfile pins, must accept what we sign and refuse a
tampered byte, as sigstore-python does. It once refused every development
bundle (`TLOG_INCLUSION_PROOF_ERROR invalid checkpoint signature`): it
finds the log of a checkpoint signature by key hint *and* by the signer's
name appearing in the log's URL, and the development log's URL did not
carry its name. Both the development identity and a CI workflow identity
(the keyless path's shape: a URI subject, from the local stack standing in
for Sigstore's public-good instance, which cannot be reached here) are
checked, and a real release's manifest, provenance and brain bundles."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from terminai_release.signing.devstack import DEFAULT_IDENTITY, ISSUER, DevSigstore
from terminai_release.signing.sign import sign_bytes, sign_statement, verify_bytes, verify_statement
from terminai_shim.layout import BUNDLE_SUFFIX, DEV_TRUSTED_ROOT, MANIFEST, MANIFEST_BUNDLE, PROVENANCE

HELPER = Path(__file__).with_name("sigstore_js_verify.cjs")
WORKFLOW = "https://github.com/terminai/terminai-runtime/.github/workflows/release.yml@refs/tags/v0.1.0"
DATA = b'{"release": "0.1.0", "serial": 7}\n'


@pytest.fixture(scope="module")
def client(ctx):
    """The client's pinned dev dependencies (npm ci from its lockfile), @sigstore/verify among them."""
    from terminai_release.client import build_client

    return build_client(ctx).directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with DevSigstore(tmp_path_factory.mktemp("dev-sigstore")) as s:
        yield s


@pytest.fixture(scope="module")
def root(stack, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "trusted_root.json"
    path.write_text(json.dumps(stack.trusted_root()))
    return path


def js_verify(client: Path, root: Path, bundle: str | Path, artifact: bytes | Path | None, tmp: Path,
              identity: str = DEFAULT_IDENTITY, issuer: str = ISSUER) -> dict:  # fmt: skip
    """What sigstore-js says of one bundle: {"ok": True, "payload": ...} or the error it raised."""
    if isinstance(bundle, str):
        (tmp / "bundle.json").write_text(bundle)
        bundle = tmp / "bundle.json"
    if isinstance(artifact, bytes):
        (tmp / "artifact").write_bytes(artifact)
        artifact = tmp / "artifact"
    job = {"trustedRoot": str(root), "bundle": str(bundle), "artifact": str(artifact) if artifact else None,
           "identity": identity, "issuer": issuer}  # fmt: skip
    done = subprocess.run(["node", str(HELPER), str(client), json.dumps(job)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.stdout.strip(), f"the sigstore-js helper printed nothing: {done.stderr[-2000:]}"
    answer = json.loads(done.stdout)
    assert (done.returncode == 0) == answer["ok"], done
    return answer


@pytest.mark.build
def test_a_development_signature_verifies_in_both_and_a_flipped_byte_fails_in_both(client, stack, root, tmp_path):
    bundle = sign_bytes(DATA, stack.trust_config(), stack.identity_token())
    verify_bytes(DATA, bundle, root, DEFAULT_IDENTITY, ISSUER)
    assert js_verify(client, root, bundle, DATA, tmp_path) == {"ok": True, "payload": None}

    flipped = DATA.replace(b"7", b"8")
    from sigstore.errors import VerificationError

    with pytest.raises(VerificationError):
        verify_bytes(flipped, bundle, root, DEFAULT_IDENTITY, ISSUER)
    refused = js_verify(client, root, bundle, flipped, tmp_path)
    assert not refused["ok"] and "SIGNATURE" in refused["code"], refused


@pytest.mark.build
def test_sigstore_js_refuses_a_tampered_log_entry_another_identity_and_a_foreign_root(client, stack, root, tmp_path):
    bundle = sign_bytes(DATA, stack.trust_config(), stack.identity_token())
    doc = json.loads(bundle)
    entry = doc["verificationMaterial"]["tlogEntries"][0]
    entry["integratedTime"] = str(int(entry["integratedTime"]) + 1)  # the signed entry timestamp no longer holds
    assert not js_verify(client, root, json.dumps(doc), DATA, tmp_path)["ok"]

    doc = json.loads(bundle)
    proof = doc["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    proof["checkpoint"]["envelope"] = proof["checkpoint"]["envelope"].replace("\n", "\n\n", 1)  # a forged note
    assert not js_verify(client, root, json.dumps(doc), DATA, tmp_path)["ok"]

    other = js_verify(client, root, bundle, DATA, tmp_path, identity="someone-else@terminai.invalid")
    assert not other["ok"] and other["code"].startswith("UNTRUSTED_SIGNER"), other
    assert not js_verify(client, root, bundle, DATA, tmp_path, issuer="https://other-issuer.invalid")["ok"]

    with DevSigstore(tmp_path / "another") as another:
        foreign = tmp_path / "foreign-root.json"
        foreign.write_text(json.dumps(another.trusted_root()))
        assert not js_verify(client, foreign, bundle, DATA, tmp_path)["ok"]


@pytest.mark.build
def test_a_workflow_identity_and_an_attestation_verify_in_both(client, stack, root, tmp_path):
    """The keyless path's shape: the CI workflow's URI identity, a DSSE
    in-toto statement as the provenance is signed."""
    token = stack.identity_token(WORKFLOW)
    bundle = sign_bytes(DATA, stack.trust_config(), token)
    verify_bytes(DATA, bundle, root, WORKFLOW, ISSUER)
    assert js_verify(client, root, bundle, DATA, tmp_path, identity=WORKFLOW)["ok"]
    assert not js_verify(client, root, bundle, DATA, tmp_path)["ok"]  # not the development identity

    digest = "ab" * 32
    statement = sign_statement({"manifest.json": digest}, "https://slsa.dev/provenance/v1",
                               {"buildDefinition": {"buildType": "x"}}, stack.trust_config(), token)  # fmt: skip
    assert verify_statement(statement, root, WORKFLOW, ISSUER)["subject"][0]["digest"]["sha256"] == digest
    answer = js_verify(client, root, statement, None, tmp_path, identity=WORKFLOW)
    assert answer["ok"], answer
    assert json.loads(base64.b64decode(answer["payload"]))["subject"][0]["digest"]["sha256"] == digest

    doc = json.loads(statement)
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    payload["subject"][0]["digest"]["sha256"] = "cd" * 32
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    assert not js_verify(client, root, json.dumps(doc), None, tmp_path, identity=WORKFLOW)["ok"]


@pytest.mark.build
def test_a_real_release_verifies_with_sigstore_js(ctx, client, tmp_path_factory, tmp_path):
    """The release `inv release` writes, built by the cached tasks: its
    manifest, provenance and brain bundles, against the development trust
    root shipped beside it."""
    from terminai_release.release import build_release, sign_release

    rel = build_release(ctx, channel="dev", out=tmp_path_factory.mktemp("dist"))
    sign_release(ctx, rel)
    root = rel.directory / DEV_TRUSTED_ROOT
    assert js_verify(client, root, rel.directory / MANIFEST_BUNDLE, rel.directory / MANIFEST, tmp_path)["ok"]

    answer = js_verify(client, root, rel.directory / PROVENANCE, None, tmp_path)
    assert answer["ok"], answer
    statement = json.loads(base64.b64decode(answer["payload"]))
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert {a.name: a.sha256 for a in rel.manifest.artifacts}.items() <= subjects.items()

    brains = [a for a in rel.manifest.artifacts if a.kind == "brain-bundle"]
    assert brains, "the release has a brain bundle"
    for brain in brains:
        signature = rel.directory / f"{brain.name}{BUNDLE_SUFFIX}"
        assert js_verify(client, root, signature, rel.directory / brain.location, tmp_path)["ok"]

    tampered = tmp_path / "manifest.json"
    tampered.write_bytes((rel.directory / MANIFEST).read_bytes().replace(b'"dev"', b'"stable"', 1))
    assert not js_verify(client, root, rel.directory / MANIFEST_BUNDLE, tampered, tmp_path)["ok"]
