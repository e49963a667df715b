"""Delegation, end to end: every escalation a sub-agent may try is refused with its reason,
policies see the whole actor chain, and the audit trace shows the whole tree."""

from __future__ import annotations

from typing import Any

import pytest

from tether import Effect, ProofKey, Tether, parse_intent
from tether._errors import IdentityRejected, NotFound
from tether.core._delegation import DelegationRejected
from tether.store import IdentityRow

from .conftest import AGENT, OWNER

CHILD = "spiffe://acme.example/agent/helper"
PARENT: dict[str, Any] = {
    "purpose": "pay bills",
    "capabilities": [
        {"tool": "bank.read_*"},
        {"tool": "bank.send_money", "args": {"amount": {"max": 500}, "to": {"one_of": ["a", "b"]}}},
    ],
    "data_ceiling": "internal",
    "egress": ["bank.example"],
    "budget": {"max_calls": 10},
    "ttl_seconds": 600,
}


def _intent(**changes: Any) -> Any:
    raw: dict[str, Any] = {
        "purpose": "help",
        "capabilities": [{"tool": "bank.read_bills"}],
        "budget": {"max_calls": 3},
        "ttl_seconds": 300,
    }
    raw.update(changes)
    return parse_intent(raw)


@pytest.fixture
def parent(permissive: Tether) -> tuple[Tether, ProofKey, Any]:
    permissive.register_identity(CHILD, kind="agent", owner=OWNER)
    key = ProofKey()
    opened = permissive.open_task(AGENT, proof_jwk=key.jwk, intent=parse_intent(PARENT))
    return permissive, key, opened


def _call(t: Tether, key: ProofKey, token: str, tool: str, args: dict[str, Any]) -> Any:
    proof = key.prove(token, tool, args, now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=args)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"capabilities": [{"tool": "shell.exec"}]}, "no parent capability covers it"),
        (
            {
                "capabilities": [
                    {"tool": "bank.send_money", "args": {"amount": {"max": 5000}, "to": {}}}
                ]
            },
            "argument 'amount' maximum may not exceed 500",
        ),
        ({"data_ceiling": "secret"}, "data ceiling secret is above the parent's internal"),
        ({"egress": ["evil.example"]}, "egress ['evil.example'] is not allowed"),
        ({"ttl_seconds": 3600}, "lifetime 3600s exceeds the parent's remaining 600s"),
        ({"budget": {"max_calls": 50}}, "budget of 50 calls exceeds the parent's remaining 10"),
    ],
    ids=["tool", "argument-range", "ceiling", "egress", "ttl", "budget"],
)
def test_escalation_is_refused_with_its_reason(
    parent: tuple[Tether, ProofKey, Any], changes: dict[str, Any], needle: str
) -> None:
    t, _, opened = parent
    with pytest.raises(DelegationRejected) as info:
        t.open_task(
            CHILD,
            proof_jwk=ProofKey().jwk,
            intent=_intent(**changes),
            parent_task_id=opened.task_id,
        )
    assert needle in info.value.message
    assert info.value.code == "delegation.widening"
    last = t.audit.tail(1)[0]
    assert last["kind"] == "task.delegate" and last["effect"] == "deny"
    assert needle in last["reasons"][0]["message"]
    assert t.store.list_tasks(agent_id=CHILD) == []


def test_redelegation_past_the_depth_limit_is_refused(permissive: Tether) -> None:
    agents = [f"spiffe://acme.example/agent/a{i}" for i in range(6)]
    for agent in agents:
        permissive.register_identity(agent, kind="agent", owner=OWNER)
    task_id = permissive.open_task(
        agents[0], proof_jwk=ProofKey().jwk, intent=_intent(budget={"max_calls": 10})
    ).task_id
    for agent in agents[1:5]:  # four levels below the root: the limit
        task_id = permissive.open_task(
            agent, proof_jwk=ProofKey().jwk, intent=_intent(), parent_task_id=task_id
        ).task_id
    with pytest.raises(DelegationRejected) as info:
        permissive.open_task(
            agents[5], proof_jwk=ProofKey().jwk, intent=_intent(), parent_task_id=task_id
        )
    assert info.value.code == "delegation.depth"
    assert "depth 5 exceeds the limit of 4" in info.value.message
    assert permissive.audit.tail(1)[0]["reasons"][0]["code"] == "delegation.depth"


def test_child_token_is_refused_once_the_parent_ended(
    parent: tuple[Tether, ProofKey, Any],
) -> None:
    t, _, opened = parent
    key = ProofKey()
    child = t.open_task(CHILD, proof_jwk=key.jwk, intent=_intent(), parent_task_id=opened.task_id)
    assert _call(t, key, child.token, "bank.read_bills", {}).effect is Effect.ALLOW
    t.end_task(opened.task_id)
    receipt = _call(t, key, child.token, "bank.read_bills", {})
    assert receipt.effect is Effect.DENY
    assert receipt.decision.reasons[0].code == "task.revoked"
    # and no new child may be opened under the ended parent
    with pytest.raises(DelegationRejected) as info:
        t.open_task(CHILD, proof_jwk=key.jwk, intent=_intent(), parent_task_id=opened.task_id)
    assert info.value.code == "delegation.parent"


