"""Signing with the real sigstore library against the local development
Sigstore stack (CA, CT log, transparency log on loopback), and every way a
verification must fail."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sigstore.errors import VerificationError
from terminai_release.signing.devstack import DEFAULT_IDENTITY, ISSUER, DevSigstore
from terminai_release.signing.sign import ambient_token, sign_bytes, verify_bytes

pytestmark = pytest.mark.unit
DATA = b'{"release": "0.1.0"}\n'


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with DevSigstore(tmp_path_factory.mktemp("dev-sigstore")) as s:
        yield s


@pytest.fixture(scope="module")
def signed(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust") / "trusted_root.json"
    root.write_text(json.dumps(stack.trusted_root()))
    bundle = sign_bytes(DATA, stack.trust_config(), stack.identity_token())
    return bundle, root


def test_sign_and_verify(signed):
    bundle, root = signed
    verify_bytes(DATA, bundle, root, DEFAULT_IDENTITY, ISSUER)
    doc = json.loads(bundle)
    assert doc["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["checkpoint"]["envelope"]


def test_flipped_byte_fails(signed):
    bundle, root = signed
    with pytest.raises(VerificationError):
        verify_bytes(DATA.replace(b"0.1.0", b"0.1.1"), bundle, root, DEFAULT_IDENTITY, ISSUER)


def test_wrong_identity_and_issuer_fail(signed):
    bundle, root = signed
    with pytest.raises(VerificationError, match=r"identity|SAN|Certificate"):
        verify_bytes(DATA, bundle, root, "someone-else@terminai.invalid", ISSUER)
    with pytest.raises(VerificationError):
        verify_bytes(DATA, bundle, root, DEFAULT_IDENTITY, "https://other-issuer.invalid")


def test_bundle_for_other_bytes_and_other_trust_root_fail(stack, signed, tmp_path):
    bundle, root = signed
    other_bundle = sign_bytes(b"other bytes", stack.trust_config(), stack.identity_token())
    with pytest.raises(VerificationError):
        verify_bytes(DATA, other_bundle, root, DEFAULT_IDENTITY, ISSUER)
    with DevSigstore(tmp_path / "another") as other:
        foreign = tmp_path / "foreign-root.json"
        foreign.write_text(json.dumps(other.trusted_root()))
        with pytest.raises(VerificationError):
            verify_bytes(DATA, bundle, foreign, DEFAULT_IDENTITY, ISSUER)


def test_tampered_log_entry_fails(signed):
    bundle, root = signed
    doc = json.loads(bundle)
    entry = doc["verificationMaterial"]["tlogEntries"][0]
    entry["integratedTime"] = str(int(entry["integratedTime"]) + 1)
    with pytest.raises(VerificationError):
        verify_bytes(DATA, json.dumps(doc), root, DEFAULT_IDENTITY, ISSUER)


def test_ci_ambient_identity_through_a_token_endpoint(stack, signed, monkeypatch):
    """GitHub Actions' token endpoint, stood in for by a local server: the
    real detect_credential() fetches the token the signer then uses."""
    token = stack.identity_token("https://github.com/terminai/runtime/.github/workflows/release.yml@refs/tags/v0.1.0")
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"value": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GITHUB_ACTIONS", "true")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"http://127.0.0.1:{server.server_address[1]}/token?x=1")
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-secret")
        got = ambient_token()
    finally:
        server.shutdown()
    assert got == token
    assert seen and "audience=sigstore" in seen[0][0] and seen[0][1] == "bearer request-secret"
    claims = json.loads(base64.urlsafe_b64decode(got.split(".")[1] + "=="))
    bundle = sign_bytes(DATA, stack.trust_config(), got)
    _, root = signed
    verify_bytes(DATA, bundle, root, claims["sub"], ISSUER)


def test_keyless_release_signing_from_ci_identity(stack, tmp_path, monkeypatch):
    """`inv release --keyless` as CI runs it: ambient identity from the token
    endpoint, signer services from a trust config (here the local stack)."""
    from terminai_release.context import BuildContext
    from terminai_release.progress import Reporter
    from terminai_release.release import Release, sign_release
    from terminai_shim.manifest import Manifest

    workflow = "https://github.com/terminai/terminai-runtime/.github/workflows/release.yml@refs/tags/v0.1.0"
    token = stack.identity_token(workflow)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"value": token}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"http://127.0.0.1:{server.server_address[1]}/t?a=b")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "secret")
    config = tmp_path / "trust-config.json"
    config.write_text(json.dumps(stack.trust_config()))
    from terminai_shim.manifest import Artifact, BootDefaults

    arts = tuple(
        Artifact(f"{kind}.bin", kind, "linux/amd64", 1, c * 64, "application/x", f"blobs/sha256/{c * 64}",
                 {"source": {"kind": "tarball", "sha256": "e" * 64}, "fragments": [["base.conf", "f" * 64]]})
        for kind, c in (("kernel", "a"), ("rootfs", "b"))
    )  # fmt: skip
    manifest = Manifest("0.1.0", "stable", 1, 1, 2, "abcdef0", "0.1.0", 1, BootDefaults(), arts)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "manifest.json").write_bytes(DATA)
    rel = Release(tmp_path / "rel", manifest)
    try:
        out = sign_release(BuildContext(reporter=Reporter("plain")), rel, keyless=True, trust_config=config)
    finally:
        server.shutdown()
    root = tmp_path / "root.json"
    root.write_text(json.dumps(stack.trusted_root()))
    verify_bytes(DATA, out.read_text(), root, workflow, ISSUER)
    assert not (tmp_path / "rel" / "dev-trusted-root.json").exists()
    from terminai_release.signing.sign import verify_statement

    statement = verify_statement((tmp_path / "rel" / "provenance.sigstore.json").read_text(), root, workflow, ISSUER)
    assert {s["name"] for s in statement["subject"]} == {"kernel.bin", "rootfs.bin", "manifest.json"}


def test_in_toto_statement_in_dsse(stack, signed):
    from terminai_release.signing.sign import sign_statement, verify_statement

    _, root = signed
    subjects = {"vmlinux": "a" * 64, "rootfs.squashfs": "b" * 64}
    bundle = sign_statement(subjects, "https://slsa.dev/provenance/v1", {"buildDefinition": {"buildType": "x"}},
                            stack.trust_config(), stack.identity_token())  # fmt: skip
    statement = verify_statement(bundle, root, DEFAULT_IDENTITY, ISSUER)
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == subjects
    doc = json.loads(bundle)
    doc["dsseEnvelope"]["payload"] = base64.b64encode(b'{"tampered": true}').decode()
    with pytest.raises(VerificationError):
        verify_statement(json.dumps(doc), root, DEFAULT_IDENTITY, ISSUER)


def test_two_checkouts_development_identities_both_stay_trusted(stack, tmp_path, monkeypatch):
    """`inv release` in one checkout must not break `--dev` for another's
    releases: the developer's trust root keeps both development stacks."""
    from terminai_release.release import keep_dev_trust_root
    from terminai_shim.verify import dev_policy

    monkeypatch.setenv("TERMINAI_DEV_TRUSTED_ROOT", str(tmp_path / "dev-root.json"))
    first = sign_bytes(DATA, stack.trust_config(), stack.identity_token())
    keep_dev_trust_root(stack.trusted_root(), tmp_path)
    with DevSigstore(tmp_path / "other-checkout") as other:
        second = sign_bytes(DATA, other.trust_config(), other.identity_token())
        keep_dev_trust_root(other.trusted_root(), tmp_path)
    policy = dev_policy()
    for bundle in (first, second):
        verify_bytes(DATA, bundle, policy.trusted_root, policy.identity, policy.issuer)
    merged = json.loads((tmp_path / "dev-root.json").read_text())
    assert len(merged["tlogs"]) == 2 and len(merged["certificateAuthorities"]) == 2
