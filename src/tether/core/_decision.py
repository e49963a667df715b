"""The decision core: one tool call in, one decision out.

Given a task token, its proof of possession, the call (tool + arguments), a
view of task state and the policy snapshot, :func:`decide` returns a
:class:`Decision`. It performs no I/O: the clock is a number passed in, the
task state comes through the :class:`TaskView` seam, keys and policies are
values.

Invariants
----------
1. Default deny. The only path to ``allow`` passes every check below; a call
   no policy permits is denied.
2. Fail closed. Any exception raised while deciding, expected or not, yields a
   ``deny`` whose reason names the failure. ``decide`` never raises.
3. Authority never exceeds the intent. A call is allowed only if a capability
   declared by the task's intent covers the tool and its arguments, *and*
   Cedar permits it, *and* the budget has room: policy can narrow an intent,
   never widen it.
4. Every decision has a reason. A deny names the check that refused it
   (``Reason.code``) and, for Cedar, the ids of the policies that fired.
5. Decisions have no side effects. The caller applies what a decision implies
   (record the proof id, spend budget) atomically with its receipt, only for
   ``allow``; a refused call changes no task state.

6. Flow rules only narrow. When the enforcement point passes the task's flow
   state (:class:`tether.core.FlowInput`), the flow rules of
   :mod:`tether.core._flow` run after every other check: a finding can turn an
   allow into a deny or an approval, never the reverse, and a deny finding
   outranks an approval. The state's summary is Cedar's ``context.flow``.

Checks, in order: token (shape, algorithm, trust domain, key id, signature,
``exp``/``nbf`` with a small skew, audience), task and identity liveness
(revocation, task ended or expired, agent disabled), the proof of possession
(key binding, call binding, freshness, replay), the intent's capabilities,
Cedar policy, budget, flow rules.
"""

from __future__ import annotations

import json
from enum import StrEnum
from functools import lru_cache
from typing import Any, Protocol

import cedarpy
import msgspec

from tether._errors import TetherError
from tether.core._canonical import digest
from tether.core._flow import (
    FlowInput,
    RuleEffect,
    empty_flow_context,
    evaluate_flow,
    flow_context,
)
from tether.core._intent import Intent, match_capability
from tether.core._policy import PolicySnapshot
from tether.core._risk import Control, risk_tags
from tether.core._verify import (
    ProofVerifier,
    TaskClaims,
    TokenVerifier,
    call_digest,
)

DECIDE_HTM = "POST"
DECIDE_HTU = "urn:tether:decide"
MAX_ARGS_BYTES = 64 * 1024
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


class TaskView(Protocol):
    """Read-only access to task state, provided by the enforcement point."""

    def task(self, task_id: str) -> TaskState | None: ...

    def token_revoked(self, token_id: str) -> bool: ...

    def proof_seen(self, jti: str) -> bool: ...


class Call(msgspec.Struct, frozen=True):
    tool: str
    args: dict[str, Any]


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

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


class _Refusal(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *controls: Control,
        policies: tuple[str, ...] = (),
        more: tuple[Reason, ...] = (),
    ):
        super().__init__(message)
        self.code, self.message, self.controls, self.policies = code, message, controls, policies
        self.more = more


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


@lru_cache(maxsize=4096)
def call_entities(agent_id: str, owner: str, kind: str, tool: str) -> cedarpy.Entities:
    """The entity graph of one (agent, tool) pair, parsed once by Cedar and reused."""
    _, entities = principal_entities(agent_id, owner, kind)
    entities.append({"uid": {"type": "Tool", "id": tool}, "attrs": {}, "parents": []})
    return cedarpy.Entities.from_json_str(json.dumps(entities))


