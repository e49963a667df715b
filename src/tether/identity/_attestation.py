"""Attestation: how a workload proves it may take an identity, exchanged for SVIDs.

- One-time join tokens: random (256 bits), stored only as their SHA-256, single use and
  short-lived.
- A JWT-SVID of a federated trust domain (:mod:`tether.identity._federation`): verified
  with that domain's bundle, linked to a registered identity here, single use.

Either way the workload's public key gets a JWT-SVID and an X.509-SVID of this trust
domain for the identity, both bound to that key. A refusal leaves a receipt with its
reason and changes nothing else.
"""

from __future__ import annotations

import hashlib
import secrets

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec

from tether._errors import (
    AttestationRejected,
    IdentityRejected,
    NotFound,
    ProofRejected,
    Rejected,
)
from tether.audit import Auditor
from tether.audit._rows import JOIN_TOKEN
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.core._spiffe_id import parse_spiffe_id
from tether.core._verify import PROOF_WINDOW, ProofVerifier, jwk_thumbprint
from tether.identity._federation import Federation
from tether.identity._registry import IdentityRegistry
from tether.identity._svid import DEFAULT_SVID_TTL, issue_jwt_svid, issue_x509_svid, pem_chain
from tether.store import Store
from tether.tokens._keys import KeyRing, public_jwk

