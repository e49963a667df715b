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

The token and proof are verified once, here, by the one enforcement pipeline
(:class:`tether.enforcement.Enforcement`), and liveness is its one check
(:func:`tether.core.check_live`); the verified request is handed on, never
verified again. Proof ids are consumed here for every request except
``tools/call``: there the decision consumes the proof on ``allow`` and the
gateway burns it after any other outcome, so one proof serves one call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tether._errors import TokenRejected
from tether._tether import Tether
from tether.core._decision import Refused, TaskState, Verified
from tether.core._risk import Control
from tether.core._verify import TaskClaims, call_digest

ALGS = "ES256"
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: the task's verified token and proof, and its state."""

    verified: Verified
    state: TaskState
    htm: str
    htu: str
    rpc_method: str | None

    @property
    def claims(self) -> TaskClaims:
        return self.verified.claims

    @property
    def agent_id(self) -> str:
        return self.verified.claims.subject

    @property
    def task_id(self) -> str:
        return self.verified.claims.task_id

    @property
    def proof_iat(self) -> float:
        return self.verified.proof_iat


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
        call = tool_call(rpc)
        method = rpc.get("method") if isinstance(rpc, dict) else None
        enforcement = self.tether.enforcement
        try:
            verified = enforcement.verify(
                token=token,
                proof=dpop[0] if dpop else None,
                binding=call_digest(*call) if call is not None else None,
                htm=htm,
                htu=htu,
                resource=self.resource,
            )
        except TokenRejected as exc:
            raise Refusal(401, "invalid_token", exc.message, exc.code) from None
        except Refused as exc:
            # The audience and the proof: sender-constrained failures say so.
            error = "invalid_token" if exc.code.startswith("token.") else "invalid_dpop_proof"
            raise Refusal(
                401, error, exc.message, exc.code, *exc.controls, claims=exc.claims
            ) from None
        try:
            # The one liveness check (tether.core.check_live); for a tools/call the proof
            # is consumed by the decision, otherwise here.
            state = enforcement.authenticate(verified, consume_proof=call is None)
            if call is not None and self.tether.store.proof_seen(verified.proof_jti):
                raise Refused(
                    "proof.replayed", "proof has been used before", Control.SENDER_CONSTRAINED
                )
        except Refused as exc:
            error = "invalid_dpop_proof" if exc.code.startswith("proof.") else "invalid_token"
            raise Refusal(
                401, error, exc.message, exc.code, *exc.controls, claims=verified.claims
            ) from None
        return Caller(
            verified=verified,
            state=state,
            htm=htm,
            htu=htu,
            rpc_method=method if isinstance(method, str) else None,
        )
