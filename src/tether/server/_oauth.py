"""OAuth endpoints: RFC 8693 token exchange, RFC 7662 introspection, RFC 7009 revocation.

Token exchange turns an agent's JWT-SVID (``actor_token``) plus a subject
token into a task token bound to the agent's key (the SVID's ``cnf.jkt``):

- a user token from a configured issuer: the task acts on that user's behalf;
- a parent task token (``urn:ietf:params:oauth:token-type:txn_token``): a
  delegated task whose intent must be within the parent's; the parent's
  identity chain becomes the child token's ``act`` chain.

``scope`` names the intent template; ``request_details`` (JSON) carries its
``params`` or an explicit ``intent``. The response follows RFC 8693 §2.2.1
with ``issued_token_type`` = txn_token and ``token_type`` = ``N_A``.
A ``DPoP`` proof on the request is checked against the SVID's key when
present; the issued token is useless without that key either way.
"""

from __future__ import annotations

import json
from typing import Any

import jwt

from tether._errors import (
    NotFound,
    ProofRejected,
    Rejected,
    TetherError,
    TokenRejected,
    UsageError,
)
from tether._tether import Tether
from tether.core._intent import parse_intent
from tether.core._verify import PROOF_WINDOW, ProofVerifier, verify_jwt_svid
from tether.server._schemas import json_problem

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TYPE_TXN = "urn:ietf:params:oauth:token-type:txn_token"
TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
MAX_FIELD = 16 * 1024


