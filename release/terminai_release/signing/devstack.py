"""A local development Sigstore: certificate authority, CT log and
transparency log on loopback, so the unmodified sigstore library signs and
verifies offline.

It is what `inv release` uses by default and what the tests run against.
Its keys persist under the build cache (so a bundle signed yesterday still
verifies today) and its trust root is written next to every release it
signs, but **nothing trusts it by default**: the shim accepts it only when
told to explicitly. Production signing is keyless, from CI's OIDC identity,
against Sigstore's public-good instance (`terminai_release.signing.sign`).

Formats follow Sigstore's: Fulcio's `POST /api/v2/signingCert`, Rekor v1's
`POST /api/v1/log/entries` (hashedrekord), SCTs per RFC 6962, checkpoints as
signed notes, signed entry timestamps over RFC 8785 canonical JSON.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from ..cache import StepCache, write_atomic
from . import transparency

UTC = dt.UTC
ISSUER = "https://oidc.terminai.invalid/dev"
DEFAULT_IDENTITY = "dev-release@terminai.invalid"
_SCT_LIST = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
_OIDC_ISSUER = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")  # raw bytes
_OIDC_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")  # DER UTF8String
_KEYS = ("root", "intermediate", "ctlog", "rekor")
_LEAF_LIFETIME = dt.timedelta(minutes=10)
# The name the transparency log signs its checkpoints with. Verifiers find
# the log a checkpoint signature belongs to by key hint *and* by this name
# appearing in the log's URL in the trust root (sigstore-js, as npm uses it,
# requires both), so the trust root's URL for the log carries it.
LOG_ORIGIN = "terminai-dev-log"


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_octet_string(data: bytes) -> bytes:
    return b"\x04" + _der_length(len(data)) + data


def _der_utf8(text: str) -> bytes:
    raw = text.encode()
    return b"\x0c" + _der_length(len(raw)) + raw


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class DevSigstore:
    """Keys and CA certificates under ``home``; servers started by ``start``."""

    home: Path
    _keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    _root: x509.Certificate | None = None
    _intermediate: x509.Certificate | None = None
    _since: dt.datetime | None = None
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- keys and certificates -------------------------------------------------
    def load(self) -> DevSigstore:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        with StepCache(self.home).lock("dev-sigstore", "keys"):
            if not (self.home / "intermediate.pem").is_file():
                self._generate()
        for name in _KEYS:
            key = serialization.load_pem_private_key((self.home / f"{name}.key").read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._keys[name] = key
        self._root = x509.load_pem_x509_certificate((self.home / "root.pem").read_bytes())
        self._intermediate = x509.load_pem_x509_certificate((self.home / "intermediate.pem").read_bytes())
        self._since = self._root.not_valid_before_utc
        return self

    def _generate(self) -> None:
        since = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(days=1)
        keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in _KEYS}
        for name, key in keys.items():
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            # Created 0600 from the first byte: nobody else may ever read a signing key.
            tmp = self.home / f".{name}.key.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.home / f"{name}.key")

        def ca(
            cn: str,
            key: ec.EllipticCurvePrivateKey,
            issuer: x509.Name,
            signer: ec.EllipticCurvePrivateKey,
            path_length: int,
        ) -> x509.Certificate:
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "terminai-dev"),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(issuer if issuer else subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(since)
                .not_valid_after(since + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            )
            if signer is not key:
                builder = builder.add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
                )
            return builder.sign(signer, hashes.SHA256())

        root = ca("terminai-dev-root", keys["root"], x509.Name([]), keys["root"], 1)
        intermediate = ca("terminai-dev-intermediate", keys["intermediate"], root.subject, keys["root"], 0)
        write_atomic(self.home / "root.pem", root.public_bytes(serialization.Encoding.PEM))
        write_atomic(self.home / "intermediate.pem", intermediate.public_bytes(serialization.Encoding.PEM))

    # -- trust documents ---------------------------------------------------------
    def _log_entry(self, name: str, url: str) -> dict[str, Any]:
        key = self._keys[name]
        assert self._since is not None
        return {
            "baseUrl": url,
            "hashAlgorithm": "SHA2_256",
            "publicKey": {
                "rawBytes": _b64(_spki(key)),
                "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                "validFor": {"start": _iso(self._since)},
            },
            "logId": {"keyId": _b64(hashlib.sha256(_spki(key)).digest())},
        }

    def trusted_root(self, url: str = "http://127.0.0.1") -> dict[str, Any]:
        assert self._root is not None and self._intermediate is not None and self._since is not None
        der = serialization.Encoding.DER
        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [self._log_entry("rekor", f"{url}/{LOG_ORIGIN}")],
            "certificateAuthorities": [
                {
                    "subject": {"organization": "terminai-dev", "commonName": "terminai-dev-intermediate"},
                    "uri": url,
                    "certChain": {
                        "certificates": [
                            {"rawBytes": _b64(c.public_bytes(der))} for c in (self._intermediate, self._root)
                        ]
                    },
                    "validFor": {"start": _iso(self._since)},
                }
            ],
            "ctlogs": [self._log_entry("ctlog", url)],
            "timestampAuthorities": [],
        }

    def trust_config(self) -> dict[str, Any]:
        """The ClientTrustConfig the signer uses: this stack's services and trust root."""
        assert self._server is not None and self._since is not None
        url = self.url
        service = {
            "url": url,
            "majorApiVersion": 1,
            "validFor": {"start": _iso(self._since)},
            "operator": "terminai-dev",
        }
        return {
            "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
            "trustedRoot": self.trusted_root(url),
            "signingConfig": {
                "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
                "caUrls": [service],
                "oidcUrls": [],
                "rekorTlogUrls": [service],
                "tsaUrls": [],
                "rekorTlogConfig": {"selector": "ANY"},
                "tsaConfig": {"selector": "ANY"},
            },
        }

    def identity_token(self, identity: str = DEFAULT_IDENTITY, lifetime: int = 600) -> str:
        """A JWT from the dev issuer (sigstore reads, but does not verify, tokens)."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": "sigstore",
            "sub": identity,
            "email": identity,
            "email_verified": True,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
        }

        def enc(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

        signing_input = f"{enc({'alg': 'ES256', 'typ': 'JWT'})}.{enc(claims)}"
        signature = self._keys["root"].sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"

    # -- the CA: a short-lived code-signing certificate with an embedded SCT -------
    def issue(self, csr_pem: bytes, claims: dict[str, Any]) -> list[str]:
        assert self._intermediate is not None and self._root is not None
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature is invalid")
        issuer_key = self._keys["intermediate"]
        identity = claims.get("email") or claims["sub"]
        san: list[x509.GeneralName] = (
            [x509.RFC822Name(identity)] if "@" in identity else [x509.UniformResourceIdentifier(identity)]
        )
        start = dt.datetime.now(UTC).replace(microsecond=0)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._intermediate.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + _LEAF_LIFETIME)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=True)  # the subject is empty
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
            .add_extension(x509.UnrecognizedExtension(_OIDC_ISSUER, claims["iss"].encode()), critical=False)
            .add_extension(x509.UnrecognizedExtension(_OIDC_ISSUER_V2, _der_utf8(claims["iss"])), critical=False)
        )
        # The SCT signs the certificate as it is without the SCT extension
        # (RFC 6962 precertificate entry): build that first, then add the SCT.
        tbs = builder.sign(issuer_key, hashes.SHA256()).tbs_certificate_bytes
        sct_list = self._sct_list(tbs, hashlib.sha256(_spki(issuer_key)).digest())
        cert = builder.add_extension(
            x509.UnrecognizedExtension(_SCT_LIST, _der_octet_string(sct_list)), critical=False
        ).sign(issuer_key, hashes.SHA256())
        if cert.tbs_precertificate_bytes != tbs:
            raise RuntimeError("the certificate does not match the precertificate its SCT signs")
        pem = serialization.Encoding.PEM
        return [c.public_bytes(pem).decode() for c in (cert, self._intermediate, self._root)]

    def _sct_list(self, tbs: bytes, issuer_key_hash: bytes) -> bytes:
        """A TLS-encoded SignedCertificateTimestampList with one SCT (RFC 6962 3.2-3.3)."""
        key = self._keys["ctlog"]
        timestamp = int(time.time() * 1000)
        signed = (
            struct.pack("!BBQH", 0, 0, timestamp, 1)  # v1, certificate_timestamp, time, precert_entry
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + struct.pack("!H", 0)  # no extensions
        )
        signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
        sct = (
            b"\x00"
            + hashlib.sha256(_spki(key)).digest()
            + struct.pack("!QH", timestamp, 0)
            + bytes([4, 3])  # sha256, ecdsa
            + struct.pack("!H", len(signature))
            + signature
        )
        return struct.pack("!HH", len(sct) + 2, len(sct)) + sct

    # -- the transparency log ------------------------------------------------------------
    @staticmethod
    def _canonical_body(proposed: dict[str, Any]) -> bytes:
        """The entry as the log records it: hashedrekord as proposed; dsse
        reduced, as Rekor does, to payload and envelope hashes plus signatures."""
        kind, version = proposed.get("kind"), proposed.get("apiVersion")
        if version != "0.0.1" or kind not in ("hashedrekord", "dsse"):
            raise ValueError("only hashedrekord and dsse 0.0.1 entries are accepted")
        if kind == "hashedrekord":
            return rfc8785.dumps({"apiVersion": "0.0.1", "kind": kind, "spec": proposed["spec"]})
        content = proposed["spec"]["proposedContent"]
        envelope = json.loads(content["envelope"])
        verifier = content["verifiers"][0]
        spec = {
            "envelopeHash": {"algorithm": "sha256", "value": hashlib.sha256(content["envelope"].encode()).hexdigest()},
            "payloadHash": {
                "algorithm": "sha256",
                "value": hashlib.sha256(base64.b64decode(envelope["payload"])).hexdigest(),
            },
            "signatures": [{"signature": s["sig"], "verifier": verifier} for s in envelope["signatures"]],
        }
        return rfc8785.dumps({"apiVersion": "0.0.1", "kind": kind, "spec": spec})

    def log(self, proposed: dict[str, Any]) -> dict[str, Any]:
        body = self._canonical_body(proposed)
        key = self._keys["rekor"]
        log_id = hashlib.sha256(_spki(key)).digest()
        leaves_file = self.home / "log-leaves"
        with self._lock, leaves_file.open("ab+") as f:
            f.seek(0)
            raw = f.read()
            leaves = [raw[i : i + 32] for i in range(0, len(raw), 32)]
            index = len(leaves)
            leaves.append(transparency.leaf_hash(body))
            f.write(leaves[-1])
            f.flush()
        size = len(leaves)
        tree_root = transparency.root(leaves)
        integrated = int(time.time())
        body_b64 = _b64(body)
        set_payload = rfc8785.dumps(
            {"body": body_b64, "integratedTime": integrated, "logID": log_id.hex(), "logIndex": index}
        )
        note = f"{LOG_ORIGIN}\n{size}\n{_b64(tree_root)}\n"
        note_sig = key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        checkpoint = note + "\n" + f"\u2014 {LOG_ORIGIN} {_b64(log_id[:4] + note_sig)}\n"
        return {
            transparency.leaf_hash(body).hex(): {
                "body": body_b64,
                "integratedTime": integrated,
                "logID": log_id.hex(),
                "logIndex": index,
                "verification": {
                    "signedEntryTimestamp": _b64(key.sign(set_payload, ec.ECDSA(hashes.SHA256()))),
                    "inclusionProof": {
                        "checkpoint": checkpoint,
                        "hashes": [h.hex() for h in transparency.inclusion_proof(index, leaves)],
                        "logIndex": index,
                        "rootHash": tree_root.hex(),
                        "treeSize": size,
                    },
                },
            }
        }

    # -- serving -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> DevSigstore:
        stack = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests carry tokens: nothing is logged

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    if self.path == "/api/v2/signingCert":
                        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
                        csr = base64.b64decode(json.loads(data)["certificateSigningRequest"])
                        reply = {"signedCertificateEmbeddedSct": {"chain": {"certificates": stack.issue(csr, claims)}}}
                    elif self.path == "/api/v1/log/entries":
                        reply = stack.log(json.loads(data))
                    else:
                        self._send(404, {"code": 404, "message": f"no such endpoint {self.path}"})
                        return
                except (ValueError, KeyError, IndexError) as exc:
                    self._send(400, {"code": 400, "message": str(exc)})
                    return
                self._send(201, reply)

            def _send(self, code: int, reply: dict[str, Any]) -> None:
                body = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="dev-sigstore", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> DevSigstore:
        return self.load().start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
