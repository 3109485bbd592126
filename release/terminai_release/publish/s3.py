"""An S3 (or S3-compatible) store through boto3.

Credentials, region and endpoint come from the standard AWS configuration
and environment (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, web-identity role
assumption in CI...), so nothing here knows which provider it talks to.
Large files go up in parts, each with a SHA-256 checksum the server checks;
at the end the object's composite checksum must equal the one computed
here from the same parts, and the whole file's sha256 is stored in the
object's metadata. Channel pointers are written with ``If-Match`` /
``If-None-Match`` so a concurrent publish is refused, never overwritten.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from .store import Conflict, Headers, ObjectInfo, Store, StoreError

PART = 16 << 20  # multipart above this size, in parts of this size


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class S3Store(Store):
    def __init__(self, url: str) -> None:
        rest = url.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/")
        self.url = url.rstrip("/")
        if not self.bucket:
            raise StoreError(f"no bucket in {url}", hint="use s3://BUCKET/PREFIX")
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()  # not the cached default session: the environment as it is now
        self.client: Any = session.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, what: str) -> StoreError:
        """A boto3 failure as one plain sentence and what to do about it."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return StoreError(
                f"{what}: no AWS credentials",
                hint="set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or assume a role",
            )
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"{what}: the store is unreachable ({exc})",
                              hint="check AWS_ENDPOINT_URL / the region and the network")  # fmt: skip
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StoreError(f"{what}: bucket {self.bucket} does not exist", hint="create it, or fix --store")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken"):
                return StoreError(f"{what}: the store refused the credentials ({code})",
                                  hint="check the credentials and the role's permissions on the bucket")  # fmt: skip
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return Conflict(f"{what}: the object changed since it was read",
                                hint="someone else published; run again to see the new state")  # fmt: skip
            return StoreError(f"{what}: {code or exc}", hint="check the store and try again")
        return StoreError(f"{what}: {exc}", hint="check the store and try again")

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                raise StoreError(f"bucket {self.bucket} does not exist", hint="create it, or fix --store") from None
            raise self._error(exc, f"cannot reach bucket {self.bucket}") from None

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(exc, f"cannot look at {key}") from None
        except Exception as exc:
            raise self._error(exc, f"cannot look at {key}") from None
        return ObjectInfo(int(r["ContentLength"]), r.get("Metadata", {}).get("sha256"), str(r["ETag"]))

    def read(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return r["Body"].read(), str(r["ETag"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise self._error(exc, f"cannot read {key}") from None
        except Exception as exc:
            raise self._error(exc, f"cannot read {key}") from None

    def digest(self, key: str) -> str:
        h = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            while chunk := body.read(1 << 20):
                h.update(chunk)
        except Exception as exc:
            raise self._error(exc, f"cannot read {key} back") from None
        return h.hexdigest()

    def put_file(self, key: str, path: Path, sha256: str, headers: Headers) -> None:
        args = {"Bucket": self.bucket, "Key": self._key(key), "ContentType": headers.content_type,
                "CacheControl": headers.cache_control, "Metadata": {"sha256": sha256}}  # fmt: skip
        size = path.stat().st_size
        try:
            if size <= PART:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise StoreError(f"{path} changed since it was verified", hint="rebuild the release")
                self.client.put_object(Body=data, ChecksumSHA256=_b64(hashlib.sha256(data).digest()), **args)
                return
            self._multipart(args, path, sha256)
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc, f"cannot upload {key}") from None

    def _multipart(self, args: dict[str, Any], path: Path, sha256: str) -> None:
        upload = self.client.create_multipart_upload(ChecksumAlgorithm="SHA256", **args)["UploadId"]
        whole = hashlib.sha256()
        part_digests: list[bytes] = []
        parts = []
        try:
            with path.open("rb") as f:
                while chunk := f.read(PART):
                    whole.update(chunk)
                    digest = hashlib.sha256(chunk).digest()
                    part_digests.append(digest)
                    r = self.client.upload_part(
                        Bucket=args["Bucket"], Key=args["Key"], UploadId=upload, PartNumber=len(parts) + 1,
                        Body=chunk, ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(digest),
                    )  # fmt: skip
                    parts.append({"PartNumber": len(parts) + 1, "ETag": r["ETag"], "ChecksumSHA256": _b64(digest)})
            if whole.hexdigest() != sha256:
                raise StoreError(f"{path} changed since it was verified", hint="rebuild the release")
            self.client.complete_multipart_upload(
                Bucket=args["Bucket"], Key=args["Key"], UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=args["Bucket"], Key=args["Key"], UploadId=upload)
            except Exception:
                pass  # an abandoned upload costs storage, not correctness; lifecycle rules remove it
            raise
        # The digest checked at the end: the server's composite checksum over
        # the parts it stored must be the one computed from the bytes sent.
        expected = _b64(hashlib.sha256(b"".join(part_digests)).digest())
        got = self.client.head_object(Bucket=args["Bucket"], Key=args["Key"], ChecksumMode="ENABLED")
        stored = str(got.get("ChecksumSHA256", "")).split("-")[0]
        if stored != expected or int(got["ContentLength"]) != path.stat().st_size:
            self.client.delete_object(Bucket=args["Bucket"], Key=args["Key"])
            raise StoreError(f"{args['Key']} did not arrive intact (checksum {stored}, expected {expected})",
                             hint="publish again")  # fmt: skip

    def put_bytes(self, key: str, data: bytes, headers: Headers, *, replaces: str | None) -> None:
        condition = {"IfMatch": replaces} if replaces is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=headers.content_type,
                CacheControl=headers.cache_control, Metadata={"sha256": hashlib.sha256(data).hexdigest()},
                ChecksumSHA256=_b64(hashlib.sha256(data).digest()), **condition,
            )  # fmt: skip
        except Exception as exc:
            raise self._error(exc, f"cannot write {key}") from None