JOIN_TOKEN_PREFIX = "tjt_"  # noqa: S105 - a name, not a secret
DEFAULT_JOIN_TTL = 600.0
MAX_JOIN_TTL = 24 * 3600.0
#: Refusals of a federated SVID before its signature verified: its presenter proved nothing.
UNVERIFIED = frozenset(
    {
        "svid.malformed",
        "svid.header",
        "svid.subject",
        "svid.alg",
        "svid.unknown_kid",
        "svid.signature",
        "federation.unknown_trust_domain",
        "federation.stale",
        "federation.no_keys",
        "svid.x509",
        "svid.chain",
        "svid.key",
        "proof.missing",
        "proof.malformed",
        "proof.header",
        "proof.typ",
        "proof.alg",
        "proof.key",
        "proof.key_mismatch",
        "proof.signature",
        "proof.claims",
        "proof.target",
        "proof.ath",
        "proof.stale",
        "proof.replayed",
    }
)


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
        self.federation = Federation(store, auditor, clock, registry)
        self._proofs = ProofVerifier()

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
            return self._issue(spiffe_id, public_key, audience, ttl, {"method": "join_token"})

    def _issue(
        self,
        spiffe_id: str,
        public_key: ec.EllipticCurvePublicKey,
        audience: list[str] | None,
        ttl: float,
        detail: dict[str, object],
    ) -> SVIDs:
        """Issue the SVIDs of an attested identity (inside the attestation's transaction)."""
        now = self._clock.now()
        tags = list(risk_tags(Control.WORKLOAD_IDENTITY))
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
            detail={**detail, "expires_at": expires_at},
        )
        return SVIDs(
            spiffe_id=spiffe_id,
            jwt_svid=jwt_svid,
            x509_svid_pem=pem_chain(leaf, ca),
            expires_at=expires_at,
        )

    def attest_federated(
        self,
        jwt_svid: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        audience: list[str] | None = None,
        ttl: float = DEFAULT_SVID_TTL,
        record_unverified: bool = True,
    ) -> SVIDs:
        """SVIDs of this trust domain for the identity a federated trust domain's JWT-SVID
        attests (its audience must name this trust domain, ``spiffe://<td>``). Refused with
        a receipt: a subject in a trust domain not federated, a stale bundle, an unknown
        key, a bad signature, a wrong audience, an expired SVID, a subject linked to no
        identity, a disabled identity, an SVID used before.

        ``record_unverified`` off: a refusal before the SVID's signature verified (its
        presenter proved nothing) leaves no receipt here; a network door counts and samples
        those (see :mod:`tether.enforcement._unauthenticated`)."""
        subject: str | None = None
        try:
            claims = self.federation.verify_jwt_svid(
                jwt_svid, audience=f"spiffe://{self._registry.trust_domain}"
            )
            subject = claims.spiffe_id
            spiffe_id = self.federation.linked_identity(claims.spiffe_id)
            with self._store.transaction():
                if not self._store.record_proof(
                    "federated-svid:" + claims.token_digest, claims.expires_at + 60.0
                ):
                    raise AttestationRejected(
                        "this JWT-SVID has attested before (single use)",
                        code="federation.replayed",
                    )
                return self._issue(
                    spiffe_id,
                    public_key,
                    audience,
                    ttl,
                    {
                        "method": "federated_jwt_svid",
                        "attested_by": claims.spiffe_id,
                        "svid_digest": claims.token_digest,
                    },
                )
        except (AttestationRejected, IdentityRejected, NotFound) as exc:
            code = exc.code if isinstance(exc, Rejected) else "federation.not_linked"
            if record_unverified or code not in UNVERIFIED:
                self._record_refusal(subject, code, exc.message)
            if isinstance(exc, AttestationRejected):
                raise
            raise AttestationRejected(exc.message, code=code) from None

    def attest_federated_x509(
        self,
        chain_pem: str,
        proof: str | None,
        *,
        htm: str,
        htu: str,
        audience: list[str] | None = None,
        ttl: float = DEFAULT_SVID_TTL,
        record_unverified: bool = True,
    ) -> SVIDs:
        """SVIDs of this trust domain for the identity a federated trust domain's
        X.509-SVID attests, bound to the SVID's own key. A certificate is public, so the
        presenter proves it holds the key: ``proof`` is a DPoP proof (RFC 9449 §4) signed
        by it, for this request (``htm``, ``htu``) and this chain (``ath``: the SHA-256 of
        ``chain_pem`` as sent), fresh and single use. Refusals as for
        :meth:`attest_federated`."""
        subject: str | None = None
        try:
            claims, key = self.federation.verify_x509_svid(chain_pem)
            now = self._clock.now()
            try:
                checked = self._proofs.verify(
                    proof,
                    token=chain_pem,
                    jkt=jwk_thumbprint(public_jwk(key)),
                    htm=htm,
                    htu=htu,
                    call=None,
                    now=now,
                )
            except ProofRejected as exc:
                raise AttestationRejected(exc.message, code=exc.code) from None
            subject = claims.spiffe_id
            spiffe_id = self.federation.linked_identity(claims.spiffe_id)
            with self._store.transaction():
                if not self._store.record_proof(checked.jti, now + PROOF_WINDOW * 2):
                    raise AttestationRejected("proof has been used before", code="proof.replayed")
                return self._issue(
                    spiffe_id,
                    key,
                    audience,
                    ttl,
                    {
                        "method": "federated_x509_svid",
                        "attested_by": claims.spiffe_id,
                        "svid_digest": claims.token_digest,
                    },
                )
        except (AttestationRejected, IdentityRejected, NotFound) as exc:
            code = exc.code if isinstance(exc, Rejected) else "federation.not_linked"
            if record_unverified or code not in UNVERIFIED:
                self._record_refusal(subject, code, exc.message, "federated_x509_svid")
            if isinstance(exc, AttestationRejected):
                raise
            raise AttestationRejected(exc.message, code=code) from None

    def _record_refusal(
        self, subject: str | None, code: str, message: str, method: str = "federated_jwt_svid"
    ) -> None:
        tags = list(risk_tags(Control.WORKLOAD_IDENTITY, Control.TRUST_DOMAIN))
        self._auditor.append(
            "attestation.attest",
            chain=[subject] if subject else None,
            effect="deny",
            risk_tags=tags,
            reasons=[{"code": code, "message": message[:300]}],
            detail={"method": method},
        )
