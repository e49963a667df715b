"""Approval fatigue: a task floods its approvers with pending approvals.

Attacker: a compromised (or prompt-injected) agent. A call that needs a human's
approval spends no budget, so one task could open hundreds of pending approvals,
each for slightly different arguments, until an approver clicks one through. Now a
task has at most ``max_pending`` approvals waiting; identical calls join the one
already waiting.
"""

from __future__ import annotations

from typing import Any

import pytest

from tether import Effect, ProofKey, Tether, UsageError

from .conftest import open_simple_task

POLICY = (
    "permit (principal, action, resource);\n"
    '@id("payments-need-a-human")\n@approval("required")\n'
    'forbid (principal, action == Action::"call_tool", resource == Tool::"pay");'
)


def _pay(t: Tether, key: ProofKey, token: str, amount: int) -> Any:
    args = {"amount": amount}
    proof = key.prove(token, "pay", args, now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool="pay", args=args)


@pytest.fixture
def held(tether: Tether) -> tuple[Tether, ProofKey, str, str]:
    tether.policies.load({"p.cedar": POLICY})
    key, task_id, token = open_simple_task(tether, tools=("pay",), max_calls=3)
    return tether, key, task_id, token


def test_distinct_requests_stop_at_the_limit(held: tuple[Tether, ProofKey, str, str]) -> None:
    """Compromised agent: 50 distinct approval requests open ``max_pending`` approvals;
    the rest are denied with their own receipt, and spend nothing."""
    t, key, task_id, token = held
    limit = t.approvals.max_pending
    receipts = [_pay(t, key, token, amount) for amount in range(1, 51)]
    held_ones = [r for r in receipts if r.effect is Effect.APPROVAL_REQUIRED]
    denied = [r for r in receipts if r.effect is Effect.DENY]
    assert len(held_ones) == limit
    assert len(denied) == 50 - limit
    assert {r.decision.reasons[0].code for r in denied} == {"approval.pending_limit"}
    assert len([a for a in t.approvals.list("pending") if a.task_id == task_id]) == limit
    records = [r for r in t.audit.tail(50 - limit)]
    assert all(r["kind"] == "decision" and r["effect"] == "deny" for r in records)
    assert t.store.get_task(task_id).calls_used == 0  # type: ignore[union-attr]


def test_identical_calls_join_the_waiting_approval(
    held: tuple[Tether, ProofKey, str, str],
) -> None:
    """Compromised agent: repeating one call, even at the limit, never opens a second
    approval for it: every repeat names the one waiting."""
    t, key, task_id, token = held
    limit = t.approvals.max_pending
    first = [_pay(t, key, token, amount) for amount in range(1, limit + 1)]
    for _ in range(20):
        again = _pay(t, key, token, 1)
        assert again.effect is Effect.APPROVAL_REQUIRED
        assert again.approval_id == first[0].approval_id
    assert len([a for a in t.approvals.list("pending") if a.task_id == task_id]) == limit


def test_a_decided_approval_makes_room(held: tuple[Tether, ProofKey, str, str]) -> None:
    """Control: once an approver decides one, the task may ask again."""
    t, key, _task_id, token = held
    limit = t.approvals.max_pending
    first = [_pay(t, key, token, amount) for amount in range(1, limit + 1)]
    assert _pay(t, key, token, 999).effect is Effect.DENY
    t.decide_approval(first[0].approval_id, approve=False, by="bob@acme.example")
    assert _pay(t, key, token, 999).effect is Effect.APPROVAL_REQUIRED


def test_the_limit_is_configurable(
    held: tuple[Tether, ProofKey, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is a setting (``$TETHER_MAX_PENDING_APPROVALS``); nonsense is refused."""
    t, key, _task_id, token = held
    t.approvals.max_pending = 2
    assert [_pay(t, key, token, a).effect for a in (1, 2, 3)] == [
        Effect.APPROVAL_REQUIRED,
        Effect.APPROVAL_REQUIRED,
        Effect.DENY,
    ]
    monkeypatch.setenv("TETHER_MAX_PENDING_APPROVALS", "7")
    other = Tether.ephemeral("acme.example")
    assert other.approvals.max_pending == 7
    other.close()
    monkeypatch.setenv("TETHER_MAX_PENDING_APPROVALS", "0")
    with pytest.raises(UsageError):
        Tether.ephemeral("acme.example")
