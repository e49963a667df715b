"""Replay: a candidate policy set judged on the calls already recorded.

It judges with the code shadow mode judges with (``shadow_of``), so on the same traffic
it reports what shadow mode reports; what it cannot rebuild faithfully it says so.
"""

from __future__ import annotations

from typing import Any

from tether import Effect, ProofKey, Tether
from tether.policy._replay import carried, recorded_cedar

from .conftest import open_simple_task
from .test_policy_shadow import CANDIDATE, LIVE, TOOLS


def _call(t: Tether, key: ProofKey, token: str, tool: str, **args: Any) -> Any:
    proof = key.prove(token, tool, dict(args), now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=dict(args))


def test_replay_reports_what_shadow_mode_recorded(tether: Tether) -> None:
    """The same calls judged twice, once as they happen (shadow mode) and once from the
    receipts (replay): the same calls change, the same way; a candidate the live set
    itself changes nothing."""
    tether.policies.load({"live.cedar": LIVE})
    tether.policies.load({"candidate.cedar": CANDIDATE}, shadow=True)
    key, _task, token = open_simple_task(tether, tools=TOOLS, max_calls=10)
    effects = [
        _call(tether, key, token, tool).effect
        for tool in ("kb.read", "kb.read", "mail.send", "audit.log", "kb.read")
    ]
    assert effects == [Effect.ALLOW, Effect.ALLOW, Effect.ALLOW, Effect.DENY, Effect.ALLOW]

    shadow = tether.policies.shadow_report(limit=50)
    replayed = tether.policies.replay({"candidate.cedar": CANDIDATE}, by="ops@acme.example")
    assert (
        replayed.changes
        == shadow.changes
        == {
            "allow→approval_required": 1,
            "allow→deny": 1,
            "deny→allow": 1,
        }
    )
    assert sorted(c["seq"] for c in replayed.changed) == sorted(c["seq"] for c in shadow.changed)
    by_tool = {c["tool"]: c for c in replayed.changed}
    assert by_tool["mail.send"]["new_reasons"] == ["policy.forbid"]
    assert by_tool["mail.send"]["policies"] == ["no-mail-after-reading"]
    assert by_tool["audit.log"]["old_reasons"] == ["policy.no_permit"]
    assert by_tool["audit.log"]["complete"] is False  # the later checks never ran
    assert replayed.unreplayable_count == 0 and replayed.replayed == 5

    unchanged = tether.policies.replay({"live.cedar": LIVE})
    assert unchanged.changes == {} and unchanged.replayed == 5
    assert tether.audit.tail(1)[0]["kind"] == "policy.replay"


def test_a_call_the_live_set_no_longer_decides_as_recorded_is_not_replayable(
    tether: Tether,
) -> None:
    """A receipt keeps no arguments and no flow state: when the live set does not decide
    the rebuilt call as the receipt says, replay lists it with why, never a guess."""
    tether.policies.load({"live.cedar": LIVE})
    key, _task, token = open_simple_task(tether, tools=TOOLS, max_calls=10)
    assert _call(tether, key, token, "mail.send").effect is Effect.ALLOW
    assert _call(tether, key, token, "shell.exec").effect is Effect.DENY  # not in the intent
    stricter = LIVE + '@id("no-mail") forbid (principal, action, resource == Tool::"mail.send");'
    tether.policies.load({"live.cedar": stricter})
    report = tether.policies.replay({"candidate.cedar": LIVE})
    assert report.unreplayable_count == 1 and report.changes == {}
    assert "live policy set" in report.unreplayable[0]["why"]
    assert report.before_policy == 1  # refused by the intent: no policy set changes that
    window = tether.policies.replay({"candidate.cedar": LIVE}, since=tether.clock.now() + 1)
    assert window.scanned == 0


def test_effects_are_carried_through_the_checks_after_the_policy_step() -> None:
    """A deny outranks a hold; flow rules that held a call still hold it; a call the
    live set denied never ran the later checks."""
    allow, deny, hold = "allow", "deny", "approval_required"
    assert carried(allow, ["allow"], allow, deny) == (deny, True)
    assert carried(allow, ["allow"], allow, hold) == (hold, True)
    assert carried(deny, ["budget.calls_exhausted"], allow, hold) == (deny, True)
    assert carried(deny, ["policy.forbid"], deny, allow) == (allow, False)
    assert carried(hold, ["policy.approval"], hold, allow) == (allow, True)
    assert carried(hold, ["policy.approval", "flow.untrusted_sink"], hold, allow) == (hold, True)
    assert carried(deny, ["approval.pending_limit"], hold, allow) == (allow, True)
    assert recorded_cedar(deny, ["intent.no_capability"], []) is None
    assert recorded_cedar(deny, ["secret.egress"], []) == {allow, hold}
    assert recorded_cedar(hold, ["flow.untrusted_sink"], ["p"]) == {allow}