def test_parent_token_replayed_by_the_child_is_refused(
    parent: tuple[Tether, ProofKey, Any],
) -> None:
    t, parent_key, opened = parent
    child_key = ProofKey()
    t.open_task(CHILD, proof_jwk=child_key.jwk, intent=_intent(), parent_task_id=opened.task_id)
    # The child got hold of the parent's token: its own key cannot prove possession of it.
    receipt = _call(t, child_key, opened.token, "bank.send_money", {"amount": 100, "to": "a"})
    assert receipt.effect is Effect.DENY
    assert receipt.decision.reasons[0].code == "proof.key_mismatch"
    # the parent, with its own key, still may
    ok = _call(t, parent_key, opened.token, "bank.send_money", {"amount": 100, "to": "a"})
    assert ok.effect is Effect.ALLOW


def test_child_of_another_trust_domain_is_refused(parent: tuple[Tether, ProofKey, Any]) -> None:
    t, _, opened = parent
    foreign = "spiffe://evil.example/agent/helper"
    with pytest.raises(IdentityRejected):
        t.register_identity(foreign, kind="agent", owner=OWNER)
    # Even if such a row reached the store, no task (child or not) is opened for it.
    t.store.add_identity(IdentityRow(foreign, "agent", OWNER, "", "active", t.clock.now()))
    with pytest.raises(IdentityRejected) as info:
        t.open_task(
            foreign, proof_jwk=ProofKey().jwk, intent=_intent(), parent_task_id=opened.task_id
        )
    assert info.value.code == "identity.trust_domain"
    last = t.audit.tail(1)[0]
    assert last["effect"] == "deny" and last["reasons"][0]["code"] == "identity.trust_domain"
    assert t.store.list_tasks(parent_task_id=opened.task_id) == []


def test_unknown_parent_is_refused(permissive: Tether) -> None:
    with pytest.raises(NotFound):
        permissive.open_task(
            AGENT, proof_jwk=ProofKey().jwk, intent=_intent(), parent_task_id="task_nope"
        )


ROOT_POLICIES = {
    "all.cedar": "permit (principal, action, resource);",
    "root.cedar": (
        '@id("payments-need-a-human-rooted-chain")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.send_money")'
        f' when {{ context.root != "{AGENT}" }};\n'
        '@id("helper-payments-reviewed")\n@approval("required")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.send_money")'
        f' when {{ context.chain.contains("{CHILD}") }};\n'
    ),
}


def test_policies_see_the_whole_chain_and_its_root(tether: Tether) -> None:
    """A payment needs the chain to start at the human-driven agent; a payment anywhere
    below the helper needs a human's approval; the helper alone may not pay at all."""
    tether.policies.load(ROOT_POLICIES)
    tether.register_identity(CHILD, kind="agent", owner=OWNER)
    payment = {"amount": 100, "to": "a"}
    pay_cap = {"capabilities": [PARENT["capabilities"][1]]}

    root_key = ProofKey()
    root = tether.open_task(AGENT, proof_jwk=root_key.jwk, intent=parse_intent(PARENT))
    assert _call(tether, root_key, root.token, "bank.send_money", payment).effect is Effect.ALLOW

    # Rooted at AGENT, through the helper: held for a human.
    child_key = ProofKey()
    child = tether.open_task(
        CHILD, proof_jwk=child_key.jwk, intent=_intent(**pay_cap), parent_task_id=root.task_id
    )
    held = _call(tether, child_key, child.token, "bank.send_money", payment)
    assert held.effect is Effect.APPROVAL_REQUIRED
    assert "helper-payments-reviewed" in held.decision.policies

    # The helper on its own (root = the helper): refused outright.
    alone_key = ProofKey()
    alone = tether.open_task(CHILD, proof_jwk=alone_key.jwk, intent=_intent(**pay_cap))
    refused = _call(tether, alone_key, alone.token, "bank.send_money", payment)
    assert refused.effect is Effect.DENY
    assert refused.decision.reasons[0].code == "policy.forbid"
    assert "payments-need-a-human-rooted-chain" in refused.decision.policies


def test_audit_trace_shows_the_whole_tree(parent: tuple[Tether, ProofKey, Any]) -> None:
    t, parent_key, opened = parent
    key = ProofKey()
    child = t.open_task(CHILD, proof_jwk=key.jwk, intent=_intent(), parent_task_id=opened.task_id)
    _call(t, key, child.token, "bank.read_bills", {})
    _call(t, key, child.token, "shell.exec", {})
    _call(t, parent_key, opened.token, "bank.read_bills", {})
    t.end_task(opened.task_id)

    trace = t.trace(child.task_id)  # from any node: the whole tree
    assert trace["root_task_id"] == opened.task_id
    tasks = {x["task_id"]: x for x in trace["tasks"]}
    assert tasks[opened.task_id]["children"] == [child.task_id]
    assert tasks[child.task_id]["delegated_by"] == AGENT
    assert tasks[child.task_id]["chain"] == [CHILD, AGENT]
    assert tasks[child.task_id]["status"] == "revoked"
    kinds = [(r["kind"], r.get("task_id"), r.get("effect")) for r in trace["receipts"]]
    assert ("task.open", child.task_id, "allow") in kinds
    assert ("decision", child.task_id, "deny") in kinds
    assert ("decision", opened.task_id, "allow") in kinds
    assert ("task.revoked", child.task_id, "allow") in kinds
    assert trace["leases"] == []
