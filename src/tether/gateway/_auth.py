"""Who is calling the gateway: a task token with a DPoP proof, on every request.

The gateway is an OAuth resource server as the MCP authorization spec (and
STANDARDS.md §5, §7) has it. Every HTTP request carries ``Authorization: DPoP
<task token>`` and a ``DPoP`` proof for this method and URL (``htm``/``htu``),
bound to the token (``ath``) and to the token's key (``cnf.jkt``), fresh and
never seen before. For a ``tools/call`` the proof also carries ``call``: the
digest of the namespaced tool name and its arguments, so a proof cannot be
moved to another call.

A request is refused before it reaches MCP when the token is missing,
malformed, expired, not addressed to this gateway's resource URI, or belongs to
a task that has ended or been revoked (``401 invalid_token``), or when the
proof is missing, wrong or replayed (``401 invalid_dpop_proof``). Every
refusal carries a ``WWW-Authenticate: DPoP`` challenge with
``resource_metadata``, and leaves a receipt.

Proof ids are consumed here for every request except ``tools/call``: there the
decision (``Tether.authorize``) consumes the proof on ``allow`` and the
gateway burns it after any other outcome, so one proof serves one call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tether._errors import ProofRejected, TokenRejected
from tether._tether import Tether
from tether.core._decision import TaskState
from tether.core._risk import Control
from tether.core._verify import PROOF_WINDOW, ProofVerifier, TaskClaims, call_digest
from tether.tasks._authorizer import StoreTaskView

ALGS = "ES256"
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: the task's verified token, proof and state."""

    token: str
    proof: str
    claims: TaskClaims
    state: TaskState
    htm: str
    htu: str
    proof_jti: str
    proof_iat: float
    rpc_method: str | None

    @property
    def agent_id(self) -> str:
        return self.claims.subject

    @property
    def task_id(self) -> str:
        return self.claims.task_id


class Refusal(Exception):
    """The request is refused before MCP sees it."""

    def __init__(
        self,
        status: int,
        error: str | None,
        message: str,
        code: str,
        *controls: Control,
        claims: TaskClaims | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.code = code
        self.controls = controls or (Control.TASK_TOKEN,)
        self.claims = claims


def challenge(error: str | None, description: str | None, metadata_url: str) -> str:
    """A ``WWW-Authenticate: DPoP`` challenge (RFC 9449 §7.1, RFC 9728 §5.1).

    With no credentials presented there is no ``error`` (RFC 6750 §3).
    """
    parts: list[str] = []
    if error:
        parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{_UNSAFE.sub("", description)[:200]}"')
    parts.append(f'algs="{ALGS}"')
    parts.append(f'resource_metadata="{metadata_url}"')
    return "DPoP " + ", ".join(parts)


def tool_call(rpc: Any) -> tuple[str, dict[str, Any]] | None:
    """``(name, arguments)`` when ``rpc`` is a well-formed ``tools/call`` request."""
    if not isinstance(rpc, dict) or rpc.get("method") != "tools/call":
        return None
    params = rpc.get("params")
    if not isinstance(params, dict):
        return None
    name, args = params.get("name"), params.get("arguments")
    if not isinstance(name, str):
        return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return name, args


class Authenticator:
    def __init__(self, tether: Tether, resource: str) -> None:
        self.tether = tether
        self.resource = resource
        self.proofs = ProofVerifier()
        self.view = StoreTaskView(tether.store)

    def authenticate(
        self,
        *,
        htm: str,
        htu: str,
        authorization: list[str],
        dpop: list[str],
        rpc: Any,
    ) -> Caller:
        """Verify the request's token and proof; raise :class:`Refusal` if anything fails."""
        if not authorization:
            raise Refusal(401, None, "a task token is required", "token.missing")
        if len(authorization) > 1:
            raise Refusal(
                400, "invalid_request", "exactly one Authorization header", "request.malformed"
            )
        scheme, _, token = authorization[0].partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer":
            # RFC 9449 §7.2: a DPoP-bound token presented as a bearer token is refused.
            raise Refusal(
                401,
                "invalid_token",
                "task tokens are DPoP-bound: use 'Authorization: DPoP'",
                "token.scheme",
                Control.SENDER_CONSTRAINED,
            )
        if scheme.lower() != "dpop" or not token:
            raise Refusal(401, "invalid_token", "unsupported authorization scheme", "token.scheme")
        if len(dpop) > 1 or (dpop and "," in dpop[0]):
            raise Refusal(
                400,
                "invalid_dpop_proof",
                "exactly one DPoP header",
                "proof.malformed",
                Control.SENDER_CONSTRAINED,
            )
        now = self.tether.clock.now()
        try:
            claims = self.tether.authorizer.verify_token(token, now=now)
        except TokenRejected as exc:
            raise Refusal(401, "invalid_token", exc.message, exc.code) from None
        if self.resource not in claims.audiences:
            raise Refusal(
                401,
                "invalid_token",
                f"token is not addressed to this resource ({self.resource})",
                "token.audience",
                Control.AUDIENCE,
                claims=claims,
            )
        state = self._live_state(claims, now)
        call = tool_call(rpc)
        method = rpc.get("method") if isinstance(rpc, dict) else None
        try:
            proved = self.proofs.verify(
                dpop[0] if dpop else None,
                token=token,
                jkt=claims.jkt,
                htm=htm,
                htu=htu,
                call=call_digest(*call) if call is not None else None,
                now=now,
            )
        except ProofRejected as exc:
            raise Refusal(
                401,
                "invalid_dpop_proof",
                exc.message,
                exc.code,
                Control.SENDER_CONSTRAINED,
                claims=claims,
            ) from None
        replayed = (
            self.tether.store.proof_seen(proved.jti)
            if call is not None
            else not self.tether.store.record_proof(proved.jti, now + PROOF_WINDOW * 2)
        )
        if replayed:
            raise Refusal(
                401,
                "invalid_dpop_proof",
                "proof has been used before",
                "proof.replayed",
                Control.SENDER_CONSTRAINED,
                claims=claims,
            )
        return Caller(
            token=token,
            proof=dpop[0],
            claims=claims,
            state=state,
            htm=htm,
            htu=htu,
            proof_jti=proved.jti,
            proof_iat=proved.issued_at,
            rpc_method=method if isinstance(method, str) else None,
        )

    def _live_state(self, claims: TaskClaims, now: float) -> TaskState:
        """The task's state, if the token is still live (RFC 7662 ``active`` semantics)."""

        def refuse(message: str, code: str, *controls: Control) -> Refusal:
            return Refusal(401, "invalid_token", message, code, *controls, claims=claims)

        state = self.view.task(claims.task_id)
        if state is None:
            raise refuse(f"task {claims.task_id} is not known", "task.unknown")
        if state.agent_id != claims.subject:
            raise refuse("token subject is not the task's agent", "token.task_mismatch")
        if not state.agent_active:
            raise refuse(f"agent {state.agent_id} is disabled", "identity.disabled")
        if state.status != "open":
            raise refuse(f"task {state.task_id} is {state.status}", f"task.{state.status}")
        if self.tether.store.token_revoked(claims.token_id) or state.token_id != claims.token_id:
            raise refuse("token has been revoked", "token.revoked", Control.CASCADING_REVOCATION)
        if now >= state.expires_at:
            raise refuse(f"task {state.task_id} has expired", "task.expired")
        if state.intent_digest != claims.intent_digest or state.jkt != claims.jkt:
            raise refuse("token does not match its task", "token.task_mismatch")
        return state
