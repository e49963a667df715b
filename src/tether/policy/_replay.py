"""Replay: what a candidate policy set would have decided of the calls already made.

Shadow mode (:mod:`tether.policy._shadow`) judges a candidate on the traffic to come;
replay judges it on the traffic recorded, at once. Both judge with the same code:
:func:`tether.core._decision.shadow_of` evaluates the candidate on the Cedar request
the live set saw, and gives both effects.

For each ``decision`` receipt in the window, oldest first:

1. A call refused before the policy step (its token, proof, task, identity or
   intent; such a receipt names no policy and no policy code) cannot change with the
   policy set: it is counted as ``before_policy`` and left alone.
2. The Cedar request is rebuilt from what the store holds: the agent (the receipt's
   actor chain) and its owner and kind (the registry), the tool, the task's intent and
   template (its row, tag checked), the calls the task had used (the allowed decisions
   before this one), the arguments when they are kept (a held call's approval keeps
   them; a receipt keeps only their digest), and an empty flow state.
3. The live set is evaluated on that request. If it does not give the Cedar effect the
   receipt records (the set changed since, or it reads arguments or flow state the
   store does not keep), the call is ``unreplayable``: listed with that reason, never
   guessed at.
4. Otherwise the candidate is evaluated on the same request (``shadow_of``) and the
   receipt's effect is carried through the checks that followed the policy step as the
   decision core orders them (budgets, flow rules and credentials before approvals; a
   deny outranks a hold): every call whose effect would change is reported, the old
   and new effect, its tool, task, receipt and reason codes. A call the live set denied
   and the candidate lets through never ran the later checks: it is marked
   ``complete: false``.

Nothing is written but the caller's receipt of the replay itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tether.audit._rows import TASK, RowTags, task_fields
from tether.core._decision import call_context, call_entities, cedar_effect, cedar_value, shadow_of
from tether.core._flow import empty_flow_context
from tether.core._intent import decode_verified_intent
from tether.core._policy import PolicySnapshot
from tether.store import RecordRow, Store

#: How many receipts a replay reads at most.
MAX_SCANNED = 1_000_000
#: Reason codes of a call the policy step itself refused.
CEDAR_DENY = frozenset({"policy.forbid", "policy.no_permit", "policy.error"})
#: Refusals after the policy step that name no policy (credentials in the arguments).
AFTER_POLICY_UNNAMED = frozenset({"secret.egress", "secret.brokered"})
ALLOW, DENY, HOLD = "allow", "deny", "approval_required"


@dataclass
class ReplayReport:
    candidate: str
    live: str
    since: float | None = None
    until: float | None = None
    scanned: int = 0
    replayed: int = 0
    before_policy: int = 0
    changes: dict[str, int] = field(default_factory=dict)  # "allow→deny": count
    changed: list[dict[str, Any]] = field(default_factory=list)
    unreplayable: list[dict[str, Any]] = field(default_factory=list)
    unreplayable_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "live": self.live,
            "from": self.since,
            "to": self.until,
            "decisions": self.scanned,
            "replayed": self.replayed,
            "before_policy": self.before_policy,
            "would_change": sum(self.changes.values()),
            "changes": dict(sorted(self.changes.items())),
            "changed": self.changed,
            "unreplayable_count": self.unreplayable_count,
            "unreplayable": self.unreplayable,
        }


def recorded_cedar(effect: str, codes: list[str], policies: list[str]) -> frozenset[str] | None:
    """The Cedar effects a receipt is consistent with; None: refused before the policy
    step (nothing a policy set changes)."""
    if any(c in CEDAR_DENY for c in codes):
        return frozenset({DENY})
    if not policies and not any(c in AFTER_POLICY_UNNAMED for c in codes):
        return None
    if effect == HOLD:
        return frozenset({HOLD if "policy.approval" in codes else ALLOW})
    if effect == ALLOW and codes == ["allow"]:
        return frozenset({ALLOW})
    return frozenset({ALLOW, HOLD})  # granted, or refused after the policy step


def carried(old: str, codes: list[str], live: str, new: str) -> tuple[str, bool]:
    """The decision's effect once the candidate's Cedar effect ``new`` replaces the
    live set's ``live``, the later checks as recorded; and whether those checks ran."""
    if new == live:
        return old, True
    if new == DENY:
        return DENY, True
    if live == DENY:
        return new, False  # the budgets, flow rules and credentials never ran
    flow_held = old == HOLD and any(c != "policy.approval" for c in codes)
    if new == HOLD:  # the live set allowed it
        return (old, True) if old in (DENY, HOLD) else (HOLD, True)
    # The live set held it for a human; the candidate allows it.
    if old == HOLD:
        return (HOLD, True) if flow_held else (ALLOW, True)
    if old == DENY and codes == ["approval.pending_limit"]:
        return ALLOW, True
    return old, True


def _new_codes(effect: str, shadow_policies: tuple[str, ...], errors: tuple[str, ...]) -> list[str]:
    if effect == DENY:
        if errors:
            return ["policy.error"]
        return ["policy.forbid"] if shadow_policies else ["policy.no_permit"]
    return ["policy.approval"] if effect == HOLD else ["allow"]


