"""Cedar policies: validated at load, refused with file and line, indexed, fail closed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cedarpy
import pytest

from tether import Effect, InvalidPolicy, Tether
from tether.core import build_snapshot
from tether.policy import default_schema

from .conftest import AGENT, open_simple_task

ADMIT = 'permit (principal, action == Action::"open_task", resource);\n'


def test_invalid_policy_is_refused_with_file_and_line(tmp_path: Path, permissive: Tether) -> None:
    live = permissive.policies.snapshot().digest
    (tmp_path / "good.cedar").write_text(ADMIT)
    (tmp_path / "bad.cedar").write_text(
        "// header\n\npermit (principal, action, resource);\n\n"
        'permit (principal, action = Action::"call_tool", resource);\n'
    )
    with pytest.raises(InvalidPolicy, match=r"bad\.cedar:5"):
        permissive.load_policies(tmp_path)
    assert permissive.policies.snapshot().digest == live
    last = permissive.audit.tail(1)[0]
    assert last["kind"] == "policy.load" and last["effect"] == "deny"


def test_policy_that_fails_schema_validation_is_refused(tmp_path: Path, permissive: Tether) -> None:
    (tmp_path / "typo.cedar").write_text(
        ADMIT + '\n@id("typo")\npermit (principal, action == Action::"call_tool", resource)\n'
        "  when { context.nonexistent == 1 };\n"
    )
    with pytest.raises(InvalidPolicy, match=r"typo\.cedar:3: .*nonexistent"):
        permissive.load_policies(tmp_path)


def test_duplicate_policy_ids_are_refused() -> None:
    with pytest.raises(InvalidPolicy, match="also defined"):
        build_snapshot(
            {
                "a.cedar": '@id("x")\npermit (principal, action, resource);',
                "b.cedar": '@id("x")\nforbid (principal, action, resource);',
            },
            default_schema(),
        )


def test_approval_annotation_only_on_forbid() -> None:
    with pytest.raises(InvalidPolicy, match="forbid only"):
        build_snapshot(
            {"a.cedar": '@approval("required")\npermit (principal, action, resource);'},
            default_schema(),
        )


def test_no_policy_means_deny(tether: Tether) -> None:
    tether.policies.load({"admit.cedar": ADMIT})
    key, _, token = open_simple_task(tether)
    receipt = tether.authorize(
        token=token,
        proof=key.prove(token, "fs.read", {}, now=tether.clock.now()),
        tool="fs.read",
        args={},
    )
    assert receipt.effect is Effect.DENY
    assert receipt.decision.reasons[0].code == "policy.no_permit"


def test_forbid_names_the_policy(tether: Tether) -> None:
    tether.policies.load(
        {
            "p.cedar": ADMIT + '@id("allow-read")\npermit (principal, action == '
            'Action::"call_tool", resource == Tool::"fs.read");\n'
            '@id("no-etc")\nforbid (principal, action == Action::"call_tool", resource) when '
            '{ context.args has path && context.args.path like "/etc/*" };'
        }
    )
    key, _, token = open_simple_task(tether)
    ok = {"path": "/home/a"}
    bad = {"path": "/etc/shadow"}
    now = tether.clock.now()
    assert tether.authorize(
        token=token, proof=key.prove(token, "fs.read", ok, now=now), tool="fs.read", args=ok
    ).decision.policies == ("allow-read",)
    denied = tether.authorize(
        token=token, proof=key.prove(token, "fs.read", bad, now=now), tool="fs.read", args=bad
    )
    assert denied.effect is Effect.DENY
    assert denied.decision.reasons[0].code == "policy.forbid"
    assert denied.decision.policies == ("no-etc",)


def test_policy_evaluation_error_denies(tether: Tether) -> None:
    # amount is declared Long; a string amount makes `>` error: Cedar would skip the forbid,
    # Tether denies instead.
    tether.policies.load(
        {
            "p.cedar": ADMIT + "permit (principal, action, resource);\n"
            '@id("cap")\nforbid (principal, action == Action::"call_tool", resource) when '
            "{ context.args has amount && context.args.amount > 100 };"
        }
    )
    key, _, token = open_simple_task(tether)
    args = {"amount": "lots"}
    receipt = tether.authorize(
        token=token,
        proof=key.prove(token, "fs.read", args, now=tether.clock.now()),
        tool="fs.read",
        args=args,
    )
    assert receipt.effect is Effect.DENY
    assert receipt.decision.reasons[0].code == "policy.error"


def test_policy_change_in_another_process_is_picked_up(tmp_path: Path) -> None:
    a = Tether.init(tmp_path / "h", "acme.example")
    b = Tether.open(tmp_path / "h")
    assert b.policies.snapshot().policies == ()
    a.policies.load({"p.cedar": ADMIT})
    assert len(b.policies.snapshot().policies) == 1


def _random_policies(rng: random.Random, n: int) -> str:
    parts = []
    for i in range(n):
        effect = rng.choice(["permit", "permit", "forbid"])
        tool = f"t{rng.randrange(20)}"
        action = rng.choice(
            [
                'action == Action::"call_tool"',
                "action",
                'action in [Action::"call_tool", Action::"open_task"]',
            ]
        )
        resource = rng.choice([f'resource == Tool::"{tool}"', "resource", "resource is Tool"])
        cond = rng.choice(
            [
                "",
                " when { context.calls_used > 2 }",
                " unless { context.args has amount && context.args.amount < 50 }",
            ]
        )
        if "==" not in action:
            cond = ""
        parts.append(f'@id("r{i}")\n{effect} (principal, {action}, {resource}){cond};')
    return "\n".join(parts)


def test_index_agrees_with_plain_cedar_on_random_policy_sets() -> None:
    rng = random.Random(7)
    agent = {"type": "Agent", "id": AGENT}
    entities = [
        {
            "uid": agent,
            "attrs": {"owner": "o", "kind": "agent", "trust_domain": "acme.example"},
            "parents": [],
        }
    ]
    for _ in range(25):
        text = _random_policies(rng, rng.randrange(1, 40))
        snapshot = build_snapshot({"r.cedar": text}, default_schema())
        plain = cedarpy.PolicySet.from_str(text)
        for _ in range(10):
            tool = f"t{rng.randrange(22)}"
            context = {
                "task_id": "t",
                "template": "x",
                "purpose": "p",
                "data_ceiling": "internal",
                "on_behalf_of": "",
                "calls_used": rng.randrange(5),
                "max_calls": 9,
                "delegation_depth": 0,
                "args": {"amount": rng.randrange(100)},
            }
            resource = {"type": "Tool", "id": tool}
            ents = [*entities, {"uid": resource, "attrs": {}, "parents": []}]
            ours = snapshot.evaluate(agent, "call_tool", resource, context, ents)
            theirs = cedarpy.is_authorized(
                {
                    "principal": agent,
                    "action": {"type": "Action", "id": "call_tool"},
                    "resource": resource,
                    "context": context,
                },
                plain,
                ents,
            )
            assert ours.allowed == theirs.allowed, (text, tool, context)
            if not theirs.allowed:
                fired = {
                    json.loads(cedarpy.policies_to_json_str(text))["staticPolicies"][p][
                        "annotations"
                    ]["id"]
                    for p in theirs.diagnostics.reasons
                }
                assert set(ours.policies) == fired


def test_index_evaluates_only_applicable_policies() -> None:
    text = "\n".join(
        f'@id("p{i}")\npermit (principal, action == Action::"call_tool", '
        f'resource == Tool::"tool{i}");'
        for i in range(500)
    )
    snapshot = build_snapshot(
        {
            "many.cedar": text + '\n@id("open")\nforbid (principal, '
            'action == Action::"call_tool", resource) when { context.calls_used > 99 };'
        },
        default_schema(),
    )
    chosen = snapshot.applicable("call_tool", "Tool", "tool42")
    assert [p.id for p in chosen] == ["p42", "open"]


def test_context_pruning_never_allows_more() -> None:
    """Policies get only the context attributes they read; reading one that is left
    out would error, and an error denies."""
    agent = {"type": "Agent", "id": AGENT}
    ents = [
        {
            "uid": agent,
            "attrs": {"owner": "o", "kind": "agent", "trust_domain": "acme.example"},
            "parents": [],
        },
        {"uid": {"type": "Tool", "id": "t"}, "attrs": {}, "parents": []},
    ]
    context = {
        "task_id": "t",
        "template": "x",
        "purpose": "p",
        "data_ceiling": "internal",
        "on_behalf_of": "",
        "calls_used": 5,
        "max_calls": 9,
        "delegation_depth": 0,
        "args": {"amount": 10},
    }
    text = (
        'permit (principal, action == Action::"call_tool", resource);\n'
        '@id("cap")\nforbid (principal, action == Action::"call_tool", resource) '
        "when { context.calls_used > 3 };"
    )
    snapshot = build_snapshot({"p.cedar": text}, default_schema())
    _, _, used = snapshot._bucket("call_tool", "Tool", "t")
    assert used == frozenset({"calls_used"})
    outcome = snapshot.evaluate(agent, "call_tool", {"type": "Tool", "id": "t"}, context, ents)
    assert not outcome.allowed and outcome.policies == ("cap",)


def test_arguments_policies_cannot_see_faithfully_are_refused() -> None:
    from tether.core._decision import cedar_value

    assert cedar_value(12.5) == {"__extn": {"fn": "decimal", "arg": "12.5000"}}
    with pytest.raises(ValueError, match="precision"):
        cedar_value(100.00004)
    with pytest.raises(ValueError, match="__"):
        cedar_value({"__entity": {"type": "Agent", "id": "x"}})


def test_a_set_in_a_policy_scope_is_refused_with_a_hint(tether: Tether) -> None:
    """`resource in [..]` in a scope is a parser error Cedar names by its grammar only;
    the refusal says what to write instead."""
    with pytest.raises(InvalidPolicy) as caught:
        tether.policies.load(
            {"a.cedar": 'permit (principal, action, resource in [Tool::"a", Tool::"b"]);'}
        )
    assert "a.cedar:1" in str(caught.value)
    assert ".contains(resource)" in str(caught.value)
