"""Shadow mode: a candidate policy set evaluated on real traffic, recorded, never enforced.

The operator loads a candidate set beside the live one; every call is decided by the
live set alone, and its receipt records what the candidate would have made of the same
Cedar request. ``shadow_report`` (``tether policy shadow``, ``GET
/v1/policies/shadow``) reads those receipts back: every call whose effect would change.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tether import Effect, ProofKey, Tether
from tether._errors import InvalidPolicy

from .conftest import AGENT, open_simple_task
from .server_support import CLI, Server
from .test_cli import EXAMPLES

ADMIT = """
@id("admit") permit (principal, action == Action::"open_task", resource);
"""
LIVE = (
    ADMIT
    + """
@id("read") permit (principal, action == Action::"call_tool", resource == Tool::"kb.read");
@id("mail") permit (principal, action == Action::"call_tool", resource == Tool::"mail.send");
"""
)
CANDIDATE = (
    ADMIT
    + """
@id("read") permit (principal, action == Action::"call_tool", resource == Tool::"kb.read");
@id("mail") permit (principal, action == Action::"call_tool", resource == Tool::"mail.send");
@id("audit") permit (principal, action == Action::"call_tool", resource == Tool::"audit.log");
@id("no-mail-after-reading") forbid (principal, action == Action::"call_tool",
  resource == Tool::"mail.send") when { context.calls_used >= 2 };
@id("read-is-held") @approval("required") forbid (principal, action == Action::"call_tool",
  resource == Tool::"kb.read") when { context.calls_used >= 3 };
"""
)
TOOLS = ("kb.read", "mail.send", "audit.log")


def _call(t: Tether, key: ProofKey, token: str, tool: str, **args: Any) -> Any:
    proof = key.prove(token, tool, dict(args), now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=dict(args))


def _shadow_of(t: Tether, seq: int) -> dict[str, Any] | None:
    row = t.store.get_record(seq)
    assert row is not None
    shadow: dict[str, Any] | None = (json.loads(row.body).get("detail") or {}).get("shadow")
    return shadow


def test_the_shadow_set_is_recorded_never_enforced(tether: Tether) -> None:
    """The live set decides; the candidate's effect is on every receipt, and the report
    lists exactly the calls it would change, with the transition."""
    tether.policies.load({"live.cedar": LIVE})
    candidate = tether.policies.load({"candidate.cedar": CANDIDATE}, shadow=True)
    assert tether.policies.snapshot().digest != candidate.digest  # the live set is live
    key, _task, token = open_simple_task(tether, tools=TOOLS, max_calls=10)

    steps = [
        ("kb.read", "allow", "allow"),
        ("mail.send", "allow", "allow"),  # calls_used 1
        ("kb.read", "allow", "allow"),  # calls_used 2
        ("mail.send", "allow", "deny"),  # calls_used 3: would deny
        ("kb.read", "allow", "approval_required"),  # calls_used 4: would hold
        ("audit.log", "deny", "allow"),  # the live set permits nothing: would allow
    ]
    seqs = []
    for tool, live, would in steps:
        receipt = _call(tether, key, token, tool)
        assert str(receipt.decision.effect) == live, (tool, receipt.decision.reasons)
        shadow = _shadow_of(tether, receipt.seq)
        assert shadow is not None and shadow["digest"] == candidate.digest
        assert (shadow["live"], shadow["effect"]) == (live, would), (tool, shadow)
        seqs.append(receipt.seq)

    report = tether.policies.shadow_report().to_dict()
    assert report["digest"] == candidate.digest and report["evaluated"] == len(steps)
    assert report["changes"] == {
        "allow→approval_required": 1,
        "allow→deny": 1,
        "deny→allow": 1,
    }
    listed = {(c["seq"], c["tool"], c["live"], c["shadow"]) for c in report["changed"]}
    assert listed == {
        (seqs[3], "mail.send", "allow", "deny"),
        (seqs[4], "kb.read", "allow", "approval_required"),
        (seqs[5], "audit.log", "deny", "allow"),
    }
    assert next(c for c in report["changed"] if c["seq"] == seqs[3])["policies"] == [
        "no-mail-after-reading"
    ]

    # Off: nothing more is recorded, and a receipt says when it ended.
    assert tether.policies.clear_shadow() == candidate.digest
    after = _call(tether, key, token, "kb.read")
    assert after.decision.effect is Effect.ALLOW and _shadow_of(tether, after.seq) is None
    assert tether.policies.clear_shadow() is None
    kinds = [json.loads(r.body)["kind"] for r in tether.store.records_page(limit=500)]
    assert kinds.count("policy.shadow") == 2


def test_an_invalid_shadow_set_is_refused_with_a_receipt(tether: Tether) -> None:
    tether.policies.load({"live.cedar": LIVE})
    with pytest.raises(InvalidPolicy):
        tether.policies.load({"bad.cedar": "permit (principal, action, resource"}, shadow=True)
    assert tether.policies.shadow() is None and tether.policies.shadow_digest() is None
    [last] = tether.store.records_page(limit=1)
    body = json.loads(last.body)
    assert body["kind"] == "policy.shadow" and body["effect"] == "deny"


def test_refusals_before_cedar_carry_no_shadow(tether: Tether) -> None:
    """A call refused before the policy step (outside the intent) was never put to
    either set: its receipt says nothing of the candidate."""
    tether.policies.load({"live.cedar": LIVE})
    tether.policies.load({"candidate.cedar": CANDIDATE}, shadow=True)
    key, _task, token = open_simple_task(tether, tools=("kb.read",))
    refused = _call(tether, key, token, "mail.send")
    assert refused.decision.reasons[0].code == "intent.no_capability"
    assert _shadow_of(tether, refused.seq) is None


def test_shadow_mode_from_the_cli(tmp_path: Any) -> None:
    """The operator's commands, through the server: load --shadow, report, --off."""
    server = Server(tmp_path / "home").start()
    try:
        _shadow_mode_from_the_cli(tmp_path, CLI(tmp_path / "home", server))
    finally:
        server.stop()