class _Requests:
    """Rebuilds the Cedar request of a recorded call from the store (cached per task)."""

    def __init__(self, store: Store, rows: RowTags) -> None:
        self._store = store
        self._rows = rows
        self._tasks: dict[str, Any] = {}
        self._args: dict[tuple[str, str, str], dict[str, Any]] = {}
        for approval in store.list_approvals():
            key = (approval.task_id, approval.tool, approval.args_digest)
            self._args[key] = json.loads(approval.args_json)

    def _task(self, task_id: str) -> Any:
        if task_id not in self._tasks:
            row = self._store.get_task(task_id)
            found: Any = None
            if row is not None and self._rows.authentic(TASK, row.task_id, task_fields(row)):
                intent = decode_verified_intent(row.intent_json, row.intent_digest, task_id)
                agent = self._rows.identity(row.agent_id)
                found = (row, intent, agent)
            self._tasks[task_id] = found
        return self._tasks[task_id]

    def build(self, body: dict[str, Any], calls_used: int) -> tuple[Any, ...] | str:
        """The request ``(principal, resource, context, entities)``, or why it cannot be
        rebuilt."""
        task_id, tool = body.get("task_id"), body.get("tool")
        if not isinstance(task_id, str) or not isinstance(tool, str):
            return "the receipt names no task or tool"
        task = self._task(task_id)
        if task is None:
            return "the task is gone or its row does not verify"
        row, intent, agent = task
        if agent is None:
            return "the agent is no longer registered"
        args = self._args.get((task_id, tool, str(body.get("args_digest"))), {})
        chain = tuple(body.get("chain") or ()) or (row.agent_id,)
        context = call_context(
            task_id=task_id,
            template=row.template,
            intent=intent,
            calls_used=calls_used,
            chain=chain,
            args={k: cedar_value(v) for k, v in args.items() if v is not None},
            flow=empty_flow_context(),
        )
        principal = {"type": "Agent", "id": row.agent_id}
        resource = {"type": "Tool", "id": tool}
        entities = call_entities(row.agent_id, agent.owner, agent.kind, tool)
        return principal, resource, context, entities


def replay(
    store: Store,
    rows: RowTags,
    live: PolicySnapshot,
    candidate: PolicySnapshot,
    *,
    since: float | None = None,
    until: float | None = None,
    limit: int = 1000,
) -> ReplayReport:
    """Re-decide the recorded calls between ``since`` and ``until`` (seconds since the
    epoch, inclusive; None: unbounded) under ``candidate``; see the module docstring.
    ``limit`` bounds the calls listed (changed, and unreplayable), not those counted."""
    report = ReplayReport(candidate.digest, live.digest, since, until)
    requests = _Requests(store, rows)
    allowed: dict[str, int] = {}
    record: RecordRow
    for scanned, record in enumerate(store.iter_records()):
        if scanned >= MAX_SCANNED or (until is not None and record.created_at > until):
            break
        body = json.loads(record.body)
        if body.get("kind") != "decision":
            continue
        task_id = body.get("task_id")
        used = allowed.get(task_id, 0) if isinstance(task_id, str) else 0
        if body.get("effect") == ALLOW and isinstance(task_id, str):
            allowed[task_id] = used + 1
        if since is not None and record.created_at < since:
            continue
        report.scanned += 1
        _replay_one(report, requests, live, candidate, record, body, used, limit)
    return report


def _replay_one(
    report: ReplayReport,
    requests: _Requests,
    live: PolicySnapshot,
    candidate: PolicySnapshot,
    record: RecordRow,
    body: dict[str, Any],
    calls_used: int,
    limit: int,
) -> None:
    old = str(body.get("effect"))
    codes = [str(r.get("code")) for r in body.get("reasons") or [] if isinstance(r, dict)]
    recorded = recorded_cedar(old, codes, list(body.get("policies") or []))
    if recorded is None:
        report.before_policy += 1
        return
    chain = body.get("chain") or []
    entry: dict[str, Any] = {
        "seq": record.seq,
        "at": record.created_at,
        "task_id": body.get("task_id"),
        "agent": chain[0] if chain else None,
        "tool": body.get("tool"),
        "old": old,
        "old_reasons": codes,
    }

    def unreplayable(why: str) -> None:
        report.unreplayable_count += 1
        if len(report.unreplayable) < limit:
            report.unreplayable.append({**entry, "why": why})

    try:
        request = requests.build(body, calls_used)
    except Exception as exc:  # a stored value that no longer reads: say so, never guess
        request = f"the recorded call cannot be rebuilt: {type(exc).__name__}"
    if isinstance(request, str):
        unreplayable(request)
        return
    principal, resource, context, entities = request
    outcome = live.evaluate(principal, "call_tool", resource, context, entities)
    if cedar_effect(outcome) not in recorded:
        unreplayable(
            "the live policy set does not decide the rebuilt call as recorded (it changed "
            "since, or reads arguments or flow state the store does not keep)"
        )
        return
    shadow = shadow_of(candidate, outcome, request)
    if shadow is None:
        unreplayable("the candidate set cannot evaluate the call")
        return
    report.replayed += 1
    new, complete = carried(old, codes, shadow.live, shadow.effect)
    if new == old:
        return
    key = f"{old}→{new}"
    report.changes[key] = report.changes.get(key, 0) + 1
    if len(report.changed) < limit:
        report.changed.append(
            {
                **entry,
                "new": new,
                "new_reasons": _new_codes(shadow.effect, shadow.policies, shadow.errors),
                "policies": list(shadow.policies),
                "complete": complete,
            }
        )
