"""``tether serve``: the control plane over HTTP (Litestar, msgspec bodies).

Same words as the CLI: identities, templates, policies, tasks, decisions,
approvals, audit, bundles. Standards endpoints: ``/oauth2/token`` (RFC 8693),
``/oauth2/introspect`` (RFC 7662), ``/oauth2/revoke`` (RFC 7009), the JWKS and
the SPIFFE bundle under ``/.well-known/``. Each request is authenticated
(see :mod:`tether.server._auth`), rate limited per principal, logged as one
JSON line and counted in ``/metrics``.

Handlers call the store directly on the event loop: the embedded SQLite store
is one connection, so a thread pool would only add hand-offs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from litestar import Litestar, Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import OpenAPIType, RequestBody, Schema
from litestar.params import Body, Parameter
from litestar.response import Redirect

from tether._errors import (
    Conflict,
    InfrastructureError,
    NotFound,
    Rejected,
    TetherError,
    UsageError,
)
from tether._tether import Tether
from tether.cluster import Node, join
from tether.core._decision import call_entities, cedar_value
from tether.core._flow import empty_flow_context
from tether.core._intent import parse_intent
from tether.core._policy import build_snapshot
from tether.core._risk import Control, risk_tags
from tether.core._verify import jwk_thumbprint, token_hash
from tether.enforcement import ObservationRefused
from tether.enforcement._unauthenticated import OTHER, UnauthenticatedTraffic, bounded_code
from tether.gateway._profiles import profiles_from_catalogue
from tether.identity._credentials import PREFIX as CREDENTIAL_PREFIX
from tether.identity._credentials import credential_dict
from tether.observability import remote_parent
from tether.policy import default_schema
from tether.secrets import SecretInfo, lease_dict
from tether.server import _schemas as S
from tether.server._auth import (
    Authenticator,
    Forbidden,
    Principal,
    RateLimited,
    RateLimiter,
    Unauthorized,
    request_uri,
    require,
    single_header,
)
from tether.server._oauth import OAuth, OAuthError
from tether.server._observe import LOG, Metrics, configure_logging, log_request
from tether.store import ApprovalRow, CredentialRow, IdentityRow, TaskRow

MAX_BODY = 1024 * 1024
DECISIONS = "/v1/decisions"
SECRETS = "/v1/secrets"
log = logging.getLogger("tether.server")
_ERRORS = {
    400: ResponseSpec(data_container=S.ErrorOut, description="Malformed request"),
    401: ResponseSpec(data_container=S.ErrorOut, description="Not authenticated"),
    403: ResponseSpec(data_container=S.ErrorOut, description="Not allowed"),
    404: ResponseSpec(data_container=S.ErrorOut, description="Not found"),
    409: ResponseSpec(data_container=S.ErrorOut, description="Conflict"),
    413: ResponseSpec(data_container=S.ErrorOut, description="Body too large"),
    429: ResponseSpec(data_container=S.ErrorOut, description="Rate limited"),
    503: ResponseSpec(data_container=S.ErrorOut, description="Store unavailable"),
}
_PUBLIC = {503: _ERRORS[503]}  # no credential, no body: only the store can fail


@dataclass
class ServerSettings:
    rate: float = 2000.0
    burst: float = 4000.0
    log_level: str = "INFO"
    #: Seconds between two runs of the reaper (expired tasks and leases, leftover
    #: database roles); it also runs once at start. 0 turns the periodic run off.
    reap_interval: float = 5.0
    #: Seconds between two resyncs of a node's memory when the store is PostgreSQL (see
    #: :mod:`tether.cluster`); ``TETHER_RESYNC_INTERVAL`` overrides it.
    resync_interval: float = 2.0
    #: The console's public origin behind a proxy (``https://tether.example``); its scheme
    #: decides TLS and it is the one Origin a console form may come from.
    #: ``TETHER_PUBLIC_URL`` sets it.
    public_url: str | None = None
    #: Refusals a second (and their burst) one source address may cause before it is
    #: answered 429: callers whose credential is missing or does not verify.
    unauthenticated_rate: float = 20.0
    unauthenticated_burst: float = 100.0
    #: One receipt per source address per this many seconds stands for its
    #: unauthenticated refusals (counted in between).
    unauthenticated_receipt_interval: float = 60.0
    #: A bearer token that may read ``/metrics`` (besides admins and auditors);
    #: ``TETHER_METRICS_TOKEN`` sets it.
    metrics_token: str | None = None


class Context:
    """What every handler needs, kept in ``app.state.ctx``."""

    def __init__(self, tether: Tether, settings: ServerSettings) -> None:
        self.tether = tether
        self.audience = f"spiffe://{tether.trust_domain}"
        self.auth = Authenticator(tether, self.audience)
        self.oauth = OAuth(tether, self.audience)
        self.limiter = RateLimiter(settings.rate, settings.burst)
        self.unauthenticated = UnauthenticatedTraffic(
            rate=settings.unauthenticated_rate,
            burst=settings.unauthenticated_burst,
            interval=settings.unauthenticated_receipt_interval,
        )
        self.metrics = Metrics()
        self.settings = settings
        self.reaper: asyncio.Task[None] | None = None
        #: This process as one node of several over a PostgreSQL store (else None).
        self.node: Node | None = None


def _ctx(request: Request) -> Context:  # type: ignore[type-arg]
    ctx: Context = request.app.state.ctx
    return ctx


class TetherRequest(Request[Any, Any, Any]):
    """A request whose hostile JSON body is a 400, never a 500: invalid UTF-8, nesting
    past ``MAX_JSON_DEPTH`` (or past the decoder's own recursion limit), NULs in strings."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except RecursionError:
            raise ClientException(f"JSON is nested deeper than {S.MAX_JSON_DEPTH} levels") from None
        except UnicodeDecodeError:
            raise ClientException("body is not valid UTF-8") from None
        problem = S.json_problem(value)
        if problem is not None:
            raise ClientException(problem)
        return value


def authenticated(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Guard: authenticate before the body is even read; 401 before any 400."""
    ctx: Context = connection.app.state.ctx
    try:
        principal = ctx.auth.authenticate(connection)  # type: ignore[arg-type]
    except Unauthorized as exc:
        refuse_unauthenticated(ctx, connection, exc.code)
    connection.state.principal = principal
    ctx.limiter.check(f"{principal.kind}:{principal.id}")


def source_address(connection: ASGIConnection) -> str:  # type: ignore[type-arg]
    """The peer of the connection (a proxy's, behind one)."""
    return source_address_of(connection.scope)


def source_address_of(scope: Any) -> str:
    """The peer address of an ASGI scope (never a forwarded header)."""
    client = scope.get("client")
    return str(client[0])[:64] if client else "unknown"


#: Public, cheap and writing nothing: health probes, trust bundles and the API's schema
#: stay answered.
_NEVER_SHED = frozenset(
    {
        "/healthz",
        "/livez",
        "/readyz",
        "/.well-known/jwks.json",
        "/.well-known/spiffe-bundle",
        "/.well-known/oauth-authorization-server",
        "/.well-known/authzen-configuration",
    }
)


def _never_shed(path: str) -> bool:
    return path in _NEVER_SHED or path == "/openapi.json" or path.startswith("/schema")


def _presents_admin_credential(scope: Any) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return bool(value.lower().startswith(b"bearer " + CREDENTIAL_PREFIX.encode()))
    return False


async def _send_rate_limited(send: Any) -> None:
    message = "too many unauthenticated requests from this address"
    body = msgspec.json.encode(
        S.ErrorOut(status_code=429, detail=message, error="rate_limited", error_description=message)
    )
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def refuse_unauthenticated(
    ctx: Context,
    connection: ASGIConnection,  # type: ignore[type-arg]
    code: str,
    *,
    status: int = 401,
) -> NoReturn:
    """Refuse a request whose credential is missing or does not verify: counted, a
    receipt per source address per interval (not per request), 429 past the address's
    rate, and a code with a fixed description (never an exception's text)."""
    source = source_address(connection)
    refusal = ctx.unauthenticated.refuse(source, code)
    ctx.metrics.unauthenticated.labels(refusal.code).inc()
    connection.state.accounted = True
    if refusal.limited:
        raise RateLimited("too many unauthenticated requests from this address")
    if refusal.receipt_for:
        with contextlib.suppress(TetherError):
            ctx.tether.audit.append(
                "request.unauthenticated",
                chain=[],
                effect="deny",
                reasons=[{"code": refusal.code, "message": refusal.description}],
                risk_tags=list(risk_tags(Control.AUDIT)),
                detail={
                    "source": source,
                    "method": connection.scope.get("method", ""),
                    "route": str(connection.scope.get("path_template") or "unmatched")[:128],
                    "status": status,
                    "refused": refusal.receipt_for,
                    "interval_seconds": ctx.unauthenticated.interval,
                },
            )
    if status == 401:
        raise Unauthorized(refusal.description, code=refusal.code)
    if status == 403:
        raise Forbidden(refusal.description, code=refusal.code)
    raise HTTPException(status_code=status, detail=refusal.description)


def _principal(request: Request) -> Principal:  # type: ignore[type-arg]
    principal: Principal = request.state.principal
    return principal


# -- errors ---------------------------------------------------------------------------
def _status(exc: Exception) -> int:
    if isinstance(exc, OAuthError):
        return exc.status
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, RateLimited):
        return 429
    if isinstance(exc, Forbidden | Rejected):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, UsageError):
        return 400
    if isinstance(exc, InfrastructureError):
        return 503
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def _error_response(request: Request, exc: Exception) -> Response[Any]:  # type: ignore[type-arg]
    status = _status(exc)
    if isinstance(exc, TetherError):
        code, message = exc.code, exc.message
    elif isinstance(exc, HTTPException):
        code = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
        }.get(status, "http_error")
        message = str(exc.detail) + _first_problem(exc)
        if request.url.path.startswith(SECRETS) and status == 400:
            # A refused secret write names the rule only: never a member name or value
            # the body carried (a value could have been put in the wrong place).
            message = (
                "the body is not a valid secret request (see /openapi.json)" + _secret_problem(exc)
            )
    else:
        code, message = "internal_error", "internal error"
        # The type only: a message could carry a secret; never the request body.
        LOG.error(
            "unhandled",
            extra={"fields": {"error": type(exc).__name__, "path": request.url.path[:128]}},
        )
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}  # 405: Allow
    if status == 401:
        error = "invalid_token" if single_header_safe(request) else "invalid_request"
        headers["WWW-Authenticate"] = f'DPoP algs="ES256", error="{error}", Bearer realm="tether"'
    if status == 429:
        headers["Retry-After"] = "1"
    ctx = request.app.state.get("ctx")
    principal = request.state.get("principal") if hasattr(request, "state") else None
    if (
        ctx is not None
        and principal is None
        and not request.state.get("accounted")
        and _is_decision_call(request, status)
    ):
        _refused_decision(ctx, request, status, code, message)
    elif (
        ctx is not None
        and principal is None
        and not request.state.get("accounted")
        and 400 <= status < 500
        and status != 429
    ):
        # Any other refusal of a caller who proved nothing (a malformed body or key at a
        # door that needs no credential, an unknown route) is charged to its address too:
        # counted, sampled, and past the rate answered 429 before any work.
        with contextlib.suppress(RateLimited, Unauthorized, Forbidden, HTTPException):
            refuse_unauthenticated(ctx, request, bounded_code(code), status=status)
    if ctx is not None and principal is not None and status >= 400:
        # A refused request from a known principal leaves a receipt.
        with contextlib.suppress(TetherError):
            ctx.tether.audit.append(
                "request.rejected",
                chain=[principal.name],
                effect="deny",
                reasons=[{"code": code, "message": message[:500]}],
                detail={"method": request.method, "path": request.url.path[:256], "status": status},
                risk_tags=list(risk_tags(Control.AUDIT)),
            )
    body = S.ErrorOut(status_code=status, detail=message, error=code, error_description=message)
    return Response(content=body, status_code=status, headers=headers)


