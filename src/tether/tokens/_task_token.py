"""Minting task tokens: transaction-token-style JWTs bound to the agent's key."""

from __future__ import annotations

import uuid
from typing import Any

import jwt

from tether.core._intent import Intent, authorization_details
from tether.core._verify import TASK_TOKEN_TYP, low_s
from tether.tokens._keys import JWT_USE, KeyRing


def act_claim(chain: tuple[str, ...]) -> dict[str, Any] | None:
    """Nested RFC 8693 ``act`` claim for the actors after the subject (innermost last)."""
    act: dict[str, Any] | None = None
    for actor in reversed(chain):
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    return act


def mint_task_token(
    keyring: KeyRing,
    *,
    task_id: str,
    agent_id: str,
    template: str,
    intent: Intent,
    intent_digest: str,
    jkt: str,
    issued_at: float,
    expires_at: float,
    actors: tuple[str, ...] = (),
    resources: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Return ``(token, token_id)``.

    ``aud`` is the trust domain (transaction-token profile); ``resources`` adds the
    resource servers (RFC 8707 style, e.g. an MCP gateway's URI) that may accept it.
    """
    row, key = keyring.active(JWT_USE)
    token_id = str(uuid.uuid4())
    claims: dict[str, Any] = {
        "iss": f"spiffe://{keyring.trust_domain}",
        "sub": agent_id,
        "aud": [keyring.trust_domain, *resources] if resources else keyring.trust_domain,
        "iat": int(issued_at),
        "nbf": int(issued_at),
        "exp": int(expires_at),
        "jti": token_id,
        "txn": task_id,
        "scope": template,
        "req_wl": agent_id,
        "tctx": {
            "intent_digest": intent_digest,
            "template": template,
            "purpose": intent.purpose,
            "data_ceiling": str(intent.data_ceiling),
            "egress": list(intent.egress),
            "max_calls": intent.budget.max_calls,
        },
        "authorization_details": authorization_details(intent),
        "cnf": {"jkt": jkt},
    }
    if intent.on_behalf_of:
        claims["obo"] = intent.on_behalf_of
    act = act_claim(actors)
    if act is not None:
        claims["act"] = act
    token = low_s(
        jwt.encode(claims, key, algorithm="ES256", headers={"kid": row.kid, "typ": TASK_TOKEN_TYP})
    )
    return token, token_id
