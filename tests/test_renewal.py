"""Long-running tasks: token renewal against the current policy, idle expiry; and the
renewal, trace and kill endpoints over HTTP with the SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from typer.testing import CliRunner

from tether import Client, Effect, FrozenClock, ProofKey, Tether, parse_intent
from tether.cli import _app as cli
from tether.core import ToolProfile
from tether.core._verify import DEFAULT_LEEWAY
from tether.tasks import RenewalRejected

from .conftest import AGENT, OWNER
from .server_support import Server

HELPER = "spiffe://acme.example/agent/helper"
OPEN = 'permit (principal, action == Action::"open_task", resource);'
READ = 'permit (principal, action == Action::"call_tool", resource == Tool::"fs.read");'
PAY = (
    'permit (principal, action == Action::"call_tool", resource == Tool::"bank.pay")'
    " when { context.args has amount && context.args.amount <= 500 };"
)
LONG = {
    "purpose": "nightly reconciliation",
    "capabilities": [{"tool": "fs.read"}, {"tool": "bank.pay", "args": {"amount": {"max": 200}}}],
    "budget": {"max_calls": 100},
    "ttl_seconds": 3600,
    "token_ttl_seconds": 300,
}


#: What the tools of these tests do, as a catalogue file's ``tools`` tables.
TOOLS = {
    "fs.read": {"side_effect": "read", "sensitivity": "internal", "trusted": True},
    "bank.pay": {"side_effect": "write", "sensitivity": "internal", "trusted": True},
}


def _call(t: Tether, key: ProofKey, token: str, tool: str = "fs.read", **args: Any) -> Any:
    proof = key.prove(token, tool, args, now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=args)


@pytest.fixture
def long_task(tether: Tether) -> tuple[Tether, ProofKey, Any]:
    tether.policies.load({"open.cedar": OPEN, "read.cedar": READ, "pay.cedar": PAY})
    key = ProofKey()
    opened = tether.open_task(AGENT, proof_jwk=key.jwk, intent=parse_intent(LONG))
    return tether, key, opened


def test_token_lives_shorter_than_the_task_and_renews(
    long_task: tuple[Tether, ProofKey, Any], clock: FrozenClock
) -> None:
    t, key, opened = long_task
    assert opened.token_expires_at == opened.expires_at - 3300
    assert jwt.decode(opened.token, options={"verify_signature": False})["exp"] == int(
        opened.token_expires_at
    )
    assert _call(t, key, opened.token, "bank.pay", amount=100).effect is Effect.ALLOW
    clock.advance(301 + DEFAULT_LEEWAY)  # the token ran out; the task did not
    stale = _call(t, key, opened.token)
    assert stale.effect is Effect.DENY and stale.decision.reasons[0].code.startswith("token.")

    old_id = t.tasks.get(opened.task_id).token_id
    renewed = t.renew_task(opened.task_id)
    assert renewed.task_id == opened.task_id and renewed.token != opened.token
    assert renewed.expires_at == opened.expires_at
    assert renewed.token_expires_at == int(clock.now() + 300)
    assert renewed.token_expires_at < renewed.expires_at
    new_id = t.tasks.get(opened.task_id).token_id
    assert new_id != old_id and t.store.token_revoked(old_id)
    assert _call(t, key, renewed.token).effect is Effect.ALLOW
    receipt = t.audit.tail(2)[0]
    assert receipt["kind"] == "task.renew" and receipt["effect"] == "allow"
    assert receipt["detail"]["previous_token_id"] == old_id
    assert receipt["detail"]["token_id"] == new_id


def test_the_old_token_is_refused_after_renewal(long_task: tuple[Tether, ProofKey, Any]) -> None:
    t, key, opened = long_task
    renewed = t.renew_task(opened.task_id)
    old = _call(t, key, opened.token)
    assert old.effect is Effect.DENY and old.decision.reasons[0].code == "token.revoked"
    assert _call(t, key, renewed.token).effect is Effect.ALLOW


def test_renewal_is_refused_after_a_policy_removes_a_capability_in_use(
    long_task: tuple[Tether, ProofKey, Any],
) -> None:
    t, key, opened = long_task
    assert _call(t, key, opened.token, "bank.pay", amount=150).effect is Effect.ALLOW
    t.policies.load({"open.cedar": OPEN, "read.cedar": READ})  # payments no longer permitted
    with pytest.raises(RenewalRejected) as info:
        t.renew_task(opened.task_id)
    assert info.value.code == "renewal.capability_revoked"
    assert "'bank.pay'" in info.value.message
    receipt = t.audit.tail(1)[0]
    assert receipt["kind"] == "task.renew" and receipt["effect"] == "deny"
    assert receipt["reasons"][0]["code"] == "renewal.capability_revoked"
    assert receipt["policy_digest"] == t.policies.snapshot().digest
    # The task keeps its token (it was not renewed), and the call is refused per call too.
    assert t.tasks.get(opened.task_id).status == "open"
    assert _call(t, key, opened.token, "bank.pay", amount=150).effect is Effect.DENY


def test_renewal_is_refused_when_a_forbid_now_covers_a_capability(
    long_task: tuple[Tether, ProofKey, Any],
) -> None:
    t, _, opened = long_task
    forbid = (
        '@id("payments-frozen")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.pay");'
    )
    t.policies.load({"open.cedar": OPEN, "read.cedar": READ, "pay.cedar": PAY, "f.cedar": forbid})
    with pytest.raises(RenewalRejected, match="payments-frozen"):
        t.renew_task(opened.task_id)


def test_renewal_is_refused_when_admission_is_withdrawn(
    long_task: tuple[Tether, ProofKey, Any],
) -> None:
    t, _, opened = long_task
    t.policies.load({"read.cedar": READ, "pay.cedar": PAY})
    with pytest.raises(RenewalRejected) as info:
        t.renew_task(opened.task_id)
    assert info.value.code == "admission.denied"


def test_renewal_is_refused_for_a_disabled_agent_or_an_ended_parent(
    long_task: tuple[Tether, ProofKey, Any],
) -> None:
    t, _, opened = long_task
    t.register_identity(HELPER, kind="agent", owner=OWNER)
    child_intent = {**LONG, "ttl_seconds": 600, "budget": {"max_calls": 10}}
    child = t.open_task(
        HELPER,
        proof_jwk=ProofKey().jwk,
        intent=parse_intent(child_intent),
        parent_task_id=opened.task_id,
    )
    assert t.renew_task(child.task_id).task_id == child.task_id
    t.end_task(opened.task_id)
    with pytest.raises(RenewalRejected) as info:
        t.renew_task(child.task_id)
    assert info.value.code == "task.revoked"
    with pytest.raises(RenewalRejected) as ended:
        t.renew_task(opened.task_id)
    assert ended.value.code == "task.ended"

    key = ProofKey()
    other = t.open_task(HELPER, proof_jwk=key.jwk, intent=parse_intent(LONG))
    t.disable_identity(HELPER)
    with pytest.raises(RenewalRejected):
        t.renew_task(other.task_id)


def test_idle_task_is_refused_then_reaped(tether: Tether, clock: FrozenClock) -> None:
    tether.policies.load({"all.cedar": "permit (principal, action, resource);"})
    key = ProofKey()
    intent = parse_intent(
        {"purpose": "watch", "capabilities": [{"tool": "fs.read"}], "idle_seconds": 60}
    )
    opened = tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    clock.advance(50)
    assert _call(tether, key, opened.token).effect is Effect.ALLOW
    clock.advance(50)  # 100 s since opening, 50 s since the last allowed call
    assert _call(tether, key, opened.token).effect is Effect.ALLOW
    assert tether.tasks.expire() == []
    clock.advance(61)
    idle = _call(tether, key, opened.token)
    assert idle.effect is Effect.DENY and idle.decision.reasons[0].code == "task.idle"
    assert tether.tasks.expire() == [opened.task_id]
    with pytest.raises(RenewalRejected):
        tether.renew_task(opened.task_id)
    row = tether.tasks.get(opened.task_id)
    assert row.status == "expired" and row.end_reason == "idle for 60s"
    assert tether.store.token_revoked(row.token_id)


def test_idle_and_token_ttl_are_validated() -> None:
    from tether._errors import InvalidIntent

    for field in ("idle_seconds", "token_ttl_seconds"):
        with pytest.raises(InvalidIntent):
            parse_intent({"purpose": "x", "capabilities": [{"tool": "a"}], field: 0})


# -- the CLI: delegate, renew, trace -----------------------------------------------------------
def test_cli_delegate_renew_and_trace(tmp_path: Path) -> None:
    home = tmp_path / "home"
    t = Tether.init(home, "acme.example")
    t.register_identity(AGENT, kind="agent", owner=OWNER)
    t.register_identity(HELPER, kind="agent", owner=OWNER)
    t.policies.load({"open.cedar": OPEN, "read.cedar": READ, "pay.cedar": PAY})
    t.catalogue.load({name: msgspec.convert(entry, ToolProfile) for name, entry in TOOLS.items()})
    t.close()

    def run(*args: str) -> Any:
        # The operator at the store's host: break-glass (no server in this test).
        result = CliRunner().invoke(
            cli.app, ["--home", str(home), "--break-glass", *args, "--json"]
        )
        assert result.exit_code == 0, (result.output, result.exception)
        return json.loads(result.output.strip().splitlines()[-1])

    parent = run("task", "open", "--agent", AGENT, "--intent", json.dumps(LONG))
    child_intent = {"purpose": "read", "capabilities": [{"tool": "fs.read"}], "ttl_seconds": 60}
    child = run(
        "task",
        "delegate",
        "--parent",
        parent["task_id"],
        "--agent",
        HELPER,
        "--intent",
        json.dumps(child_intent),
    )
    assert child["parent_task_id"] == parent["task_id"]
    assert (home / "tasks" / f"{child['task_id']}.json").stat().st_mode & 0o777 == 0o600
    assert run("authorize", "--task", child["task_id"], "--tool", "fs.read")["effect"] == "allow"
    renewed = run("task", "renew", parent["task_id"])
    assert renewed["token"] != parent["token"]
    kept = json.loads((home / "tasks" / f"{parent['task_id']}.json").read_text())
    assert kept["token"] == renewed["token"]
    assert run("authorize", "--task", parent["task_id"], "--tool", "fs.read")["effect"] == "allow"
    trace = run("audit", "trace", child["task_id"])
    assert trace["root_task_id"] == parent["task_id"]
    assert [x["task_id"] for x in trace["tasks"]] == [parent["task_id"], child["task_id"]]
    kinds = {r["kind"] for r in trace["receipts"]}
    assert {"task.open", "task.renew", "decision"} <= kinds
    human = CliRunner().invoke(
        cli.app, ["--home", str(home), "--break-glass", "audit", "trace", child["task_id"]]
    )
    assert human.exit_code == 0 and f"delegated by {AGENT}" in human.output


# -- over HTTP, with the SDK ------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "srv").start()
    yield srv
    srv.stop()


def test_renew_trace_and_kill_over_http(server: Server) -> None:
    admin = Client(server.url, admin=server.admin)
    admin.register_identity(AGENT, kind="agent", owner=OWNER)
    admin.load_policies({"open.cedar": OPEN, "read.cedar": READ, "pay.cedar": PAY})
    admin.post("/v1/catalogue", {"tools": TOOLS})
    agent = Client(server.url, key=ProofKey())
    agent.attest(admin.join_token(AGENT))

    task = agent.open_task(intent=LONG)
    first = task.token
    assert task.authorize("fs.read").allowed
    assert task.renew() is task and task.token != first
    assert task.authorize("fs.read").allowed
    assert agent.send(agent.requests.decision(first, agent.key, "fs.read", {}))["effect"] == "deny"  # type: ignore[arg-type]

    trace = admin.trace(task.task_id)
    assert trace["root_task_id"] == task.task_id
    assert any(r["kind"] == "task.renew" for r in trace["receipts"])

    with pytest.raises(Exception) as forbidden:  # a workload may not pull the kill switch
        agent.kill("mine", agent=AGENT)
    assert getattr(forbidden.value, "status", 403) == 403
    admin.load_policies({"open.cedar": OPEN, "read.cedar": READ})
    with pytest.raises(Exception, match="no longer permitted"):
        task.renew()
    result = admin.kill("incident 7", owner=OWNER)
    assert result["tasks"] == [task.task_id]
    refused = task.authorize("fs.read")
    assert refused.effect == "deny" and refused.reasons[0]["code"] == "task.revoked"
    legacy = admin.post("/v1/kill-switch", {"reason": "legacy", "template": "adhoc"})
    assert legacy == {"tasks": [], "leases": []}
