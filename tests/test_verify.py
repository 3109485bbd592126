"""The shim verifies a release before it boots anything: signature, signer,
issuer, trust root, schema, compatibility, expiry, channel, serial, artifact
digests. Each bad input gets its own distinct error and leaves the state as
it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shimproc import SHIM
from terminai_release.signing.devstack import DEFAULT_IDENTITY, ISSUER, DevSigstore
from terminai_release.signing.sign import sign_bytes
from terminai_shim._internal.releases import SerialState, verify_directory
from terminai_shim.launch import VM_KINDS
from terminai_shim.manifest import Artifact, BootDefaults, Manifest, ManifestExpired, NeedsNewerShim, UnsupportedSchema
from terminai_shim.verify import (
    DEV_IDENTITY,
    DEV_ISSUER,
    ChannelRefused,
    RollbackRefused,
    TrustPolicy,
    VerificationFailed,
)

pytestmark = pytest.mark.unit


def verify_release(directory, policy, *, state, channel="dev"):
    return verify_directory(directory, policy, channel, kinds=VM_KINDS, state=state)


def fetch_release(url, policy, *, state=None, channel="dev", allow_http=False):
    from terminai_shim._internal.releases import fetch_release as fetch

    return fetch(url, policy, channel, kinds=VM_KINDS, state=state, allow_http=allow_http)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with DevSigstore(tmp_path_factory.mktemp("dev-sigstore")) as s:
        yield s


@pytest.fixture(scope="module")
def root(stack, tmp_path_factory):
    path = tmp_path_factory.mktemp("trust") / "root.json"
    path.write_text(json.dumps(stack.trusted_root()))
    return path


def _release(stack, directory, *, serial=10, expires_in=86400, blobs=None, raw=None, min_shim="0.1.0", age=60,
             channel="dev"):  # fmt: skip
    """A signed release with small stand-in blobs (verification never boots them)."""
    directory.mkdir(parents=True, exist_ok=True)
    blobs = blobs or {"kernel": os.urandom(4096), "rootfs": os.urandom(8192)}
    arts = []
    for kind, data in blobs.items():
        digest = hashlib.sha256(data).hexdigest()
        (directory / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        (directory / "blobs/sha256" / digest).write_bytes(data)
        media = "application/vnd.terminai.rootfs.squashfs"
        arts.append(Artifact(f"{kind}.bin", kind, "linux/amd64", len(data), digest, media, f"blobs/sha256/{digest}"))
    now = int(time.time())
    m = Manifest("0.1.0", channel, serial, now - age, now + expires_in, "abcdef0", min_shim, 1, BootDefaults(),
                 tuple(arts))  # fmt: skip
    data = raw if raw is not None else m.to_json()
    (directory / "manifest.json").write_bytes(data)
    (directory / "manifest.json.sigstore.json").write_text(
        sign_bytes(data, stack.trust_config(), stack.identity_token())
    )
    return directory


def _policy(root, identity=DEFAULT_IDENTITY, issuer=ISSUER):
    return TrustPolicy(root, identity, issuer)


def test_dev_identity_matches_the_pipeline():
    assert (DEV_IDENTITY, DEV_ISSUER) == (DEFAULT_IDENTITY, ISSUER)


def test_good_release_verifies_and_records_its_serial(stack, root, tmp_path):
    rel = _release(stack, tmp_path / "rel")
    state = SerialState(tmp_path / "serials.json")
    verified = verify_release(rel, _policy(root), state=state)
    assert verified.path("kernel").is_file()
    assert json.loads(state.path.read_text()) == {"dev": 10}


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        ("artifact-byte", VerificationFailed, "has sha256 .* the manifest says"),
        ("manifest-byte", VerificationFailed, "signature of manifest.json does not verify"),
        ("other-bundle", VerificationFailed, "signature of manifest.json does not verify"),
        ("truncated-artifact", VerificationFailed, "bytes; the manifest says"),
        ("missing-artifact", VerificationFailed, "is missing"),
        ("binary-bundle", VerificationFailed, "not UTF-8 JSON"),
    ],
)
def test_tampering_is_named(stack, root, tmp_path, mutate, error, message):
    rel = _release(stack, tmp_path / "rel")
    m = Manifest.from_json((rel / "manifest.json").read_bytes())
    blob = rel / m.artifact("rootfs").location
    if mutate == "artifact-byte":
        data = bytearray(blob.read_bytes())
        data[100] ^= 1
        blob.write_bytes(bytes(data))
    elif mutate == "manifest-byte":
        text = (rel / "manifest.json").read_bytes().replace(b'"serial": 10', b'"serial": 11')
        (rel / "manifest.json").write_bytes(text)
    elif mutate == "other-bundle":
        (rel / "manifest.json.sigstore.json").write_text(
            sign_bytes(b"other", stack.trust_config(), stack.identity_token())
        )
    elif mutate == "truncated-artifact":
        blob.write_bytes(blob.read_bytes()[:100])
    elif mutate == "missing-artifact":
        blob.unlink()
    elif mutate == "binary-bundle":
        (rel / "manifest.json.sigstore.json").write_bytes(b"\xff\xfe not utf-8 \x80")
    state = SerialState(tmp_path / "serials.json")
    with pytest.raises(error, match=message):
        verify_release(rel, _policy(root), state=state)
    assert not state.path.exists(), "a failed verification must not move the serial"


def test_wrong_signer_issuer_or_trust_root(stack, root, tmp_path):
    rel = _release(stack, tmp_path / "rel")
    state = SerialState(tmp_path / "s.json")
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_release(rel, _policy(root, identity="mallory@terminai.invalid"), state=state)
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_release(rel, _policy(root, issuer="https://accounts.invalid"), state=state)
    with DevSigstore(tmp_path / "other-stack") as other:
        foreign = tmp_path / "foreign.json"
        foreign.write_text(json.dumps(other.trusted_root()))
        with pytest.raises(VerificationFailed, match="does not verify"):
            verify_release(rel, _policy(foreign), state=state)


def test_missing_trust_root_is_a_named_error_through_the_cli(stack, tmp_path):
    """Not a traceback: the shim's own error, exit 125, naming the file."""
    rel = _release(stack, tmp_path / "rel")
    shim = SHIM
    done = subprocess.run([shim, "verify", str(rel), "--trusted-root", str(tmp_path / "nowhere.json"), "--identity",
                           DEFAULT_IDENTITY, "--issuer", ISSUER], capture_output=True, text=True,
                          env=dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache")))  # fmt: skip
    assert done.returncode == 125 and "Traceback" not in done.stderr, done.stderr
    assert "nowhere.json cannot be read" in done.stderr


def test_dev_never_trusts_a_root_found_beside_the_release(stack, root, tmp_path):
    """A forged release signed by a fresh development Sigstore, with that
    Sigstore's trust root dropped beside it: `--dev` trusts only the
    developer's own root, so it fails; the genuine release passes."""
    shim = SHIM
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"), TERMINAI_DEV_TRUSTED_ROOT=str(root))
    with DevSigstore(tmp_path / "forger") as forger:
        forged = _release(forger, tmp_path / "forged")
        (forged / "dev-trusted-root.json").write_text(json.dumps(forger.trusted_root()))
        for target in (str(forged), forged.as_uri()):
            done = subprocess.run([shim, "verify", target, "--dev"], env=env, capture_output=True, text=True)
            assert done.returncode == 125 and "does not verify" in done.stderr, done.stderr
    genuine = _release(stack, tmp_path / "genuine")
    done = subprocess.run([shim, "verify", str(genuine), "--dev"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    missing = dict(env, TERMINAI_DEV_TRUSTED_ROOT=str(tmp_path / "none.json"))
    done = subprocess.run([shim, "verify", str(genuine), "--dev"], env=missing, capture_output=True, text=True)
    assert done.returncode == 125 and "needs the development trust root" in done.stderr


def test_expired_newer_shim_and_unsupported_schema(stack, root, tmp_path):
    state = SerialState(tmp_path / "s.json")
    with pytest.raises(ManifestExpired, match="expired"):
        verify_release(_release(stack, tmp_path / "old", expires_in=-30), _policy(root), state=state)
    with pytest.raises(NeedsNewerShim, match=r"needs terminai-shim >= 9.9.9"):
        verify_release(_release(stack, tmp_path / "new", min_shim="9.9.9"), _policy(root), state=state)
    future = json.loads(Manifest.from_json((tmp_path / "new" / "manifest.json").read_bytes()).to_json())
    future["schemaVersion"] = 2
    raw = json.dumps(future).encode()
    with pytest.raises(UnsupportedSchema, match="schema version 2"):
        verify_release(_release(stack, tmp_path / "v2", raw=raw), _policy(root), state=state)
    assert not state.path.exists()


def test_rollback_and_mix_and_match(stack, root, tmp_path):
    state = SerialState(tmp_path / "s.json")
    kernel_old, rootfs_old = os.urandom(4096), os.urandom(8192)
    old = _release(stack, tmp_path / "old", serial=5, blobs={"kernel": kernel_old, "rootfs": rootfs_old})
    new = _release(stack, tmp_path / "new", serial=6)
    verify_release(new, _policy(root), state=state)
    with pytest.raises(RollbackRefused, match=r"serial 5 .* lower than 6"):
        verify_release(old, _policy(root), state=state)
    # An artifact listed in the older manifest swapped in under the newer one's name.
    m = Manifest.from_json((new / "manifest.json").read_bytes())
    target = new / m.artifact("rootfs").location
    shutil.copyfile(old / Manifest.from_json((old / "manifest.json").read_bytes()).artifact("rootfs").location, target)
    with pytest.raises(VerificationFailed, match=r"rootfs.bin"):
        verify_release(new, _policy(root), state=state)
    assert json.loads(state.path.read_text()) == {"dev": 6}


def test_fetch_release_over_http_verifies_before_downloading(stack, root, tmp_path, monkeypatch):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "cache"))
    rel = _release(stack, tmp_path / "served")
    served: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            served.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(rel)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        state = SerialState(tmp_path / "s.json")
        with pytest.raises(VerificationFailed, match="does not verify"):
            fetch_release(url, _policy(root, identity="mallory@terminai.invalid"), allow_http=True, state=state)
        assert not any("blobs" in p for p in served), "artifacts were fetched before the signature verified"
        verified = fetch_release(url, _policy(root), allow_http=True, state=state)
        assert (
            verified.path("rootfs").read_bytes() == (rel / verified.manifest.artifact("rootfs").location).read_bytes()
        )
        assert str(verified.path("kernel")).startswith(str(tmp_path / "cache" / "blobs" / "sha256"))
    finally:
        httpd.shutdown()


def test_identity_patterns_and_the_pinned_policy(stack, root, tmp_path):
    from sigstore.models import TrustedRoot
    from terminai_shim.verify import pinned_policy

    workflow = "https://github.com/terminai/terminai-runtime/.github/workflows/release.yml@refs/tags/v0.1.0"
    rel = tmp_path / "rel"
    _release(stack, rel)
    data = (rel / "manifest.json").read_bytes()
    (rel / "manifest.json.sigstore.json").write_text(
        sign_bytes(data, stack.trust_config(), stack.identity_token(workflow))
    )
    stable = pinned_policy("stable")
    assert stable.identity is None and stable.identity_pattern is not None
    TrustedRoot.from_file(str(stable.trusted_root))  # the shipped root parses
    ok = TrustPolicy(root, None, ISSUER, stable.identity_pattern)
    verify_release(rel, ok, state=SerialState(tmp_path / "a.json"))
    wrong_tag = TrustPolicy(root, None, ISSUER, pinned_policy("dev").identity_pattern)
    with pytest.raises(VerificationFailed, match="does not match"):
        verify_release(rel, wrong_tag, state=SerialState(tmp_path / "b.json"))
    # With no policy given, the pinned one for the manifest's channel applies:
    # a release signed by anyone else (here the dev stack) is refused.
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_release(rel, None, state=SerialState(tmp_path / "c.json"))
    with pytest.raises(VerificationFailed, match="no signer is pinned"):
        pinned_policy("nightly")


def test_cache_gc_keeps_the_newest_releases_and_their_blobs(stack, root, tmp_path, monkeypatch):
    from terminai_shim._internal.releases import gc

    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "cache"))
    state = SerialState(tmp_path / "s.json")
    fetched = []
    for i, age in enumerate((300, 200, 100)):  # oldest first
        rel = _release(stack, tmp_path / f"r{i}", serial=i, age=age)
        fetched.append(fetch_release(rel.as_uri(), _policy(root), state=state))
    removed = gc(keep=1)
    assert sum(1 for r in removed if r.startswith("release ")) == 2
    newest = fetched[-1]
    assert newest.path("kernel").exists() and newest.path("rootfs").exists()
    for old in fetched[:2]:
        assert not old.path("kernel").exists()


