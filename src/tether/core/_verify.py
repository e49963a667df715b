"""Verification of task tokens and per-call proofs of possession.

Pure functions over public keys and an injected time: no clock, store or
network. Both verifiers raise (:class:`TokenRejected`, :class:`ProofRejected`)
with a specific reason code; they never return a boolean.

Task tokens follow the transaction-token profile (``typ: txntoken+jwt``, ES256,
``aud`` = the trust domain, ``txn`` = the task id, ``tctx`` with the intent
digest, ``authorization_details`` per RFC 9396, ``cnf.jkt`` per RFC 9449 §6.1).
Proofs follow DPoP (RFC 9449 §4): ``typ: dpop+jwt``, the public ``jwk`` in the
header, ``jti``/``htm``/``htu``/``iat``/``ath``, plus ``call``: the digest of the
exact tool call, so a captured proof cannot be re-targeted at another call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import ECAlgorithm

from tether._errors import IdentityRejected, ProofRejected, TokenRejected
from tether.core._canonical import b64url, canonical_json
from tether.core._spiffe_id import parse_spiffe_id

TASK_TOKEN_TYP = "txntoken+jwt"  # noqa: S105 - a name, not a secret
PROOF_TYP = "dpop+jwt"
ALGORITHMS = ("ES256",)
MAX_TOKEN_BYTES = 16 * 1024
MAX_PROOF_BYTES = 4 * 1024
MAX_JTI_LENGTH = 128
DEFAULT_LEEWAY = 5.0
PROOF_WINDOW = 60.0
_TOKEN_HEADERS = frozenset({"alg", "kid", "typ"})
_PROOF_HEADERS = frozenset({"alg", "typ", "jwk"})
_REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "txn", "req_wl", "cnf")


#: The order of the P-256 group. An ECDSA signature (r, s) has a twin (r, n - s) that
#: verifies too; a JWS signed by this trust domain is accepted with the low s only, so
#: one token has one encoding and one digest (revocation, caching and receipts key on it).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HALF_ORDER = P256_ORDER // 2


def _signature_halves(token: str) -> tuple[str, bytes] | None:
    head, _, segment = token.rpartition(".")
    if not head or _B64URL.fullmatch(segment) is None or len(segment) != 86:
        return None
    return head, base64.urlsafe_b64decode(segment + "==")


def low_s(token: str) -> str:
    """``token`` (a compact ES256 JWS) with its signature in low-s form (s <= n/2).

    Every JWS this trust domain signs goes through here, because verification refuses
    the high-s twin."""
    parts = _signature_halves(token)
    if parts is None:
        raise ValueError("not a compact ES256 JWS")
    head, raw = parts
    s = int.from_bytes(raw[32:], "big")
    if s <= _HALF_ORDER:
        return token
    return f"{head}.{b64url(raw[:32] + (P256_ORDER - s).to_bytes(32, 'big'))}"


def require_low_s(token: str, rejected: type[TokenRejected], code: str) -> None:
    """Raise ``rejected`` unless ``token``'s ES256 signature is 64 bytes with s <= n/2."""
    parts = _signature_halves(token)
    if parts is None:
        raise rejected("signature is not an ES256 signature", code=code)
    if int.from_bytes(parts[1][32:], "big") > _HALF_ORDER:
        raise rejected(
            "signature is not in low-s form (a malleated twin of a signature)", code=code
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate JSON member {key!r}")
        result[key] = value
    return result


def strict_json(data: bytes | str) -> Any:
    """Parse security JSON, refusing duplicate members (STANDARDS.md §0.1)."""
    return json.loads(data, object_pairs_hook=_no_duplicates)


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an EC P-256 public JWK."""
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise ProofRejected("proof key must be an EC P-256 JWK", code="proof.key")
    if not all(k in jwk for k in ("x", "y")):
        raise ProofRejected("proof key lacks x or y", code="proof.key")
    x, y = jwk["x"], jwk["y"]
    if not isinstance(x, str) or not isinstance(y, str):
        raise ProofRejected("proof key members must be strings", code="proof.key")
    return _ec_thumbprint(x, y)


@lru_cache(maxsize=4096)
def _ec_thumbprint(x: str, y: str) -> str:
    members = {"crv": "P-256", "kty": "EC", "x": x, "y": y}
    return b64url(hashlib.sha256(canonical_json(members)).digest())


def token_hash(token: str) -> str:
    """The ``ath`` value for ``token`` (RFC 9449 §4.2); also how tokens are logged."""
    return b64url(hashlib.sha256(token.encode("ascii", "replace")).digest())


def call_digest(tool: str, args: dict[str, Any]) -> str:
    return b64url(hashlib.sha256(canonical_json({"tool": tool, "args": args})).digest())


def result_digest(tool: str, receipt: int, result: Any) -> str:
    """What a proof for reporting a tool's result binds: the tool, the receipt of the
    allowed decision it answers and the result itself (the ``call`` claim)."""
    body = {"tool": tool, "receipt": receipt, "result": result}
    return b64url(hashlib.sha256(canonical_json(body)).digest())


@dataclass(frozen=True, slots=True)
class VerificationKeys:
    """The public keys of one trust domain that may verify what it signed."""

    trust_domain: str
    keys: dict[str, ec.EllipticCurvePublicKey]

    @property
    def issuer(self) -> str:
        return f"spiffe://{self.trust_domain}"


@dataclass(frozen=True, slots=True)
class TaskClaims:
    """The verified claims of a task token."""

    token_id: str
    task_id: str
    subject: str
    jkt: str
    expires_at: float
    not_before: float
    intent_digest: str
    chain: tuple[str, ...]
    raw: dict[str, Any]
    token_digest: str
    audiences: tuple[str, ...] = ()


def _header(token: str, limit: int, rejected: type[TokenRejected | ProofRejected]) -> Any:
    kind = "token" if rejected is TokenRejected else "proof"
    if not isinstance(token, str) or not token:
        raise rejected(f"{kind} is missing", code=f"{kind}.missing")
    if len(token) > limit:
        raise rejected(f"{kind} is larger than {limit} bytes", code=f"{kind}.malformed")
    if token.count(".") != 2:
        raise rejected(f"{kind} is not a compact JWS", code=f"{kind}.malformed")
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise rejected(f"{kind} header is malformed", code=f"{kind}.malformed") from None


def actor_chain(claims: dict[str, Any]) -> tuple[str, ...]:
    """The identity chain: the subject, then each nested ``act`` (RFC 8693 §4.1)."""
    chain = [str(claims.get("sub", ""))]
    act = claims.get("act")
    depth = 0
    while isinstance(act, dict) and depth < 16:
        chain.append(str(act.get("sub", "")))
        act = act.get("act")
        depth += 1
    return tuple(chain)


class TokenVerifier:
    """Verifies task tokens against one trust domain's keys.

    A verified token's claims are cached by the token's digest until it
    expires; time, audience and revocation are still checked on every call by
    the decision core. The cache is bounded.
    """

    def __init__(
        self, keys: VerificationKeys, *, leeway: float = DEFAULT_LEEWAY, cache_size: int = 4096
    ) -> None:
        self.keys = keys
        self.leeway = leeway
        self._cache: OrderedDict[str, TaskClaims] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: str, *, now: float, check_times: bool = True) -> TaskClaims:
        digest = token_hash(token) if isinstance(token, str) else ""
        claims = self._cache.get(digest) if digest else None
        if claims is None:
            claims = self._verify_signature(token)
            self._cache[digest] = claims
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if check_times:
            self._check_times(claims, now)
        return claims

    def _verify_signature(self, token: str) -> TaskClaims:
        header = _header(token, MAX_TOKEN_BYTES, TokenRejected)
        if not isinstance(header, dict) or not set(header) <= _TOKEN_HEADERS:
            raise TokenRejected(
                "token header carries members other than alg, kid, typ", code="token.header"
            )
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRejected(
                f"token algorithm {str(alg)[:20]!r} is not allowed (only ES256)", code="token.alg"
            )
        if header.get("typ") != TASK_TOKEN_TYP:
            raise TokenRejected(f"token typ must be {TASK_TOKEN_TYP!r}", code="token.typ")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("token payload is malformed", code="token.malformed") from None
        self._check_trust_domain(unverified)
        require_low_s(token, TokenRejected, "token.signature")
        kid = header.get("kid")
        key = self.keys.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenRejected(
                f"token key id {str(kid)[:40]!r} is not in the trust bundle",
                code="token.unknown_kid",
            )
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=list(ALGORITHMS),
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected("token signature does not verify", code="token.signature") from None
        except jwt.PyJWTError:
            raise TokenRejected("token is malformed", code="token.malformed") from None
        return self._claims(token, payload)

    def _check_trust_domain(self, claims: Any) -> None:
        if not isinstance(claims, dict):
            raise TokenRejected("token payload is not an object", code="token.malformed")
        iss, sub = claims.get("iss"), claims.get("sub")
        if iss != self.keys.issuer:
            raise TokenRejected(
                f"token issuer {str(iss)[:80]!r} is not this trust domain",
                code="token.trust_domain",
            )
        try:
            subject = parse_spiffe_id(str(sub))
        except IdentityRejected as exc:
            raise TokenRejected(f"token subject: {exc.message}", code="token.subject") from None
        if subject.trust_domain != self.keys.trust_domain:
            raise TokenRejected(
                f"token subject is in foreign trust domain {subject.trust_domain!r}",
                code="token.trust_domain",
            )

    def _claims(self, token: str, payload: dict[str, Any]) -> TaskClaims:
        missing = [c for c in _REQUIRED_CLAIMS if c not in payload]
        if missing:
            raise TokenRejected(f"token lacks claims {missing}", code="token.claims")
        self._check_trust_domain(payload)
        aud = payload["aud"]
        audiences = aud if isinstance(aud, list) else [aud]
        if self.keys.trust_domain not in audiences:
            raise TokenRejected(
                f"token audience {aud!r} is not this trust domain", code="token.audience"
            )
        cnf = payload["cnf"]
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        tctx = payload.get("tctx")
        intent = tctx.get("intent_digest") if isinstance(tctx, dict) else None
        exp, nbf = payload["exp"], payload["nbf"]
        if not (
            isinstance(jkt, str)
            and isinstance(intent, str)
            and isinstance(payload["txn"], str)
            and isinstance(payload["jti"], str)
            and isinstance(exp, int | float)
            and isinstance(nbf, int | float)
        ):
            raise TokenRejected("token claims have the wrong types", code="token.claims")
        return TaskClaims(
            token_id=payload["jti"],
            task_id=payload["txn"],
            subject=payload["sub"],
            jkt=jkt,
            expires_at=float(exp),
            not_before=float(nbf),
            intent_digest=intent,
            chain=actor_chain(payload),
            raw=payload,
            token_digest=token_hash(token),
            audiences=tuple(str(a) for a in audiences),
        )

    def _check_times(self, claims: TaskClaims, now: float) -> None:
        if now >= claims.expires_at + self.leeway:
            raise TokenRejected("token has expired", code="token.expired")
        if now + self.leeway < claims.not_before:
            raise TokenRejected("token is not yet valid", code="token.not_yet_valid")


_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _b64_segment(segment: str) -> bytes:
    if not segment:
        return b""
    if _B64URL.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise ProofRejected("proof is not base64url", code="proof.malformed")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _parse_proof(proof: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split and decode a compact JWS once: (header, claims, signing input, signature).

    The signature is checked by the caller with ``cryptography``; PyJWT's decode path
    (two full parses and a per-byte alphabet scan) costs more than the ECDSA check itself.
    """
    if not isinstance(proof, str) or not proof:
        raise ProofRejected("proof is missing", code="proof.missing")
    if len(proof) > MAX_PROOF_BYTES:
        raise ProofRejected(f"proof is larger than {MAX_PROOF_BYTES} bytes", code="proof.malformed")
    parts = proof.split(".")
    if len(parts) != 3:
        raise ProofRejected("proof is not a compact JWS", code="proof.malformed")
    try:
        header = strict_json(_b64_segment(parts[0]))
        claims = strict_json(_b64_segment(parts[1]))
    except ValueError:  # includes JSON and UTF-8 errors
        raise ProofRejected("proof is malformed", code="proof.malformed") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ProofRejected("proof header and claims must be objects", code="proof.malformed")
    signature = _b64_segment(parts[2])
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


@dataclass(frozen=True, slots=True)
class ProofClaims:
    jti: str
    issued_at: float


class ProofVerifier:
    """Verifies DPoP-style proofs; caches parsed public keys by thumbprint."""

    def __init__(self, *, window: float = PROOF_WINDOW, leeway: float = DEFAULT_LEEWAY) -> None:
        self.window = window
        self.leeway = leeway
        self._keys: OrderedDict[str, ec.EllipticCurvePublicKey] = OrderedDict()

    def verify(
        self,
        proof: str | None,
        *,
        token: str,
        jkt: str,
        htm: str,
        htu: str,
        call: str | None,
        now: float,
    ) -> ProofClaims:
        if proof is None:
            raise ProofRejected(
                "no proof of possession accompanies the token", code="proof.missing"
            )
        header, claims, signing_input, signature = _parse_proof(proof)
        if not set(header) <= _PROOF_HEADERS:
            raise ProofRejected("proof header carries unexpected members", code="proof.header")
        if header.get("typ") != PROOF_TYP:
            raise ProofRejected(f"proof typ must be {PROOF_TYP!r}", code="proof.typ")
        if header.get("alg") not in ALGORITHMS:
            raise ProofRejected("proof algorithm is not allowed (only ES256)", code="proof.alg")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or "d" in jwk:
            raise ProofRejected("proof jwk is missing or holds a private key", code="proof.key")
        thumbprint = jwk_thumbprint(jwk)
        if not hmac.compare_digest(thumbprint, jkt):
            raise ProofRejected(
                "proof is signed by a key other than the one the token is bound to",
                code="proof.key_mismatch",
            )
        key = self._keys.get(thumbprint)
        if key is None:
            try:
                loaded = ECAlgorithm.from_jwk(jwk)
            except jwt.PyJWTError:
                raise ProofRejected("proof jwk is invalid", code="proof.key") from None
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise ProofRejected("proof jwk is not a public key", code="proof.key")
            key = loaded
            self._keys[thumbprint] = key
            if len(self._keys) > 4096:
                self._keys.popitem(last=False)
        if len(signature) != 64:
            raise ProofRejected("proof signature is not an ES256 signature", code="proof.signature")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, signing_input, _ECDSA_SHA256)
        except InvalidSignature:
            raise ProofRejected("proof signature does not verify", code="proof.signature") from None
        jti, iat = claims.get("jti"), claims.get("iat")
        if not isinstance(jti, str) or not 16 <= len(jti) <= MAX_JTI_LENGTH:
            raise ProofRejected("proof jti must be 16-128 characters", code="proof.claims")
        if not isinstance(iat, int | float) or isinstance(iat, bool) or not math.isfinite(iat):
            raise ProofRejected("proof lacks a numeric iat", code="proof.claims")
        if claims.get("htm") != htm or claims.get("htu") != htu:
            raise ProofRejected("proof is for another request (htm/htu)", code="proof.target")
        if not hmac.compare_digest(str(claims.get("ath", "")), token_hash(token)):
            raise ProofRejected("proof is bound to another token (ath)", code="proof.ath")
        if call is not None and not hmac.compare_digest(str(claims.get("call", "")), call):
            raise ProofRejected("proof is for another tool call", code="proof.call")
        if iat > now + self.leeway or iat < now - self.window:
            raise ProofRejected("proof is outside its acceptance window", code="proof.stale")
        return ProofClaims(jti=jti, issued_at=float(iat))


