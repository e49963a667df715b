"""Who is calling: admin credentials (humans) and SVIDs with proofs (workloads).

- Humans present ``Authorization: Bearer tadm_<id>.<secret>`` (or HTTP Basic
  with the credential id and secret, for OAuth clients).
- Workloads present ``Authorization: DPoP <JWT-SVID>`` and a ``DPoP`` proof
  signed by the key the SVID is bound to (``cnf.jkt``), for this method and
  URL, fresh and never seen before.

Every write endpoint requires one of the two; the decision endpoint is
authenticated by the task token and its proof instead.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from dataclasses import dataclass

from litestar import Request

from tether._errors import IdentityRejected, ProofRejected, Rejected, TokenRejected
from tether._tether import Tether
from tether.core._verify import PROOF_WINDOW, ProofVerifier, verify_jwt_svid
from tether.identity import Role


class Unauthorized(Rejected):
    """401: no credential, or one that does not verify."""

    code = "invalid_token"


class Forbidden(Rejected):
    """403: a valid credential without the right to do this."""

    code = "insufficient_scope"


class RateLimited(Rejected):
    code = "rate_limited"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # admin | workload
    id: str  # credential id, or SPIFFE ID
    role: str  # admin | owner | approver | auditor | workload
    owner: str = ""  # the human's email (admin credentials)
    jkt: str | None = None  # the workload's bound key

    @property
    def name(self) -> str:
        return self.owner if self.kind == "admin" else self.id


def request_uri(request: Request) -> str:  # type: ignore[type-arg]
    """``htu``: scheme, authority and path, no query or fragment (RFC 9449 §4.3)."""
    url = request.url
    return f"{url.scheme}://{url.netloc}{url.path}"


def single_header(request: Request, name: str) -> str | None:  # type: ignore[type-arg]
    values = request.headers.getall(name, [])
    if len(values) > 1 or (values and "," in values[0]):
        raise Unauthorized(f"exactly one {name} header is allowed", code="invalid_request")
    return values[0] if values else None


class Authenticator:
    def __init__(self, tether: Tether, audience: str) -> None:
        self.tether = tether
        self.audience = audience
        self.proofs = ProofVerifier()

    def authenticate(self, request: Request) -> Principal:  # type: ignore[type-arg]
        header = single_header(request, "authorization")
        if not header:
            raise Unauthorized("authentication required", code="invalid_request")
        scheme, _, credential = header.partition(" ")
        scheme = scheme.lower()
        credential = credential.strip()
        try:
            if scheme == "bearer" and credential.startswith("tadm_"):
                row = self.tether.credentials.verify(credential)
                return Principal("admin", row.credential_id, row.role, row.owner)
            if scheme == "basic":
                return self._basic(credential)
            if scheme == "dpop":
                return self._workload(request, credential)
        except (IdentityRejected, TokenRejected, ProofRejected) as exc:
            raise Unauthorized(exc.message, code=exc.code) from None
        raise Unauthorized("unsupported authorization scheme", code="invalid_request")

    def _basic(self, credential: str) -> Principal:
        try:
            decoded = base64.b64decode(credential, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed basic credentials", code="invalid_client") from None
        client_id, _, secret = decoded.partition(":")
        row = self.tether.credentials.verify_pair(client_id, secret)
        return Principal("admin", row.credential_id, row.role, row.owner)

    def _workload(self, request: Request, svid: str) -> Principal:  # type: ignore[type-arg]
        now = self.tether.clock.now()
        claims = verify_jwt_svid(
            svid, self.tether.keys.verification_keys(now), audience=self.audience, now=now
        )
        if claims.jkt is None:
            raise Unauthorized("JWT-SVID is not bound to a key (cnf.jkt)", code="invalid_token")
        identity = self.tether.identities.lookup(claims.spiffe_id)
        if identity is None or identity.status != "active":
            raise Unauthorized(
                f"{claims.spiffe_id} is not an active identity", code="identity.disabled"
            )
        proof = self.proofs.verify(
            single_header(request, "dpop"),
            token=svid,
            jkt=claims.jkt,
            htm=request.method,
            htu=request_uri(request),
            call=None,
            now=now,
        )
        if not self.tether.store.record_proof(proof.jti, now + PROOF_WINDOW * 2):
            raise Unauthorized("proof has been used before", code="proof.replayed")
        return Principal("workload", claims.spiffe_id, "workload", identity.owner, claims.jkt)


def require(principal: Principal, *roles: str) -> None:
    """Admins may do anything; others need one of ``roles``."""
    if principal.role == Role.ADMIN or principal.role in roles:
        return
    raise Forbidden(f"role {principal.role!r} may not do this (needs {', '.join(roles)})")


class RateLimiter:
    """Token bucket per principal: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                raise RateLimited(f"rate limit of {self.rate:g} requests/s exceeded")
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 100_000:
                self._buckets.clear()
