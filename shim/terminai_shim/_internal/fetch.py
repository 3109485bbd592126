"""Downloads into a content-addressed blob cache, with resume.

``<cache>/blobs/sha256/<digest>`` holds complete, verified files only: a
download goes to ``.<digest>.partial`` (with its validator in
``.<digest>.partial.json``), is hashed while it streams, and is renamed
into place only when its size and sha256 match what the signed manifest
says. An interrupted download resumes with ``Range`` + ``If-Range``; 206
appends, 200 starts over, 416 starts over once. A per-digest lock lets
concurrent shims share one download. A cached blob is re-hashed before use
unless its size, mtime and inode are exactly those recorded when it was
verified (a digest file alone is never trusted).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShimError
from .fsutil import cache_root, locked, sha256_file, stamp, stamp_holds, write_atomic

CHUNK = 1 << 20
Progress = Callable[[str, int, int], None]


class FetchError(ShimError):
    code = "FETCH_FAILED"


@dataclass(frozen=True)
class Source:
    """Where a release lives: ``file://DIR``, ``http(s)://HOST/PATH``."""

    url: str
    allow_http: bool = False

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme == "http":
            host = parsed.hostname or ""
            loopback = host in ("localhost", "::1") or host.startswith("127.")
            if not (loopback and self.allow_http):
                raise FetchError(
                    f"refusing plain http for {self.url}",
                    hint="use https; plain http is allowed only on loopback with --allow-http",
                )
        elif parsed.scheme not in ("https", "file", "s3"):
            raise FetchError(
                f"unsupported URL scheme {parsed.scheme!r} in {self.url}", hint="use https://, s3:// or file://"
            )

    def join(self, relative: str) -> str:
        return self.url.rstrip("/") + "/" + relative

    def read(self, relative: str, limit: int = 16 << 20) -> bytes:
        url = self.join(relative)
        try:
            if url.startswith("s3://"):
                with _open(url, 0, None) as s3:
                    data: bytes = s3.read(limit + 1)
            else:
                with _urlopen(url, self.allow_http) as resp:
                    data = resp.read(limit + 1)
        except (_Retry, _RangeRefused, OSError, urllib.error.URLError) as exc:
            raise FetchError(f"cannot read {url}: {exc}", hint="check the URL and the network") from None
        if len(data) > limit:
            raise FetchError(f"{url} is larger than {limit} bytes")
        return data


class BlobCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        return self.root / digest

    def _stamp_file(self, digest: str) -> Path:
        return self.root / f".{digest}.verified"

    def valid(self, digest: str, size: int) -> bool:
        """Present and intact: cheap when untouched since verification."""
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        try:
            if stamp_holds(json.loads(self._stamp_file(digest).read_text()), st) and st.st_size == size:
                return True
        except (OSError, ValueError):
            pass
        if st.st_size != size or sha256_file(path) != digest:
            return False
        write_atomic(self._stamp_file(digest), json.dumps(stamp(path.stat())).encode())
        return True

    def fetch(self, source: Source, location: str, digest: str, size: int, progress: Progress | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root / f".{digest}.lock"):
            if self.valid(digest, size):
                return self.path(digest)
            if self.path(digest).exists():  # damaged in the cache: fetched again, never used
                self.path(digest).unlink()
            last: Exception | None = None
            for attempt in range(4):
                try:
                    return self._download(source, location, digest, size, progress)
                except _Retry as exc:
                    last = exc
                    time.sleep(min(2.0, 0.1 * 2**attempt))
            raise FetchError(f"downloading {source.join(location)} failed: {last}", hint="try again; it resumes")

    def _download(self, source: Source, location: str, digest: str, size: int, progress: Progress | None) -> Path:
        partial = self.root / f".{digest}.partial"
        meta = self.root / f".{digest}.partial.json"
        url = source.join(location)
        if urllib.parse.urlparse(url).scheme == "file":
            return self._copy_local(urllib.parse.urlparse(url).path, digest, size)
        have = partial.stat().st_size if partial.exists() else 0
        validator = json.loads(meta.read_text()).get("validator") if have and meta.exists() else None
        if have > size:
            partial.unlink()
            have = 0
        try:
            resp = _open(url, have if validator else 0, validator, source.allow_http)
        except _RangeRefused:  # our partial is not a prefix of what the store has now
            partial.unlink(missing_ok=True)
            raise _Retry("416 on resume: starting over") from None
        h = _BackgroundHash()
        try:
            with resp:
                if resp.status == 206 and have:
                    mode = "ab"
                    with partial.open("rb") as f:  # the kept prefix is hashed again, never trusted
                        while chunk := f.read(CHUNK):
                            h.update(chunk)
                else:
                    mode, have = "wb", 0
                validator = resp.validator
                write_atomic(meta, json.dumps({"validator": validator}).encode())
                received = have
                try:
                    with partial.open(mode) as out:
                        for chunk in _read_ahead(resp):
                            received += len(chunk)
                            if received > size:
                                raise FetchError(
                                    f"{url} sent more than the {size} bytes the manifest lists",
                                    hint="the server or the release is wrong; nothing was kept",
                                )
                            h.update(chunk)
                            out.write(chunk)
                            if progress is not None:
                                progress(location, received, size)
                        out.flush()
                        os.fsync(out.fileno())
                except FetchError:
                    partial.unlink(missing_ok=True)
                    meta.unlink(missing_ok=True)
                    raise
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        partial.unlink(missing_ok=True)
                        meta.unlink(missing_ok=True)
                        raise FetchError(
                            f"disk full while downloading {location} into {self.root}",
                            hint=f"free at least {size} bytes, or set TERMINAI_CACHE to a larger disk",
                        ) from None
                    raise _Retry(str(exc)) from None
            if received < size:
                raise _Retry(f"connection ended after {received} of {size} bytes")
            actual = h.hexdigest()
            if actual != digest:
                partial.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                raise FetchError(f"{url} has sha256 {actual}; the manifest says {digest}", hint="nothing was kept")
            os.replace(partial, self.path(digest))
            meta.unlink(missing_ok=True)
            write_atomic(self._stamp_file(digest), json.dumps(stamp(self.path(digest).stat())).encode())
            return self.path(digest)
        finally:
            h.close()

    def _copy_local(self, path: str, digest: str, size: int) -> Path:
        """A local release's file, copied and hashed in one pass, never past
        the size the manifest lists (a link to /dev/zero stops there)."""
        tmp = self.root / f".{digest}.partial"
        h = hashlib.sha256()
        copied = 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang us
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FetchError(f"{path} is not a regular file", hint="the release directory is wrong")
            with os.fdopen(fd, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(min(CHUNK, size + 1 - copied)):
                    copied += len(chunk)
                    if copied > size:
                        raise FetchError(f"{path} is larger than the {size} bytes the manifest lists",
                                         hint="the release directory is wrong; nothing was kept")  # fmt: skip
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except FetchError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise FetchError(f"disk full while copying {path} into {self.root}") from None
            raise FetchError(f"cannot read {path}: {exc}") from None
        if copied != size or h.hexdigest() != digest:
            tmp.unlink()
            raise FetchError(f"{path} does not match the manifest (size {size}, sha256 {digest})")
        os.replace(tmp, self.path(digest))
        write_atomic(self._stamp_file(digest), json.dumps(stamp(self.path(digest).stat())).encode())
        return self.path(digest)


class _RangeRefused(Exception):
    pass


@dataclass
class _Response:
    """What the download loop needs of an HTTP or S3 response."""

    status: int
    validator: str | None
    body: Any

    def read(self, n: int) -> bytes:
        try:
            data: bytes = self.body.read(n)
        except OSError:
            raise
        except Exception as exc:  # botocore's stream errors are not OSErrors
            raise ConnectionError(f"stream broke: {exc}") from None
        return data

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.body.close()


class _SameRules(urllib.request.HTTPRedirectHandler):
    """Every redirect hop must satisfy the rule the first URL did: https
    (plain http only to loopback, and only when allowed)."""

    def __init__(self, allow_http: bool) -> None:
        self.allow_http = allow_http

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        target = urllib.parse.urlparse(newurl)
        if target.scheme not in ("https", "http"):
            raise FetchError(f"{req.full_url} redirects to {newurl}: refused", hint="only https redirects are followed")
        Source(newurl, allow_http=self.allow_http)  # raises FetchError for plain http off loopback
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _urlopen(request: Any, allow_http: bool = False, timeout: float = 60) -> Any:
    return urllib.request.build_opener(_SameRules(allow_http)).open(request, timeout=timeout)


def _open(url: str, offset: int, validator: str | None, allow_http: bool = False) -> _Response:
    """GET ``url`` from ``offset`` (Range with If-Range / IfMatch), over HTTP(S) or S3."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "s3":
        return _open_s3(parsed.netloc, parsed.path.lstrip("/"), offset, validator)
    request = urllib.request.Request(url)
    if offset and validator:
        request.add_header("Range", f"bytes={offset}-")
        request.add_header("If-Range", validator)
    try:
        resp = _urlopen(request, allow_http)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            raise _RangeRefused from None
        if exc.code >= 500 or exc.code == 429:  # the store's trouble, not ours: retried with backoff
            raise _Retry(f"HTTP {exc.code}") from None
        if 300 <= exc.code < 400:
            raise FetchError(f"{url}: redirect refused (HTTP {exc.code} to {exc.headers.get('Location')!r})",
                             hint="only https redirects are followed") from None  # fmt: skip
        raise FetchError(f"{url}: HTTP {exc.code}", hint="check the release store") from None
    except (OSError, urllib.error.URLError) as exc:
        raise _Retry(str(exc)) from None
    return _Response(resp.status, resp.headers.get("ETag") or resp.headers.get("Last-Modified"), resp)


def _s3_client() -> Any:
    try:
        import boto3
    except ImportError:
        raise FetchError("s3:// needs boto3", hint="pip install boto3, or fetch over https") from None
    # Region, credentials and endpoint (AWS_ENDPOINT_URL) come from the standard AWS configuration.
    return boto3.client("s3")


def _open_s3(bucket: str, key: str, offset: int, validator: str | None) -> _Response:
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client()
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if offset and validator:
        args.update(Range=f"bytes={offset}-", IfMatch=validator)
    try:
        resp = client.get_object(**args)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidRange", "PreconditionFailed", "412", "416"):
            raise _RangeRefused from None
        if code in ("InternalError", "ServiceUnavailable", "SlowDown", "500", "503"):
            raise _Retry(f"S3 {code}") from None
        raise FetchError(
            f"s3://{bucket}/{key}: {code or exc}", hint="check the bucket, the key and the credentials"
        ) from None
    except BotoCoreError as exc:
        raise _Retry(str(exc)) from None
    status = 206 if resp.get("ContentRange") else 200
    return _Response(status, resp.get("ETag"), resp["Body"])


class _BackgroundHash:
    """sha256 on its own thread, so hashing overlaps writing the same chunks."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="fetch-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()


def _read_ahead(resp: Any, depth: int = 8) -> Iterator[bytes]:
    """Chunks of ``resp``, read by a second thread: the network read overlaps
    hashing and writing (all three release the GIL on large buffers)."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                chunks.put(chunk)
            chunks.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            chunks.put(exc)

    thread = threading.Thread(target=reader, name="fetch-read", daemon=True)
    thread.start()
    try:
        while True:
            item = chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                chunks.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _Retry(Exception):
    """A transient failure: the partial file is kept and the download resumes."""