def _first_problem(exc: HTTPException) -> str:
    """What a validation error is about (the field and the rule, never the value)."""
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict) and "message" in first:
            return f": {first.get('key', '')}: {first['message']}"[:300]
    return ""


_SECRET_FIELDS = frozenset(
    {"name", "value", "kind", "description", "tools", "overlap_seconds", "postgres", "reason"}
)


def _secret_problem(exc: HTTPException) -> str:
    """The offending field of a refused secret write, if it is one of the schema's own."""
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        key = str(first.get("key", "")) if isinstance(first, dict) else ""
        if key in _SECRET_FIELDS:
            return f": field {key!r} is invalid"
    return ""


def _is_decision_call(request: Request, status: int) -> bool:  # type: ignore[type-arg]
    """A refused ``POST /v1/decisions`` (other than a rate limit): it gets a receipt."""
    return (
        request.scope.get("path_template") == DECISIONS
        and request.method == "POST"
        and status not in (405, 429)
        and status < 500
    )


def _refused_decision(
    ctx: Context,
    request: Request,  # type: ignore[type-arg]
    status: int,
    code: str,
    message: str,
) -> None:
    """The receipt of a decision call refused before it could be decided (a body that is
    not a call: too large, not JSON, too deep, NULs). A deny like any other when the
    task token presented verifies (the task is accountable for it); from a caller who
    proved nothing it is counted and sampled like any unauthenticated refusal."""
    token: str | None = None
    with contextlib.suppress(Unauthorized):
        scheme, _, value = (single_header(request, "authorization") or "").partition(" ")
        token = value.strip() if scheme.lower() == "dpop" and value.strip() else None
    reason = {400: "call.malformed", 413: "call.oversized"}.get(status, code)
    claims = None
    if token is not None:
        with contextlib.suppress(Exception):  # a token that does not verify is no token
            claims = ctx.tether.enforcement.verify_token(token, now=ctx.tether.clock.now())
    if claims is None or token is None:
        with contextlib.suppress(RateLimited, Unauthorized, HTTPException):
            refuse_unauthenticated(ctx, request, reason, status=status)
        return
    with contextlib.suppress(TetherError):
        ctx.tether.audit.append(
            "decision",
            chain=list(claims.chain),
            task_id=claims.task_id,
            intent_digest=claims.intent_digest,
            effect="deny",
            reasons=[{"code": reason, "message": message[:500]}],
            policies=[],
            risk_tags=list(risk_tags(Control.PER_CALL_POLICY)),
            token_digest=token_hash(token),
            detail={"status": status, "error": code},
        )
    ctx.metrics.decisions.labels("deny", reason, "").inc()
    request.state.decision = "deny"


def single_header_safe(request: Request) -> bool:  # type: ignore[type-arg]
    try:
        return single_header(request, "authorization") is not None
    except Unauthorized:
        return False