def decide(
    *,
    token: str | None,
    proof: str | None,
    call: Call,
    view: TaskView,
    snapshot: PolicySnapshot,
    tokens: TokenVerifier,
    proofs: ProofVerifier,
    now: float,
    task_hint: str | None = None,
    htm: str = DECIDE_HTM,
    htu: str = DECIDE_HTU,
    resource: str | None = None,
    flow: FlowInput | None = None,
) -> Decision:
    """Decide one tool call. Never raises; see the module docstring.

    ``resource`` is the enforcement point's own identifier (e.g. an MCP gateway's
    URI): when given, the token must be addressed to it as well. ``flow`` is the
    task's flow state, the called tool's profile and the flow policy in force:
    when given, the flow rules run too (invariant 6).
    """
    context: dict[str, Any] = {"tool": None, "args_digest": None}
    try:
        return _decide(
            token,
            proof,
            call,
            view,
            snapshot,
            tokens,
            proofs,
            now,
            task_hint,
            htm,
            htu,
            context,
            resource,
            flow,
        )
    except _Refusal as refusal:
        return Decision(
            effect=Effect.DENY,
            reasons=(Reason(refusal.code, refusal.message), *refusal.more),
            policies=refusal.policies,
            risk_tags=risk_tags(*refusal.controls),
            **context,
        )
    except TetherError as exc:
        return Decision(
            effect=Effect.DENY,
            reasons=(Reason(exc.code, exc.message),),
            risk_tags=risk_tags(Control.TASK_TOKEN),
            **context,
        )
    except Exception as exc:  # fail closed on anything unexpected
        return Decision(
            effect=Effect.DENY,
            reasons=(Reason("internal.error", f"decision failed: {type(exc).__name__}: {exc}"),),
            risk_tags=risk_tags(Control.PER_CALL_POLICY),
            **context,
        )