def test_verify_checks_every_artifact_the_manifest_lists(stack, root, tmp_path):
    """Not only what boots: a flipped SBOM or brain bundle fails `verify`, which names each kind it checked."""
    shim = SHIM
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"), TERMINAI_DEV_TRUSTED_ROOT=str(root))
    blobs = {"kernel": os.urandom(4096), "rootfs": os.urandom(8192), "sbom": b'{"spdxVersion": "SPDX-2.3"}',
             "brain-bundle": os.urandom(2048)}  # fmt: skip
    rel = _release(stack, tmp_path / "rel", blobs=blobs)
    done = subprocess.run([shim, "verify", str(rel), "--dev"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "kernel, rootfs, sbom, brain-bundle match" in done.stdout, done.stderr
    for kind in ("sbom", "brain-bundle"):
        m = Manifest.from_json((rel / "manifest.json").read_bytes())
        blob = rel / m.artifact(kind).location
        good = blob.read_bytes()
        blob.write_bytes(bytes([good[0] ^ 1]) + good[1:])
        done = subprocess.run([shim, "verify", str(rel), "--dev"], env=env, capture_output=True, text=True)
        assert done.returncode == 125 and "the manifest says" in done.stderr, (kind, done.stderr)
        blob.write_bytes(good)


def _store(stack, directory, *, channel):
    """A one-release store in the published layout, without a channel pointer:
    reached with --release VERSION (what a mirror could serve to anyone)."""
    _release(stack, directory, channel=channel)
    folder = directory / "releases" / "0.1.0"
    folder.mkdir(parents=True)
    for name in ("manifest.json", "manifest.json.sigstore.json"):
        (directory / name).rename(folder / name)
    return directory


def test_the_channel_asked_for_is_enforced(stack, root, tmp_path):
    """Finding 5: a dev-channel release is refused to someone asking for stable,
    whoever signed it and however it is reached (a directory, file://, a store's
    pinned --release), through the CLI and through serve; asked for by name it verifies."""
    from shimproc import ShimProc

    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"), TERMINAI_DEV_TRUSTED_ROOT=str(root))
    rel = _release(stack, tmp_path / "rel", channel="dev")
    store = _store(stack, tmp_path / "store", channel="dev")
    explicit = ["--trusted-root", str(root), "--identity", DEFAULT_IDENTITY, "--issuer", ISSUER]
    refused = [
        ["verify", str(rel), *explicit],  # the default channel is stable
        ["verify", str(rel), "--dev", "--channel", "stable"],
        ["verify", rel.as_uri(), "--dev", "--channel", "stable"],
        ["verify", "--store", str(store), "--release", "0.1.0", "--channel", "stable", "--dev"],
        ["verify", "--store", str(store), "--release", "0.1.0", "--channel", "stable", *explicit],
        ["run", "--manifest", str(rel), "--dev", "--channel", "stable", "--", "true"],
    ]
    for argv in refused:
        done = subprocess.run([SHIM, *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 125 and "signed for channel dev, not stable" in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr
    # With the pinned signer for stable (no trust flags), the dev identity's signature is refused first.
    done = subprocess.run([SHIM, "verify", "--store", str(store), "--release", "0.1.0"], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 125 and "does not verify" in done.stderr, done.stderr
    for argv in (["verify", str(rel), "--dev"], ["verify", str(rel), *explicit, "--channel", "dev"],
                 ["verify", "--store", str(store), "--release", "0.1.0", "--dev"]):  # fmt: skip
        done = subprocess.run([SHIM, *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "channel dev" in done.stdout, (argv, done.stderr)
    with ShimProc(env=env) as shim:
        for params in ({"manifest": str(rel), "dev": True, "channel": "stable"},
                       {"store": str(store), "release": "0.1.0", "channel": "stable", "dev": True}):  # fmt: skip
            err = shim.call("initialize", {**params, "backend": "qemu"})["error"]
            assert err["code"] == "WRONG_CHANNEL" and "signed for channel dev, not stable" in err["message"], err
    with pytest.raises(ChannelRefused):
        verify_release(rel, _policy(root), state=SerialState(tmp_path / "s.json"), channel="stable")
    assert not (tmp_path / "s.json").exists(), "a refused release must not move the serial"


def test_a_bad_request_is_the_same_error_through_either_door(stack, root, tmp_path):
    """One front door: a trust policy missing its identity is INVALID_CONFIG in
    serve and exit 125 with the same words from the CLI, before anything is read."""
    from shimproc import ShimProc

    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"))
    rel = _release(stack, tmp_path / "rel")
    done = subprocess.run([SHIM, "run", "--manifest", str(rel), "--trusted-root", str(root), "--", "true"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 125 and "needs all of trustedRoot, identity and issuer" in done.stderr, done.stderr
    with ShimProc(env=env) as shim:
        bad = [
            ({"manifest": str(rel), "trustedRoot": str(root)}, "needs all of trustedRoot, identity and issuer"),
            ({"manifest": str(rel), "store": str(rel)}, "name one release"),
            ({"manifest": str(rel), "memoryMib": "lots"}, "memoryMib must be a whole number"),
            ({"manifest": str(rel), "network": {"mode": "none", "allow": ["example.com"]}}, "--allow needs"),
            ({"manifest": str(rel), "user": "admin"}, "unknown guest user"),
            ({}, "needs a release"),
        ]
        for params, words in bad:
            err = shim.call("initialize", params)["error"]
            assert err["code"] == "INVALID_CONFIG" and words in err["message"], (params, err)


STAND_IN_QEMU = """#!/usr/bin/python3 -I
# A stand-in QEMU (no guest boots here: only what QEMU is handed matters).
# As it starts it plays the attacker winning the race: the release's kernel
# is rewritten in place, then it records the sha256 of the kernel it was given.
# (QEMU starts with a fixed environment: the paths are written in here.)
import hashlib, sys
TARGET, RECORD = {target!r}, {record!r}
argv = sys.argv[1:]
with open(TARGET, "r+b") as f:
    f.write(b"rewritten in place after verification")
with open(argv[argv.index("-kernel") + 1], "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
with open(RECORD, "a") as f:
    f.write(digest + "\\n")
sys.exit(1)
"""


def test_what_boots_is_what_was_verified_even_if_rewritten_in_place(stack, root, tmp_path):
    """Finding 1, through the CLI and serve: a kernel that others may write is
    rewritten in place as QEMU starts (after every check passed). QEMU is
    handed a sealed private copy of the verified bytes, so what it reads has
    the manifest's digest. (A stand-in QEMU records what it was handed: a
    fair double for the race, which a real boot cannot time.)"""
    import tempfile

    from shimproc import ShimProc

    shared = Path(tempfile.mkdtemp(prefix="terminai-race-"))  # QEMU may run as nobody: reachable by it
    try:
        os.chmod(shared, 0o777)
        rel = _release(stack, shared / "rel")
        m = Manifest.from_json((rel / "manifest.json").read_bytes())
        kernel = rel / m.artifact("kernel").location
        for path in (rel, rel / "blobs", rel / "blobs/sha256"):
            os.chmod(path, 0o755)
        qemu = shared / "qemu"
        record = shared / "record"
        qemu.write_text(STAND_IN_QEMU.format(target=str(kernel), record=str(record)))
        qemu.chmod(0o755)
        env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"), TERMINAI_DEV_TRUSTED_ROOT=str(root),
                   TERMINAI_QEMU=str(qemu))  # fmt: skip
        good = kernel.read_bytes()

        def reset():
            kernel.write_bytes(good)
            kernel.chmod(0o666)  # another local user may write it
            record.write_text("")
            record.chmod(0o666)

        reset()
        argv = [
            SHIM,
            "run",
            "--manifest",
            str(rel),
            "--dev",
            "--backend",
            "qemu",
            "--accel",
            "tcg",
            "--cold",
            "--",
            "true",
        ]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 125 and "Traceback" not in done.stderr, done.stderr  # the stand-in boots nothing
        assert kernel.read_bytes() != good, "the stand-in did rewrite the kernel in place"
        assert record.read_text().split() == [m.artifact("kernel").sha256], "QEMU was handed unverified bytes"
        reset()
        with ShimProc(env=env) as shim:
            err = shim.call("initialize", {"manifest": str(rel), "dev": True, "backend": "qemu", "accel": "tcg",
                                           "cold": True})["error"]  # fmt: skip
            assert err["code"] == "BOOT_FAILED", err
        assert record.read_text().split() == [m.artifact("kernel").sha256], "QEMU was handed unverified bytes"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_signature_verified_once_is_not_verified_again_and_no_record_can_stand_in(stack, root, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    """The second run of the same release skips sigstore (it is not even
    imported), but a record is only ever the shim's own, for exactly these
    bytes: a forged record, one for other bytes, one in a directory others
    can write, each means a full verification; expiry and serial are checked
    on every run whatever the record says."""
    from terminai_shim import verify as V
    from terminai_shim._internal.sigrecords import SignatureRecords

    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "cache"))
    calls: list[bytes] = []
    real = V._verify_bundle
    monkeypatch.setattr(V, "_verify_bundle", lambda data, *a: (calls.append(data), real(data, *a))[1])
    rel = _release(stack, tmp_path / "rel", expires_in=3600)
    state = SerialState(tmp_path / "serials.json")
    verify_release(rel, _policy(root), state=state)
    verify_release(rel, _policy(root), state=state)
    assert len(calls) == 1, "verified in full once"
    records = SignatureRecords()
    made = [p for p in records.root.iterdir() if not p.name.startswith(".")]
    assert len(made) == 1 and (records.root.stat().st_mode & 0o077) == 0

    # A forged manifest (serial raised), with a record under the key its bytes would have: refused.
    forged = (rel / "manifest.json").read_bytes().replace(b'"serial": 10', b'"serial": 99')
    (rel / "manifest.json").write_bytes(forged)
    bundle = (rel / "manifest.json.sigstore.json").read_text()
    key = records.key(forged, bundle, root.read_bytes(), (ISSUER, DEFAULT_IDENTITY, "", "manifest.json"))
    (records.root / key).write_bytes(made[0].read_bytes())  # a real record's text, for other bytes
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_release(rel, _policy(root), state=state)
    (records.root / key).write_bytes(b"0" * 64)
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_release(rel, _policy(root), state=state)

    # Another trust root (same signer) or a directory others can write: no record counts.
    _release(stack, tmp_path / "rel")
    other_root = tmp_path / "root2.json"
    other_root.write_bytes(root.read_bytes() + b" ")
    calls.clear()
    verify_release(tmp_path / "rel", _policy(other_root), state=SerialState(tmp_path / "s2.json"))
    assert len(calls) == 1
    records.root.chmod(0o777)
    verify_release(tmp_path / "rel", _policy(other_root), state=SerialState(tmp_path / "s3.json"))
    assert len(calls) == 2, "a record in a directory others can write is not trusted"
    records.root.chmod(0o700)

    # Expiry and rollback are checked on every run, record or not.
    later = time.time() + 2 * 86400
    with pytest.raises(ManifestExpired):
        verify_directory(tmp_path / "rel", _policy(other_root), "dev", kinds=VM_KINDS,
                         state=SerialState(tmp_path / "s4.json"), now=later)  # fmt: skip
    high = SerialState(tmp_path / "s5.json")
    high._record("dev", 50)
    with pytest.raises(RollbackRefused):
        verify_release(tmp_path / "rel", _policy(other_root), state=high)


def test_a_warm_run_of_a_verified_release_imports_no_sigstore(stack, root, tmp_path):
    rel = _release(stack, tmp_path / "rel")
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"))
    code = ("import sys\nfrom terminai_shim._internal.releases import SerialState, verify_directory\n"
            "from terminai_shim.launch import VM_KINDS\nfrom terminai_shim.verify import TrustPolicy\n"
            f"p = TrustPolicy({str(root)!r}, {DEFAULT_IDENTITY!r}, {ISSUER!r})\n"
            f"verify_directory(__import__('pathlib').Path({str(rel)!r}), p, 'dev', kinds=VM_KINDS, "
            f"state=SerialState(__import__('pathlib').Path({str(tmp_path / 's.json')!r})))\n"
            "print('sigstore' in sys.modules)")  # fmt: skip
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (first.stdout.strip(), second.stdout.strip()) == ("True", "False"), (first.stderr, second.stderr)


def test_an_artifact_changed_in_place_after_a_verification_is_caught_on_the_next(stack, root, tmp_path, monkeypatch):
    """Verifying a release again does not hash what is unchanged (digests are
    remembered per file and stamp), but a byte flipped in place, its mtime
    put back, changes the file's ctime: the next verification hashes again."""
    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "cache"))
    rel = _release(stack, tmp_path / "rel")
    time.sleep(2.1)  # past the clock tick in which the file was written (a stamp that young is not trusted)
    verify_release(rel, _policy(root), state=SerialState(tmp_path / "s1.json"))
    blob = rel / Manifest.from_json((rel / "manifest.json").read_bytes()).artifact("rootfs").location
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    with blob.open("r+b") as f:
        f.write(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(VerificationFailed, match=r"has sha256 .* the manifest says"):
        verify_release(rel, _policy(root), state=SerialState(tmp_path / "s2.json"))
