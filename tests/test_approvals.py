"""Approvals: bound to the exact call, single use, expiring, invalidated by policy change."""

from __future__ import annotations

import pytest

from tether import Conflict, Effect, FrozenClock, ProofKey, Tether

from .conftest import open_simple_task

POLICY = (
    "permit (principal, action, resource);\n"
    '@id("big-payments")\n@approval("required")\n'
    'forbid (principal, action == Action::"call_tool", resource == Tool::"pay") '
    "when { context.args has amount && context.args.amount >= 100 };"
)


def _call(t: Tether, key: ProofKey, token: str, **args: object) -> object:
    proof = key.prove(token, "pay", dict(args), now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool="pay", args=dict(args))


@pytest.fixture
def held(tether: Tether) -> tuple[Tether, ProofKey, str, str]:
    tether.policies.load({"p.cedar": POLICY})
    key, task_id, token = open_simple_task(tether, tools=("pay",), max_calls=10)
    return tether, key, task_id, token


def test_held_call_opens_one_pending_approval(held: tuple[Tether, ProofKey, str, str]) -> None:
    t, key, task_id, token = held
    first = _call(t, key, token, amount=500)
    again = _call(t, key, token, amount=500)
    assert first.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]
    assert first.approval_id and first.approval_id == again.approval_id  # type: ignore[attr-defined]
    (pending,) = t.approvals.list("pending")
    assert pending.task_id == task_id and pending.tool == "pay"
    assert t.store.get_task(task_id).calls_used == 0  # type: ignore[union-attr]


def test_approved_call_goes_through_exactly_once(held: tuple[Tether, ProofKey, str, str]) -> None:
    t, key, _, token = held
    approval = _call(t, key, token, amount=500).approval_id  # type: ignore[attr-defined]
    t.decide_approval(approval, approve=True, by="bob@acme.example")
    allowed = _call(t, key, token, amount=500)
    assert allowed.effect is Effect.ALLOW  # type: ignore[attr-defined]
    assert allowed.decision.reasons[0].code == "approval.granted"  # type: ignore[attr-defined]
    replay = _call(t, key, token, amount=500)
    assert replay.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]
    assert replay.approval_id != approval  # type: ignore[attr-defined]
    kinds = [r["kind"] for r in t.audit.tail(6)]
    assert "approval.decide" in kinds and "approval.request" in kinds


def test_approval_cannot_be_retargeted(held: tuple[Tether, ProofKey, str, str]) -> None:
    t, key, _, token = held
    approval = _call(t, key, token, amount=500).approval_id  # type: ignore[attr-defined]
    t.decide_approval(approval, approve=True, by="bob@acme.example")
    other = _call(t, key, token, amount=900)
    assert other.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]
    key2, _, token2 = open_simple_task(t, tools=("pay",))
    other_task = _call(t, key2, token2, amount=500)
    assert other_task.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]


def test_policy_change_voids_an_approval(held: tuple[Tether, ProofKey, str, str]) -> None:
    t, key, _, token = held
    approval = _call(t, key, token, amount=500).approval_id  # type: ignore[attr-defined]
    t.decide_approval(approval, approve=True, by="bob@acme.example")
    t.policies.load({"p.cedar": POLICY + "\n// reloaded\n"})
    assert _call(t, key, token, amount=500).effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]


def test_denied_and_expired_approvals(
    held: tuple[Tether, ProofKey, str, str], clock: FrozenClock
) -> None:
    t, key, _, token = held
    approval = _call(t, key, token, amount=500).approval_id  # type: ignore[attr-defined]
    t.decide_approval(approval, approve=False, by="bob@acme.example")
    with pytest.raises(Conflict):
        t.decide_approval(approval, approve=True, by="bob@acme.example")
    late = _call(t, key, token, amount=700).approval_id  # type: ignore[attr-defined]
    clock.advance(t.approvals.ttl + 1)
    with pytest.raises(Conflict):
        t.decide_approval(late, approve=True, by="bob@acme.example")
