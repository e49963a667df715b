"""The decision core: one tool call in, one decision and one plan out.

An enforcement point (the HTTP API, the SDK's in-process path, the MCP gateway)
never decides anything itself. It hands what it received to the one pipeline
(:mod:`tether.enforcement`), which calls, in order:

1. :func:`verify`: the task token and its proof of possession, checked once
   (signature, times, audience, trust domain, key binding, call binding);
2. the store, in one transaction that locks the task and its ancestors, to
   load a :class:`Snapshot` (the task and its ancestors, revocation, whether
   the proof was seen, a matching approval, the tree's flow states, the
   brokered values to look for, the tool's profile);
3. :func:`decide`, pure: the :class:`Decision` **and** the :class:`Plan` of what
   it implies (the proof consumed, one call spent on the task and every
   ancestor, the next flow state of each, an approval used or requested);
4. the plan applied and the receipt appended, in the same transaction.

Results come back the same way: :func:`observe` returns the plan of what a
tool's result does to the flow state of the task and its ancestors.

Nothing here performs I/O: the clock is a number passed in, keys and
policies are values, the snapshot is a value.

Invariants
----------
1. Default deny. The only path to ``allow`` passes every check below; a call
   no policy permits is denied.
2. Fail closed. Any exception raised while deciding, expected or not, yields a
   ``deny`` whose reason names the failure. ``decide`` never raises.
3. Authority never exceeds the intent. A call is allowed only if a capability
   declared by the task's intent covers the tool and its arguments, *and*
   Cedar permits it, *and* the budgets of the task and of every ancestor have
   room: policy can narrow an intent, never widen it.
4. Authority only narrows down a delegation tree. A task is judged against the
   flow state of its whole tree (what it and its ancestors read:
   :func:`tether.core._flow.merge`), and its calls, distinct tools and spend
   count against every ancestor's budget: a child can never do what its
   parent's state forbids.
5. Every decision has a reason. A deny names the check that refused it
   (``Reason.code``) and, for Cedar, the ids of the policies that fired.
6. Decisions have no side effects. What a decision implies is its
   :class:`Plan`; a refused call's plan is empty, so a refused call changes no
   task state (the enforcement point may still burn a refused call's proof).
7. Flow rules and the credential check only narrow. They run after every
   other check: a finding can turn an allow into a deny or an approval, never
   the reverse, and a deny outranks an approval. The state's summary is
   Cedar's ``context.flow``.
8. A task cannot flood its approvers. A call needing an approval joins the
   pending approval of the identical call when there is one; otherwise it is
   denied once the task has ``PendingApprovals.limit`` approvals pending.

Checks, in order: the call's shape; token (shape, algorithm, trust domain, key
id, signature, ``exp``/``nbf`` with a small skew, audience) and proof (key
binding, call binding, freshness); task and identity liveness (revocation,
task ended, expired or idle, agent disabled, an ancestor no longer open),
proof replay; the intent's capabilities; Cedar policy; call budgets of the
task and its ancestors; flow rules; credentials in the arguments; approval
(a grant for exactly this call, else the pending approvals' limit).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import cedarpy
import msgspec

from tether._errors import TetherError
from tether.core._canonical import digest
from tether.core._credentials import Known, find_credentials, named_credential
from tether.core._flow import (
    OVERSIZED,
    UNDESCRIBED,
    FlowPolicy,
    FlowState,
    ResultReading,
    RuleEffect,
    SideEffect,
    ToolProfile,
    evaluate_flow,
    flow_context,
    merge,
    observe_call,
    observe_result,
    read_result,
    start,
)
from tether.core._intent import Intent, covered_tools, is_pattern, match_capability
from tether.core._policy import CedarOutcome, PolicySnapshot
from tether.core._risk import Control, risk_tags
from tether.core._scanning import MAX_ARGUMENT_BYTES, ScanExceeded, ScanLimits
from tether.core._verify import (
    ProofVerifier,
    TaskClaims,
    TokenVerifier,
)

DECIDE_HTM = "POST"
DECIDE_HTU = "urn:tether:decide"
MAX_ARGS_BYTES = MAX_ARGUMENT_BYTES
MAX_TOOL_NAME = 256


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"


class Reason(msgspec.Struct, frozen=True):
    code: str
    message: str


class TaskState(msgspec.Struct, frozen=True):
    """What the decision core needs to know about one task."""

    task_id: str
    agent_id: str
    agent_owner: str
    agent_kind: str
    agent_active: bool
    template: str
    status: str  # open | ended | expired | revoked
    intent: Intent
    intent_digest: str
    jkt: str
    expires_at: float
    calls_used: int
    token_id: str
    chain: tuple[str, ...] = ()
    opened_at: float = 0.0
    #: When the task's last call was allowed (None: none yet; read only for an intent
    #: with ``idle_seconds``).
    last_activity: float | None = None
    #: The task this one was delegated from (None for a root task).
    parent_task_id: str | None = None


class Call(msgspec.Struct, frozen=True):
    tool: str
    args: dict[str, Any]


class Shadow(msgspec.Struct, frozen=True):
    """What a candidate policy set in shadow mode would have made of a call's Cedar step
    (``allow``, ``deny`` or ``approval_required``), beside what the live set made of it;
    recorded on the receipt, never enforced."""

    digest: str
    effect: str
    live: str
    policies: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def differs(self) -> bool:
        return self.effect != self.live


class Decision(msgspec.Struct, frozen=True, omit_defaults=True):
    effect: Effect
    reasons: tuple[Reason, ...]
    policies: tuple[str, ...] = ()
    risk_tags: tuple[str, ...] = ()
    task_id: str | None = None
    agent_id: str | None = None
    chain: tuple[str, ...] = ()
    intent_digest: str | None = None
    tool: str | None = None
    args_digest: str | None = None
    token_digest: str | None = None
    proof_jti: str | None = None
    shadow: Shadow | None = None

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


class Refused(Exception):
    """A check refused the call (raised inside the core, turned into a deny)."""

    def __init__(
        self,
        code: str,
        message: str,
        *controls: Control,
        policies: tuple[str, ...] = (),
        more: tuple[Reason, ...] = (),
        claims: TaskClaims | None = None,
    ):
        super().__init__(message)
        self.code, self.message, self.controls, self.policies = code, message, controls, policies
        self.more = more
        self.claims = claims


def cedar_value(value: Any, depth: int = 0) -> Any:
    """A JSON argument as a Cedar value (None values are dropped by the caller)."""
    if depth > 8:
        raise ValueError("argument nesting deeper than 8")
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        text = f"{value:.4f}"
        if float(text) != value:  # Cedar decimals hold 4 places: never decide on a rounding
            raise ValueError(f"number {value!r} has more precision than policies can see")
        return {"__extn": {"fn": "decimal", "arg": text}}
    if isinstance(value, list):
        return [cedar_value(v, depth + 1) for v in value if v is not None]
    if isinstance(value, dict):
        if any(str(k).startswith("__") for k in value):
            # "__entity" / "__extn" would be read by Cedar as escapes, not as data.
            raise ValueError("argument keys may not start with '__'")
        return {str(k): cedar_value(v, depth + 1) for k, v in value.items() if v is not None}
    raise ValueError(f"unsupported argument type {type(value).__name__}")


def principal_entities(
    agent_id: str, owner: str, kind: str
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The Cedar principal for an agent and the entities it brings (itself, its owner)."""
    principal = {"type": "Agent", "id": agent_id}
    owner_uid = {"type": "Owner", "id": owner}
    entities: list[dict[str, Any]] = [
        {
            "uid": principal,
            "attrs": {"owner": owner, "kind": kind, "trust_domain": agent_id.split("/")[2]},
            "parents": [owner_uid],
        },
        {"uid": owner_uid, "attrs": {}, "parents": []},
    ]
    return principal, entities


