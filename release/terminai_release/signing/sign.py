"""Sign and verify with the sigstore library, against any trust config.

Production (CI): keyless, from the workflow's ambient OIDC identity
(``detect_credential``), against the trust config given (Sigstore's
public-good instance by default). Local: the development stack in
``devstack``. Either way the signer verifies its own output before it
returns, so a release is never written with a bundle that does not verify.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sigstore.models import Bundle, ClientTrustConfig, TrustedRoot
from sigstore.oidc import IdentityToken, detect_credential
from sigstore.sign import SigningContext
from sigstore.verify import Verifier, policy

from ..errors import BuildError


def ambient_token() -> str:
    """CI's identity token (GitHub Actions: ACTIONS_ID_TOKEN_REQUEST_*)."""
    token = detect_credential()
    if token is None:
        raise BuildError("no ambient OIDC credential", hint="run in CI with `id-token: write`, or sign with --dev")
    return token


def sign_bytes(data: bytes, trust_config: ClientTrustConfig | dict[str, Any], token: str) -> str:
    if isinstance(trust_config, dict):
        trust_config = ClientTrustConfig.from_json(json.dumps(trust_config))
    context = SigningContext.from_trust_config(trust_config)
    with context.signer(IdentityToken(token)) as signer:
        bundle = signer.sign_artifact(data)
    return bundle.to_json()


def sign_statement(subjects: dict[str, str], predicate_type: str, predicate: dict[str, Any],
                   trust_config: ClientTrustConfig | dict[str, Any], token: str) -> str:  # fmt: skip
    """An in-toto statement (subjects: name -> sha256) in a signed DSSE envelope."""
    from sigstore import dsse

    if isinstance(trust_config, dict):
        trust_config = ClientTrustConfig.from_json(json.dumps(trust_config))
    statement = (
        dsse.StatementBuilder()
        .subjects([dsse.Subject(name=name, digest={"sha256": digest}) for name, digest in sorted(subjects.items())])
        .predicate_type(predicate_type)
        .predicate(predicate)
        .build()
    )
    with SigningContext.from_trust_config(trust_config).signer(IdentityToken(token)) as signer:
        return signer.sign_dsse(statement).to_json()


def verify_statement(bundle_json: str, trusted_root: Path | TrustedRoot, identity: str, issuer: str) -> dict[str, Any]:
    """Verify a DSSE bundle; return the in-toto statement it carries."""
    if isinstance(trusted_root, Path):
        trusted_root = TrustedRoot.from_file(str(trusted_root))
    payload_type, payload = Verifier(trusted_root=trusted_root).verify_dsse(
        Bundle.from_json(bundle_json), policy.Identity(identity=identity, issuer=issuer)
    )
    if payload_type != "application/vnd.in-toto+json":
        raise BuildError(f"unexpected DSSE payload type {payload_type}")
    statement: dict[str, Any] = json.loads(payload)
    return statement


def verify_bytes(data: bytes, bundle_json: str, trusted_root: Path | TrustedRoot, identity: str, issuer: str) -> None:
    """Raises sigstore's VerificationError (naming the failed check) on failure."""
    if isinstance(trusted_root, Path):
        trusted_root = TrustedRoot.from_file(str(trusted_root))
    Verifier(trusted_root=trusted_root).verify_artifact(
        data, Bundle.from_json(bundle_json), policy.Identity(identity=identity, issuer=issuer)
    )
