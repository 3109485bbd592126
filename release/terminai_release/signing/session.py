"""One signing identity for a whole run: the manifest, its provenance and
channel pointers are all signed by the same signer.

Keyless (CI): the ambient OIDC identity against a trust config (Sigstore's
public-good instance by default). Local: the development stack, whose
trust root callers write beside what they signed. Every signature is
verified against the same trust root before it is handed back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sigstore.models import ClientTrustConfig
from sigstore.oidc import IdentityToken

from ..context import BuildContext
from .sign import ambient_token, sign_bytes, sign_statement, verify_bytes, verify_statement


@dataclass(frozen=True)
class Signer:
    config: ClientTrustConfig
    token_source: Callable[[], str]  # asked again for every signature: CI tokens live minutes, uploads may not
    dev_trusted_root: dict[str, Any] | None  # set for the local development identity
    custom_trusted_root: dict[str, Any] | None = None  # keyless against a trust config other than public-good

    @property
    def token(self) -> str:
        return self.token_source()

    @property
    def identity(self) -> str:
        return str(IdentityToken(self.token).identity)

    @property
    def issuer(self) -> str:
        return str(IdentityToken(self.token).issuer)

    @property
    def kind(self) -> str:
        return "local development identity" if self.dev_trusted_root else "keyless"

    def sign(self, data: bytes) -> str:
        token = self.token
        bundle = sign_bytes(data, self.config, token)
        identity = IdentityToken(token)
        verify_bytes(data, bundle, self.config.trusted_root, str(identity.identity), str(identity.issuer))
        return bundle

    def attest(self, subjects: dict[str, str], predicate_type: str, predicate: dict[str, Any]) -> str:
        token = self.token
        bundle = sign_statement(subjects, predicate_type, predicate, self.config, token)
        identity = IdentityToken(token)
        verify_statement(bundle, self.config.trusted_root, str(identity.identity), str(identity.issuer))
        return bundle


@contextlib.contextmanager
def signer(ctx: BuildContext, *, keyless: bool = False, trust_config: Path | None = None) -> Iterator[Signer]:
    if keyless:
        text = trust_config.read_text() if trust_config else None
        config = ClientTrustConfig.from_json(text) if text else ClientTrustConfig.production()
        ambient_token()  # fail now, before any work, if there is no ambient identity
        yield Signer(config, ambient_token, None, json.loads(text)["trustedRoot"] if text else None)
        return
    from .devstack import DevSigstore

    with DevSigstore(ctx.cache.root / "dev-sigstore") as dev:
        yield Signer(ClientTrustConfig.from_json(json.dumps(dev.trust_config())), dev.identity_token,
                     dev.trusted_root())  # fmt: skip