def call_context(
    *,
    task_id: str,
    template: str,
    intent: Intent,
    calls_used: int,
    chain: tuple[str, ...] | list[str],
    args: dict[str, Any],
    flow: dict[str, Any],
) -> dict[str, Any]:
    """Cedar's ``context`` for ``call_tool`` (the default schema declares every field).

    ``chain`` is the actor chain, the caller first and the root last: policies see it
    whole as ``context.chain`` (a set of SPIFFE IDs) and its root as ``context.root``,
    so a rule can refer to everyone a sub-agent acts for, not only to the sub-agent.
    """
    return {
        "task_id": task_id,
        "template": template,
        "purpose": intent.purpose,
        "data_ceiling": str(intent.data_ceiling),
        "on_behalf_of": intent.on_behalf_of or "",
        "calls_used": calls_used,
        "max_calls": intent.budget.max_calls,
        "delegation_depth": len(chain) - 1,
        "chain": list(chain),
        "root": chain[-1] if chain else "",
        "args": args,
        "flow": flow,
    }


def admission_context(intent: Intent, known: Iterable[str]) -> dict[str, Any]:
    """Cedar's ``context`` for ``open_task``: ``tools`` holds what the capabilities cover
    (a pattern expanded over the ``known`` tool names), ``patterns`` the patterns as
    written."""
    return {
        "purpose": intent.purpose,
        "data_ceiling": str(intent.data_ceiling),
        "on_behalf_of": intent.on_behalf_of or "",
        "max_calls": intent.budget.max_calls,
        "ttl_seconds": intent.ttl_seconds,
        "tools": covered_tools(intent, known),
        "patterns": sorted({c.tool for c in intent.capabilities if is_pattern(c.tool)}),
    }