@dataclass(frozen=True, slots=True)
class SvidClaims:
    spiffe_id: str
    jkt: str | None
    expires_at: float
    token_digest: str


_SVID_HEADERS = frozenset({"alg", "kid", "typ"})


def verify_jwt_svid(
    token: str, keys: VerificationKeys, *, audience: str, now: float, leeway: float = DEFAULT_LEEWAY
) -> SvidClaims:
    """Verify a JWT-SVID of this trust domain (JWT-SVID.md §2-§4) or raise TokenRejected."""
    header = _header(token, MAX_TOKEN_BYTES, TokenRejected)
    if not isinstance(header, dict) or not set(header) <= _SVID_HEADERS:
        raise TokenRejected("JWT-SVID header may carry only alg, kid, typ", code="svid.header")
    if header.get("alg") not in ALGORITHMS:
        raise TokenRejected("JWT-SVID algorithm is not allowed", code="svid.alg")
    if header.get("typ", "JWT") not in ("JWT", "JOSE"):
        raise TokenRejected("JWT-SVID typ must be JWT or JOSE", code="svid.typ")
    kid = header.get("kid")
    key = keys.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenRejected("JWT-SVID key id is not in the trust bundle", code="svid.unknown_kid")
    require_low_s(token, TokenRejected, "svid.signature")
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=list(ALGORITHMS),
            audience=audience,
            options={
                "require": ["sub", "aud", "exp"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidAudienceError:
        raise TokenRejected("JWT-SVID audience is not this server", code="svid.audience") from None
    except jwt.InvalidSignatureError:
        raise TokenRejected("JWT-SVID signature does not verify", code="svid.signature") from None
    except jwt.PyJWTError:
        raise TokenRejected("JWT-SVID is malformed", code="svid.malformed") from None
    exp = claims["exp"]
    if not isinstance(exp, int | float) or now >= exp + leeway:
        raise TokenRejected("JWT-SVID has expired", code="svid.expired")
    try:
        subject = parse_spiffe_id(str(claims["sub"]))
    except IdentityRejected as exc:
        raise TokenRejected(f"JWT-SVID subject: {exc.message}", code="svid.subject") from None
    if subject.trust_domain != keys.trust_domain:
        raise TokenRejected("JWT-SVID is from a foreign trust domain", code="svid.trust_domain")
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return SvidClaims(
        spiffe_id=str(subject),
        jkt=jkt if isinstance(jkt, str) else None,
        expires_at=float(exp),
        token_digest=token_hash(token),
    )
