"""The holder's side of proof of possession: a key and the proofs it signs."""

from __future__ import annotations

import secrets
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.core._decision import DECIDE_HTM, DECIDE_HTU
from tether.core._verify import PROOF_TYP, call_digest, jwk_thumbprint, result_digest, token_hash
from tether.tokens._keys import new_ec_key, public_jwk


class ProofKey:
    """An agent's proof-of-possession key (EC P-256). Its private half never leaves."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self._key = private_key or new_ec_key()
        self.jwk: dict[str, Any] = public_jwk(self._key.public_key())
        self.thumbprint = jwk_thumbprint(self.jwk)

    def __repr__(self) -> str:
        return f"ProofKey(jkt={self.thumbprint!r})"

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> ProofKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("proof key must be an EC private key")
        return cls(key)

    def _sign(
        self, token: str, *, htm: str, htu: str, now: float, jti: str | None, call: str | None
    ) -> str:
        claims: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(18),
            "htm": htm,
            "htu": htu,
            "iat": int(now),
            "ath": token_hash(token),
        }
        if call is not None:
            claims["call"] = call
        return jwt.encode(
            claims, self._key, algorithm="ES256", headers={"typ": PROOF_TYP, "jwk": self.jwk}
        )

    def prove_request(
        self, token: str, *, htm: str, htu: str, now: float, jti: str | None = None
    ) -> str:
        """A proof for one HTTP request that carries ``token`` (RFC 9449 §4.2)."""
        return self._sign(token, htm=htm, htu=htu, now=now, jti=jti, call=None)

    def prove_result(
        self,
        token: str,
        tool: str,
        receipt: int,
        result: Any,
        *,
        now: float,
        htm: str,
        htu: str,
        jti: str | None = None,
    ) -> str:
        """A proof for reporting what ``tool`` returned after the decision ``receipt``."""
        call = result_digest(tool, receipt, result)
        return self._sign(token, htm=htm, htu=htu, now=now, jti=jti, call=call)

    def prove(
        self,
        token: str,
        tool: str,
        args: dict[str, Any],
        *,
        now: float,
        htm: str = DECIDE_HTM,
        htu: str = DECIDE_HTU,
        jti: str | None = None,
    ) -> str:
        """A fresh proof for one call of ``tool`` with ``args`` under ``token``."""
        call = call_digest(tool, args)
        return self._sign(token, htm=htm, htu=htu, now=now, jti=jti, call=call)