def _shadow_mode_from_the_cli(tmp_path: Any, cli: CLI) -> None:
    cli.json("identity", "register", AGENT, "--kind", "agent", "--owner", "alice@acme.example")
    cli.json("template", "add", str(EXAMPLES / "templates" / "pay-bill.toml"))
    cli.json("policy", "load", str(EXAMPLES / "policies"))
    cli.json("catalogue", "load", str(EXAMPLES / "bank.catalogue.toml"), "--prefix", "bank")
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    for path in (EXAMPLES / "policies").glob("*.cedar"):
        (candidate / path.name).write_text(path.read_text())
    (candidate / "stricter.cedar").write_text(
        '@id("no-payments-at-all")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.send_money");'
    )
    loaded = cli.json("policy", "load", str(candidate), "--shadow")
    assert loaded["shadow"] is True
    opened = cli.json(
        "task", "open", "--agent", AGENT, "--template", "pay-bill",
        "--param", "payee=DE00123456780000000000", "--param", "max_amount=500",
    )  # fmt: skip
    task = opened["task_id"]
    paid = cli.json(
        "authorize", "--task", task, "--tool", "bank.send_money",
        "--args", '{"recipient": "DE00123456780000000000", "amount": 20}',
    )  # fmt: skip
    assert paid["effect"] == "allow"  # the live set decides
    report = cli.json("policy", "shadow")
    assert report["digest"] == loaded["digest"] and report["evaluated"] == 1
    [changed] = report["changed"]
    assert (changed["tool"], changed["live"], changed["shadow"]) == (
        "bank.send_money",
        "allow",
        "deny",
    )
    assert changed["policies"] == ["no-payments-at-all"]
    assert cli.json("policy", "shadow", "--off")["removed"] == loaded["digest"]
    assert cli.json("policy", "shadow")["digest"] is None