class OAuthError(TetherError):
    """An RFC 6749 §5.2 error: ``code`` is the ``error`` value."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description, code=error)
        self.status = status


def _field(form: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = form.get(name)
    if isinstance(value, list):
        raise OAuthError("invalid_request", f"{name} must appear once")
    if value is None or value == "":
        if required:
            raise OAuthError("invalid_request", f"{name} is required")
        return None
    if not isinstance(value, str) or len(value) > MAX_FIELD or "\x00" in value:
        raise OAuthError("invalid_request", f"{name} is malformed or too long")
    return value


class OAuth:
    def __init__(self, tether: Tether, audience: str) -> None:
        self.tether = tether
        self.audience = audience
        self.proofs = ProofVerifier()

    # -- RFC 8693 ----------------------------------------------------------------------
    def exchange(self, form: dict[str, Any], *, dpop: str | None, htu: str) -> dict[str, Any]:
        if _field(form, "grant_type", True) != GRANT_TOKEN_EXCHANGE:
            raise OAuthError("unsupported_grant_type", "only token exchange is supported")
        requested = _field(form, "requested_token_type")
        if requested not in (None, TYPE_TXN):
            raise OAuthError("invalid_request", "only txn_token can be issued")
        audience = _field(form, "audience")
        if audience not in (None, self.tether.trust_domain):
            raise OAuthError("invalid_target", "audience must be this trust domain")
        actor_token = _field(form, "actor_token", True)
        if _field(form, "actor_token_type", True) != TYPE_JWT:
            raise OAuthError("invalid_request", "actor_token_type must be a JWT (the JWT-SVID)")
        assert actor_token is not None
        now = self.tether.clock.now()
        try:
            actor = verify_jwt_svid(
                actor_token,
                self.tether.keys.verification_keys(now),
                audience=self.audience,
                now=now,
            )
            if actor.jkt is None:
                raise TokenRejected("the actor's JWT-SVID is not bound to a key")
            subject_is_task = _field(form, "subject_token_type") == TYPE_TXN
            if dpop is not None and not subject_is_task:
                self._consume(dpop, token=actor_token, jkt=actor.jkt, htu=htu, now=now)
        except Rejected as exc:
            raise OAuthError("invalid_client", f"actor token: {exc.message}", 401) from None
        subject_token = _field(form, "subject_token", True)
        subject_type = _field(form, "subject_token_type", True)
        assert subject_token is not None
        on_behalf_of, parent_task_id = self._subject(
            subject_token, subject_type, now, dpop=dpop, htu=htu
        )
        details = self._details(_field(form, "request_details"))
        scope = _field(form, "scope")
        intent = details.get("intent")
        if (scope is None) == (intent is None):
            raise OAuthError(
                "invalid_scope", "scope names the template; or give request_details.intent"
            )
        try:
            opened = self.tether.open_task(
                actor.spiffe_id,
                jkt=actor.jkt,
                template=scope,
                params=details.get("params") or {},
                intent=parse_intent(intent) if intent is not None else None,
                on_behalf_of=on_behalf_of,
                parent_task_id=parent_task_id,
            )
        except NotFound as exc:
            raise OAuthError("invalid_scope", exc.message) from None
        except Rejected as exc:
            raise OAuthError("invalid_grant", exc.message) from None
        except UsageError as exc:
            raise OAuthError("invalid_request", exc.message) from None
        return {
            "access_token": opened.token,
            "issued_token_type": TYPE_TXN,
            "token_type": "N_A",
            "expires_in": max(0, int(opened.expires_at - now)),
            "task_id": opened.task_id,
        }

    def _consume(self, dpop: str, *, token: str, jkt: str, htu: str, now: float) -> None:
        proof = self.proofs.verify(
            dpop, token=token, jkt=jkt, htm="POST", htu=htu, call=None, now=now
        )
        if not self.tether.store.record_proof(proof.jti, now + PROOF_WINDOW * 2):
            raise ProofRejected("proof has been used before", code="proof.replayed")

    def _subject(
        self, token: str, token_type: str | None, now: float, *, dpop: str | None, htu: str
    ) -> tuple[str | None, str | None]:
        if token_type == TYPE_TXN:
            # Delegation: the parent's holder must consent, by a DPoP proof made with the
            # key the parent token is bound to. A parent token alone (leaked, or read from a
            # receipt) delegates nothing.
            try:
                claims = self.tether.enforcement.verify_token(token, now=now)
                if dpop is None:
                    raise ProofRejected(
                        "delegation needs a DPoP proof by the parent token's key",
                        code="proof.missing",
                    )
                self._consume(dpop, token=token, jkt=claims.jkt, htu=htu, now=now)
                task = self.tether.store.get_task(claims.task_id)
                if (
                    task is None
                    or task.status != "open"
                    or task.token_id != claims.token_id
                    or self.tether.store.token_revoked(claims.token_id)
                ):
                    raise TokenRejected("the parent token is no longer live", code="token.revoked")
            except Rejected as exc:
                raise OAuthError("invalid_grant", f"subject token: {exc.message}") from None
            return None, claims.task_id
        if token_type in (TYPE_JWT, TYPE_ACCESS):
            return self._user(token, now), None
        raise OAuthError("invalid_request", "unsupported subject_token_type")

    def _user(self, token: str, now: float) -> str:
        issuers = self.tether.user_issuers()
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "subject token is malformed") from None
        issuer = issuers.get(str(unverified.get("iss")))
        if issuer is None:
            raise OAuthError("invalid_grant", "subject token issuer is not trusted")
        if header.get("alg") not in ("ES256", "RS256", "PS256", "EdDSA"):
            raise OAuthError("invalid_grant", "subject token algorithm is not allowed")
        try:
            keys = jwt.PyJWKSet.from_dict(issuer["jwks"])
            key = next((k for k in keys.keys if k.key_id == header.get("kid")), None)
            if key is None:
                raise OAuthError("invalid_grant", "subject token key is unknown")
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[str(header["alg"])],
                audience=issuer["audience"],
                issuer=issuer["issuer"],
                options={
                    "require": ["sub", "exp", "iss", "aud"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", "subject token does not verify") from None
        if now >= float(claims["exp"]):
            raise OAuthError("invalid_grant", "subject token has expired")
        return str(claims["sub"])

    @staticmethod
    def _details(raw: str | None) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            details = json.loads(raw)
        except (ValueError, RecursionError):
            raise OAuthError("invalid_request", "request_details is not JSON") from None
        problem = json_problem(details)
        if problem is not None:
            raise OAuthError("invalid_request", f"request_details: {problem}")
        if not isinstance(details, dict) or set(details) - {"params", "intent"}:
            raise OAuthError("invalid_request", "request_details takes params or intent")
        if not isinstance(details.get("params", {}), dict):
            raise OAuthError("invalid_request", "request_details.params must be an object")
        return details

    # -- RFC 7662 and RFC 7009 -----------------------------------------------------------------
    def introspect(self, form: dict[str, Any]) -> dict[str, Any]:
        token = _field(form, "token", True)
        assert token is not None
        now = self.tether.clock.now()
        try:
            claims = self.tether.enforcement.verify_token(token, now=now)
            state = self.tether.store.get_task(claims.task_id)
            agent = self.tether.identities.lookup(claims.subject)
            if (
                state is None
                or state.status != "open"
                or state.expires_at <= now
                or state.token_id != claims.token_id
                or agent is None
                or agent.status != "active"
                or self.tether.store.token_revoked(claims.token_id)
            ):
                return {"active": False}
        except Rejected:
            return {"active": False}
        raw = claims.raw
        response: dict[str, Any] = {
            k: raw[k]
            for k in (
                "iss",
                "sub",
                "aud",
                "iat",
                "nbf",
                "exp",
                "jti",
                "txn",
                "scope",
                "req_wl",
                "tctx",
                "authorization_details",
                "cnf",
                "act",
                "obo",
            )
            if k in raw
        }
        response.update(active=True, client_id=claims.subject)
        response["token_type"] = "DPoP"  # RFC 9449 §6.2: a key-bound token
        return response

    def revoke(self, form: dict[str, Any], *, principal_id: str, is_admin: bool) -> None:
        token = _field(form, "token", True)
        assert token is not None
        now = self.tether.clock.now()
        try:
            claims = self.tether.enforcement.verify_token(token, now=now, check_times=False)
        except Rejected:
            return  # RFC 7009 §2.2: an invalid token is not an error
        if not is_admin and principal_id not in claims.chain:
            raise OAuthError(
                "unauthorized_client", "only the token's agents or an admin may revoke it", 403
            )
        task = self.tether.store.get_task(claims.task_id)
        if task is not None and task.status == "open":
            self.tether.tasks.end(
                claims.task_id, reason=f"revoked by {principal_id}", status="revoked"
            )
        self.tether.store.revoke_token(claims.token_id, claims.task_id, "revoked", now)