# -- conversions -------------------------------------------------------------------------
def _identity(row: IdentityRow) -> S.IdentityOut:
    return S.IdentityOut(
        spiffe_id=row.spiffe_id,
        kind=row.kind,
        owner=row.owner,
        description=row.description,
        status=row.status,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


def _task(row: TaskRow) -> S.TaskOut:
    return S.TaskOut(
        task_id=row.task_id,
        agent=row.agent_id,
        template=row.template,
        status=row.status,
        calls_used=row.calls_used,
        opened_at=row.opened_at,
        expires_at=row.expires_at,
        intent_digest=row.intent_digest,
        intent=json.loads(row.intent_json),
        chain=json.loads(row.chain_json),
        parent_task_id=row.parent_task_id,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
    )


def _approval(row: ApprovalRow, tether: Tether, viewer: str | None = None) -> S.ApprovalOut:
    """The approval with what its approver must see (owner, chain, deceptive text flags,
    and whether ``viewer`` has a conflict of interest)."""
    review = tether.approvals.review(row, viewer)
    return S.ApprovalOut(
        owner=review["owner"],
        chain=review["chain"],
        flags=review["flags"],
        conflict=review["conflict"],
        approval_id=row.approval_id,
        task_id=row.task_id,
        agent=row.agent_id,
        tool=row.tool,
        args=json.loads(row.args_json),
        args_digest=row.args_digest,
        status=row.status,
        reasons=[S.ReasonOut(**r) for r in json.loads(row.reasons_json)],
        created_at=row.created_at,
        expires_at=row.expires_at,
        decided_by=row.decided_by,
    )


def _may_see(principal: Principal, identity: IdentityRow) -> bool:
    """An owner sees only the identities they own; the roles that may read the inventory
    (admins, approvers, auditors) see all of it. Endpoints still require their roles."""
    return principal.role != "owner" or identity.owner == principal.owner


def _visible(principal: Principal, tether: Tether, spiffe_id: str) -> IdentityRow:
    """The identity, or not found when ``principal`` may not see it (no owner learns
    which other owners' identities exist)."""
    row = tether.identities.get(spiffe_id)
    if not _may_see(principal, row):
        raise NotFound(f"identity {spiffe_id} is not registered")
    return row


def _may_manage(principal: Principal, identity: IdentityRow) -> None:
    if principal.role == "admin":
        return
    if principal.role == "owner" and identity.owner == principal.owner:
        return
    raise Forbidden(f"{principal.name} does not own {identity.spiffe_id}")


# -- public -------------------------------------------------------------------------------
@get("/healthz", tags=["health"], responses=_PUBLIC)
async def healthz(request: Request) -> S.HealthOut:  # type: ignore[type-arg]
    """Liveness and readiness: the store answers."""
    tether = _ctx(request).tether
    tether.store.get_meta("trust_domain")
    return S.HealthOut(status="ok", trust_domain=tether.trust_domain)


@get("/livez", tags=["health"], include_in_schema=True)
async def livez() -> dict[str, str]:
    """Liveness: the process answers (restart it if not)."""
    return {"status": "ok"}


@get("/readyz", tags=["health"], responses=_PUBLIC)
async def readyz(request: Request) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    """Readiness: the store answers and, in a node, its memory is listening and in sync.

    503 otherwise, so a load balancer sends no decisions to a node that could not hear a
    revocation (it would still refuse a revoked token: the store is asked then)."""
    ctx = _ctx(request)
    try:
        await asyncio.to_thread(ctx.tether.store.get_meta, "trust_domain")
    except Exception as exc:  # the store is down: not ready
        return Response(
            {"status": "store unavailable", "error": type(exc).__name__}, status_code=503
        )
    node = ctx.node
    if node is not None and not node.memory.in_sync():
        why = "not listening" if not node.memory.connected else "not resynced recently"
        return Response({"status": f"node {why}"}, status_code=503)
    return Response({"status": "ok", "trust_domain": ctx.tether.trust_domain})


@get("/v1/node", tags=["health"], responses=_ERRORS, guards=[authenticated])
async def node_status(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """This node: listener state, events applied, their lag, resyncs (admins, auditors)."""
    require(_principal(request), "auditor")
    node = _ctx(request).node
    if node is None:
        return {"name": "", "clustered": False}
    return {"clustered": True, **node.stats()}


@get("/openapi.json", include_in_schema=False)
async def openapi_json(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    schema: dict[str, Any] = request.app.openapi_schema.to_schema()
    return schema


@get("/.well-known/jwks.json", tags=["bundles"], responses=_PUBLIC)
async def jwks(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """The JWKS of the trust domain's JWT signing keys (rotation shows here)."""
    return _ctx(request).tether.jwks()


@get("/.well-known/spiffe-bundle", tags=["bundles"], responses=_PUBLIC)
async def spiffe_bundle(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """The SPIFFE trust bundle: X.509 authorities and JWT-SVID keys."""
    return _ctx(request).tether.spiffe_bundle()


@get("/.well-known/oauth-authorization-server", tags=["bundles"], responses=_PUBLIC)
async def oauth_metadata(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """RFC 8414 metadata for the token, introspection and revocation endpoints."""
    base = f"{request.url.scheme}://{request.url.netloc}"
    return {
        "issuer": f"spiffe://{_ctx(request).tether.trust_domain}",
        "token_endpoint": f"{base}/oauth2/token",
        "introspection_endpoint": f"{base}/oauth2/introspect",
        "revocation_endpoint": f"{base}/oauth2/revoke",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
        "dpop_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic"],
        "authorization_details_types_supported": ["tether:tool"],
    }


def metrics_reader(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Guard of ``/metrics``: the metrics bearer token, or an admin or auditor."""
    ctx: Context = connection.app.state.ctx
    expected = ctx.settings.metrics_token
    scheme, _sep, value = (single_header(connection, "authorization") or "").partition(" ")  # type: ignore[arg-type]
    if expected and scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), expected):
        return
    authenticated(connection, _)
    require(connection.state.principal, "auditor")


def _render_metrics(ctx: Context) -> bytes:
    ctx.metrics.approvals_pending.set(len(ctx.tether.approvals.list("pending")))
    return ctx.metrics.render()


@get(
    "/metrics",
    tags=["health"],
    media_type="text/plain; version=0.0.4",
    responses=_ERRORS,
    guards=[metrics_reader],
)
async def metrics(request: Request) -> bytes:  # type: ignore[type-arg]
    """Prometheus metrics: ``Authorization: Bearer`` the metrics token, or an admin or
    auditor credential. ``tether serve --metrics-listen`` also serves them on a
    listener of their own."""
    return _render_metrics(_ctx(request))


# -- identities ---------------------------------------------------------------------------
@post(
    "/v1/identities",
    tags=["identities"],
    responses=_ERRORS,
    status_code=201,
    guards=[authenticated],
)
async def identity_register(request: Request, data: S.IdentityIn) -> S.IdentityOut:  # type: ignore[type-arg]
    """Register an identity (admins; owners for identities they own)."""
    principal = _principal(request)
    require(principal, "owner")
    if principal.role == "owner" and data.owner != principal.owner:
        raise Forbidden("owners register identities they own")
    row = _ctx(request).tether.register_identity(
        data.spiffe_id, kind=data.kind, owner=data.owner, description=data.description
    )
    return _identity(row)


@get("/v1/identities", tags=["identities"], responses=_ERRORS, guards=[authenticated])
async def identity_list(request: Request) -> S.IdentityList:  # type: ignore[type-arg]
    """List identities (an owner's list holds the identities they own)."""
    principal = _principal(request)
    require(principal, "owner", "approver", "auditor")
    rows = _ctx(request).tether.identities.list()
    return S.IdentityList([_identity(r) for r in rows if _may_see(principal, r)])


@get("/v1/identity", tags=["identities"], responses=_ERRORS, guards=[authenticated])
async def identity_show(
    request: Request,  # type: ignore[type-arg]
    spiffe_id: str = Parameter(query="spiffe_id", max_length=2048),
) -> S.IdentityOut:
    """Show one identity (to an owner, only one they own: another's is not found)."""
    principal = _principal(request)
    require(principal, "owner", "approver", "auditor")
    return _identity(_visible(principal, _ctx(request).tether, spiffe_id))


@post(
    "/v1/identities/disable",
    tags=["identities"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def identity_disable(request: Request, data: S.SpiffeIdIn) -> S.DisableOut:  # type: ignore[type-arg]
    """Offboard: disable an identity and revoke every task and token it holds."""
    principal = _principal(request)
    tether = _ctx(request).tether
    _may_manage(principal, _visible(principal, tether, data.spiffe_id))
    row, revoked = tether.disable_identity(data.spiffe_id, by=principal.name)
    _ctx(request).metrics.tokens.labels("revoked").inc(len(revoked))
    return S.DisableOut(identity=_identity(row), revoked_tasks=revoked)


@post(
    "/v1/identities/join-token",
    tags=["identities"],
    responses=_ERRORS,
    status_code=201,
    guards=[authenticated],
)
async def identity_join_token(request: Request, data: S.JoinTokenIn) -> S.JoinTokenOut:  # type: ignore[type-arg]
    """Mint a one-time join token for a workload to attest with."""
    principal = _principal(request)
    tether = _ctx(request).tether
    _may_manage(principal, _visible(principal, tether, data.spiffe_id))
    token = tether.create_join_token(data.spiffe_id, ttl=data.ttl)
    return S.JoinTokenOut(spiffe_id=data.spiffe_id, join_token=token, ttl=data.ttl)


def _public_key(jwk: dict[str, str]) -> ec.EllipticCurvePublicKey:
    """An EC public key from a JWK, or a 400 (a private key is refused outright)."""
    if "d" in jwk:
        raise UsageError("send the public key only")
    try:
        key = ECAlgorithm.from_jwk(json.dumps(jwk))
    except Exception:
        raise UsageError("jwk is not an EC public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UsageError("jwk is not an EC public key")
    return key


@post("/v1/attest", tags=["identities"], responses=_ERRORS, status_code=200)
async def attest(request: Request, data: S.AttestIn) -> S.AttestOut:  # type: ignore[type-arg]
    """Redeem a join token (the credential) for SVIDs bound to the given public key."""
    key = _public_key(data.jwk)
    ctx = _ctx(request)
    try:
        svids = ctx.tether.attest(
            data.join_token, key, audience=data.audience, record_refusal=False
        )
    except Rejected as exc:
        if exc.code != "attestation.join_token":
            raise
        # The join token is the credential: a wrong one proves nothing, no receipt each.
        refuse_unauthenticated(ctx, request, exc.code, status=403)
    return S.AttestOut(
        spiffe_id=svids.spiffe_id,
        jwt_svid=svids.jwt_svid,
        x509_svid_pem=svids.x509_svid_pem,
        expires_at=svids.expires_at,
    )


# -- templates and policies -------------------------------------------------------------------
def _template_out(t: Any) -> S.TemplateOut:
    return S.TemplateOut(name=t.name, description=t.description, params=sorted(t.params))


@post(
    "/v1/templates", tags=["templates"], responses=_ERRORS, status_code=201, guards=[authenticated]
)
async def template_add(request: Request, data: S.TemplateIn) -> S.TemplateOut:  # type: ignore[type-arg]
    """Add or replace an intent template."""
    require(_principal(request))
    return _template_out(_ctx(request).tether.add_template(data.template))


@get("/v1/templates", tags=["templates"], responses=_ERRORS, guards=[authenticated])
async def template_list(request: Request) -> S.TemplateList:  # type: ignore[type-arg]
    require(_principal(request), "owner", "approver", "auditor", "workload")
    return S.TemplateList([_template_out(t) for t in _ctx(request).tether.list_templates()])


def _policies_out(snapshot: Any) -> S.PoliciesOut:
    return S.PoliciesOut(
        digest=snapshot.digest,
        policies=[
            S.PolicyOut(id=p.id, effect=p.effect, file=p.file, line=p.line, approval=p.approval)
            for p in snapshot.policies
        ],
    )


@post("/v1/policies", tags=["policies"], responses=_ERRORS, status_code=200, guards=[authenticated])
async def policy_load(request: Request, data: S.PoliciesIn) -> S.PoliciesOut:  # type: ignore[type-arg]
    """Validate and load a policy set; an invalid one is refused and the live one stays.
    With ``"shadow": true`` it becomes the shadow set instead: evaluated beside the live
    set on every call and recorded on its receipt, never enforced."""
    principal = _principal(request)
    require(principal)
    policies = _ctx(request).tether.policies
    loaded = policies.load(data.files, data.schema, shadow=data.shadow, by=principal.name)
    return _policies_out(loaded)


@get("/v1/policies/shadow", tags=["policies"], responses=_ERRORS, guards=[authenticated])
async def policy_shadow(request: Request, limit: int = 50) -> dict[str, Any]:  # type: ignore[type-arg]
    """What the shadow set would change: the calls it saw and each whose effect differs."""
    require(_principal(request), "auditor")
    report = _ctx(request).tether.policies.shadow_report(limit=min(max(limit, 0), 500))
    return report.to_dict()


@delete(
    "/v1/policies/shadow", tags=["policies"], responses=_ERRORS, status_code=200,
    guards=[authenticated],
)  # fmt: skip
async def policy_shadow_off(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """Stop evaluating the shadow set (a receipt naming who)."""
    principal = _principal(request)
    require(principal)
    return {"removed": _ctx(request).tether.policies.clear_shadow(by=principal.name)}


@post(
    "/v1/policies/replay", tags=["policies"], responses=_ERRORS, status_code=200,
    guards=[authenticated],
)  # fmt: skip
async def policy_replay(request: Request, data: S.ReplayIn) -> dict[str, Any]:  # type: ignore[type-arg]
    """Re-decide the recorded calls of a window (``from``/``to``, seconds since the epoch)
    under a candidate policy set, without loading it: every decision whose effect would
    change, and the calls that cannot be replayed faithfully, with why (auditors and
    admins; a receipt names who replayed which set)."""
    principal = _principal(request)
    require(principal, "auditor")
    ctx = _ctx(request)
    replay = functools.partial(
        ctx.tether.policies.replay,
        data.files,
        data.schema,
        since=data.since,
        until=data.until,
        limit=data.limit,
        by=principal.name,
    )
    # A long log takes a while: over PostgreSQL, in a worker thread.
    report = await asyncio.to_thread(replay) if ctx.node is not None else replay()
    return report.to_dict()


@post(
    "/v1/catalogue", tags=["policies"], responses=_ERRORS, status_code=200, guards=[authenticated]
)
async def catalogue_load(request: Request, data: S.CatalogueIn) -> S.CatalogueOut:  # type: ignore[type-arg]
    """Replace the tool catalogue every door judges calls by (a catalogue file's
    ``tools`` tables as JSON; ``prefix`` names them ``prefix.<name>``)."""
    require(_principal(request))
    entries = profiles_from_catalogue({"tools": data.tools}, data.prefix)
    value = _ctx(request).tether.catalogue.load(entries)
    return S.CatalogueOut(digest=value, tools=sorted(entries))


@post("/v1/pins", tags=["policies"], responses=_ERRORS, status_code=200, guards=[authenticated])
async def pins_set(request: Request, data: S.PinsIn) -> S.PinsOut:  # type: ignore[type-arg]
    """Pin an upstream's reviewed tool definitions (``tether gateway pin``): a receipt
    per new or changed pin, attributed to the authenticated admin; ``dry_run`` only
    reports what would change."""
    from tether.gateway._pins import pin_reviewed  # noqa: PLC0415 - the MCP types load late

    principal = _principal(request)
    require(principal)
    changed, unchanged = pin_reviewed(
        _ctx(request).tether,
        data.upstream,
        data.tools,
        by=principal.name,
        dry_run=data.dry_run,
        source=data.source,
    )
    return S.PinsOut(
        upstream=data.upstream,
        dry_run=data.dry_run,
        changed=[S.PinChangeOut(**c) for c in changed],
        unchanged=unchanged,
        by=principal.name,
    )


@get("/v1/catalogue", tags=["policies"], responses=_ERRORS, guards=[authenticated])
async def catalogue_show(request: Request) -> S.CatalogueOut:  # type: ignore[type-arg]
    require(_principal(request), "owner", "approver", "auditor")
    catalogue = _ctx(request).tether.catalogue
    entries = catalogue.entries()
    return S.CatalogueOut(
        digest=catalogue.digest or "",
        tools=sorted(entries),
        entries=[
            S.CatalogueEntryOut(
                tool=name,
                side_effect=str(p.side_effect),
                sensitivity=str(p.sensitivity),
                trusted=p.trusted,
            )
            for name, p in sorted(entries.items())
        ],
    )


@get("/v1/policies", tags=["policies"], responses=_ERRORS, guards=[authenticated])
async def policy_list(request: Request) -> S.PoliciesOut:  # type: ignore[type-arg]
    require(_principal(request), "owner", "approver", "auditor")
    return _policies_out(_ctx(request).tether.policies.snapshot())


@post(
    "/v1/policies/dry-run",
    tags=["policies"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def policy_dry_run(request: Request, data: S.DryRunIn) -> S.DryRunOut:  # type: ignore[type-arg]
    """Evaluate one call against a proposed policy set, without loading it."""
    require(_principal(request))
    tether = _ctx(request).tether
    snapshot = build_snapshot(data.files, data.schema or default_schema())
    agent = tether.identities.get(data.agent)
    context = {
        "task_id": "dry-run",
        "template": "dry-run",
        "purpose": "dry-run",
        "data_ceiling": "internal",
        "on_behalf_of": "",
        "calls_used": data.calls_used,
        "max_calls": 1_000_000,
        "delegation_depth": 0,
        "chain": [agent.spiffe_id],
        "root": agent.spiffe_id,
        "args": {k: cedar_value(v) for k, v in data.args.items() if v is not None},
        "flow": empty_flow_context(),
    }
    outcome = snapshot.evaluate(
        {"type": "Agent", "id": agent.spiffe_id},
        "call_tool",
        {"type": "Tool", "id": data.tool},
        context,
        call_entities(agent.spiffe_id, agent.owner, agent.kind, data.tool),
    )
    effect = (
        "deny"
        if outcome.errors or not outcome.allowed
        else "approval_required"
        if outcome.approval
        else "allow"
    )
    return S.DryRunOut(effect=effect, policies=list(outcome.policies), errors=list(outcome.errors))


# -- tasks and decisions -------------------------------------------------------------------
@post("/v1/tasks", tags=["tasks"], responses=_ERRORS, status_code=201, guards=[authenticated])
async def task_open(request: Request, data: S.TaskOpenIn) -> S.TaskOpenOut:  # type: ignore[type-arg]
    """Open a task. A workload opens for itself, bound to its SVID's key; an admin names
    the agent and its public proof key."""
    principal = _principal(request)
    tether = _ctx(request).tether
    if principal.kind == "workload":
        if data.agent not in (None, principal.id) or data.jwk is not None:
            raise Forbidden("a workload opens tasks for itself, with its own key")
        if data.parent_task_id is not None:
            parent = tether.tasks.get(data.parent_task_id)
            if parent.agent_id != principal.id:
                raise Forbidden(
                    "only the parent task's agent may open a sub-task here; delegation to "
                    "another agent is a token exchange with the parent's proof"
                )
        agent, jkt = principal.id, principal.jkt
    else:
        require(principal)
        if data.agent is None or data.jwk is None:
            raise UsageError("an admin must give agent and jwk")
        _public_key(data.jwk)
        agent, jkt = data.agent, jwk_thumbprint(data.jwk)
    opened = tether.open_task(
        agent,
        jkt=jkt,
        template=data.template,
        params=data.params,
        intent=parse_intent(data.intent) if data.intent is not None else None,
        parent_task_id=data.parent_task_id,
        resources=tuple(data.resources),
        request=data.request,
    )
    _ctx(request).metrics.tokens.labels("issued").inc()
    return S.TaskOpenOut(
        task_id=opened.task_id,
        token=opened.token,
        expires_at=opened.expires_at,
        token_expires_at=opened.token_expires_at,
    )


def _task_access(principal: Principal, row: TaskRow, tether: Tether, *, write: bool) -> None:
    if principal.kind == "workload":
        if principal.id not in json.loads(row.chain_json):
            raise Forbidden("a workload may only touch its own tasks")
        return
    if principal.role == "admin" or (not write and principal.role in ("auditor", "approver")):
        return
    if principal.role == "owner":
        agent = tether.store.get_identity(row.agent_id)
        if agent is not None and agent.owner == principal.owner:
            return
    raise Forbidden("not allowed to touch this task")


@get("/v1/tasks/{task_id:str}", tags=["tasks"], responses=_ERRORS, guards=[authenticated])
async def task_show(request: Request, task_id: str) -> S.TaskOut:  # type: ignore[type-arg]
    principal = _principal(request)
    tether = _ctx(request).tether
    row = tether.show_task(task_id)
    _task_access(principal, row, tether, write=False)
    return _task(row)


@post(
    "/v1/tasks/{task_id:str}/end",
    tags=["tasks"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def task_end(request: Request, task_id: str) -> S.TaskOut:  # type: ignore[type-arg]
    """End a task: its token, its children and their tokens are revoked."""
    principal = _principal(request)
    tether = _ctx(request).tether
    _task_access(principal, tether.tasks.get(task_id), tether, write=True)
    return _task(tether.end_task(task_id))


@post(
    "/v1/tasks/{task_id:str}/renew",
    tags=["tasks"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def task_renew(request: Request, task_id: str) -> S.TaskOpenOut:  # type: ignore[type-arg]
    """Renew a long-running task's token: only the task's own workload (its SVID and a
    DPoP proof), or an admin. The admission policy and every capability of the intent
    are re-checked against the current policy; the old token is revoked."""
    principal = _principal(request)
    tether = _ctx(request).tether
    row = tether.tasks.get(task_id)
    if principal.kind == "workload":
        if principal.id != row.agent_id:
            raise Forbidden("only the task's own agent renews its token")
    else:
        require(principal)
    renewed = tether.renew_task(task_id)
    _ctx(request).metrics.tokens.labels("issued").inc()
    return S.TaskOpenOut(
        task_id=renewed.task_id,
        token=renewed.token,
        expires_at=renewed.expires_at,
        token_expires_at=renewed.token_expires_at,
    )


def _task_token(ctx: Context, request: Request) -> str:  # type: ignore[type-arg]
    """The task token of a decision or result request, if it verifies (signature, issuer,
    times); the request is then rate limited per task. Otherwise the caller proved
    nothing: :func:`refuse_unauthenticated`."""
    scheme, _, value = (single_header(request, "authorization") or "").partition(" ")
    token = value.strip() if scheme.lower() == "dpop" and value.strip() else None
    if token is None:
        refuse_unauthenticated(ctx, request, "token.missing")
    try:
        claims = ctx.tether.enforcement.verify_token(token, now=ctx.tether.clock.now())
    except InfrastructureError:
        raise  # the store could not be asked: a 503, not the caller's fault
    except Exception as exc:  # whatever else the reason, the token proves nothing
        code = exc.code if isinstance(exc, TetherError) else "token.malformed"
        refuse_unauthenticated(ctx, request, code)
    ctx.limiter.check("task:" + claims.task_id)
    return token


def _tool_label(ctx: Context, tool: str | None) -> str:
    """A tool as a metric label: a name the catalogue holds, else ``other`` (the
    caller chooses tool names; a series each would be theirs to create)."""
    return tool if tool and ctx.tether.catalogue.names(tool) else OTHER


def task_token_presented(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """A guard: a task token (``Authorization: DPoP``) before the body is even read."""
    scheme, _sep, value = (single_header(connection, "authorization") or "").partition(" ")  # type: ignore[arg-type]
    if scheme.lower() != "dpop" or not value.strip():
        refuse_unauthenticated(connection.app.state.ctx, connection, "token.missing")


@post(
    "/v1/tasks/{task_id:str}/results",
    tags=["decisions"],
    responses=_ERRORS,
    status_code=200,
    guards=[task_token_presented],
)
async def task_result(request: Request, task_id: str, data: S.ResultIn) -> S.ObservationOut:  # type: ignore[type-arg]
    """Report what a tool returned after an allowed decision (``receipt``), so its labels
    and values join the flow state of the task and of its ancestors, exactly as the
    gateway observes the results it forwards. ``Authorization: DPoP <task token>`` and a
    ``DPoP`` proof whose ``call`` claim is the digest of the tool, the receipt and the
    result (``ProofKey.prove_result``). 401 for a bad token or proof, 404 when the
    receipt is not an allowed decision of this task and tool, 409 when the task is no
    longer live; each refusal leaves a receipt."""
    ctx = _ctx(request)
    task_token = _task_token(ctx, request)
    observe = functools.partial(
        ctx.tether.observe,
        token=task_token,
        proof=single_header(request, "dpop"),
        tool=data.tool,
        receipt=data.receipt,
        result=data.result,
        task_id=task_id,
        htm=request.method,
        htu=request_uri(request),
    )
    try:
        # Always in a worker thread: scanning a result (bounded by the node's limits) must
        # not hold up the event loop.
        seen = await asyncio.to_thread(observe)
    except ObservationRefused as exc:
        if exc.code.startswith(("token.", "proof.")):
            raise Unauthorized(exc.message, code=exc.code) from None
        if exc.code == "result.unknown_decision":
            raise NotFound(exc.message) from None
        raise Conflict(exc.message, code=exc.code) from None
    return S.ObservationOut(
        task_id=seen.task_id,
        tool=seen.tool,
        sensitivity=seen.sensitivity,
        untrusted=seen.untrusted,
        receipt=S.ReceiptRef(seq=seen.seq, hash=seen.hash),
        oversized=seen.oversized,
    )


@post("/v1/decisions", tags=["decisions"], responses=_ERRORS, status_code=200)
async def decision(request: Request, data: S.AuthorizeIn) -> S.AuthorizeOut:  # type: ignore[type-arg]
    """Decide one tool call. ``Authorization: DPoP <task token>`` and a ``DPoP`` proof for
    this request whose ``call`` claim is the digest of this tool call. With a task token
    that verifies, always answers with a decision and its receipt: a refused call is a
    ``deny``, not an HTTP error. Without one the caller proved nothing: 401 with the
    reason code, counted and sampled, no receipt of its own (429 past its address's
    rate)."""
    ctx = _ctx(request)
    task_token = _task_token(ctx, request)
    # The decision's span (tether.observability) is a child of the caller's traceparent.
    with remote_parent(request.headers):
        decide = functools.partial(
            ctx.tether.authorize,
            token=task_token,
            proof=single_header(request, "dpop"),
            tool=data.tool,
            args=data.args,
            htm=request.method,
            htu=request_uri(request),
        )
        # Decisions run in worker threads: one waiting on the database does not hold up
        # the next, nor /livez, and concurrent ones share a commit (group commit, on by
        # default). With group commit off, SQLite decides on the loop (one writer anyway).
        threaded = ctx.node is not None or ctx.tether.store.group_commit > 0
        receipt = await asyncio.to_thread(decide) if threaded else decide()
    d = receipt.decision
    ctx.metrics.decisions.labels(
        str(d.effect), bounded_code(d.reasons[0].code), _tool_label(ctx, d.tool)
    ).inc()
    ctx.metrics.decision_latency.observe(receipt.latency_us / 1e6)
    request.state.decision = str(d.effect)
    return S.AuthorizeOut(
        effect=str(d.effect),
        reasons=[S.ReasonOut(r.code, r.message) for r in d.reasons],
        policies=list(d.policies),
        risk_tags=list(d.risk_tags),
        receipt=S.ReceiptRef(seq=receipt.seq, hash=receipt.hash),
        task_id=d.task_id,
        approval_id=receipt.approval_id,
    )


# -- approvals --------------------------------------------------------------------------------
@get("/v1/approvals", tags=["approvals"], responses=_ERRORS, guards=[authenticated])
async def approval_list(
    request: Request,  # type: ignore[type-arg]
    status: str | None = Parameter(query="status", default="pending", max_length=32),
) -> S.ApprovalList:
    principal = _principal(request)
    require(principal, "approver", "auditor")
    tether = _ctx(request).tether
    return S.ApprovalList(
        [_approval(r, tether, principal.name) for r in tether.approvals.list(status)]
    )


async def _decide_approval(
    request: Request,  # type: ignore[type-arg]
    approval_id: str,
    approve: bool,
    data: S.ApprovalDecisionIn | None,
) -> S.ApprovalOut:
    principal = _principal(request)
    require(principal, "approver")
    tether = _ctx(request).tether
    row = tether.decide_approval(
        approval_id, approve=approve, by=principal.name, comment=data.comment if data else ""
    )
    return _approval(row, tether)


@post(
    "/v1/approvals/{approval_id:str}/approve",
    tags=["approvals"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def approval_approve(
    request: Request,  # type: ignore[type-arg]
    approval_id: str,
    data: S.ApprovalDecisionIn | None = None,
) -> S.ApprovalOut:
    """Approve one held call: the identical call then goes through once. An optional
    ``{"comment": ...}`` is kept in the receipt."""
    return await _decide_approval(request, approval_id, True, data)


@post(
    "/v1/approvals/{approval_id:str}/deny",
    tags=["approvals"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def approval_deny(
    request: Request,  # type: ignore[type-arg]
    approval_id: str,
    data: S.ApprovalDecisionIn | None = None,
) -> S.ApprovalOut:
    """Deny one held call. An optional ``{"comment": ...}`` is kept in the receipt."""
    return await _decide_approval(request, approval_id, False, data)


# -- audit ---------------------------------------------------------------------------------
@get("/v1/audit", tags=["audit"], responses=_ERRORS, guards=[authenticated])
async def audit_query(
    request: Request,  # type: ignore[type-arg]
    limit: int = Parameter(query="limit", default=50, ge=1, le=10_000),
    task_id: str | None = Parameter(query="task_id", default=None, max_length=128),
) -> S.AuditOut:
    """The newest receipts, optionally of one task."""
    require(_principal(request), "auditor")
    records = _ctx(request).tether.audit.tail(limit if task_id is None else 10_000)
    if task_id is not None:
        records = [r for r in records if r.get("task_id") == task_id][-limit:]
    return S.AuditOut(records=records)


@get("/v1/audit/trace", tags=["audit"], responses=_ERRORS, guards=[authenticated])
async def audit_trace(
    request: Request,  # type: ignore[type-arg]
    task_id: str = Parameter(query="task_id", min_length=1, max_length=128),
) -> S.TraceOut:
    """The whole delegation tree of a task: its tasks, every receipt, every lease."""
    require(_principal(request), "auditor")
    trace = _ctx(request).tether.trace(task_id)
    return S.TraceOut(**trace)


@get("/v1/audit/verify", tags=["audit"], responses=_ERRORS, guards=[authenticated])
async def audit_verify(request: Request) -> S.VerifyOut:  # type: ignore[type-arg]
    require(_principal(request), "auditor")
    ctx = _ctx(request)
    # A long chain takes a while: over PostgreSQL, in a worker thread (the node keeps
    # deciding and answering /livez meanwhile).
    r = (
        await asyncio.to_thread(ctx.tether.verify_audit)
        if ctx.node is not None
        else ctx.tether.verify_audit()
    )
    return S.VerifyOut(
        ok=r.ok,
        records=r.records,
        checkpoints=r.checkpoints,
        first_bad=r.first_bad,
        problem=r.problem,
        heads=r.heads,
        witnessed=r.witnessed,
        size=r.size,
        root=r.root,
    )


# -- OAuth -----------------------------------------------------------------------------------
_FORM = Body(media_type=RequestEncodingType.URL_ENCODED)


async def _utf8_form(request: Request) -> None:  # type: ignore[type-arg]
    """A form body is UTF-8 (RFC 6749 appendix B): refuse what Litestar would decode leniently
    (invalid bytes, raw or percent-encoded, would become U+FFFD)."""
    try:
        parse_qsl((await request.body()).decode(), separator="&", errors="strict")
    except UnicodeDecodeError:
        raise ClientException("form body is not valid UTF-8") from None


@post("/oauth2/token", tags=["oauth"], responses=_ERRORS, status_code=200)
async def oauth_token(request: Request, data: dict[str, str] = _FORM) -> S.TokenOut:  # type: ignore[type-arg]
    """RFC 8693 token exchange: subject token + the agent's JWT-SVID → task token."""
    await _utf8_form(request)
    ctx = _ctx(request)
    out = ctx.oauth.exchange(data, dpop=single_header(request, "dpop"), htu=request_uri(request))
    ctx.metrics.tokens.labels("issued").inc()
    return S.TokenOut(**out)


@post(
    "/oauth2/introspect", tags=["oauth"], responses=_ERRORS, status_code=200, guards=[authenticated]
)
async def oauth_introspect(request: Request, data: dict[str, str] = _FORM) -> dict[str, Any]:  # type: ignore[type-arg]
    """RFC 7662 introspection: ``active`` is false for anything revoked, ended or expired."""
    _principal(request)
    await _utf8_form(request)
    return _ctx(request).oauth.introspect(data)


@post("/oauth2/revoke", tags=["oauth"], responses=_ERRORS, status_code=200, guards=[authenticated])
async def oauth_revoke(request: Request, data: dict[str, str] = _FORM) -> dict[str, Any]:  # type: ignore[type-arg]
    """RFC 7009 revocation: revoking a task token ends its task (and its children)."""
    principal = _principal(request)
    await _utf8_form(request)
    _ctx(request).oauth.revoke(
        data,
        principal_id=principal.id if principal.kind == "workload" else principal.name,
        is_admin=principal.role == "admin",
    )
    _ctx(request).metrics.tokens.labels("revoked").inc()
    return {}


# -- secrets and leases ------------------------------------------------------------------------
def _secret_out(info: SecretInfo) -> S.SecretOut:
    return S.SecretOut(
        name=info.name,
        kind=info.kind,
        description=info.description,
        created_at=info.created_at,
        created_by=info.created_by,
        tools=list(info.tools),
        overlap_seconds=info.overlap_seconds,
        rotation_hook=info.rotation_hook,
        current_version=info.current_version,
        versions=[
            S.SecretVersionOut(
                version=v.version,
                state=v.state,
                created_at=v.created_at,
                created_by=v.created_by,
                retired_at=v.retired_at,
                usable_until=v.usable_until,
            )
            for v in info.versions
        ],
        postgres=info.postgres,
    )


def _lease_out(row: Any) -> S.LeaseOut:
    return S.LeaseOut(**lease_dict(row))


@post(SECRETS, tags=["secrets"], responses=_ERRORS, status_code=201, guards=[authenticated])
async def secret_put(request: Request, data: S.SecretIn) -> S.SecretOut:  # type: ignore[type-arg]
    """Seal a new secret (admins). Write-only: no endpoint ever returns the value. A
    rotation hook (a command) can be set from the CLI only, not over HTTP."""
    principal = _principal(request)
    require(principal)
    meta: dict[str, Any] = {}
    if data.tools:
        meta["tools"] = data.tools
    if data.overlap_seconds is not None:
        meta["overlap_seconds"] = data.overlap_seconds
    if data.postgres is not None:
        meta["postgres"] = data.postgres
    info = _ctx(request).tether.put_secret(
        data.name,
        data.value,
        kind=data.kind,
        by=principal.name,
        description=data.description,
        meta=meta or None,
    )
    return _secret_out(info)


@get(SECRETS, tags=["secrets"], responses=_ERRORS, guards=[authenticated])
async def secret_list(request: Request) -> S.SecretList:  # type: ignore[type-arg]
    """Names, kinds and versions (never a value)."""
    require(_principal(request), "auditor")
    return S.SecretList([_secret_out(i) for i in _ctx(request).tether.list_secrets()])


@get(SECRETS + "/{name:str}", tags=["secrets"], responses=_ERRORS, guards=[authenticated])
async def secret_show(request: Request, name: str) -> S.SecretOut:  # type: ignore[type-arg]
    require(_principal(request), "auditor")
    return _secret_out(_ctx(request).tether.vault.info(name))


@post(
    SECRETS + "/{name:str}/rotate",
    tags=["secrets"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def secret_rotate(request: Request, name: str, data: S.SecretRotateIn) -> S.SecretOut:  # type: ignore[type-arg]
    """A new version (the given value, or the rotation hook's); the previous one stays
    usable for the overlap window."""
    principal = _principal(request)
    require(principal)
    info = _ctx(request).tether.rotate_secret(
        name, data.value, by=principal.name, overlap=data.overlap_seconds
    )
    return _secret_out(info)


@get("/v1/leases", tags=["secrets"], responses=_ERRORS, guards=[authenticated])
async def lease_list(
    request: Request,  # type: ignore[type-arg]
    task_id: str | None = Parameter(query="task_id", default=None, max_length=128),
    status: str | None = Parameter(query="status", default=None, max_length=32),
) -> S.LeaseList:
    """Leases: who holds which credential for which task, until when (never the value)."""
    require(_principal(request), "auditor")
    rows = _ctx(request).tether.broker.list(task_id=task_id, status=status)
    return S.LeaseList([_lease_out(r) for r in rows])


@post(
    "/v1/leases/{lease_id:str}/revoke",
    tags=["secrets"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def lease_revoke(request: Request, lease_id: str, data: S.LeaseRevokeIn) -> S.LeaseOut:  # type: ignore[type-arg]
    """Revoke one lease; a dynamic credential is destroyed at once."""
    principal = _principal(request)
    require(principal)
    tether = _ctx(request).tether
    tether.broker.revoke(lease_id, data.reason, by=principal.name)
    return _lease_out(tether.broker.get(lease_id))


@post(
    "/v1/kill-switch", tags=["secrets"], responses=_ERRORS, status_code=200, guards=[authenticated]
)
async def kill_switch(request: Request, data: S.KillSwitchIn) -> S.KillSwitchOut:  # type: ignore[type-arg]
    """Revoke every open task (of one agent, or all) and, with no agent named, every
    lease, now."""
    principal = _principal(request)
    require(principal)
    scoped = data.owner or data.template or data.trust_domain
    result = _ctx(request).tether.kill(
        data.reason,
        by=principal.name,
        agent=data.agent,
        owner=data.owner,
        template=data.template,
        trust_domain=data.trust_domain,
        everything=not (data.agent or scoped),
    )
    _ctx(request).metrics.tokens.labels("revoked").inc(len(result["tasks"]))
    return S.KillSwitchOut(tasks=result["tasks"], leases=result["leases"])


@post("/v1/kill", tags=["tasks"], responses=_ERRORS, status_code=200, guards=[authenticated])
async def kill(request: Request, data: S.KillIn) -> S.KillSwitchOut:  # type: ignore[type-arg]
    """The kill switch (admin only): revoke every open task in scope (every filter given
    must match, or ``all``), with their subtrees, tokens and leases; one receipt."""
    principal = _principal(request)
    require(principal)
    result = _ctx(request).tether.kill(
        data.reason,
        by=principal.name,
        agent=data.agent,
        owner=data.owner,
        template=data.template,
        trust_domain=data.trust_domain,
        everything=data.all,
    )
    _ctx(request).metrics.tokens.labels("revoked").inc(len(result["tasks"]))
    return S.KillSwitchOut(tasks=result["tasks"], leases=result["leases"])


# -- admin credentials -------------------------------------------------------------------
def _credential_out(row: CredentialRow, now: float) -> S.CredentialOut:
    return S.CredentialOut(**credential_dict(row, now))


def _own_or_admin(principal: Principal, credential_id: str) -> None:
    """Admins manage every credential; anyone else only the one they present."""
    if not (principal.kind == "admin" and principal.id == credential_id):
        require(principal)


@get("/v1/credentials", tags=["credentials"], responses=_ERRORS, guards=[authenticated])
async def credential_list(request: Request) -> list[S.CredentialOut]:  # type: ignore[type-arg]
    """Every admin credential, never a hash (admin only)."""
    require(_principal(request))
    tether = _ctx(request).tether
    now = tether.clock.now()
    rows = await asyncio.to_thread(tether.credentials.list)
    return [_credential_out(r, now) for r in rows]


@post(
    "/v1/credentials",
    tags=["credentials"],
    responses=_ERRORS,
    status_code=201,
    guards=[authenticated],
)
async def credential_create(
    request: Request,  # type: ignore[type-arg]
    data: S.CredentialIn,
) -> S.CredentialIssuedOut:
    """A new admin credential (admin only), expiring; its secret is shown once."""
    principal = _principal(request)
    require(principal)
    tether = _ctx(request).tether
    row, secret = tether.credentials.create(
        data.role, data.owner, ttl=data.ttl_seconds, by=principal.name
    )
    return S.CredentialIssuedOut(secret, _credential_out(row, tether.clock.now()))


@get(
    "/v1/credentials/{credential_id:str}",
    tags=["credentials"],
    responses=_ERRORS,
    guards=[authenticated],
)
async def credential_show(request: Request, credential_id: str) -> S.CredentialOut:  # type: ignore[type-arg]
    """One credential (admin, or the credential itself)."""
    _own_or_admin(_principal(request), credential_id)
    tether = _ctx(request).tether
    return _credential_out(tether.credentials.show(credential_id), tether.clock.now())


@post(
    "/v1/credentials/{credential_id:str}/disable",
    tags=["credentials"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def credential_disable(
    request: Request,  # type: ignore[type-arg]
    credential_id: str,
    data: S.CredentialDisableIn,
) -> S.CredentialOut:
    """Disable a credential now (admin, or the credential itself); a receipt says who."""
    principal = _principal(request)
    _own_or_admin(principal, credential_id)
    tether = _ctx(request).tether
    row = tether.credentials.disable(credential_id, by=principal.name, reason=data.reason)
    return _credential_out(row, tether.clock.now())


@post(
    "/v1/credentials/{credential_id:str}/rotate",
    tags=["credentials"],
    responses=_ERRORS,
    status_code=201,
    guards=[authenticated],
)
async def credential_rotate(
    request: Request,  # type: ignore[type-arg]
    credential_id: str,
    data: S.CredentialRotateIn,
) -> S.CredentialIssuedOut:
    """A new secret for the same role and owner, the old one disabled at once (admin, or
    the credential itself)."""
    principal = _principal(request)
    _own_or_admin(principal, credential_id)
    tether = _ctx(request).tether
    row, secret = tether.credentials.rotate(credential_id, by=principal.name, ttl=data.ttl_seconds)
    return S.CredentialIssuedOut(secret, _credential_out(row, tether.clock.now()))


async def _reap_forever(ctx: Context) -> None:
    """The reaper: at start, then every ``reap_interval`` seconds (in a worker thread:
    it may talk to a database server). It also deletes expired console sessions."""
    # Imported here: the console itself imports this package's authentication.
    from tether.console._sessions import purge_expired  # noqa: PLC0415

    while True:
        try:
            report = await asyncio.to_thread(ctx.tether.reap)
            if report.expired or report.revoked or report.cleaned or report.failed:
                log.info(
                    "reaper",
                    extra={
                        "fields": {
                            "expired": len(report.expired),
                            "revoked": len(report.revoked),
                            "cleaned": len(report.cleaned),
                            "failed": len(report.failed),
                        }
                    },
                )
        except Exception as exc:  # never the message: it could name a connection string
            log.warning("reaper failed", extra={"fields": {"error": type(exc).__name__}})
        try:
            await asyncio.to_thread(purge_expired, ctx.tether.store, ctx.tether.clock)
        except Exception as exc:
            log.warning(
                "console session purge failed", extra={"fields": {"error": type(exc).__name__}}
            )
        if ctx.settings.reap_interval <= 0:
            return
        await asyncio.sleep(ctx.settings.reap_interval)


async def _start_reaper(app: Litestar) -> None:
    ctx: Context = app.state.ctx
    ctx.reaper = asyncio.get_running_loop().create_task(_reap_forever(ctx))


async def _start_node(app: Litestar) -> None:
    """Over PostgreSQL, join the other nodes: listen for their changes, resync."""
    ctx: Context = app.state.ctx
    ctx.node = await asyncio.to_thread(
        join, ctx.tether, resync_interval=ctx.settings.resync_interval
    )


async def _stop_node(app: Litestar) -> None:
    ctx: Context = app.state.ctx
    if ctx.node is not None:
        await asyncio.to_thread(ctx.node.stop)


async def _stop_reaper(app: Litestar) -> None:
    ctx: Context = app.state.ctx
    if ctx.reaper is not None:
        ctx.reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ctx.reaper


# -- assembly -------------------------------------------------------------------------------
_OAUTH_FORMS = {
    "/oauth2/token": (
        "grant_type",
        "actor_token",
        "actor_token_type",
        "subject_token",
        "subject_token_type",
    ),
    "/oauth2/introspect": ("token",),
    "/oauth2/revoke": ("token",),
}


def _refine_openapi(app: Litestar) -> None:
    """Say in the schema what Litestar cannot infer from the types: strict bodies refuse
    unknown fields, policy file names are labels, the OAuth forms' required parameters."""
    openapi = app.openapi_schema
    schemas = openapi.components.schemas
    for name, schema in schemas.items():
        struct = getattr(S, name, None)
        if isinstance(struct, type) and issubclass(struct, S.Strict):
            schema.additional_properties = False
    for name in ("PoliciesIn", "DryRunIn"):
        files = (schemas[name].properties or {}).get("files")
        if isinstance(files, Schema):
            files.property_names = Schema(
                type=OpenAPIType.STRING, pattern=S.POLICY_FILE_NAME, max_length=128
            )
    for path, required in _OAUTH_FORMS.items():
        item = (openapi.paths or {}).get(path)
        body = item.post.request_body if item and item.post else None
        if not isinstance(body, RequestBody):
            continue
        form = body.content.get(RequestEncodingType.URL_ENCODED)
        if form is not None and isinstance(form.schema, Schema):
            form.schema.properties = {
                field: Schema(type=OpenAPIType.STRING, min_length=1, max_length=16 * 1024)
                for field in required
            }
            form.schema.required = list(required)


class _Observe:
    """ASGI middleware: one JSON log line and one counter per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        ctx = scope["app"].state.get("ctx") if "app" in scope else None
        if (
            ctx is not None
            and ctx.unauthenticated.limited(source_address_of(scope))
            and not _presents_admin_credential(scope)
            and not _never_shed(str(scope.get("path", "")))
        ):
            # An address past its rate of refusals is answered before any work: no body
            # read, no token or proof verified, no store touched. An operator's admin
            # credential (cheap to check: a hash and a row) still gets through, so an
            # attacker behind the operators' proxy cannot lock them out.
            ctx.metrics.unauthenticated.labels("rate_limited").inc()
            await _send_rate_limited(send)
            log_request(scope["method"], "unmatched", 429, started, None)
            return

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            state = scope.get("state", {})
            principal = state.get("principal")
            # The route's template, never the raw path: a caller chooses paths.
            route = scope.get("path_template") or "unmatched"
            ctx = scope["app"].state.get("ctx") if "app" in scope else None
            if ctx is not None:
                ctx.metrics.requests.labels(
                    scope["method"], str(route)[:64], str(status["code"])
                ).inc()
            log_request(
                scope["method"],
                str(route)[:128],
                status["code"],
                started,
                principal.name if principal else None,
                decision=state.get("decision"),
            )


def create_metrics_app(app: Litestar) -> Litestar:
    """``/metrics`` alone, for a listener of its own (``tether serve --metrics-listen``):
    the metrics of ``app``; the metrics token is required when one is set."""
    ctx: Context = app.state.ctx

    @get("/metrics", media_type="text/plain; version=0.0.4", sync_to_thread=False)
    def metrics_only(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
        expected = ctx.settings.metrics_token
        if expected:
            scheme, _sep, value = (request.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), expected):
                return Response(b"metrics token required\n", status_code=401)
        return Response(_render_metrics(ctx), media_type="text/plain; version=0.0.4")

    return Litestar(route_handlers=[metrics_only], openapi_config=None, debug=False)


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/console", status_code=303)


def create_app(tether: Tether, settings: ServerSettings | None = None) -> Litestar:
    # Imported here: the console itself imports this package's authentication.
    from tether.console import console_router  # noqa: PLC0415
    from tether.server._authzen import authzen_routes  # noqa: PLC0415
    from tether.server._federation import federation_routes  # noqa: PLC0415

    settings = settings or ServerSettings()
    configure_logging(settings.log_level)
    return Litestar(
        route_handlers=[
            root,
            console_router(tether),
            healthz,
            livez,
            readyz,
            node_status,
            openapi_json,
            jwks,
            spiffe_bundle,
            oauth_metadata,
            metrics,
            identity_register,
            identity_list,
            identity_show,
            identity_disable,
            identity_join_token,
            attest,
            template_add,
            template_list,
            policy_load,
            policy_shadow,
            policy_shadow_off,
            policy_replay,
            catalogue_load,
            catalogue_show,
            pins_set,
            policy_list,
            policy_dry_run,
            task_open,
            task_show,
            task_end,
            task_renew,
            task_result,
            decision,
            approval_list,
            approval_approve,
            approval_deny,
            audit_query,
            audit_trace,
            audit_verify,
            oauth_token,
            oauth_introspect,
            oauth_revoke,
            secret_put,
            secret_list,
            secret_show,
            secret_rotate,
            lease_list,
            lease_revoke,
            kill_switch,
            kill,
            credential_list,
            credential_create,
            credential_show,
            credential_disable,
            credential_rotate,
            *authzen_routes(),
            *federation_routes(),
        ],
        state=State({"ctx": Context(tether, settings)}),
        exception_handlers={Exception: _error_response},
        openapi_config=OpenAPIConfig(title="Tether", version="0.1.0", path="/schema"),
        request_max_body_size=MAX_BODY,
        logging_config=None,
        request_class=TetherRequest,
        on_startup=[_refine_openapi, _start_node, _start_reaper],
        on_shutdown=[_stop_reaper, _stop_node],
        middleware=[_Observe],
        debug=False,
    )
