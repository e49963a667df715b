"""The AuthZEN decision point: OpenID AuthZEN Authorization API 1.0 over the one pipeline.

An external enforcement point (agentgateway, an Envoy ``ext_authz`` filter, a custom MCP
proxy) asks Tether about a tool call in the standard's words::

    POST /access/v1/evaluation      one call         -> {"decision": bool, "context": {...}}
    POST /access/v1/evaluations     several calls    -> {"evaluations": [...]}
    POST /access/v1/search/action   tools the task may call now
    GET  /.well-known/authzen-configuration          the decision point's metadata

How a request maps onto a decision:

- ``subject`` is the agent: ``{"type": "agent", "id": <its SPIFFE ID>}``. Its task token
  and proof are the request's credentials, exactly as ``POST /v1/decisions`` takes them
  (``Authorization: DPoP <task token>`` and a ``DPoP`` proof), or
  ``subject.properties.token`` and ``subject.properties.proof`` (one proof per call of a
  batch). The proof is made for this request: ``htm`` ``POST``, ``htu`` the endpoint's
  URL, ``call`` the digest of the tool and its arguments (``ProofKey.prove``).
- ``action.name`` is the tool; ``context.arguments`` its arguments.
- ``resource`` is what the call is addressed to: ``{"type": "tool", "id": <the tool>}``,
  or any other type whose ``id`` must be one of the task token's audiences (an upstream
  MCP server's identifier, say).
- ``context.previous_result`` (``tool``, ``receipt``: the seq of the allowed decision it
  answers, ``result``, ``proof``: made with ``ProofKey.prove_result`` for this request)
  is observed first, as ``POST /v1/tasks/{id}/results`` would, so the call is judged
  knowing what the task has read.

Every call is decided by :meth:`tether.Tether.authorize` (the one enforcement pipeline)
and leaves the same receipt as the SDK and HTTP doors, with ``detail.door`` ``authzen``.
``decision`` is true for ``allow`` only; ``context`` carries the effect, the reasons, the
receipt and, for a held call, the approval id. What cannot be decided is a ``false``
decision with a reason, never an HTTP error (but shedding, 429): a caller who proved
nothing (no token, a token that does not verify) is counted and sampled like every
unauthenticated refusal (``request.unauthenticated`` receipts); a caller whose token
verifies but whose request is refused before the pipeline (a malformed evaluation, a
subject that is not the token's, a previous result that cannot be observed) gets a
``decision`` deny receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException

from tether._errors import InfrastructureError, TetherError
from tether.core._decision import Call, Decision, decide
from tether.core._risk import Control, risk_tags
from tether.core._verify import TaskClaims, token_hash
from tether.enforcement import Observation, ObservationRefused, Receipt
from tether.enforcement._unauthenticated import bounded_code, describe
from tether.server import _schemas as S
from tether.server._app import _ERRORS, Context, _tool_label, refuse_unauthenticated
from tether.server._auth import (
    Forbidden,
    RateLimited,
    Unauthorized,
    request_uri,
    single_header,
)

T = TypeVar("T")

EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
SEARCH_ACTION = "/access/v1/search/action"
CONFIGURATION = "/.well-known/authzen-configuration"
#: The calls one batch may carry (each one is a decision, a proof and a receipt).
MAX_EVALUATIONS = 64
#: The tools one action search may judge.
MAX_SEARCH = 256
SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
SUBJECT_TYPE = "agent"
DOOR = "authzen"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


# -- the standard's shapes --------------------------------------------------------------------
class Entity(msgspec.Struct):
    """A subject or a resource: ``type``, ``id`` and open ``properties``."""

    type: str
    id: str = ""
    properties: dict[str, Any] = {}


class Action(msgspec.Struct):
    name: str
    properties: dict[str, Any] = {}


class Evaluation(msgspec.Struct):
    """One access evaluation request (in a batch, each member defaults to the top level's)."""

    subject: Entity | None = None
    action: Action | None = None
    resource: Entity | None = None
    context: dict[str, Any] | None = None


class Evaluations(Evaluation):
    #: Absent: the request is one evaluation (and so is the answer).
    evaluations: list[Evaluation] | None = None
    options: dict[str, Any] | None = None


class ActionSearch(msgspec.Struct):
    subject: Entity | None = None
    resource: Entity | None = None
    action: Action | None = None
    context: dict[str, Any] | None = None
    page: dict[str, Any] | None = None


class PreviousResult(msgspec.Struct, forbid_unknown_fields=True):
    """What the previous allowed call returned: observed before this call is decided."""

    tool: str
    receipt: int
    proof: str
    result: Any = None


class Malformed(Exception):
    """The body, or one evaluation in it, is not what the standard describes."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


# -- answers ------------------------------------------------------------------------------------
def _reasons(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"code": code, "message": message} for code, message in pairs]


def answer(
    allowed: bool,
    effect: str,
    reasons: list[dict[str, str]],
    *,
    receipt: dict[str, Any] | None = None,
    error: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``{"decision", "context"}``: the context names the effect, the reasons (first one
    also as ``reason_admin``), the receipt and whatever else the decision has; ``error``
    (an HTTP status) says that no decision could be made, as the standard's
    ``context.error`` (``status``, ``message``)."""
    context: dict[str, Any] = {
        "effect": effect,
        "reasons": reasons,
        "reason_admin": {"en": reasons[0]["message"]} if reasons else None,
        "receipt": receipt,
    }
    if error is not None:
        context["error"] = {"status": error, "message": reasons[0]["message"]}
    context.update({k: v for k, v in extra.items() if v is not None})
    return {"decision": allowed, "context": context}


def _from_receipt(receipt: Receipt) -> dict[str, Any]:
    d: Decision = receipt.decision
    return answer(
        d.allowed,
        str(d.effect),
        [{"code": r.code, "message": r.message} for r in d.reasons],
        receipt={"seq": receipt.seq, "hash": receipt.hash},
        task_id=d.task_id,
        tool=d.tool,
        risk_tags=list(d.risk_tags),
        policies=list(d.policies),
        approval_id=receipt.approval_id,
    )


def _request_id(request: Request) -> dict[str, str]:  # type: ignore[type-arg]
    """The ``X-Request-ID`` to echo (only one, and only printable ASCII of bounded size)."""
    values = request.headers.getall("x-request-id", [])
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return {"X-Request-ID": values[0]}
    return {}


def _respond(request: Request, body: dict[str, Any]) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    return Response(content=body, status_code=200, headers=_request_id(request))


# -- the door ----------------------------------------------------------------------------------
class Door:
    """One AuthZEN request: its context, credentials and the calls it asks about."""

    def __init__(self, ctx: Context, request: Request) -> None:  # type: ignore[type-arg]
        self.ctx = ctx
        self.tether = ctx.tether
        self.request = request
        self.htu = request_uri(request)
        self.request_id = _request_id(request).get("X-Request-ID")
        self.header_token: str | None = None
        self.header_proof: str | None = None
        self.header_problem: str | None = None
        try:
            scheme, _, value = (single_header(request, "authorization") or "").partition(" ")
            if scheme.lower() == "dpop" and value.strip():
                self.header_token = value.strip()
            self.header_proof = single_header(request, "dpop")
        except Unauthorized:
            self.header_problem = "invalid_request"

    async def run(self, fn: Callable[[], T], *, always: bool = False) -> T:
        """Run a pipeline call as ``POST /v1/decisions`` does: in a worker thread when
        decisions share commits (or across nodes), else on the loop; ``always`` for the
        work that must never hold up the loop (scanning a result)."""
        threaded = always or self.ctx.node is not None or self.tether.store.group_commit > 0
        return await asyncio.to_thread(fn) if threaded else fn()

    # -- refusals --------------------------------------------------------------------------
    def unauthenticated(self, code: str, status: int = 401) -> dict[str, Any]:
        """A caller who proved nothing: counted and sampled like any other such refusal
        (429 past its address's rate), answered with a fixed description."""
        try:
            refuse_unauthenticated(self.ctx, self.request, code, status=status)
        except RateLimited:
            raise
        except (Unauthorized, Forbidden, HTTPException):
            pass
        # Counted as an unauthenticated refusal (above), not as a decision: nobody's call.
        return answer(
            False,
            "deny",
            _reasons((code, describe(code))),
            error=status,
            sampled="request.unauthenticated",
        )

    def refused(
        self,
        token: str,
        claims: TaskClaims,
        tool: str | None,
        code: str,
        message: str,
        *,
        control: Control = Control.PER_CALL_POLICY,
        detail: dict[str, Any] | None = None,
        error: int | None = None,
    ) -> dict[str, Any]:
        """A call refused before the pipeline, from a caller whose task token verifies:
        a ``decision`` deny receipt that the task is accountable for (as for a decision
        body that is not a call)."""
        reasons = _reasons((code, message[:500]))
        try:
            row = self.tether.audit.append(
                "decision",
                chain=list(claims.chain),
                task_id=claims.task_id,
                intent_digest=claims.intent_digest,
                tool=tool[:256] if isinstance(tool, str) else None,
                effect="deny",
                reasons=reasons,
                policies=[],
                risk_tags=list(risk_tags(control)),
                token_digest=token_hash(token),
                detail={"door": DOOR, **self.detail(), **(detail or {})},
            )
            receipt: dict[str, Any] | None = {"seq": row.seq, "hash": row.hash}
        except TetherError:
            receipt = None
        self.count("deny", code, tool)
        return answer(False, "deny", reasons, receipt=receipt, error=error, task_id=claims.task_id)

    def detail(self) -> dict[str, Any]:
        return {"request_id": self.request_id} if self.request_id else {}

    def count(self, effect: str, code: str, tool: str | None) -> None:
        self.ctx.metrics.decisions.labels(
            effect, bounded_code(code), _tool_label(self.ctx, tool)
        ).inc()
        self.request.state.decision = effect

    # -- credentials -----------------------------------------------------------------------
    def credentials(self, subject: Entity) -> tuple[str | None, str | None, str | None]:
        """The task token and proof of one evaluation (its subject's properties, else the
        request's headers) and a reason code when they cannot be told apart."""
        props = subject.properties
        token, proof = props.get("token"), props.get("proof")
        if token is not None and not isinstance(token, str):
            return None, None, "token.malformed"
        if proof is not None and not isinstance(proof, str):
            return None, None, "proof.malformed"
        if self.header_problem is not None:
            return None, None, self.header_problem
        if token is not None and self.header_token is not None and token != self.header_token:
            # Two different tokens for one call: which one speaks is the caller's choice.
            return None, None, "invalid_request"
        return token or self.header_token, proof or self.header_proof, None

    def verify_token(self, token: str | None) -> TaskClaims | dict[str, Any]:
        """The claims of a task token that verifies (then rate limited per task, as at the
        other doors), else the answer to a caller who proved nothing."""
        if token is None:
            return self.unauthenticated("token.missing")
        try:
            claims = self.tether.enforcement.verify_token(token, now=self.tether.clock.now())
        except InfrastructureError:
            raise
        except Exception as exc:  # whatever else the reason, the token proves nothing
            code = exc.code if isinstance(exc, TetherError) else "token.malformed"
            return self.unauthenticated(code)
        self.ctx.limiter.check("task:" + claims.task_id)
        return claims

    # -- one evaluation --------------------------------------------------------------------
    async def evaluate(self, item: Evaluation) -> dict[str, Any]:
        """Decide one evaluation; whatever fails on the way is a false decision with a
        reason (never an error, but shedding: 429)."""
        try:
            return await self._evaluate(item)
        except RateLimited:
            raise
        except Exception as exc:  # fail closed; the type only (a message could carry data)
            code = exc.code if isinstance(exc, TetherError) else "internal.error"
            self.count("deny", code, None)
            status = 503 if isinstance(exc, InfrastructureError) else 500
            return answer(
                False,
                "deny",
                _reasons((code, f"the call could not be decided: {type(exc).__name__}")),
                error=status,
            )

    async def _evaluate(self, item: Evaluation) -> dict[str, Any]:
        subject = item.subject or Entity(type="", id="")
        token, proof, problem = self.credentials(subject)
        if problem is not None:
            return self.unauthenticated(problem)
        verified = self.verify_token(token)
        if not isinstance(verified, TaskClaims):
            return verified
        claims = verified
        assert token is not None
        tool = item.action.name if item.action is not None else None
        try:
            args, audience, previous = self.call_of(item, claims)
        except Malformed as exc:
            return self.refused(token, claims, tool, "call.malformed", exc.message, error=400)
        assert tool is not None
        if subject.type != SUBJECT_TYPE or subject.id != claims.subject:
            return self.refused(
                token,
                claims,
                tool,
                "subject.mismatch",
                f"the subject is not the agent the task token was issued to ({claims.subject})",
                control=Control.TASK_TOKEN,
                detail={"subject": {"type": subject.type[:64], "id": subject.id[:256]}},
            )
        observed: dict[str, Any] | None = None
        if previous is not None:
            seen = await self.observe(token, claims, tool, previous)
            if not isinstance(seen, Observation):
                return seen
            observed = {
                "tool": seen.tool,
                "receipt": {"seq": seen.seq, "hash": seen.hash},
                "sensitivity": seen.sensitivity,
                "untrusted": seen.untrusted,
            }
        decide_call = functools.partial(
            self.tether.authorize,
            token=token,
            proof=proof,
            tool=tool,
            args=args,
            htm=self.request.method,
            htu=self.htu,
            resource=audience,
            detail={"door": DOOR, **self.detail()},
        )
        receipt = await self.run(decide_call)
        d = receipt.decision
        self.count(str(d.effect), d.reasons[0].code, d.tool)
        self.ctx.metrics.decision_latency.observe(receipt.latency_us / 1e6)
        out = _from_receipt(receipt)
        if observed is not None:
            out["context"]["previous_result"] = observed
        return out

    def call_of(
        self, item: Evaluation, claims: TaskClaims
    ) -> tuple[dict[str, Any], str | None, PreviousResult | None]:
        """The arguments, the audience to check and the previous result of one evaluation."""
        if item.subject is None:
            raise Malformed("an evaluation needs a subject: the agent")
        if item.action is None or not item.action.name:
            raise Malformed("an evaluation needs an action whose name is the tool")
        if item.resource is None:
            raise Malformed("an evaluation needs a resource")
        context = item.context or {}
        args = context.get("arguments", {})
        if not isinstance(args, dict):
            raise Malformed("context.arguments must be an object")
        audience: str | None = None
        if item.resource.type == "tool":
            if item.resource.id != item.action.name:
                raise Malformed("a resource of type tool must name the action's tool")
        elif not item.resource.id:
            raise Malformed("the resource needs an id")
        else:
            audience = item.resource.id
        previous = None
        raw = context.get("previous_result")
        if raw is not None:
            try:
                previous = msgspec.convert(raw, PreviousResult)
            except msgspec.ValidationError as exc:
                raise Malformed(f"context.previous_result: {exc}") from None
        return args, audience, previous

    async def observe(
        self, token: str, claims: TaskClaims, tool: str, previous: PreviousResult
    ) -> Observation | dict[str, Any]:
        """Observe the previous call's result through the pipeline; a refusal denies this
        call (the task's view of what it read would be incomplete)."""
        observe = functools.partial(
            self.tether.observe,
            token=token,
            proof=previous.proof,
            tool=previous.tool,
            receipt=previous.receipt,
            result=previous.result,
            task_id=claims.task_id,
            htm=self.request.method,
            htu=self.htu,
        )
        try:
            return await self.run(observe, always=True)
        except ObservationRefused as exc:
            return self.refused(
                token,
                claims,
                tool,
                exc.code,
                f"the previous result could not be observed: {exc.message}",
                control=Control.INFORMATION_FLOW,
                detail={"previous_result": {"tool": previous.tool[:256], "refusal": exc.seq}},
            )


# -- bodies -----------------------------------------------------------------------------------
async def _body(request: Request, into: type[T]) -> T:  # type: ignore[type-arg]
    """The body as ``into``, or :class:`Malformed` (too large, not JSON, too deep, NULs,
    not the standard's shape)."""
    try:
        raw = await request.body()
    except HTTPException as exc:
        raise Malformed("the body is too large", 413 if exc.status_code == 413 else 400) from None
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise Malformed("the body is not JSON") from None
    problem = S.json_problem(value)
    if problem is not None:
        raise Malformed(problem)
    try:
        return msgspec.convert(value, into)
    except msgspec.ValidationError as exc:
        raise Malformed(f"the body is not an AuthZEN request: {exc}") from None


def _malformed(door: Door, exc: Malformed) -> dict[str, Any]:
    """A body that is not a request: a deny receipt when the request's task token verifies
    (the task is accountable), else counted like any caller who proved nothing."""
    code = "call.oversized" if exc.status == 413 else "call.malformed"
    claims = None
    if door.header_token is not None:
        with contextlib.suppress(Exception):  # a token that does not verify is no token
            claims = door.tether.enforcement.verify_token(
                door.header_token, now=door.tether.clock.now()
            )
    if claims is None or door.header_token is None:
        return door.unauthenticated(code, exc.status)
    return door.refused(door.header_token, claims, None, code, exc.message, error=exc.status)


def _ctx(request: Request) -> Context:  # type: ignore[type-arg]
    ctx: Context = request.app.state.ctx
    return ctx


def _merge(top: Evaluation, item: Evaluation) -> Evaluation:
    """A batch member: each of its parts, else the request's default for it."""
    return Evaluation(
        subject=item.subject if item.subject is not None else top.subject,
        action=item.action if item.action is not None else top.action,
        resource=item.resource if item.resource is not None else top.resource,
        context=item.context if item.context is not None else top.context,
    )


# -- endpoints --------------------------------------------------------------------------------
_DOC: dict[str, Any] = {
    "tags": ["authzen"],
    "responses": {k: v for k, v in _ERRORS.items() if k in (413, 429, 503)},
}


@post(EVALUATION, status_code=200, **_DOC)
async def evaluation(request: Request) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    """AuthZEN Access Evaluation: may the agent (``subject``) call the tool
    (``action.name``) with ``context.arguments`` on ``resource``? Decided by the
    enforcement pipeline; ``decision`` is true only for ``allow``."""
    door = Door(_ctx(request), request)
    try:
        item = await _body(request, Evaluation)
    except Malformed as exc:
        return _respond(request, _malformed(door, exc))
    return _respond(request, await door.evaluate(item))


@post(EVALUATIONS, status_code=200, **_DOC)
async def evaluations(request: Request) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    """AuthZEN Access Evaluations: several calls, each member defaulting to the request's
    ``subject``, ``action``, ``resource`` and ``context``; ``options.evaluations_semantic``
    is ``execute_all`` (default), ``deny_on_first_deny`` or ``permit_on_first_permit``
    (the answer stops after the call that decided)."""
    door = Door(_ctx(request), request)
    try:
        batch = await _body(request, Evaluations)
        semantic = (batch.options or {}).get("evaluations_semantic", "execute_all")
        if semantic not in SEMANTICS:
            raise Malformed(f"options.evaluations_semantic must be one of {', '.join(SEMANTICS)}")
        if batch.evaluations is not None and len(batch.evaluations) > MAX_EVALUATIONS:
            raise Malformed(f"a batch holds at most {MAX_EVALUATIONS} evaluations")
    except Malformed as exc:
        return _respond(request, {**_malformed(door, exc), "evaluations": []})
    if batch.evaluations is None:
        # No array: an Access Evaluation request, answered as one.
        return _respond(request, await door.evaluate(batch))
    results: list[dict[str, Any]] = []
    for item in batch.evaluations:
        result = await door.evaluate(_merge(batch, item))
        results.append(result)
        if semantic == "deny_on_first_deny" and not result["decision"]:
            break
        if semantic == "permit_on_first_permit" and result["decision"]:
            break
    return _respond(request, {"evaluations": results})


@post(SEARCH_ACTION, status_code=200, **_DOC)
async def search_action(request: Request) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    """AuthZEN Action Search: the tools this task may call now. Each tool the task's
    intent names (a pattern: each catalogue entry it covers) is judged by the decision
    core on the task's current state with no arguments and nothing applied (no budget
    spent, no approval requested, no receipt); ``results`` are those allowed as they
    stand. The others are ``context.considered`` with their effect and reason: a tool
    whose capability constrains arguments, or that needs a human, is decided per call.
    The proof is one for this request (``ProofKey.prove_request``)."""
    ctx = _ctx(request)
    door = Door(ctx, request)
    try:
        search = await _body(request, ActionSearch)
    except Malformed as exc:
        return _respond(request, {"results": [], **_malformed(door, exc)})
    if search.subject is None:
        return _respond(request, {"results": [], **door.unauthenticated("token.missing")})
    token, proof, problem = door.credentials(search.subject)
    if problem is not None:
        return _respond(request, {"results": [], **door.unauthenticated(problem)})
    claims = door.verify_token(token)
    if not isinstance(claims, TaskClaims):
        return _respond(request, {"results": [], **claims})
    assert token is not None
    if search.subject.type != SUBJECT_TYPE or search.subject.id != claims.subject:
        refused = door.refused(
            token,
            claims,
            None,
            "subject.mismatch",
            f"the subject is not the agent the task token was issued to ({claims.subject})",
            control=Control.TASK_TOKEN,
        )
        return _respond(request, {"results": [], **refused})
    judge = functools.partial(_search, door, token, proof)
    try:
        found = await door.run(judge)
    except Exception as exc:  # fail closed: nothing found; the type only
        code = exc.code if isinstance(exc, TetherError) else "internal.error"
        message = f"the search could not be made: {type(exc).__name__}"
        status = 503 if isinstance(exc, InfrastructureError) else 500
        found = {"results": [], **answer(False, "deny", _reasons((code, message)), error=status)}
    return _respond(request, found)


def _search(door: Door, token: str, proof: str | None) -> dict[str, Any]:
    tether = door.tether
    enforcement = tether.enforcement
    try:
        verified = enforcement.verify(
            token=token, proof=proof, binding=None, htm=door.request.method, htu=door.htu
        )
        state = enforcement.authenticate(verified, consume_proof=True)
    except Exception as exc:
        code = str(getattr(exc, "code", "internal.error"))
        message = getattr(exc, "message", None) or type(exc).__name__
        claims = enforcement.verify_token(token, now=tether.clock.now())
        return {"results": [], **door.refused(token, claims, None, code, message)}
    now = tether.clock.now()
    policy = tether.policies.snapshot()
    catalogue = tether.catalogue.entries()
    names: list[str] = []
    for capability in state.intent.capabilities:
        if any(c in capability.tool for c in "*?["):
            covered = sorted(
                n
                for n in catalogue
                if not any(c in n for c in "*?[") and fnmatch.fnmatchcase(n, capability.tool)
            )
        else:
            covered = [capability.tool]
        names.extend(n for n in covered if n not in names)
    results: list[dict[str, Any]] = []
    considered: list[dict[str, Any]] = []
    for tool in names[:MAX_SEARCH]:
        snapshot = enforcement.loader.load(
            verified.claims,
            proof_jti=None,
            profile=tether.catalogue.profile(tool),
            flow_policy=enforcement.flow_policy,
            limits=enforcement.limits,
        )
        decision, _plan = decide(verified, snapshot, Call(tool=tool, args={}), policy, now)
        if decision.allowed:
            results.append({"name": tool})
        else:
            first = decision.reasons[0]
            considered.append({"name": tool, "effect": str(decision.effect), "reason": first.code})
    return {
        "results": results,
        "page": {"next_token": ""},
        "context": {
            "task_id": state.task_id,
            "considered": considered,
            "truncated": len(names) > MAX_SEARCH,
        },
    }


@get(CONFIGURATION, tags=["authzen"], responses={503: _ERRORS[503]})
async def configuration(request: Request) -> dict[str, Any]:  # type: ignore[type-arg]
    """The AuthZEN metadata of this decision point: its identifier and endpoints."""
    base = (_ctx(request).settings.public_url or "").rstrip("/")
    if not base:
        url = request.url
        base = f"{url.scheme}://{url.netloc}"
    return {
        "policy_decision_point": base,
        "access_evaluation_endpoint": base + EVALUATION,
        "access_evaluations_endpoint": base + EVALUATIONS,
        "search_action_endpoint": base + SEARCH_ACTION,
    }


def authzen_routes() -> list[Any]:
    """The AuthZEN endpoints, for the server's app."""
    return [configuration, evaluation, evaluations, search_action]


__all__ = ["authzen_routes"]
