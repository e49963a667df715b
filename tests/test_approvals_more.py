"""Approvals, the edges: expiry after approval, single use, re-targeting, replay, roles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tether import (
    APIError,
    ApprovalRequired,
    Client,
    Conflict,
    Effect,
    FrozenClock,
    ProofKey,
    Tether,
)

from .conftest import open_simple_task
from .server_support import Server
from .test_server_e2e import PAYEE, _setup, server  # noqa: F401 - the server fixture

POLICY = (
    "permit (principal, action, resource);\n"
    '@id("big-payments")\n@approval("required")\n'
    'forbid (principal, action == Action::"call_tool", resource) '
    "when { context.args has amount && context.args.amount >= 100 };"
)


def _call(t: Tether, key: ProofKey, token: str, tool: str = "pay", **args: object) -> object:
    proof = key.prove(token, tool, dict(args), now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=dict(args))


@pytest.fixture
def held(tether: Tether) -> tuple[Tether, ProofKey, str, str]:
    tether.policies.load({"p.cedar": POLICY})
    key, task_id, token = open_simple_task(tether, tools=("pay", "refund"), max_calls=10)
    return tether, key, task_id, token


def _approved(t: Tether, key: ProofKey, token: str) -> str:
    approval: str = _call(t, key, token, amount=500).approval_id  # type: ignore[attr-defined]
    t.decide_approval(approval, approve=True, by="bob@acme.example")
    return approval


def test_an_approved_but_unused_approval_expires(
    held: tuple[Tether, ProofKey, str, str], clock: FrozenClock
) -> None:
    t, key, task_id, token = held
    t.approvals.ttl = 60.0  # shorter than the task's life, so only the approval expires
    approval = _approved(t, key, token)
    clock.advance(61)
    late = _call(t, key, token, amount=500)
    assert late.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]
    assert late.approval_id != approval  # type: ignore[attr-defined]
    assert t.store.get_task(task_id).calls_used == 0  # type: ignore[union-attr]


def test_an_approval_is_single_use(held: tuple[Tether, ProofKey, str, str]) -> None:
    t, key, task_id, token = held
    approval = _approved(t, key, token)
    assert _call(t, key, token, amount=500).effect is Effect.ALLOW  # type: ignore[attr-defined]
    assert t.approvals.consume(approval) is False  # already used
    assert t.approvals.get(approval).status != "approved"
    with pytest.raises(Conflict):  # a used approval cannot be approved again
        t.decide_approval(approval, approve=True, by="bob@acme.example")
    again = _call(t, key, token, amount=500)
    assert again.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]
    assert t.store.get_task(task_id).calls_used == 1  # type: ignore[union-attr]


def test_an_approval_cannot_be_retargeted_to_another_tool(
    held: tuple[Tether, ProofKey, str, str],
) -> None:
    t, key, _, token = held
    approval = _approved(t, key, token)
    other = _call(t, key, token, "refund", amount=500)
    assert other.effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]
    assert other.approval_id != approval  # type: ignore[attr-defined]
    # The original approval is still there, for the call it was granted for only.
    assert _call(t, key, token, amount=500).effect is Effect.ALLOW  # type: ignore[attr-defined]


def test_a_denied_approval_never_lets_the_call_through(
    held: tuple[Tether, ProofKey, str, str],
) -> None:
    t, key, _, token = held
    approval: str = _call(t, key, token, amount=500).approval_id  # type: ignore[attr-defined]
    t.decide_approval(approval, approve=False, by="bob@acme.example")
    assert _call(t, key, token, amount=500).effect is Effect.APPROVAL_REQUIRED  # type: ignore[attr-defined]


def test_the_approved_call_cannot_be_replayed(held: tuple[Tether, ProofKey, str, str]) -> None:
    t, key, _, token = held
    _approved(t, key, token)
    args = {"amount": 500}
    proof = key.prove(token, "pay", args, now=t.clock.now())
    first = t.authorize(token=token, proof=proof, tool="pay", args=args)
    assert first.effect is Effect.ALLOW
    replay = t.authorize(token=token, proof=proof, tool="pay", args=args)
    assert replay.effect is Effect.DENY and replay.decision.reasons[0].code == "proof.replayed"


def _credential(srv: Server, role: str, owner: str) -> str:
    """A credential made with the CLI, through the server, by its first admin."""
    proc = subprocess.run(
        [sys.executable, "-m", "tether", "admin", "create", "--role", role, "--owner", owner,
         "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TETHER_SERVER": srv.url, "TETHER_TOKEN": srv.admin},
    )  # fmt: skip
    credential: str = json.loads(proc.stdout)["credential"]
    return credential


def test_only_an_approver_may_decide_over_http(server: Server) -> None:  # noqa: F811
    admin, agent = _setup(server)
    with agent.task(template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}) as task:
        with pytest.raises(ApprovalRequired) as asked:
            task.check("bank.send_money", {"recipient": PAYEE, "amount": 1200.0})
        approval = asked.value.approval_id
        assert approval
        for role in ("auditor", "owner"):
            other = Client(server.url, admin=_credential(server, role, f"{role}@acme.example"))
            with pytest.raises(APIError) as refused:
                other.approve(approval)
            assert refused.value.status == 403, role
        # A workload (the agent itself) cannot approve its own call either.
        with pytest.raises(APIError) as own:
            agent.approve(approval)
        assert own.value.status in (401, 403)
        approver = Client(server.url, admin=_credential(server, "approver", "ann@acme.example"))
        assert approver.approve(approval)["status"] == "approved"
        with pytest.raises(APIError) as twice:
            approver.approve(approval)
        assert twice.value.status == 409
        assert task.authorize("bank.send_money", {"recipient": PAYEE, "amount": 1200.0}).allowed
    assert admin.verify_audit()["ok"] is True
