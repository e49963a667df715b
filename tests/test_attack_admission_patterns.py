"""Capability patterns against the admission policy.

Attacker: a compromised agent opening a task with an explicit intent. The admission
policy admits any ad-hoc task ``unless { context.tools.contains("shell.exec") }``;
``context.tools`` held the capabilities as written, so ``shell.exe[c]``, ``shell.*``
or ``*`` admitted a task that may call ``shell.exec``. Now ``context.tools`` holds
what the capabilities cover, and patterns the caller wrote need a policy that
permits them (``open_task_with_patterns``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tether import AdmissionRejected, Effect, ProofKey, Tether, parse_intent

from .conftest import AGENT, quiet

ADMISSION = """
permit (principal, action == Action::"open_task", resource == Template::"adhoc")
unless { context.tools.contains("shell.exec") };
permit (principal, action == Action::"call_tool", resource);
"""
PATTERNS_PERMITTED = """
permit (principal, action == Action::"open_task_with_patterns", resource == Template::"adhoc");
"""


@pytest.fixture
def t() -> Any:
    tether = Tether.ephemeral("acme.example")
    tether.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    tether.policies.load({"admission.cedar": ADMISSION})
    quiet(tether)
    yield tether
    tether.close()


def _open(t: Tether, *tools: str) -> Any:
    intent = parse_intent({"purpose": "p", "capabilities": [{"tool": tool} for tool in tools]})
    return t.open_task(AGENT, proof_jwk=ProofKey().jwk, intent=intent)


def _last_open_receipt(t: Tether) -> dict[str, Any]:
    (record,) = [r for r in t.audit.tail(5) if r["kind"] == "task.open"][-1:]
    return record


@pytest.mark.parametrize("pattern", ["shell.exe[c]", "shell.*", "*", "shell.exe?", "s*.exec"])
def test_a_pattern_does_not_dodge_the_admission_policy(t: Tether, pattern: str) -> None:
    """Compromised agent: a pattern covering shell.exec is refused like the name; the
    refusal is a receipt."""
    with pytest.raises(AdmissionRejected):
        _open(t, "fs.read", pattern)
    record = _last_open_receipt(t)
    assert record["effect"] == "deny"
    assert record["reasons"][0]["code"] == "admission.denied"


@pytest.mark.parametrize("pattern", ["shell.exe[c]", "shell.*", "*"])
def test_even_where_patterns_are_permitted_the_policy_sees_what_they_cover(
    t: Tether, pattern: str
) -> None:
    """Compromised agent: with patterns permitted, ``context.tools`` still holds
    shell.exec (a name the policy writes), so the policy's ``unless`` holds."""
    t.policies.load({"admission.cedar": ADMISSION, "patterns.cedar": PATTERNS_PERMITTED})
    with pytest.raises(AdmissionRejected):
        _open(t, pattern)


def test_patterns_are_refused_unless_a_policy_permits_them(t: Tether) -> None:
    """Compromised agent: a pattern that covers nothing the policy forbids still needs
    ``open_task_with_patterns``; with it the task opens (control)."""
    with pytest.raises(AdmissionRejected, match="patterns"):
        _open(t, "fs.*")
    t.policies.load({"admission.cedar": ADMISSION, "patterns.cedar": PATTERNS_PERMITTED})
    task = _open(t, "fs.*")
    assert task.task_id


def test_names_still_open_and_catalogue_names_are_expanded(t: Tether) -> None:
    """Control: literal capabilities open as before; a catalogue tool a pattern covers
    is seen by the policy too."""
    assert _open(t, "fs.read", "fs.write").task_id
    with pytest.raises(AdmissionRejected):
        _open(t, "shell.exec")
    t.policies.load(
        {
            "admission.cedar": """
permit (principal, action == Action::"open_task", resource == Template::"adhoc")
unless { context.tools.contains("db.drop") };
permit (principal, action == Action::"open_task_with_patterns", resource);
"""
        }
    )
    from tether.core import Sensitivity, SideEffect, ToolProfile

    profile = ToolProfile(side_effect=SideEffect.WRITE, sensitivity=Sensitivity.INTERNAL)
    t.catalogue.load({"db.drop": profile, "db.read": profile}, origin="tests")
    with pytest.raises(AdmissionRejected):
        _open(t, "db.*")
    assert _open(t, "db.rea?").task_id


def test_a_template_authors_patterns_are_the_administrators(t: Tether) -> None:
    """Control: a pattern written in a template by an administrator needs no extra
    permission; one a template parameter supplies does."""
    t.policies.load(
        {"admission.cedar": 'permit (principal, action == Action::"open_task", resource);'}
    )
    t.add_template(
        {
            "name": "read-files",
            "params": {"tool": {"type": "string"}},
            "intent": {
                "purpose": "read",
                "capabilities": [{"tool": "fs.read_*"}, {"tool": "{tool}"}],
            },
        }
    )
    key = ProofKey()
    task = t.open_task(AGENT, proof_jwk=key.jwk, template="read-files", params={"tool": "fs.stat"})
    assert task.task_id
    with pytest.raises(AdmissionRejected, match="patterns"):
        t.open_task(AGENT, proof_jwk=key.jwk, template="read-files", params={"tool": "*"})


def test_calls_under_an_admitted_pattern_are_still_decided(t: Tether) -> None:
    """Control: a permitted pattern is a capability like any other at call time."""
    t.policies.load({"admission.cedar": ADMISSION, "patterns.cedar": PATTERNS_PERMITTED})
    key = ProofKey()
    intent = parse_intent({"purpose": "p", "capabilities": [{"tool": "fs.*"}]})
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    proof = key.prove(task.token, "fs.read", {}, now=t.clock.now())
    receipt = t.authorize(token=task.token, proof=proof, tool="fs.read", args={})
    assert receipt.effect is Effect.ALLOW
