"""Publishing to a real S3-compatible server on loopback (moto's standalone
server; boto3 speaks the S3 HTTP API to it like to AWS) and to a file
mirror, then fetching back through the shim. The release is the real one,
built by the cached pipeline tasks and signed by the local development
Sigstore."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3server import MotoServer, environment
from terminai_release.errors import BuildError
from terminai_release.publish import promote, publish
from terminai_release.publish.store import Conflict, Headers, StoreError
from terminai_release.publish.stores import open_store
from terminai_shim.layout import blob_key, channel_key, release_key
from terminai_shim.manifest import ChannelPointer, Manifest

pytestmark = pytest.mark.build
REPO = Path(__file__).resolve().parents[1]
BUCKET = "terminai-releases"


@pytest.fixture(scope="module")
def release(ctx, tmp_path_factory):
    from terminai_release.release import build_release, sign_release

    rel = build_release(ctx, channel="dev", out=tmp_path_factory.mktemp("dist"))
    sign_release(ctx, rel)
    return rel


@pytest.fixture(scope="module")
def s3():
    server = MotoServer()
    with environment(server.env):
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        # Anonymous reads, as a CDN or a public release bucket serves them.
        client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*"}
        ]}))  # fmt: skip
        yield server
    server.stop()


def _shim(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TERMINAI_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "terminai_shim.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def _trust(release) -> list[str]:
    return ["--dev", "--trusted-root", str(release.directory / "dev-trusted-root.json")]


def _pointer(client, prefix: str, channel: str = "dev") -> ChannelPointer | None:
    try:
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{channel_key(channel)}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return ChannelPointer.from_json(body)


def test_publish_to_s3_then_fetch_back_over_http_and_s3(ctx, release, s3, tmp_path):
    store = f"s3://{BUCKET}/one"
    result = publish(ctx, release.directory, store)
    m = release.manifest
    assert result.pointer_written and result.blobs_uploaded == len(m.artifacts)
    assert result.bytes_uploaded == sum(a.size for a in m.artifacts)
    client = s3.client()
    # Headers a CDN relies on: immutable blobs, short-lived pointers.
    rootfs = m.artifact("rootfs")
    assert rootfs.size > 16 << 20  # big enough to go up in parts, checked at the end
    head = client.head_object(Bucket=BUCKET, Key=f"one/{blob_key(rootfs.sha256)}")
    assert head["ContentType"] == rootfs.media_type
    assert "immutable" in head["CacheControl"] and head["Metadata"]["sha256"] == rootfs.sha256
    pointer_head = client.head_object(Bucket=BUCKET, Key=f"one/{channel_key('dev')}")
    assert pointer_head["ContentType"] == "application/json" and "max-age=60" in pointer_head["CacheControl"]
    manifest_head = client.head_object(Bucket=BUCKET, Key=f"one/{release_key(m.release)}")
    assert manifest_head["ContentType"] == "application/vnd.terminai.manifest.v1+json"
    pointer = _pointer(client, "one")
    assert pointer is not None and pointer.release == m.release and pointer.serial >= m.serial

    # The shim follows the channel over plain HTTP (loopback only, explicitly allowed)...
    http = _shim("fetch", "--store", f"{s3.endpoint}/{BUCKET}/one", "--channel", "dev", "--allow-http",
                 *_trust(release), cache=tmp_path / "http")  # fmt: skip
    assert http.returncode == 0, http.stderr
    assert (tmp_path / "http/blobs/sha256" / rootfs.sha256).stat().st_size == rootfs.size
    # ...and through boto3 from s3://.
    via_s3 = _shim("verify", "--store", store, "--channel", "dev", *_trust(release), cache=tmp_path / "s3")
    assert via_s3.returncode == 0, via_s3.stderr
    # Without a trust root for the development signer the pinned policy refuses it.
    pinned = _shim("verify", "--store", store, "--channel", "dev", cache=tmp_path / "pinned")
    assert pinned.returncode != 0 and "does not verify" in pinned.stderr

    # Publishing again uploads nothing and leaves the pointer alone...
    again = publish(ctx, release.directory, store)
    assert (again.blobs_uploaded, again.bytes_uploaded, again.pointer_written) == (0, 0, False)
    assert _pointer(client, "one") == pointer
    # ...even from a directory signed again (a CI re-run): the published signatures verify for the
    # same bytes and are kept; a signature for other bytes would be refused.
    from terminai_release.release import sign_release

    resigned = tmp_path / "resigned"
    subprocess.run(["cp", "-a", str(release.directory), str(resigned)], check=True)
    sign_release(ctx, type(release)(resigned, release.manifest))
    assert (resigned / "manifest.json.sigstore.json").read_bytes() != (
        release.directory / "manifest.json.sigstore.json").read_bytes()  # fmt: skip
    assert publish(ctx, resigned, store).bytes_uploaded == 0


def test_killed_publish_keeps_the_channel_and_a_rerun_completes_it(ctx, release, s3, tmp_path):
    """Kill `inv publish` right after its first blob; a reader polling all
    along must never see a channel pointing at a release with missing blobs."""
    store = f"s3://{BUCKET}/killed"
    client = s3.client()
    violations: list[str] = []
    observed: list[int] = []
    stop = threading.Event()

    def check_once() -> None:
        pointer = _pointer(client, "killed")
        if pointer is None:
            return
        observed.append(pointer.serial)
        try:
            body = client.get_object(Bucket=BUCKET, Key=f"killed/{release_key(pointer.release)}")["Body"].read()
        except client.exceptions.ClientError:
            violations.append(f"the manifest is missing while the channel pointed at {pointer.release}")
            return
        for a in Manifest.from_json(body).artifacts:
            try:
                client.head_object(Bucket=BUCKET, Key=f"killed/{blob_key(a.sha256)}")
            except client.exceptions.ClientError:
                violations.append(f"{a.name} missing while the channel pointed at {pointer.release}")

    def reader() -> None:
        while not stop.is_set():
            try:
                check_once()
            except Exception as exc:  # a reader that dies would prove nothing
                violations.append(f"reader failed: {exc!r}")
            time.sleep(0.02)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    cmd = [sys.executable, "-m", "invoke", "publish", "--json", "--store", store,
           "--release-dir", str(release.directory)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ), start_new_session=True)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line) if line.startswith("{") else {}
        if str(event.get("message", "")).startswith("uploaded "):
            os.killpg(proc.pid, signal.SIGKILL)  # the publisher dies half-way
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _pointer(client, "killed") is None  # no channel yet: readers see no release, not a broken one
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="killed/releases/").get("KeyCount", 0)
    assert listed == 0  # the release folder comes only after every blob

    rerun = publish(ctx, release.directory, store)
    stop.set()
    thread.join()
    check_once()  # at least once with the channel in place
    assert observed, "the reader never saw the channel"
    assert rerun.pointer_written
    assert 0 < rerun.blobs_uploaded < len(release.manifest.artifacts)  # only what the killed run had not sent
    assert not violations, violations
    assert _shim("verify", "--store", store, "--channel", "dev", *_trust(release),
                 cache=tmp_path / "c").returncode == 0  # fmt: skip


def test_promote_resigns_a_pointer_and_refuses_incomplete_or_unverified_releases(ctx, release, s3):
    store = f"s3://{BUCKET}/promote"
    client = s3.client()
    publish(ctx, release.directory, store)
    version = release.manifest.release
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="promote/")["Contents"]}
    beta = promote(ctx, store, version, source="dev", target="beta")
    assert beta.pointer_written and beta.bytes_uploaded == 0
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="promote/")["Contents"]}
    new = set(after) - set(before)
    assert new == {"promote/channels/beta.json"} | {k for k in new if k.startswith("promote/channels/bundles/")}
    assert all(after[k] == v for k, v in before.items())  # nothing re-uploaded or changed
    dev, promoted = _pointer(client, "promote"), _pointer(client, "promote", "beta")
    assert promoted is not None and dev is not None and promoted.manifest_sha256 == dev.manifest_sha256
    # Serials only increase: a second promotion of the same release is a no-op.
    assert not promote(ctx, store, version, source="dev", target="beta").pointer_written

    with pytest.raises(BuildError, match="points at"):
        promote(ctx, store, "9.9.9", source="dev", target="stable")
    # A blob missing from the store: refused, stable untouched.
    kernel = release.manifest.artifact("kernel")
    key = f"promote/{blob_key(kernel.sha256)}"
    saved = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(BuildError, match=r"incomplete in the store.*" + re.escape(kernel.name)):
        promote(ctx, store, version, source="beta", target="stable")
    assert _pointer(client, "promote", "stable") is None
    client.put_object(Bucket=BUCKET, Key=key, Body=saved, Metadata={"sha256": kernel.sha256})
    # A manifest signature that does not verify: refused.
    bundle_key = f"promote/{release_key(version, 'manifest.json.sigstore.json')}"
    good = client.get_object(Bucket=BUCKET, Key=bundle_key)["Body"].read()
    other = (release.directory / "provenance.sigstore.json").read_bytes()  # a valid bundle, for other bytes
    client.put_object(Bucket=BUCKET, Key=bundle_key, Body=other)
    with pytest.raises(BuildError, match="does not verify"):
        promote(ctx, store, version, source="beta", target="stable")
    assert _pointer(client, "promote", "stable") is None
    client.put_object(Bucket=BUCKET, Key=bundle_key, Body=good)
    stable = promote(ctx, store, version, source="beta", target="stable")
    assert stable.pointer_written and stable.serial >= promoted.serial
    # The same promotion again is a no-op, unless the pointer is past half its validity: then it is
    # re-signed with a later expiry and a higher serial (serials only increase).
    assert not promote(ctx, store, version, source="beta", target="stable").pointer_written
    refreshed = promote(ctx, store, version, source="beta", target="stable", valid_days=1000)
    assert refreshed.pointer_written and refreshed.serial == stable.serial + 1


def test_bad_stores_and_bad_releases_are_refused_before_anything_is_visible(ctx, release, s3, tmp_path):
    client = s3.client()
    with pytest.raises(StoreError, match="bucket no-such-bucket does not exist"):
        publish(ctx, release.directory, "s3://no-such-bucket/x")
    unreachable = environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    with unreachable, pytest.raises(StoreError, match="unreachable"):
        publish(ctx, release.directory, f"s3://{BUCKET}/x")
    refusing = MotoServer(auth=True)
    try:
        with environment(refusing.env), pytest.raises(StoreError, match="refused the credentials"):
            publish(ctx, release.directory, f"s3://{BUCKET}/x")
    finally:
        refusing.stop()
    none = str(tmp_path / "none")
    anonymous = environment({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                             "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_CONFIG_FILE": none})  # fmt: skip
    with anonymous, pytest.raises(StoreError, match="no AWS credentials"):
        publish(ctx, release.directory, f"s3://{BUCKET}/x")

    # Something else under a content-addressed key: never overwritten.
    kernel = release.manifest.artifact("kernel")
    client.put_object(Bucket=BUCKET, Key=f"squat/{blob_key(kernel.sha256)}", Body=b"not the kernel")
    with pytest.raises(StoreError, match="already exists with different content"):
        publish(ctx, release.directory, f"s3://{BUCKET}/squat")
    assert client.get_object(Bucket=BUCKET, Key=f"squat/{blob_key(kernel.sha256)}")["Body"].read() == b"not the kernel"
    assert _pointer(client, "squat") is None
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="squat/releases/").get("KeyCount", 0) == 0

    # A manifest that does not verify: nothing is uploaded at all.
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-a", str(release.directory), str(bad)], check=True)
    data = bytearray((bad / "manifest.json").read_bytes())
    data[data.index(b'"serial"') + 11] ^= 1
    (bad / "manifest.json").write_bytes(bytes(data))
    with pytest.raises(BuildError, match=r"refusing to publish.*does not verify"):
        publish(ctx, bad, f"s3://{BUCKET}/unverified")
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="unverified/").get("KeyCount", 0) == 0


def test_a_newer_pointer_on_the_server_is_never_overwritten(ctx, release, tmp_path):
    """Someone else published a newer release (a higher serial): refused, for
    both stores; a pointer changed between read and write is a conflict."""
    from terminai_release.release import build_release, sign_release

    older = build_release(ctx, channel="dev", serial=release.manifest.serial - 1, out=tmp_path / "older")
    sign_release(ctx, older)
    for url in (tmp_path.joinpath("mirror").as_uri(), None):
        if url is None:
            server = MotoServer()
            with environment(server.env):
                server.client().create_bucket(Bucket=BUCKET)
                _newer_refused(ctx, release, older, f"s3://{BUCKET}/race")
            server.stop()
        else:
            _newer_refused(ctx, release, older, url)


def _newer_refused(ctx, release, older, url: str) -> None:
    publish(ctx, release.directory, url)
    store = open_store(url)
    pointer, token = store.read(channel_key("dev"))
    with pytest.raises(StoreError, match="someone else published a newer release"):
        publish(ctx, older.directory, url)
    assert store.read(channel_key("dev")) == (pointer, token)
    # The conditional write itself: a stale version token is refused.
    headers = Headers("application/json", "no-store")
    store.put_bytes(channel_key("dev"), pointer + b"\n", headers, replaces=token)  # another publisher's write
    with pytest.raises(Conflict):
        store.put_bytes(channel_key("dev"), pointer, headers, replaces=token)
    assert store.read(channel_key("dev"))[0] == pointer + b"\n"
    with pytest.raises(Conflict):
        store.put_bytes(channel_key("dev"), pointer, headers, replaces=None)  # "must not exist yet"


def test_file_mirror_has_the_same_layout_and_the_shim_follows_it(ctx, release, tmp_path):
    mirror = tmp_path / "mirror"
    publish(ctx, release.directory, mirror.as_uri())
    m = release.manifest
    for a in m.artifacts:
        assert (mirror / blob_key(a.sha256)).stat().st_size == a.size
    assert (mirror / release_key(m.release)).read_bytes() == (release.directory / "manifest.json").read_bytes()
    import jsonschema

    schema = json.loads((REPO / "manifests/channel.schema.json").read_text())
    jsonschema.validate(json.loads((mirror / channel_key("dev")).read_text()), schema)
    assert not [p for p in mirror.rglob("*.tmp*")]
    ok = _shim("verify", "--store", str(mirror), "--channel", "dev", *_trust(release), cache=tmp_path / "c")
    assert ok.returncode == 0, ok.stderr
    # A pointer tampered with on the mirror: its digest no longer names its bundle.
    pointer = mirror / channel_key("dev")
    pointer.write_bytes(pointer.read_bytes().replace(b'"serial": ', b'"serial": 1'))
    bad = _shim("verify", "--store", str(mirror), "--channel", "dev", *_trust(release), cache=tmp_path / "d")
    assert bad.returncode != 0 and "channels/bundles" in bad.stderr


def test_a_profile_fetches_and_verifies_only_its_own_layers_from_a_hostile_mirror(ctx, release, tmp_path, monkeypatch):
    """The node layer's blob is rewritten on the mirror: a session with the
    standard profile never fetches it and boots; one with the full profile
    is refused before anything boots, naming the blob."""
    from terminai_shim.errors import ShimError
    from terminai_shim.launch import LaunchRequest, ReleaseSource, Trust, resolve

    mirror = tmp_path / "mirror"
    publish(ctx, release.directory, mirror.as_uri())
    m = release.manifest
    node = m.artifact("rootfs-layer", variant="node")
    blob = mirror / blob_key(node.sha256)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    monkeypatch.setenv("TERMINAI_CACHE", str(tmp_path / "cache"))
    trust = Trust(trusted_root=release.directory / "dev-trusted-root.json", dev=True)

    def request(profile: str) -> LaunchRequest:
        return LaunchRequest(source=ReleaseSource(store=str(mirror), channel="dev"), trust=trust, backend="qemu",
                             profile=profile)  # fmt: skip

    launch = resolve(request("standard"))
    assert [layer.name for layer in launch.config.layers] == ["tools"] and launch.config.profile == "standard"
    fetched = {p.name for p in (tmp_path / "cache/blobs/sha256").iterdir()}
    assert m.artifact("rootfs-layer", variant="tools").sha256 in fetched and node.sha256 not in fetched
    assert launch.config.layers[0].sha256 == m.artifact("rootfs-layer", variant="tools").sha256
    with pytest.raises(ShimError, match=node.sha256[:12]):
        resolve(request("full"))
