"""Separation of duties: nobody decides a held call they have a stake in.

Attacker: an agent's owner (or the human a task acts for) who also holds an approver
credential, and a compromised agent that tries to get its owner to wave its call
through. The four-eyes rule holds at every door (in-process, HTTP, the console) and
leaves a receipt when it refuses; the approval stays pending for another approver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tether import ProofKey, Tether, parse_intent
from tether.approvals._review import text_flags
from tether.approvals._service import SeparationOfDuties

from .conftest import AGENT, OWNER

HOLD = """
@id("admit") permit (principal, action == Action::"open_task", resource);
@id("pay") permit (principal, action == Action::"call_tool", resource == Tool::"pay.send");
@id("held") @approval("required")
forbid (principal, action == Action::"call_tool", resource == Tool::"pay.send");
"""
CHILD = "spiffe://acme.example/agent/child"
INTENT = {"purpose": "pay", "capabilities": [{"tool": "pay.send"}], "budget": {"max_calls": 5}}


def _held(t: Tether, agent: str = AGENT, **open_args: Any) -> str:
    key = ProofKey()
    task = t.open_task(agent, proof_jwk=key.jwk, intent=parse_intent(INTENT), **open_args)
    args = {"to": "someone", "amount": 5}
    proof = key.prove(task.token, "pay.send", args, now=t.clock.now())
    receipt = t.authorize(token=task.token, proof=proof, tool="pay.send", args=args)
    assert receipt.approval_id is not None, receipt.decision.reasons
    return receipt.approval_id


@pytest.fixture
def held(tether: Tether) -> Tether:
    tether.policies.load({"held.cedar": HOLD})
    return tether


def test_the_owner_may_not_approve_her_own_agent(held: Tether) -> None:
    approval = _held(held)
    with pytest.raises(SeparationOfDuties) as refused:
        held.decide_approval(approval, approve=True, by=OWNER.upper())  # case does not help
    assert "owns the agent" in str(refused.value)
    assert held.approvals.get(approval).status == "pending"  # no change of state
    [receipt] = held.audit.tail(1)
    assert receipt["kind"] == "approval.decide" and receipt["effect"] == "deny"
    assert receipt["reasons"][0]["code"] == "approval.separation_of_duties"
    # Another human may.
    decided = held.decide_approval(approval, approve=True, by="bob@acme.example")
    assert decided.status == "approved" and decided.decided_by == "bob@acme.example"


def test_the_owner_of_an_agent_up_the_delegation_tree_may_not_approve(held: Tether) -> None:
    held.register_identity(CHILD, kind="agent", owner="carol@acme.example")
    parent_key = ProofKey()
    parent = held.open_task(AGENT, proof_jwk=parent_key.jwk, intent=parse_intent(INTENT))
    approval = _held(held, CHILD, parent_task_id=parent.task_id)
    for stakeholder in (OWNER, "carol@acme.example"):
        with pytest.raises(SeparationOfDuties):
            held.decide_approval(approval, approve=True, by=stakeholder)
    review = held.approvals.review(held.approvals.get(approval), OWNER)
    assert review["owner"] == "carol@acme.example" and review["chain"] == [CHILD, AGENT]
    assert "delegation tree" in str(review["conflict"])
    assert held.decide_approval(approval, approve=False, by="bob@acme.example").status == "denied"


def test_the_human_a_task_acts_for_may_not_approve_it(held: Tether) -> None:
    approval = _held(held, on_behalf_of="dave@acme.example")
    with pytest.raises(SeparationOfDuties) as refused:
        held.decide_approval(approval, approve=True, by="dave@acme.example")
    assert "on their behalf" in str(refused.value)


def test_the_rule_can_be_lifted_for_a_trust_domain_of_one(held: Tether) -> None:
    approval = _held(held)
    held.approvals.separation_of_duties = False
    assert held.decide_approval(approval, approve=True, by=OWNER).status == "approved"


@pytest.mark.store_independent
def test_deceptive_text_is_flagged_by_path() -> None:
    flags = text_flags(
        {
            "to": "p\u0430ypal.com",  # a Cyrillic a
            "memo": ["ok", "invoice \u202egpj.exe"],
            "note": "a\u200bb",
            "plain": "M\u00fcller, \u0418\u0432\u0430\u043d \u041f\u0435\u0442\u0440\u043e\u0432",
        }
    )
    assert {(f["path"], f["flag"]) for f in flags} == {
        ("$.to", "mixed_script"),
        ("$.memo[1]", "bidi"),
        ("$.note", "zero_width"),
    }


def test_over_http_the_owners_approver_is_refused_with_403(tmp_path: Path) -> None:
    """The owner's approver credential over the API: the listing shows owner, chain,
    flags and the conflict; approving answers 403 with the code; bob's succeeds."""
    import httpx

    from tether.sdk import Client

    from .server_support import Server

    server = Server(tmp_path / "home").start()
    try:
        t = Tether.open(tmp_path / "home")
        t.register_identity(AGENT, kind="agent", owner=OWNER)
        t.policies.load({"held.cedar": HOLD})
        quiet_tools = {"pay.send": {"side_effect": "write", "sensitivity": "internal"}}
        admin = Client(server.url, admin=server.admin)
        admin.post("/v1/catalogue", {"tools": quiet_tools})
        owners = t.credentials.create("approver", OWNER)[1]
        bobs = t.credentials.create("approver", "bob@acme.example")[1]
        agent = Client(server.url, key=ProofKey())
        agent.attest(admin.join_token(AGENT))
        task = agent.open_task(intent=INTENT)
        verdict = task.authorize("pay.send", {"to": "p\u0430ypal", "amount": 5})
        assert verdict.effect == "approval_required"
        listed = httpx.get(
            f"{server.url}/v1/approvals", headers={"Authorization": f"Bearer {owners}"}
        ).json()["approvals"]
        [mine] = [a for a in listed if a["approval_id"] == verdict.approval_id]
        assert mine["owner"] == OWNER and mine["chain"] == [AGENT]
        assert mine["conflict"] and [f["flag"] for f in mine["flags"]] == ["mixed_script"]
        url = f"{server.url}/v1/approvals/{verdict.approval_id}/approve"
        refused = httpx.post(url, headers={"Authorization": f"Bearer {owners}"})
        assert refused.status_code == 403
        assert json.loads(refused.text)["error"] == "approval.separation_of_duties"
        approved = httpx.post(url, headers={"Authorization": f"Bearer {bobs}"})
        assert approved.status_code == 200 and approved.json()["status"] == "approved"
        t.close()
    finally:
        server.stop()
