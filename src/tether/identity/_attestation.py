"""Attestation, first method: one-time join tokens exchanged for SVIDs.

A join token is random (256 bits), stored only as its SHA-256, single use and
short-lived. Redeeming it with the workload's public key yields a JWT-SVID and
an X.509-SVID for the identity the token was minted for, both bound to that
key.
"""

from __future__ import annotations

import hashlib
import secrets

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec

from tether._errors import AttestationRejected, IdentityRejected
from tether.audit import Auditor
from tether.audit._rows import JOIN_TOKEN
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.core._spiffe_id import parse_spiffe_id
from tether.identity._registry import IdentityRegistry
from tether.identity._svid import DEFAULT_SVID_TTL, issue_jwt_svid, issue_x509_svid, pem_chain
from tether.store import Store
from tether.tokens._keys import KeyRing

JOIN_TOKEN_PREFIX = "tjt_"  # noqa: S105 - a name, not a secret
DEFAULT_JOIN_TTL = 600.0
MAX_JOIN_TTL = 24 * 3600.0


class SVIDs(msgspec.Struct, frozen=True):
    spiffe_id: str
    jwt_svid: str
    x509_svid_pem: str  # leaf then CA
    expires_at: float


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Attestor:
    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        registry: IdentityRegistry,
        auditor: Auditor,
        clock: Clock,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._registry = registry
        self._auditor = auditor
        self._clock = clock

    def create_join_token(self, spiffe_id: str, *, ttl: float = DEFAULT_JOIN_TTL) -> str:
        identity = self._registry.get(str(parse_spiffe_id(spiffe_id)))
        if identity.status != "active":
            raise IdentityRejected(f"{spiffe_id} is disabled", code="identity.disabled")
        if not 0 < ttl <= MAX_JOIN_TTL:
            raise AttestationRejected("join token ttl out of range", code="attestation.ttl")
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._store.transaction():
            self._store.add_join_token(_hash(token), identity.spiffe_id, self._clock.now() + ttl)
            self._auditor.rows.tag(JOIN_TOKEN, _hash(token), {"spiffe_id": identity.spiffe_id})
            self._auditor.append(
                "attestation.join_token",
                chain=[identity.spiffe_id],
                effect="allow",
                detail={"ttl": ttl},
                risk_tags=list(risk_tags(Control.WORKLOAD_IDENTITY)),
            )
        return token

    def attest(
        self,
        join_token: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        audience: list[str] | None = None,
        ttl: float = DEFAULT_SVID_TTL,
        record_refusal: bool = True,
    ) -> SVIDs:
        """SVIDs for the workload whose join token this is (single use). An unknown, used
        or expired token is refused with a receipt, unless ``record_refusal`` is off (a
        network door that counts and samples refusals of callers who proved nothing)."""
        now = self._clock.now()
        tags = list(risk_tags(Control.WORKLOAD_IDENTITY))
        token_hash = _hash(join_token)
        spiffe_id = self._store.consume_join_token(token_hash, now)
        if spiffe_id is not None and not self._auditor.rows.authentic(
            JOIN_TOKEN, token_hash, {"spiffe_id": spiffe_id}
        ):
            spiffe_id = None  # a join token a store writer put in is no join token
        if spiffe_id is None and record_refusal:
            self._auditor.append(
                "attestation.attest",
                effect="deny",
                risk_tags=tags,
                reasons=[
                    {
                        "code": "attestation.join_token",
                        "message": "join token is unknown, used or expired",
                    }
                ],
            )
        if spiffe_id is None:
            raise AttestationRejected(
                "join token is unknown, used or expired", code="attestation.join_token"
            )
        with self._store.transaction():
            identity = self._registry.get(spiffe_id)
            if identity.status != "active":
                raise IdentityRejected(f"{spiffe_id} is disabled", code="identity.disabled")
            parsed = parse_spiffe_id(spiffe_id)
            jwt_svid, jti, expires_at = issue_jwt_svid(
                self._keyring,
                parsed,
                audience=audience or [f"spiffe://{parsed.trust_domain}"],
                now=now,
                ttl=ttl,
                bound_key=public_key,
            )
            leaf, ca = issue_x509_svid(self._keyring, parsed, public_key, now=now, ttl=ttl)
            self._store.record_svid(jti, spiffe_id, "jwt", expires_at)
            self._store.record_svid(format(leaf.serial_number, "x"), spiffe_id, "x509", expires_at)
            self._auditor.append(
                "attestation.attest",
                chain=[spiffe_id],
                effect="allow",
                risk_tags=tags,
                detail={"method": "join_token", "expires_at": expires_at},
            )
        return SVIDs(
            spiffe_id=spiffe_id,
            jwt_svid=jwt_svid,
            x509_svid_pem=pem_chain(leaf, ca),
            expires_at=expires_at,
        )