@lru_cache(maxsize=4096)
def call_entities(agent_id: str, owner: str, kind: str, tool: str) -> cedarpy.Entities:
    """The entity graph of one (agent, tool) pair, parsed once by Cedar and reused."""
    _, entities = principal_entities(agent_id, owner, kind)
    entities.append({"uid": {"type": "Tool", "id": tool}, "attrs": {}, "parents": []})
    return cedarpy.Entities.from_json_str(json.dumps(entities))


#: Side effects through which an argument leaves the task's hands.
OUTBOUND = frozenset({SideEffect.EGRESS, SideEffect.WRITE, SideEffect.DESTRUCTIVE})


@dataclass(frozen=True, slots=True)
class Verified:
    """A task token and its proof, verified once: what the rest of the pipeline trusts."""

    token: str
    claims: TaskClaims
    proof_jti: str
    proof_iat: float


@dataclass(frozen=True, slots=True)
class Grant:
    """A human's approval of exactly this call (task, tool, arguments, policy)."""

    approval_id: str
    decided_by: str


#: Approvals one task may have waiting for a human at once, unless configured otherwise.
DEFAULT_MAX_PENDING_APPROVALS = 5


@dataclass(frozen=True, slots=True)
class PendingApprovals:
    """The approvals a task has waiting for a human (pending, unexpired)."""

    count: int = 0
    #: One of them is for exactly this call: the call joins it, whatever the count.
    same_call: bool = False
    limit: int = DEFAULT_MAX_PENDING_APPROVALS


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision reads, loaded in the transaction that locks the task tree.

    ``ancestors`` are the task's parent first and its root last. ``flows`` holds the
    stored flow state of the task and of each ancestor (a task with none yet starts from
    its request). ``profile`` is the called tool's catalogue entry (undescribed: the most
    restrictive) and ``flow_policy`` the flow rules in force.
    """

    task: TaskState | None
    ancestors: tuple[TaskState, ...] = ()
    token_revoked: bool = False
    proof_seen: bool = False
    flows: Mapping[str, FlowState] = field(default_factory=dict)
    grant: Grant | None = None
    pending: PendingApprovals = field(default_factory=PendingApprovals)
    known_secrets: tuple[Known, ...] = ()
    profile: ToolProfile = UNDESCRIBED
    flow_policy: FlowPolicy = field(default_factory=FlowPolicy)
    limits: ScanLimits = field(default_factory=ScanLimits)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a decision implies, applied by the pipeline with the receipt, atomically.

    ``spend`` lists the tasks one call is spent on (the task, then each ancestor);
    ``flows`` the next flow state of each task of the tree that changes.
    """

    record_proof: str | None = None
    spend: tuple[str, ...] = ()
    flows: tuple[tuple[str, FlowState], ...] = ()
    use_approval: str | None = None
    request_approval: bool = False
    touch: str | None = None

    @property
    def empty(self) -> bool:
        return self == NOTHING


