"""Delegation narrows authority: subset checks, the act chain, cascade on end."""

from __future__ import annotations

import jwt
import pytest

from tether import Effect, ProofKey, Tether, parse_intent
from tether.core._delegation import DelegationRejected, check_narrowing

from .conftest import AGENT

CHILD = "spiffe://acme.example/agent/helper"
PARENT_INTENT = {
    "purpose": "pay bills",
    "capabilities": [
        {"tool": "bank.read_*"},
        {"tool": "bank.send_money", "args": {"amount": {"max": 500}, "to": {"one_of": ["a", "b"]}}},
    ],
    "data_ceiling": "confidential",
    "egress": ["bank.example"],
    "budget": {"max_calls": 10},
    "ttl_seconds": 600,
}


def _child(**changes: object) -> object:
    raw = {
        "purpose": "read",
        "capabilities": [{"tool": "bank.read_bills"}],
        "budget": {"max_calls": 3},
        "ttl_seconds": 300,
    }
    raw.update(changes)
    return parse_intent(raw)


def _check(child: object) -> None:
    check_narrowing(
        parse_intent(PARENT_INTENT),
        child,
        parent_calls_left=10,  # type: ignore[arg-type]
        parent_seconds_left=600,
        depth=1,
    )


def test_narrower_child_is_accepted() -> None:
    _check(_child())
    _check(_child(capabilities=[{"tool": "bank.read_*"}]))
    _check(
        _child(
            capabilities=[
                {
                    "tool": "bank.send_money",
                    "args": {"amount": {"max": 100, "min": 1}, "to": {"equals": "a"}},
                }
            ]
        )
    )


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"capabilities": [{"tool": "shell.exec"}]}, "no parent capability"),
        ({"capabilities": [{"tool": "bank.*"}]}, "no parent capability"),
        (
            {"capabilities": [{"tool": "bank.send_money", "args": {"to": {"equals": "a"}}}]},
            "drops the parent's constraint",
        ),
        (
            {
                "capabilities": [
                    {
                        "tool": "bank.send_money",
                        "args": {"amount": {"max": 900}, "to": {"equals": "a"}},
                    }
                ]
            },
            "maximum may not exceed",
        ),
        (
            {
                "capabilities": [
                    {
                        "tool": "bank.send_money",
                        "args": {"amount": {"max": 9}, "to": {"one_of": ["a", "z"]}},
                    }
                ]
            },
            "must stay within",
        ),
        ({"data_ceiling": "secret"}, "data ceiling"),
        ({"egress": ["evil.example"]}, "egress"),
        ({"budget": {"max_calls": 11}}, "budget"),
        ({"ttl_seconds": 601}, "lifetime"),
    ],
)
def test_wider_child_is_refused_with_the_part_that_failed(
    changes: dict[str, object], needle: str
) -> None:
    with pytest.raises(DelegationRejected, match=needle):
        _check(_child(**changes))


def test_depth_limit() -> None:
    with pytest.raises(DelegationRejected, match="depth"):
        check_narrowing(
            parse_intent(PARENT_INTENT),
            _child(),
            parent_calls_left=10,  # type: ignore[arg-type]
            parent_seconds_left=600,
            depth=5,
        )


@pytest.fixture
def family(permissive: Tether) -> tuple[Tether, ProofKey, str, ProofKey]:
    permissive.register_identity(CHILD, kind="agent", owner="alice@acme.example")
    parent_key = ProofKey()
    parent = permissive.open_task(
        AGENT, proof_jwk=parent_key.jwk, intent=parse_intent(PARENT_INTENT), on_behalf_of="user-42"
    )
    return permissive, parent_key, parent.task_id, ProofKey()


def test_child_token_carries_the_act_chain(family: tuple[Tether, ProofKey, str, ProofKey]) -> None:
    t, _, parent_id, child_key = family
    child = t.open_task(
        CHILD,
        proof_jwk=child_key.jwk,
        intent=_child(),  # type: ignore[arg-type]
        parent_task_id=parent_id,
    )
    claims = jwt.decode(child.token, options={"verify_signature": False})
    assert claims["sub"] == CHILD
    assert claims["act"] == {"sub": AGENT}
    assert claims["obo"] == "user-42"
    proof = child_key.prove(child.token, "bank.read_bills", {}, now=t.clock.now())
    receipt = t.authorize(token=child.token, proof=proof, tool="bank.read_bills", args={})
    assert receipt.effect is Effect.ALLOW
    assert receipt.decision.chain == (CHILD, AGENT)
    assert t.audit.tail(1)[0]["chain"] == [CHILD, AGENT]


def test_widening_delegation_is_refused_with_a_receipt(
    family: tuple[Tether, ProofKey, str, ProofKey],
) -> None:
    t, _, parent_id, child_key = family
    with pytest.raises(DelegationRejected):
        t.open_task(
            CHILD,
            proof_jwk=child_key.jwk,
            parent_task_id=parent_id,
            intent=_child(capabilities=[{"tool": "shell.exec"}]),
        )  # type: ignore[arg-type]
    last = t.audit.tail(1)[0]
    assert last["kind"] == "task.delegate" and last["effect"] == "deny"
    assert t.store.list_tasks(agent_id=CHILD) == []


def test_ending_the_parent_ends_the_child(family: tuple[Tether, ProofKey, str, ProofKey]) -> None:
    t, _, parent_id, child_key = family
    child = t.open_task(
        CHILD,
        proof_jwk=child_key.jwk,
        intent=_child(),  # type: ignore[arg-type]
        parent_task_id=parent_id,
    )
    t.end_task(parent_id)
    row = t.store.get_task(child.task_id)
    assert row is not None and row.status == "revoked"
    proof = child_key.prove(child.token, "bank.read_bills", {}, now=t.clock.now())
    receipt = t.authorize(token=child.token, proof=proof, tool="bank.read_bills", args={})
    assert receipt.effect is Effect.DENY
