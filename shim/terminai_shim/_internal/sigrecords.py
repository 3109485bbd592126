"""Signatures verified before, remembered so that a run does not verify the
same bytes from scratch again.

Why: checking a sigstore bundle means importing sigstore and its tree
(pydantic models, TUF, cryptography's X.509): about half a second of a
warm `run` that boots in a tenth of that, spent re-proving something this
host already proved about these exact bytes. What a record stands for is
exactly one verification: the sha256 of the signed bytes, of the bundle,
of the trust root file and of the policy (issuer, identity or pattern,
what was signed) and this shim's version, all in the record's key. Change
any byte of any of them and there is no record: the signature is verified
in full again. Nothing else is skipped: the manifest is parsed and its
expiry, compatibility, channel and serial are checked on every run, and
every artifact QEMU or Docker gets is still hashed against the manifest.

A record is the key's HMAC under a per-user secret, in a directory only
the user can write (checked; otherwise records are neither read nor
written): a record copied from elsewhere, made up, or left by another
shim version does not verify, and the signature is checked in full.
Standard library only, and cheap to import.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from .. import __version__
from .fsutil import cache_root

SECRET = ".secret"


class SignatureRecords:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "verified"

    @staticmethod
    def key(data: bytes, bundle: str, trust_root: bytes, policy: tuple[str, ...]) -> str:
        h = hashlib.sha256()
        for part in (
            b"terminai-signature-record/1",
            __version__.encode(),
            hashlib.sha256(data).digest(),
            hashlib.sha256(bundle.encode()).digest(),
            hashlib.sha256(trust_root).digest(),
            *(p.encode() for p in policy),
        ):
            h.update(len(part).to_bytes(8, "big") + part)
        return h.hexdigest()

    def _private(self, create: bool) -> bool:
        """The directory exists (or was made), is ours and nobody else's to write."""
        try:
            if create:
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.root)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077

    def _secret(self, create: bool) -> bytes | None:
        path = self.root / SECRET
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                return None
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # another shim made it at the same moment
                return self._secret(create=False)
            except OSError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
            return self._secret(create=False)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            secret = f.read(64)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or len(secret) != 32:
            return None
        return secret

    def known(self, key: str) -> bool:
        if not self._private(create=False):
            return False
        secret = self._secret(create=False)
        if secret is None:
            return False
        try:
            fd = os.open(self.root / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            seen = f.read(128)
        return hmac.compare_digest(seen, hmac.new(secret, key.encode(), hashlib.sha256).hexdigest().encode())

    def remember(self, key: str) -> None:
        """After a full verification succeeded. Failing to remember is never an error."""
        if not self._private(create=True):
            return
        secret = self._secret(create=True)
        if secret is None:
            return
        tmp = self.root / f".{key}.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(hmac.new(secret, key.encode(), hashlib.sha256).hexdigest().encode())
            os.replace(tmp, self.root / key)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