NOTHING = Plan()


def verify(
    *,
    token: str | None,
    proof: str | None,
    binding: str | None,
    tokens: TokenVerifier,
    proofs: ProofVerifier,
    now: float,
    htm: str = DECIDE_HTM,
    htu: str = DECIDE_HTU,
    resource: str | None = None,
    task_hint: str | None = None,
) -> Verified:
    """Verify a task token and its proof for one request; raise if anything is wrong.

    ``binding`` is what the proof's ``call`` claim must hold (a call's or a result's
    digest; ``None`` for a request that carries neither). ``resource`` is the
    enforcement point's own identifier: the token must be addressed to it.
    Raises :class:`Refused` or a :class:`tether.TetherError` (``TokenRejected``,
    ``ProofRejected``); never returns a partial result.
    """
    if token is None:
        raise Refused("token.missing", "no task token was presented", Control.TASK_TOKEN)
    claims: TaskClaims = tokens.verify(token, now=now)
    if resource is not None and resource not in claims.audiences:
        raise Refused(
            "token.audience",
            f"token is not addressed to this resource ({resource})",
            Control.AUDIENCE,
            claims=claims,
        )
    if task_hint is not None and task_hint != claims.task_id:
        raise Refused(
            "token.task_mismatch",
            f"token belongs to task {claims.task_id}, not {task_hint}",
            Control.TASK_TOKEN,
            claims=claims,
        )
    try:
        proved = proofs.verify(
            proof, token=token, jkt=claims.jkt, htm=htm, htu=htu, call=binding, now=now
        )
    except TetherError as exc:
        raise Refused(exc.code, exc.message, Control.SENDER_CONSTRAINED, claims=claims) from None
    return Verified(token=token, claims=claims, proof_jti=proved.jti, proof_iat=proved.issued_at)


def check_live(claims: TaskClaims, snapshot: Snapshot, now: float) -> TaskState:
    """The task the token belongs to, if the token is still live; raise :class:`Refused`.

    The one liveness check (RFC 7662 ``active`` semantics): every door uses it, for a
    decision, a result and any other request a task token authenticates.
    """
    state = snapshot.task
    if state is None:
        raise Refused("task.unknown", f"task {claims.task_id} is not known", Control.TASK_TOKEN)
    if state.agent_id != claims.subject:
        raise Refused(
            "token.task_mismatch", "token subject is not the task's agent", Control.TASK_TOKEN
        )
    if not state.agent_active:
        raise Refused(
            "identity.disabled",
            f"agent {state.agent_id} is disabled",
            Control.OFFBOARDING,
            Control.TASK_TOKEN,
        )
    if state.status != "open":
        raise Refused(
            f"task.{state.status}", f"task {state.task_id} is {state.status}", Control.TASK_TOKEN
        )
    if snapshot.token_revoked or state.token_id != claims.token_id:
        raise Refused(
            "token.revoked",
            "token has been revoked",
            Control.TASK_TOKEN,
            Control.CASCADING_REVOCATION,
        )
    if now >= state.expires_at:
        raise Refused("task.expired", f"task {state.task_id} has expired", Control.TASK_TOKEN)
    idle = state.intent.idle_seconds
    if idle is not None and now - max(state.last_activity or 0.0, state.opened_at) >= idle:
        raise Refused(
            "task.idle",
            f"task {state.task_id} has been idle for {idle}s or more",
            Control.TASK_TOKEN,
        )
    if state.intent_digest != claims.intent_digest or state.jkt != claims.jkt:
        raise Refused(
            "token.task_mismatch",
            "token does not match its task's intent or key",
            Control.INTENT_BINDING,
        )
    for ancestor in snapshot.ancestors:
        if ancestor.status != "open" or now >= ancestor.expires_at:
            raise Refused(
                "delegation.parent",
                f"ancestor task {ancestor.task_id} is "
                f"{ancestor.status if ancestor.status != 'open' else 'expired'}",
                Control.DELEGATION,
                Control.CASCADING_REVOCATION,
            )
    return state