def _decide(
    token: str | None,
    proof: str | None,
    call: Call,
    view: TaskView,
    snapshot: PolicySnapshot,
    tokens: TokenVerifier,
    proofs: ProofVerifier,
    now: float,
    task_hint: str | None,
    htm: str,
    htu: str,
    out: dict[str, Any],
    resource: str | None = None,
    flow: FlowInput | None = None,
) -> Decision:
    if not isinstance(call.tool, str) or not 0 < len(call.tool) <= MAX_TOOL_NAME:
        raise _Refusal(
            "call.malformed", "tool name must be 1-256 characters", Control.PER_CALL_POLICY
        )
    out["tool"] = call.tool
    if not isinstance(call.args, dict):
        raise _Refusal("call.malformed", "arguments must be a JSON object", Control.PER_CALL_POLICY)
    args_json = msgspec.json.encode(call.args)
    if len(args_json) > MAX_ARGS_BYTES:
        raise _Refusal(
            "call.oversized", f"arguments exceed {MAX_ARGS_BYTES} bytes", Control.PER_CALL_POLICY
        )
    out["args_digest"] = digest(call.args)

    # 1. The token: signature, times, audience, trust domain.
    if token is None:
        raise _Refusal("token.missing", "no task token was presented", Control.TASK_TOKEN)
    claims: TaskClaims = tokens.verify(token, now=now)
    out.update(
        task_id=claims.task_id,
        agent_id=claims.subject,
        chain=claims.chain,
        intent_digest=claims.intent_digest,
        token_digest=claims.token_digest,
    )
    if resource is not None and resource not in claims.audiences:
        raise _Refusal(
            "token.audience",
            f"token is not addressed to this resource ({resource})",
            Control.AUDIENCE,
        )
    if task_hint is not None and task_hint != claims.task_id:
        raise _Refusal(
            "token.task_mismatch",
            f"token belongs to task {claims.task_id}, not {task_hint}",
            Control.TASK_TOKEN,
        )

    # 2. Liveness: revocation, the task, the agent.
    state = view.task(claims.task_id)
    if state is None:
        raise _Refusal("task.unknown", f"task {claims.task_id} is not known", Control.TASK_TOKEN)
    if state.agent_id != claims.subject:
        raise _Refusal(
            "token.task_mismatch", "token subject is not the task's agent", Control.TASK_TOKEN
        )
    if not state.agent_active:
        raise _Refusal(
            "identity.disabled",
            f"agent {state.agent_id} is disabled",
            Control.OFFBOARDING,
            Control.TASK_TOKEN,
        )
    if state.status != "open":
        raise _Refusal(
            f"task.{state.status}", f"task {state.task_id} is {state.status}", Control.TASK_TOKEN
        )
    if view.token_revoked(claims.token_id) or state.token_id != claims.token_id:
        raise _Refusal(
            "token.revoked",
            "token has been revoked",
            Control.TASK_TOKEN,
            Control.CASCADING_REVOCATION,
        )
    if now >= state.expires_at:
        raise _Refusal("task.expired", f"task {state.task_id} has expired", Control.TASK_TOKEN)
    idle = state.intent.idle_seconds
    if idle is not None and now - max(state.last_activity or 0.0, state.opened_at) >= idle:
        raise _Refusal(
            "task.idle",
            f"task {state.task_id} has been idle for {idle}s or more",
            Control.TASK_TOKEN,
        )
    if state.intent_digest != claims.intent_digest or state.jkt != claims.jkt:
        raise _Refusal(
            "token.task_mismatch",
            "token does not match its task's intent or key",
            Control.INTENT_BINDING,
        )

    # 3. Proof of possession of the bound key, for this exact call.
    proved = proofs.verify(
        proof,
        token=token,
        jkt=claims.jkt,
        htm=htm,
        htu=htu,
        call=call_digest(call.tool, call.args),
        now=now,
    )
    out["proof_jti"] = proved.jti
    if view.proof_seen(proved.jti):
        raise _Refusal("proof.replayed", "proof has been used before", Control.SENDER_CONSTRAINED)

    # 4. The intent's capabilities.
    match = match_capability(state.intent, call.tool, call.args)
    if match.matched is None:
        code = "intent.argument" if "argument" in (match.reason or "") else "intent.no_capability"
        raise _Refusal(
            code, match.reason or "not in intent", Control.INTENT_BINDING, Control.PER_CALL_POLICY
        )

    # Flow findings are computed now so Cedar sees them; they are applied last.
    if flow is not None:
        findings = evaluate_flow(
            flow.state,
            state.intent,
            call.tool,
            call.args,
            flow.profile,
            flow.policy,
            declared=match.matched.tool == call.tool,
        )
        flow_ctx = flow_context(flow.state, call.tool, flow.profile, findings)
    else:
        findings, flow_ctx = [], empty_flow_context()

    # 5. Cedar.
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
    outcome = snapshot.evaluate(
        principal,
        "call_tool",
        {"type": "Tool", "id": call.tool},
        context,
        call_entities(state.agent_id, state.agent_owner, state.agent_kind, call.tool),
    )
    if outcome.errors:
        raise _Refusal(
            "policy.error",
            "policy evaluation failed: " + "; ".join(outcome.errors),
            Control.PER_CALL_POLICY,
            policies=outcome.policies,
        )
    if not outcome.allowed:
        if outcome.policies:
            raise _Refusal(
                "policy.forbid",
                "forbidden by policy " + ", ".join(outcome.policies),
                Control.PER_CALL_POLICY,
                policies=outcome.policies,
            )
        raise _Refusal("policy.no_permit", "no policy permits this call", Control.PER_CALL_POLICY)

    # 6. Budget.
    if state.calls_used >= state.intent.budget.max_calls:
        raise _Refusal(
            "budget.calls_exhausted",
            f"call budget of {state.intent.budget.max_calls} is spent",
            Control.INTENT_BINDING,
            policies=outcome.policies,
        )

    # 7. Flow rules: they only narrow (invariant 6).
    denies = [f for f in findings if f.effect is RuleEffect.DENY]
    if denies:
        raise _Refusal(
            denies[0].code,
            denies[0].message,
            Control.INFORMATION_FLOW,
            Control.PER_CALL_POLICY,
            policies=outcome.policies,
            more=tuple(Reason(f.code, f.message) for f in findings[1:]),
        )
    held = [f for f in findings if f.effect is RuleEffect.APPROVAL]

    controls = (
        Control.TASK_TOKEN,
        Control.SENDER_CONSTRAINED,
        Control.INTENT_BINDING,
        Control.PER_CALL_POLICY,
    )
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
        return Decision(
            effect=Effect.APPROVAL_REQUIRED,
            reasons=reasons,
            policies=outcome.policies,
            risk_tags=risk_tags(*controls, *extra, Control.APPROVAL),
            **out,
        )
    return Decision(
        effect=Effect.ALLOW,
        reasons=(
            Reason(
                "allow", f"within intent capability {match.matched.tool!r} and permitted by policy"
            ),
        ),
        policies=outcome.policies,
        risk_tags=risk_tags(*controls),
        **out,
    )
