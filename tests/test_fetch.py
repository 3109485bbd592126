"""Downloads into the content-addressed cache against a real HTTP server on
loopback that can misbehave: resume, retries, lies, disk full, tampering."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from terminai_shim._internal.fetch import BlobCache, FetchError, Source

pytestmark = pytest.mark.unit
DATA = os.urandom(3 << 20)
DIGEST = hashlib.sha256(DATA).hexdigest()


class Server:
    """Serves DATA at /blob with Range/If-Range; ``mode`` injects faults."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.body_bytes = 0
        self.requests: list[dict[str, str]] = []
        self.cut_once = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(dict(self.headers))
                if outer.mode.startswith("redirect:"):
                    self.send_response(302)
                    self.send_header("Location", outer.mode.split(":", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = DATA if outer.mode != "other-bytes" else bytes(len(DATA))
                if outer.mode == "longer":
                    data = DATA + b"extra bytes the manifest does not list"
                start = 0
                rng = self.headers.get("Range")
                if rng and outer.mode == "416":
                    outer.mode = "ok"
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng and self.headers.get("If-Range") == '"v1"' and outer.mode != "ignore-range":
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("ETag", '"v1"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if outer.mode in ("cut-half", "ignore-range") or (outer.mode == "cut-once" and not outer.cut_once):
                    outer.cut_once = True
                    body = body[: len(DATA) // 2]
                elif outer.mode == "tiny":
                    body = body[:10]
                outer.body_bytes += len(body)
                self.wfile.write(body)
                self.wfile.flush()
                if len(body) < len(data) - start:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.source = Source(f"http://127.0.0.1:{self.httpd.server_address[1]}", allow_http=True)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def _left(cache: BlobCache) -> list[str]:
    return sorted(p.name for p in cache.root.iterdir() if not p.name.endswith(".lock"))


def test_download_verifies_and_caches(server, tmp_path):
    cache = BlobCache(tmp_path)
    path = cache.fetch(server.source, "blob", DIGEST, len(DATA))
    assert path.read_bytes() == DATA and server.body_bytes == len(DATA)
    cache.fetch(server.source, "blob", DIGEST, len(DATA))
    assert server.body_bytes == len(DATA), "a valid cached blob is not downloaded again"


def test_resume_after_a_cut_transfers_only_the_missing_half(server, tmp_path):
    server.mode = "cut-once"
    path = BlobCache(tmp_path).fetch(server.source, "blob", DIGEST, len(DATA))
    assert path.read_bytes() == DATA
    assert server.body_bytes == len(DATA), f"transferred {server.body_bytes} bytes for {len(DATA)}"
    assert server.requests[1]["Range"] == f"bytes={len(DATA) // 2}-" and server.requests[1]["If-Range"] == '"v1"'


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    cache = BlobCache(tmp_path)
    server.mode = "ignore-range"
    with pytest.raises(FetchError, match="connection ended after"):
        cache.fetch(server.source, "blob", DIGEST, len(DATA))
    server.mode = "ok"
    assert cache.fetch(server.source, "blob", DIGEST, len(DATA)).read_bytes() == DATA


def test_416_on_resume_starts_over(server, tmp_path):
    cache = BlobCache(tmp_path)
    (tmp_path / f".{DIGEST}.partial").write_bytes(DATA[:1000])
    (tmp_path / f".{DIGEST}.partial.json").write_text('{"validator": "\\"v1\\""}')
    server.mode = "416"
    assert cache.fetch(server.source, "blob", DIGEST, len(DATA)).read_bytes() == DATA


def test_truncated_download_is_an_error_that_keeps_nothing_visible(server, tmp_path):
    server.mode = "tiny"
    cache = BlobCache(tmp_path)
    with pytest.raises(FetchError, match=r"connection ended after \d+ of"):
        cache.fetch(server.source, "blob", DIGEST, len(DATA))
    assert not cache.path(DIGEST).exists()


def test_server_that_lies_about_length(server, tmp_path):
    server.mode = "longer"
    cache = BlobCache(tmp_path)
    with pytest.raises(FetchError, match="sent more than"):
        cache.fetch(server.source, "blob", DIGEST, len(DATA))
    assert _left(cache) == []


def test_wrong_bytes_are_refused(server, tmp_path):
    server.mode = "other-bytes"
    cache = BlobCache(tmp_path)
    with pytest.raises(FetchError, match=r"has sha256 .* the manifest says"):
        cache.fetch(server.source, "blob", DIGEST, len(DATA))
    assert _left(cache) == []


def test_modified_cached_blob_is_detected_and_fetched_again(server, tmp_path):
    cache = BlobCache(tmp_path)
    path = cache.fetch(server.source, "blob", DIGEST, len(DATA))
    with path.open("r+b") as f:
        f.write(b"X")
    assert not cache.valid(DIGEST, len(DATA))
    assert cache.fetch(server.source, "blob", DIGEST, len(DATA)).read_bytes() == DATA
    assert server.body_bytes == 2 * len(DATA)


def test_blob_flipped_in_place_with_its_mtime_restored_is_detected(server, tmp_path):
    """A local user (or the same one, by mistake) changes a verified blob and puts its mtime back."""
    cache = BlobCache(tmp_path)
    path = cache.fetch(server.source, "blob", DIGEST, len(DATA))
    st = path.stat()
    with path.open("r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    assert not cache.valid(DIGEST, len(DATA)), "a stamp of size, mtime and inode alone would say valid"
    assert cache.fetch(server.source, "blob", DIGEST, len(DATA)).read_bytes() == DATA


@pytest.mark.parametrize("target", ["http://example.invalid/blob", "ftp://127.0.0.1/blob", "file:///etc/passwd"])
def test_every_redirect_hop_obeys_the_scheme_rule(server, tmp_path, target):
    server.mode = f"redirect:{target}"
    with pytest.raises(FetchError, match=r"(?i)refus|redirect"):
        BlobCache(tmp_path).fetch(server.source, "blob", DIGEST, len(DATA))
    with pytest.raises(FetchError, match=r"(?i)refus|redirect"):
        server.source.read("manifest.json")


def test_local_release_copies_stop_at_the_listed_size(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / "zero").symlink_to("/dev/zero")
    (release / "big").write_bytes(DATA + b"more")
    (release / "ok").write_bytes(DATA)
    cache = BlobCache(tmp_path / "cache")
    source = Source(release.as_uri())
    with pytest.raises(FetchError, match="not a regular file"):
        cache.fetch(source, "zero", DIGEST, len(DATA))
    with pytest.raises(FetchError, match="larger than"):
        cache.fetch(source, "big", DIGEST, len(DATA))
    assert _left(cache) == []
    assert cache.fetch(source, "ok", DIGEST, len(DATA)).read_bytes() == DATA


def test_concurrent_fetches_share_one_download(server, tmp_path):
    cache = BlobCache(tmp_path)
    errors = []

    def one():
        try:
            assert cache.fetch(server.source, "blob", DIGEST, len(DATA)).read_bytes() == DATA
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and server.body_bytes == len(DATA)


def _open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


def test_disk_full_is_reported_and_leaves_nothing(server, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        cache = BlobCache(small / "blobs")
        with pytest.raises(FetchError, match="disk full"):
            cache.fetch(server.source, "blob", DIGEST, len(DATA))
        assert _left(cache) == []
        assert [p for p in _open_files() if p.startswith(str(small))] == [], "the failed fetch kept files open"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_plain_http_only_on_loopback_with_a_flag():
    with pytest.raises(FetchError, match="refusing plain http"):
        Source("http://127.0.0.1:1/x")
    with pytest.raises(FetchError, match="refusing plain http"):
        Source("http://example.invalid/x", allow_http=True)
    with pytest.raises(FetchError, match="unsupported URL scheme"):
        Source("ftp://127.0.0.1/x")
    Source("https://example.invalid/x")
    Source(Path("/tmp").as_uri())


@pytest.fixture(scope="module")
def s3():
    from s3server import MotoServer, environment

    server = MotoServer()
    with environment(server.env):
        client = server.client()
        client.create_bucket(Bucket="releases")
        client.put_object(Bucket="releases", Key="store/blob", Body=DATA)
        yield client
    server.stop()


def test_s3_download_and_resume(s3, tmp_path):
    cache = BlobCache(tmp_path)
    source = Source("s3://releases/store")
    assert cache.fetch(source, "blob", DIGEST, len(DATA)).read_bytes() == DATA
    # A partial download with the object's ETag resumes with Range + IfMatch.
    cache2 = BlobCache(tmp_path / "two")
    cache2.root.mkdir()
    etag = s3.head_object(Bucket="releases", Key="store/blob")["ETag"]
    (cache2.root / f".{DIGEST}.partial").write_bytes(DATA[:1000])
    (cache2.root / f".{DIGEST}.partial.json").write_text(json.dumps({"validator": etag}))
    assert cache2.fetch(source, "blob", DIGEST, len(DATA)).read_bytes() == DATA
    # A stale validator (the object changed): start over, still correct.
    cache3 = BlobCache(tmp_path / "three")
    cache3.root.mkdir()
    (cache3.root / f".{DIGEST}.partial").write_bytes(b"x" * 1000)
    (cache3.root / f".{DIGEST}.partial.json").write_text(json.dumps({"validator": '"stale"'}))
    assert cache3.fetch(source, "blob", DIGEST, len(DATA)).read_bytes() == DATA
    with pytest.raises(FetchError, match="NoSuchKey"):
        BlobCache(tmp_path / "four").fetch(Source("s3://releases/nope"), "blob", DIGEST, len(DATA))


@pytest.mark.unit
def test_a_stamp_taken_in_the_same_clock_tick_as_a_write_is_not_trusted(tmp_path):
    """ctime comes from a coarse clock: a byte written in the same tick as the
    hash leaves it unchanged. Such a racy stamp never vouches for the bytes;
    once the file is old enough, a new stamp does. (The write-right-after-fetch
    case end to end: test_modified_cached_blob_is_detected_and_fetched_again.)"""
    from terminai_shim._internal.fsutil import RACY_NS, stamp, stamp_holds

    path = tmp_path / "blob"
    path.write_bytes(b"hashed")
    fresh = stamp(path.stat())
    assert not stamp_holds(fresh, path.stat()), "a stamp as young as the file's last change is racy"
    later = [*fresh[:4], fresh[3] + RACY_NS]  # as if taken two seconds after that change
    assert stamp_holds(later, path.stat())
    assert not stamp_holds(fresh[:4], path.stat()), "an old four-field stamp is hashed again"