def tree_state(state: TaskState, snapshot: Snapshot) -> tuple[FlowState, list[FlowState]]:
    """The task's own flow state and its ancestors' (a task with none starts afresh)."""
    own = snapshot.flows.get(state.task_id) or start(state.intent.request or "")
    return own, [
        snapshot.flows[a.task_id] for a in snapshot.ancestors if a.task_id in snapshot.flows
    ]


def refusal(exc: BaseException, context: Mapping[str, Any]) -> Decision:
    """The deny an exception raised on the decision path becomes (invariant 2); never
    raises itself: a failure while describing the refusal is a bare deny."""
    try:
        return _refusal(exc, context)
    except Exception:
        return Decision(
            effect=Effect.DENY,
            reasons=(Reason("internal.error", "decision failed"),),
        )


def _refusal(exc: BaseException, context: Mapping[str, Any]) -> Decision:
    if isinstance(exc, Refused):
        return Decision(
            effect=Effect.DENY,
            reasons=(Reason(exc.code, exc.message), *exc.more),
            policies=exc.policies,
            risk_tags=_tags(*exc.controls),
            **context,
        )
    if isinstance(exc, TetherError):
        return Decision(
            effect=Effect.DENY,
            reasons=(Reason(exc.code, exc.message),),
            risk_tags=_tags(Control.TASK_TOKEN),
            **context,
        )
    return Decision(
        effect=Effect.DENY,
        reasons=(Reason("internal.error", f"decision failed: {type(exc).__name__}"),),
        risk_tags=_tags(Control.PER_CALL_POLICY),
        **context,
    )


def _tags(*controls: Control) -> tuple[str, ...]:
    """A refusal's risk tags; if tagging itself fails, none: the reason matters more."""
    try:
        return risk_tags(*controls)
    except Exception:
        return ()


def identify(verified: Verified | None, call: Call) -> dict[str, Any]:
    """What a decision's receipt says of the caller and the call, as far as it is known."""
    context: dict[str, Any] = {"tool": None, "args_digest": None}
    if isinstance(call.tool, str):
        context["tool"] = call.tool[:MAX_TOOL_NAME]
    if isinstance(call.args, dict):
        try:
            context["args_digest"] = digest(call.args)
        except Exception:
            context["args_digest"] = None
    if verified is not None:
        claims = verified.claims
        context.update(
            task_id=claims.task_id,
            agent_id=claims.subject,
            chain=claims.chain,
            intent_digest=claims.intent_digest,
            token_digest=claims.token_digest,
            proof_jti=verified.proof_jti,
        )
    return context


def check_call(call: Call, max_bytes: int = MAX_ARGS_BYTES) -> None:
    """The call's own shape: a tool name and a JSON object of arguments of at most
    ``max_bytes`` (the limit on what one call makes Tether scan)."""
    if not isinstance(call.tool, str) or not 0 < len(call.tool) <= MAX_TOOL_NAME:
        raise Refused(
            "call.malformed", "tool name must be 1-256 characters", Control.PER_CALL_POLICY
        )
    if not isinstance(call.args, dict):
        raise Refused("call.malformed", "arguments must be a JSON object", Control.PER_CALL_POLICY)
    size = len(msgspec.json.encode(call.args))
    if size > max_bytes:
        raise Refused(
            "call.oversized",
            f"arguments are {size} bytes, above the limit of {max_bytes} bytes",
            Control.PER_CALL_POLICY,
        )


def decide(
    verified: Verified,
    snapshot: Snapshot,
    call: Call,
    policy: PolicySnapshot,
    now: float,
    shadow: PolicySnapshot | None = None,
) -> tuple[Decision, Plan]:
    """Decide one verified call against one snapshot. Never raises; see the module
    docstring. A decision other than ``allow`` comes with an empty plan, except an
    approval request. ``shadow`` is a candidate policy set evaluated beside ``policy``
    on the same request and recorded (:class:`Shadow`), never enforced."""
    context = identify(verified, call)
    try:
        return _decide(verified, snapshot, call, policy, now, context, shadow)
    except Exception as exc:  # fail closed on anything, expected or not
        return refusal(exc, context), NOTHING


