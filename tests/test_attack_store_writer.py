"""Attacks by someone who can write the store (the SQLite file or the PostgreSQL role)
but does not hold the KEK, on the rows that grant authority.

Each attack writes rows with plain SQL, as such a writer would, and then tries to use
them: an admin credential or console session of their own, a join token, an identity
re-activated or re-owned, a task widened, re-pointed or re-opened after a kill, an
approval flipped to approved, a policy set, tool catalogue or trusted issuer of their
own. Every one is refused: rows carry a tag under the KEK (``tether.audit.RowTags``)
and a task's intent must hash to the digest signed into its tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tether import FrozenClock, ProofKey, Tether, parse_intent
from tether._errors import IdentityRejected, NotFound, TetherError
from tether.audit import RowTampered
from tether.console._sessions import Sessions, session_hash
from tether.core import Sensitivity, SideEffect, ToolProfile
from tether.tokens import new_ec_key

from .conftest import AGENT, OWNER, PERMIT_ALL, open_simple_task, quiet

ADMIN_ID = "00112233445566ff"
SECRET = "A" * 43


def _sql(t: Tether, statement: str, *params: Any) -> None:
    t.store.execute_unsafe(statement, tuple(params))


def _call(t: Tether, key: ProofKey, token: str, tool: str, args: dict[str, Any]) -> Any:
    return t.authorize(
        token=token, proof=key.prove(token, tool, args, now=t.clock.now()), tool=tool, args=args
    )


@pytest.fixture
def t(permissive: Tether) -> Tether:
    return permissive


def test_an_admin_credential_row_of_ones_own_is_no_credential(t: Tether) -> None:
    """Store writer: inserts an admin credential whose secret they chose."""
    _sql(
        t,
        "INSERT INTO credentials (credential_id, secret_hash, role, owner, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        ADMIN_ID,
        hashlib.sha256(SECRET.encode()).hexdigest(),
        "admin",
        "mallory@evil.test",
        t.clock.now(),
    )
    with pytest.raises(IdentityRejected):
        t.credentials.verify(f"tadm_{ADMIN_ID}.{SECRET}")


def test_a_credential_raised_to_admin_is_refused(t: Tether) -> None:
    """Store writer: holds an auditor credential and rewrites its role to admin."""
    row, secret = t.credentials.create("auditor", "mallory@acme.example")
    assert t.credentials.verify(secret).role == "auditor"
    _sql(t, "UPDATE credentials SET role = 'admin' WHERE credential_id = ?", row.credential_id)
    with pytest.raises(IdentityRejected):
        t.credentials.verify(secret)


def test_a_console_session_row_of_ones_own_signs_nobody_in(t: Tether) -> None:
    """Store writer: inserts a console session for a session id they chose."""
    sessions = Sessions(t.store, t.clock, t.audit.rows)
    now = t.clock.now()
    _sql(
        t,
        "INSERT INTO console_sessions (session_hash, credential_id, role, owner, created_at, "
        "seen_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        session_hash("chosen-session-id"),
        ADMIN_ID,
        "admin",
        "mallory@evil.test",
        now,
        now,
        now + 3600,
    )
    assert sessions.get("chosen-session-id") is None
    real = sessions.create(ADMIN_ID, "auditor", "mallory@acme.example")
    assert sessions.get(real.session_id) is not None
    _sql(t, "UPDATE console_sessions SET role = 'admin' WHERE session_hash = ?", real.session_hash)
    assert sessions.get(real.session_id) is None


def test_a_join_token_row_of_ones_own_attests_nobody(t: Tether) -> None:
    """Store writer: inserts a join token for an agent, to get its SVIDs."""
    token = "tjoin_" + "B" * 43
    _sql(
        t,
        "INSERT INTO join_tokens (token_hash, spiffe_id, expires_at) VALUES (?, ?, ?)",
        hashlib.sha256(token.encode()).hexdigest(),
        AGENT,
        t.clock.now() + 600,
    )
    with pytest.raises(TetherError) as caught:
        t.attest(token, new_ec_key().public_key())
    assert caught.value.code == "attestation.join_token"
    # A real one still works.
    svids = t.attest(t.create_join_token(AGENT), new_ec_key().public_key())
    assert svids.spiffe_id == AGENT


def test_a_disabled_identity_set_active_again_opens_nothing(t: Tether) -> None:
    """Store writer: re-activates an offboarded agent."""
    t.disable_identity(AGENT)
    _sql(
        t, "UPDATE identities SET status = 'active', disabled_at = NULL WHERE spiffe_id = ?", AGENT
    )
    with pytest.raises((NotFound, IdentityRejected)):
        open_simple_task(t)


def test_an_identity_row_of_ones_own_is_unknown(t: Tether) -> None:
    """Store writer: registers an agent of their own by inserting its row."""
    rogue = "spiffe://acme.example/agent/rogue"
    _sql(
        t,
        "INSERT INTO identities (spiffe_id, kind, owner, description, status, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rogue,
        "agent",
        "mallory@evil.test",
        "",
        "active",
        t.clock.now(),
    )
    assert t.identities.lookup(rogue) is None
    with pytest.raises(NotFound):
        t.open_task(
            rogue,
            proof_jwk=ProofKey().jwk,
            intent=parse_intent({"purpose": "x", "capabilities": [{"tool": "fs.read"}]}),
        )


def test_a_reowned_identity_cannot_act(t: Tether) -> None:
    """Store writer: moves an agent to another owner (to dodge separation of duties)."""
    key, _task_id, token = open_simple_task(t)
    _sql(t, "UPDATE identities SET owner = 'mallory@evil.test' WHERE spiffe_id = ?", AGENT)
    receipt = _call(t, key, token, "fs.read", {"path": "/a"})
    assert receipt.decision.effect == "deny"


def test_a_widened_intent_is_refused_on_a_node_that_never_saw_it(
    tmp_path: Path, clock: FrozenClock
) -> None:
    """Store writer: adds a tool to a task's stored intent (its digest left as issued);
    a node that decodes the intent afresh (a restart, another node) refuses the task."""
    home = tmp_path / "home"
    first = Tether.init(home, "acme.example", clock=clock)
    first.register_identity(AGENT, kind="agent", owner=OWNER)
    quiet(first)
    first.policies.load({"all.cedar": PERMIT_ALL})
    key, task_id, token = open_simple_task(first, tools=("fs.read",))
    row = first.store.get_task(task_id)
    assert row is not None
    intent = json.loads(row.intent_json)
    intent["capabilities"].append({"tool": "shell.exec"})
    _sql(first, "UPDATE tasks SET intent_json = ? WHERE task_id = ?", json.dumps(intent), task_id)
    first.close()
    second = Tether.open(home, clock=clock)
    try:
        receipt = _call(second, key, token, "shell.exec", {"cmd": "id"})
        assert receipt.decision.effect == "deny"
        assert [r.code for r in receipt.decision.reasons] == ["task.intent_tampered"]
        with pytest.raises(TetherError):
            second.tasks.intent_of(second.tasks.get(task_id))
    finally:
        second.close()


def test_a_delegated_task_detached_from_its_parent_is_refused(t: Tether) -> None:
    """Store writer: clears a sub-task's parent, so the parent's flow and revocation no
    longer reach it."""
    key, task_id, token = open_simple_task(t)
    _sql(t, "UPDATE tasks SET parent_task_id = 'task_elsewhere' WHERE task_id = ?", task_id)
    receipt = _call(t, key, token, "fs.read", {"path": "/a"})
    assert receipt.decision.effect == "deny"
    assert [r.code for r in receipt.decision.reasons] == ["store.row_tampered"]


def test_a_killed_task_set_open_again_stays_dead(t: Tether) -> None:
    """Store writer: undoes the kill switch (the task re-opened, its revocation deleted)."""
    key, task_id, token = open_simple_task(t)
    assert _call(t, key, token, "fs.read", {"path": "/a"}).decision.effect == "allow"
    t.kill("incident", agent=AGENT)
    _sql(
        t,
        "UPDATE tasks SET status = 'open', ended_at = NULL, end_reason = NULL WHERE task_id = ?",
        task_id,
    )
    _sql(t, "DELETE FROM revocations")
    receipt = _call(t, key, token, "fs.read", {"path": "/b"})
    assert receipt.decision.effect == "deny"
    assert [r.code for r in receipt.decision.reasons] == ["store.row_tampered"]


def _held(t: Tether) -> tuple[ProofKey, str, dict[str, Any]]:
    t.policies.load(
        {
            "hold.cedar": PERMIT_ALL
            + '\n@id("hold-pay") @approval("required")\n'
            + 'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.pay");'
        }
    )
    key, _task_id, token = open_simple_task(t, tools=("bank.pay",))
    args = {"to": "DE50526018159083016613", "amount": 3000}
    assert _call(t, key, token, "bank.pay", args).decision.effect == "approval_required"
    return key, token, args


def test_an_approval_flipped_to_approved_in_the_store_approves_nothing(t: Tether) -> None:
    """Store writer: marks a pending approval of a held payment as approved."""
    key, token, args = _held(t)
    [pending] = t.store.list_approvals(status="pending")
    _sql(
        t,
        "UPDATE approvals SET status = 'approved', decided_by = 'boss@acme.example', "
        "decided_at = ? WHERE approval_id = ?",
        t.clock.now(),
        pending.approval_id,
    )
    t.clock.advance(1)
    assert _call(t, key, token, "bank.pay", args).decision.effect != "allow"
    # Approved by a human through Tether, the same call goes through.
    _sql(
        t,
        "UPDATE approvals SET status = 'pending', decided_by = NULL, decided_at = NULL "
        "WHERE approval_id = ?",
        pending.approval_id,
    )
    t.decide_approval(pending.approval_id, approve=True, by="boss@acme.example")
    t.clock.advance(1)
    assert _call(t, key, token, "bank.pay", args).decision.effect == "allow"


def test_a_pending_approval_of_ones_own_cannot_be_approved(t: Tether) -> None:
    """Store writer: dresses a call up as a pending approval for a human to approve, with
    harmless arguments shown and the digest of a harmful call."""
    _held(t)
    [pending] = t.store.list_approvals(status="pending")
    _sql(
        t,
        "UPDATE approvals SET args_json = ? WHERE approval_id = ?",
        json.dumps({"to": "DE50526018159083016613", "amount": 3}),
        pending.approval_id,
    )
    with pytest.raises(NotFound):
        t.decide_approval(pending.approval_id, approve=True, by="boss@acme.example")


def test_a_policy_set_of_ones_own_decides_nothing(t: Tether) -> None:
    """Store writer: inserts a newer policy set that permits everything."""
    t.policies.load(
        {
            "admit.cedar": 'permit (principal, action == Action::"open_task", resource);',
            "calls.cedar": 'forbid (principal, action == Action::"call_tool", resource);',
        }
    )
    key, _task_id, token = open_simple_task(t)
    active = t.store.active_policy()
    assert active is not None
    _sql(
        t,
        "INSERT INTO policy_snapshots (digest, sources_json, schema, loaded_at) "
        "VALUES (?, ?, ?, ?)",
        "forged",
        json.dumps({"all.cedar": PERMIT_ALL}),
        active.schema,
        t.clock.now(),
    )
    t.policies.invalidate()
    receipt = _call(t, key, token, "fs.read", {"path": "/a"})
    assert receipt.decision.effect == "deny"
    assert "store.row_tampered" in [r.code for r in receipt.decision.reasons]


def test_an_edited_tool_catalogue_is_refused(t: Tether) -> None:
    """Store writer: rewrites the tool catalogue so a sink looks harmless and trusted."""
    t.catalogue.load(
        {"mail.send": ToolProfile(side_effect=SideEffect.EGRESS, sensitivity=Sensitivity.PUBLIC)}
    )
    key, _task_id, token = open_simple_task(t, tools=("mail.send",))
    forged = {"mail.send": {"side_effect": "read", "sensitivity": "public", "trusted": True}}
    _sql(t, "UPDATE meta SET value = ? WHERE key = 'catalogue'", json.dumps(forged))
    _sql(t, "UPDATE meta SET value = 'forged' WHERE key = 'catalogue.digest'")
    receipt = _call(t, key, token, "mail.send", {"to": "x@evil.test"})
    assert receipt.decision.effect == "deny"


def test_a_trusted_issuer_of_ones_own_is_refused(t: Tether) -> None:
    """Store writer: adds their own user-token issuer (their JWKS) for token exchange."""
    forged = {"https://evil.test": {"issuer": "https://evil.test", "audience": "x", "jwks": {}}}
    _sql(
        t,
        "INSERT INTO meta (key, value) VALUES ('user_issuers', ?)",
        json.dumps(forged),
    )
    with pytest.raises(RowTampered):
        t.user_issuers()


def test_a_store_made_before_rows_were_tagged_is_adopted_once(
    tmp_path: Path, clock: FrozenClock
) -> None:
    """An upgrade: a store whose rows (and receipts) carry no tags at all is tagged at
    its first open with the KEK; one that carries tags but lost the mark is not."""
    home = tmp_path / "home"
    t = Tether.init(home, "acme.example", clock=clock)
    t.register_identity(AGENT, kind="agent", owner=OWNER)
    _row, secret = t.credentials.create("admin", "ops@acme.example")
    t.close()
    # Rewind it to a store of the version before tags: no tag, no head, no mark.
    t = Tether.open(home, clock=clock)
    for table in ("row_tags", "audit_macs", "audit_heads"):
        _sql(t, f"DELETE FROM {table}")  # noqa: S608
    _sql(t, "DELETE FROM meta WHERE key = 'rows_tagged'")
    t.close()
    t = Tether.open(home, clock=clock)
    try:
        assert t.credentials.verify(secret).role == "admin"
        assert t.identities.lookup(AGENT) is not None
        # Now the writer strips the mark and a row's tag, hoping for a second adoption.
        _sql(t, "DELETE FROM meta WHERE key = 'rows_tagged'")
        _sql(t, "DELETE FROM row_tags WHERE kind = 'identity'")
    finally:
        t.close()
    t = Tether.open(home, clock=clock)
    try:
        assert t.identities.lookup(AGENT) is None  # not adopted again
    finally:
        t.close()


def test_rows_put_back_to_an_earlier_authentic_state_fail_audit_verify(t: Tether) -> None:
    """Store writer: saves a task's and an identity's rows and tags while they are live,
    and after the kill and the offboarding puts them back as they were (each tag still
    checks). The log's ending receipts contradict them: ``audit verify`` names the
    first."""
    _key, task_id, _token = open_simple_task(t)
    saved_tags = t.store.execute_fetch("SELECT kind, key, tag FROM row_tags")
    t.disable_identity(AGENT)
    assert t.verify_audit().ok
    _sql(
        t,
        "UPDATE tasks SET status = 'open', ended_at = NULL, end_reason = NULL WHERE task_id = ?",
        task_id,
    )
    _sql(
        t, "UPDATE identities SET status = 'active', disabled_at = NULL WHERE spiffe_id = ?", AGENT
    )
    for kind, key, tag in saved_tags:
        _sql(t, "UPDATE row_tags SET tag = ? WHERE kind = ? AND key = ?", tag, kind, key)
    assert t.identities.lookup(AGENT) is not None  # the tag alone cannot tell
    report = t.verify_audit()
    assert not report.ok
    ended = [r for r in t.audit.tail(20) if r["kind"] == "task.revoked"]
    assert report.first_bad == ended[0]["seq"]
    assert "open again" in (report.problem or "")


def test_a_widened_template_opens_nothing(t: Tether) -> None:
    """Store writer: adds a tool to an intent template, so every task opened with it
    could call that tool."""
    t.add_template(
        {"name": "reader", "intent": {"purpose": "read", "capabilities": [{"tool": "fs.read"}]}}
    )
    opened = t.open_task(AGENT, proof_jwk=ProofKey().jwk, template="reader")
    assert opened.task_id
    body = json.loads(t.store.get_template("reader") or "{}")
    body["intent"]["capabilities"].append({"tool": "shell.exec"})
    _sql(t, "UPDATE templates SET body = ? WHERE name = 'reader'", json.dumps(body))
    with pytest.raises(RowTampered):
        t.open_task(AGENT, proof_jwk=ProofKey().jwk, template="reader")
    refused = [r for r in t.audit.tail(5) if r["kind"] == "task.open"][-1]
    assert refused["effect"] == "deny"
    assert refused["reasons"][0]["code"] == "store.row_tampered"
