"""Tether-signed downstream tokens, and the verifier service owners run.

When an allowed call reaches a service that trusts Tether, the enforcement point
presents a token minted for that one call instead of a durable key:

- header ``{"alg": "ES256", "kid": <trust-domain key>, "typ": "tether-call+jwt"}``
  (a distinct ``typ``, so it is never taken for a task token or a JWT-SVID);
- claims ``iss`` (``spiffe://<trust domain>``), ``sub`` (the agent's SPIFFE ID), ``aud``
  (the one service it is for), ``iat``/``nbf``/``exp`` (at most 60 s), ``jti``, ``txn``
  (the task id), ``tool`` (``{"name", "spiffe_id"}``: the tool the call is for and its
  workload identity) and ``act`` (the delegation chain, RFC 8693 §4.1) when delegated.

:class:`DownstreamVerifier` checks one against the trust domain's published JWKS
(``/.well-known/jwks.json`` of ``tether serve``), with an explicit algorithm allowlist,
an exact ``typ``, the audience, the lifetime cap and (by default) single use of ``jti``.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tether._errors import IdentityRejected, TokenRejected
from tether.core._spiffe_id import parse_spiffe_id
from tether.core._verify import strict_json
from tether.tokens import JWT_USE, KeyRing, act_claim

DOWNSTREAM_TYP = "tether-call+jwt"
MAX_DOWNSTREAM_TTL = 60.0
LEEWAY = 5.0
_HEADERS = frozenset({"alg", "kid", "typ"})
_REQUIRED = ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "txn", "tool"]


def mint_downstream_token(
    keyring: KeyRing,
    *,
    audience: str,
    agent_id: str,
    task_id: str,
    tool: str,
    tool_identity: str | None,
    actors: tuple[str, ...],
    now: float,
    ttl: float = MAX_DOWNSTREAM_TTL,
) -> tuple[str, str, float]:
    """``(token, jti, expires_at)``: a per-call token for ``audience``, at most 60 s long."""
    if not audience or len(audience) > 2048:
        raise TokenRejected("a downstream token needs one audience", code="lease.audience")
    row, key = keyring.active(JWT_USE)
    expires_at = now + max(1.0, min(ttl, MAX_DOWNSTREAM_TTL))
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "iss": f"spiffe://{keyring.trust_domain}",
        "sub": agent_id,
        "aud": audience,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(expires_at),
        "jti": jti,
        "txn": task_id,
        "tool": {"name": tool, "spiffe_id": tool_identity},
    }
    if actors:
        claims["act"] = act_claim(actors)
    token = jwt.encode(
        claims, key, algorithm="ES256", headers={"kid": row.kid, "typ": DOWNSTREAM_TYP}
    )
    return token, jti, float(int(expires_at))


@dataclass(frozen=True, slots=True)
class DownstreamClaims:
    """What a verified downstream token says: who calls, for which task and tool."""

    agent: str
    task_id: str
    tool: str
    tool_identity: str | None
    chain: tuple[str, ...]
    jti: str
    expires_at: float
    raw: dict[str, Any]


def _fetch_jwks(url: str) -> dict[str, Any]:
    import httpx  # noqa: PLC0415

    response = httpx.get(url, timeout=5.0, follow_redirects=False)
    response.raise_for_status()
    document = strict_json(response.content)
    if not isinstance(document, dict):
        raise ValueError("JWKS is not an object")
    return document


class DownstreamVerifier:
    """Verifies Tether downstream tokens for one service (``audience``).

    Give the trust domain and either ``jwks`` (a JWKS document) or ``jwks_url`` (fetched
    on first use, again when a token names an unknown ``kid``, at most every 30 s).
    Raises :class:`tether.TokenRejected` with a reason code; never returns a boolean.
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        audience: str,
        jwks: dict[str, Any] | None = None,
        jwks_url: str | None = None,
        single_use: bool = True,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], dict[str, Any]] = _fetch_jwks,
    ) -> None:
        if (jwks is None) == (jwks_url is None):
            raise ValueError("give exactly one of jwks or jwks_url")
        self.trust_domain = trust_domain
        self.issuer = f"spiffe://{trust_domain}"
        self.audience = audience
        self.single_use = single_use
        self._jwks_url = jwks_url
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._fetched_at = -1e18
        self._seen: OrderedDict[str, float] = OrderedDict()
        if jwks is not None:
            self._load(jwks)

    def _load(self, jwks: dict[str, Any]) -> None:
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in jwks.get("keys", []) if isinstance(jwks, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or "d" in jwk:
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str) or jwk.get("use", "sig") != "sig":
                continue
            try:
                key = ECAlgorithm.from_jwk(jwk)
            except jwt.PyJWTError:
                continue
            if isinstance(key, ec.EllipticCurvePublicKey):
                keys[kid] = key
        self._keys = keys

    def _key(self, kid: str, now: float) -> ec.EllipticCurvePublicKey | None:
        key = self._keys.get(kid)
        if key is None and self._jwks_url is not None and now - self._fetched_at >= 30:
            self._fetched_at = now
            try:
                self._load(self._fetch(self._jwks_url))
            except Exception as exc:
                raise TokenRejected(
                    f"cannot read the trust domain's JWKS: {type(exc).__name__}",
                    code="downstream.jwks",
                ) from None
            key = self._keys.get(kid)
        return key

    def verify(self, token: str, *, now: float | None = None) -> DownstreamClaims:
        now = self._clock() if now is None else now
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 8192:
            raise TokenRejected("not a compact JWS", code="downstream.malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("token header is malformed", code="downstream.malformed") from None
        if not set(header) <= _HEADERS:
            raise TokenRejected(
                "token header may carry only alg, kid, typ", code="downstream.header"
            )
        if header.get("alg") != "ES256":
            raise TokenRejected("only ES256 is accepted", code="downstream.alg")
        if header.get("typ") != DOWNSTREAM_TYP:
            raise TokenRejected(f"typ must be {DOWNSTREAM_TYP!r}", code="downstream.typ")
        kid = header.get("kid")
        key = self._key(kid, now) if isinstance(kid, str) else None
        if key is None:
            raise TokenRejected("token key id is not in the JWKS", code="downstream.unknown_kid")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=["ES256"],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenRejected(
                "token is for another service", code="downstream.audience"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("token is from another issuer", code="downstream.issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("signature does not verify", code="downstream.signature") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"token is malformed: {exc}", code="downstream.malformed") from None
        exp, iat, nbf = claims["exp"], claims["iat"], claims["nbf"]
        if not all(isinstance(v, int | float) for v in (exp, iat, nbf)):
            raise TokenRejected("times must be numbers", code="downstream.claims")
        if exp - iat > MAX_DOWNSTREAM_TTL + LEEWAY:
            raise TokenRejected("token lives longer than 60 s", code="downstream.lifetime")
        if now >= exp + LEEWAY:
            raise TokenRejected("token has expired", code="downstream.expired")
        if now + LEEWAY < nbf:
            raise TokenRejected("token is not yet valid", code="downstream.not_yet_valid")
        try:
            agent = parse_spiffe_id(str(claims["sub"]))
        except IdentityRejected as exc:
            raise TokenRejected(f"subject: {exc.message}", code="downstream.subject") from None
        if agent.trust_domain != self.trust_domain:
            raise TokenRejected("subject is in a foreign trust domain", code="downstream.subject")
        tool = claims["tool"]
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise TokenRejected("tool claim is malformed", code="downstream.claims")
        jti, txn = claims["jti"], claims["txn"]
        if not isinstance(jti, str) or not isinstance(txn, str):
            raise TokenRejected("jti and txn must be strings", code="downstream.claims")
        if self.single_use:
            for seen, until in list(self._seen.items()):
                if until + LEEWAY > now:
                    break
                del self._seen[seen]
            if jti in self._seen:
                raise TokenRejected("token has been used before", code="downstream.replayed")
            self._seen[jti] = float(exp)
        chain = [str(agent)]
        act = claims.get("act")
        while isinstance(act, dict) and len(chain) < 16:
            chain.append(str(act.get("sub", "")))
            act = act.get("act")
        identity = tool.get("spiffe_id")
        return DownstreamClaims(
            agent=str(agent),
            task_id=txn,
            tool=tool["name"],
            tool_identity=identity if isinstance(identity, str) else None,
            chain=tuple(chain),
            jti=jti,
            expires_at=float(exp),
            raw=claims,
        )