def cedar_effect(outcome: CedarOutcome) -> str:
    """The effect of a Cedar outcome alone: ``deny`` (an error counts as one),
    ``approval_required`` or ``allow``."""
    if outcome.errors or not outcome.allowed:
        return "deny"
    return "approval_required" if outcome.approval else "allow"


def shadow_of(
    candidate: PolicySnapshot,
    live: CedarOutcome,
    request: tuple[dict[str, str], dict[str, str], dict[str, Any], Any],
) -> Shadow | None:
    """The candidate set's effect on the request the live set just saw; None if the
    candidate cannot evaluate at all (it is only recorded, so it never decides). Shadow
    mode and :mod:`tether.policy._replay` both judge a candidate set with it."""
    principal, resource, context, entities = request
    try:
        outcome = candidate.evaluate(principal, "call_tool", resource, context, entities)
    except Exception:
        return None
    return Shadow(
        digest=candidate.digest,
        effect=cedar_effect(outcome),
        live=cedar_effect(live),
        policies=outcome.policies,
        errors=tuple(e[:200] for e in outcome.errors[:3]),
    )


def _decide(
    verified: Verified,
    snapshot: Snapshot,
    call: Call,
    policy: PolicySnapshot,
    now: float,
    out: dict[str, Any],
    shadow: PolicySnapshot | None = None,
) -> tuple[Decision, Plan]:
    check_call(call, snapshot.limits.max_argument_bytes)
    claims = verified.claims
    state = check_live(claims, snapshot, now)
    if snapshot.proof_seen:
        raise Refused("proof.replayed", "proof has been used before", Control.SENDER_CONSTRAINED)

    # The intent's capabilities.
    match = match_capability(state.intent, call.tool, call.args)
    if match.matched is None:
        code = "intent.argument" if "argument" in (match.reason or "") else "intent.no_capability"
        raise Refused(
            code, match.reason or "not in intent", Control.INTENT_BINDING, Control.PER_CALL_POLICY
        )

    # Flow findings are computed now so Cedar sees them; they are applied last.
    profile = snapshot.profile
    own, ancestors = tree_state(state, snapshot)
    effective = merge(own, ancestors)
    budgets = [(state.task_id, state.intent.budget, own)]
    for ancestor in snapshot.ancestors:
        flow = snapshot.flows.get(ancestor.task_id)
        budgets.append((ancestor.task_id, ancestor.intent.budget, flow or FlowState()))
    findings = evaluate_flow(
        effective,
        state.intent,
        call.tool,
        call.args,
        profile,
        snapshot.flow_policy,
        # Named exactly by the task and by every ancestor: a child naming what its parent
        # reached only through a wildcard does not make a privileged tool declared.
        declared=match.matched.tool == call.tool
        and all(
            any(cap.tool == call.tool for cap in a.intent.capabilities) for a in snapshot.ancestors
        ),
        budgets=budgets,
    )
    flow_ctx = flow_context(
        msgspec.structs.replace(
            effective,
            calls=own.calls,
            call_count=own.calls_made,
            tools=own.tools,
            spend=own.spend,
        ),
        call.tool,
        profile,
        findings,
    )

    # Cedar.
    principal = {"type": "Agent", "id": state.agent_id}
    cedar_args = {k: cedar_value(v) for k, v in call.args.items() if v is not None}
    context = call_context(
        task_id=state.task_id,
        template=state.template,
        intent=state.intent,
        calls_used=state.calls_used,
        chain=claims.chain or (state.agent_id,),
        args=cedar_args,
        flow=flow_ctx,
    )
    resource = {"type": "Tool", "id": call.tool}
    entities = call_entities(state.agent_id, state.agent_owner, state.agent_kind, call.tool)
    outcome = policy.evaluate(principal, "call_tool", resource, context, entities)
    if shadow is not None:
        # ``out`` is the context every decision and refusal below is built from.
        out["shadow"] = shadow_of(shadow, outcome, (principal, resource, context, entities))
    if outcome.errors:
        raise Refused(
            "policy.error",
            "policy evaluation failed: " + "; ".join(outcome.errors),
            Control.PER_CALL_POLICY,
            policies=outcome.policies,
        )
    if not outcome.allowed:
        if outcome.policies:
            raise Refused(
                "policy.forbid",
                "forbidden by policy " + ", ".join(outcome.policies),
                Control.PER_CALL_POLICY,
                policies=outcome.policies,
            )
        raise Refused("policy.no_permit", "no policy permits this call", Control.PER_CALL_POLICY)

    # Call budgets: the task's and every ancestor's (children cannot multiply a budget).
    if state.calls_used >= state.intent.budget.max_calls:
        raise Refused(
            "budget.calls_exhausted",
            f"call budget of {state.intent.budget.max_calls} is spent",
            Control.INTENT_BINDING,
            policies=outcome.policies,
        )
    for ancestor in snapshot.ancestors:
        if ancestor.calls_used >= ancestor.intent.budget.max_calls:
            raise Refused(
                "budget.calls_exhausted",
                f"the budget of ancestor task {ancestor.task_id} is spent",
                Control.INTENT_BINDING,
                Control.DELEGATION,
                policies=outcome.policies,
            )

    # Flow rules: they only narrow (invariant 7).
    denies = [f for f in findings if f.effect is RuleEffect.DENY]
    if denies:
        raise Refused(
            denies[0].code,
            denies[0].message,
            Control.INFORMATION_FLOW,
            Control.PER_CALL_POLICY,
            *((Control.DELEGATION,) if snapshot.ancestors else ()),
            policies=outcome.policies,
            more=tuple(Reason(f.code, f.message) for f in findings[1:]),
        )
    held = [f for f in findings if f.effect is RuleEffect.APPROVAL]

    # Credentials in the arguments, checked before an approval is requested, so such
    # arguments are never stored for a human to read (OWASP ASI03; NHI2, NHI7).
    _hygiene(call.args, snapshot.known_secrets, profile, state.intent.request or "")

    controls = (
        Control.TASK_TOKEN,
        Control.SENDER_CONSTRAINED,
        Control.INTENT_BINDING,
        Control.PER_CALL_POLICY,
    )
    approval_id: str | None = None
    if outcome.approval or held:
        reasons = tuple(Reason(f.code, f.message) for f in held)
        if outcome.approval:
            reasons = (
                Reason(
                    "policy.approval",
                    "a human must approve this call (policy "
                    + ", ".join(p for p in outcome.policies)
                    + ")",
                ),
                *reasons,
            )
        extra = (Control.INFORMATION_FLOW,) if held else ()
        if snapshot.grant is None:
            pending = snapshot.pending
            if not pending.same_call and pending.count >= pending.limit:
                raise Refused(
                    "approval.pending_limit",
                    f"the task has {pending.count} approvals waiting for a human (at most "
                    f"{pending.limit}); a call identical to a waiting one joins it",
                    Control.APPROVAL,
                    policies=outcome.policies,
                )
            held_decision = Decision(
                effect=Effect.APPROVAL_REQUIRED,
                reasons=reasons,
                policies=outcome.policies,
                risk_tags=risk_tags(*controls, *extra, Control.APPROVAL),
                **out,
            )
            return held_decision, Plan(request_approval=True)
        approval_id = snapshot.grant.approval_id
        decision = Decision(
            effect=Effect.ALLOW,
            reasons=(
                Reason(
                    "approval.granted",
                    f"approved by {snapshot.grant.decided_by} ({approval_id})",
                ),
            ),
            policies=outcome.policies,
            risk_tags=risk_tags(*controls, *extra, Control.APPROVAL),
            **out,
        )
    else:
        decision = Decision(
            effect=Effect.ALLOW,
            reasons=(
                Reason(
                    "allow",
                    f"within intent capability {match.matched.tool!r} and permitted by policy",
                ),
            ),
            policies=outcome.policies,
            risk_tags=risk_tags(*controls),
            **out,
        )

    # The plan: one proof consumed, one call spent and the call joins the flow state, on
    # the task and on every ancestor.
    tree = (state, *snapshot.ancestors)
    flows = [(state.task_id, observe_call(own, call.tool, call.args, profile))]
    for ancestor in snapshot.ancestors:
        before = snapshot.flows.get(ancestor.task_id) or start(ancestor.intent.request or "")
        flows.append((ancestor.task_id, observe_call(before, call.tool, call.args, profile)))
    plan = Plan(
        record_proof=verified.proof_jti,
        spend=tuple(t.task_id for t in tree),
        flows=tuple(flows),
        use_approval=approval_id,
        touch=state.task_id if state.intent.idle_seconds is not None else None,
    )
    return decision, plan


def _hygiene(
    args: dict[str, Any], known: tuple[Known, ...], profile: ToolProfile, request: str = ""
) -> None:
    """Refuse a call that would carry a credential out.

    A brokered secret's value in the arguments is refused for every tool (an agent never
    holds one; if it does, it leaked); any other recognised credential (known formats,
    high entropy, a member named like one) for a tool that writes, sends or destroys (an
    undescribed tool counts as destructive). One exception: a tool that only writes may
    take, in a parameter named like a credential, the very value the user typed in the
    request (setting the password the user chose); never a tool that sends or destroys.
    """
    findings = find_credentials(args, known)
    outbound = profile.side_effect in OUTBOUND
    given = _credentials_given(args, request) if profile.side_effect is SideEffect.WRITE else ()
    refused = [f for f in findings if f.secret is not None or (outbound and f.path not in given)]
    if not refused:
        return
    what = "; ".join(f.describe() for f in refused[:3])
    if outbound:
        described = profile is not UNDESCRIBED
        raise Refused(
            "secret.egress",
            f"{what}: a credential must not reach a tool that is "
            f"{profile.side_effect if described else 'not described (treated as egress)'}",
            Control.SECRET_BROKERING,
            Control.PER_CALL_POLICY,
        )
    raise Refused(
        "secret.brokered",
        f"{what}: brokered secrets are injected by Tether, never passed by an agent",
        Control.SECRET_BROKERING,
        Control.PER_CALL_POLICY,
    )


def _credentials_given(args: Mapping[str, Any], request: str) -> frozenset[str]:
    """The paths (``$.name``) of top-level arguments named like a credential whose value
    the user's request holds verbatim, as a word of its own (not a piece of a longer one)."""
    paths = set()
    for name, value in args.items():
        if not isinstance(value, str) or not value.strip() or not named_credential(str(name)):
            continue
        at = request.find(value)
        while at >= 0:
            end = at + len(value)
            before = request[at - 1] if at > 0 else " "
            after = request[end] if end < len(request) else " "
            if not (_joins(before) or _joins(after)):
                paths.add(f"$.{str(name)[:64]}")
                break
            at = request.find(value, at + 1)
    return frozenset(paths)


def _joins(char: str) -> bool:
    """Whether ``char`` continues a word, a password or an address."""
    return char.isalnum() or char in "-_.@/+=~#$%&*^!"


def observe(
    verified: Verified,
    snapshot: Snapshot,
    tool: str,
    result: Any,
    now: float,
    *,
    reading: ResultReading | None = None,
) -> tuple[TaskState, Plan]:
    """What a tool's result does to the task tree's flow state (raises :class:`Refused`).

    The result is observed on the task and on every ancestor (it returns to them):
    labels, untrusted content and the values it holds. Observing only ever narrows
    what later calls may do. ``reading`` is the result already scanned (off the
    decision's locks, within a time budget), or :data:`~tether.core._flow.OVERSIZED`;
    without it, the result is scanned here, once for the whole tree.
    """
    state = check_live(verified.claims, snapshot, now)
    if reading is None:
        try:
            reading = read_result(result, snapshot.profile)
        except ScanExceeded:
            reading = OVERSIZED
    profile = snapshot.profile
    own = snapshot.flows.get(state.task_id) or start(state.intent.request or "")
    flows = [(state.task_id, observe_result(own, tool, result, profile, reading=reading))]
    for ancestor in snapshot.ancestors:
        before = snapshot.flows.get(ancestor.task_id) or start(ancestor.intent.request or "")
        after = observe_result(before, tool, result, profile, reading=reading)
        flows.append((ancestor.task_id, after))
    return state, Plan(flows=tuple(flows))
