"""The kill switch: scopes, confirmation, receipts, and a cascade through a task tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tether import Effect, ProofKey, Tether, parse_intent
from tether._errors import UsageError
from tether.cli import _app as cli

from .conftest import AGENT, OWNER

OTHER = "spiffe://acme.example/agent/other"
BOB_AGENT = "spiffe://acme.example/agent/bobs"


def _intent(max_calls: int = 5, ttl: int = 600) -> Any:
    return parse_intent(
        {
            "purpose": "work",
            "capabilities": [{"tool": "fs.read"}],
            "budget": {"max_calls": max_calls},
            "ttl_seconds": ttl,
        }
    )


def _call(t: Tether, key: ProofKey, token: str) -> Any:
    proof = key.prove(token, "fs.read", {}, now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool="fs.read", args={})


@pytest.fixture
def fleet(permissive: Tether) -> tuple[Tether, dict[str, tuple[ProofKey, str, str]]]:
    permissive.register_identity(OTHER, kind="agent", owner=OWNER)
    permissive.register_identity(BOB_AGENT, kind="agent", owner="bob@acme.example")
    permissive.add_template(
        {
            "name": "reader",
            "intent": {"purpose": "read", "capabilities": [{"tool": "fs.read"}]},
        }
    )
    tasks = {}
    for name, agent in (("bot", AGENT), ("other", OTHER), ("bob", BOB_AGENT)):
        key = ProofKey()
        opened = permissive.open_task(agent, proof_jwk=key.jwk, intent=_intent())
        tasks[name] = (key, opened.task_id, opened.token)
    key = ProofKey()
    opened = permissive.open_task(OTHER, proof_jwk=key.jwk, template="reader")
    tasks["templated"] = (key, opened.task_id, opened.token)
    return permissive, tasks


def _status(t: Tether, tasks: dict[str, tuple[ProofKey, str, str]]) -> dict[str, str]:
    return {name: t.tasks.get(task_id).status for name, (_, task_id, _) in tasks.items()}


def test_kill_needs_a_scope(fleet: tuple[Tether, dict[str, Any]]) -> None:
    t, _ = fleet
    with pytest.raises(UsageError):
        t.kill("incident")


def test_kill_by_owner_then_template_then_agent(fleet: tuple[Tether, dict[str, Any]]) -> None:
    t, tasks = fleet
    result = t.kill("bob's agent misbehaves", by="sec@acme.example", owner="bob@acme.example")
    assert result["tasks"] == [tasks["bob"][1]]
    assert _status(t, tasks) == {
        "bot": "open",
        "other": "open",
        "bob": "revoked",
        "templated": "open",
    }
    receipt = t.audit.tail(1)[0]
    assert receipt["kind"] == "kill_switch" and receipt["chain"] == ["sec@acme.example"]
    assert receipt["detail"]["owner"] == "bob@acme.example"
    assert receipt["detail"]["tasks"] == [tasks["bob"][1]]

    assert t.kill("template pulled", template="reader")["tasks"] == [tasks["templated"][1]]
    assert t.kill("agent pulled", agent=OTHER)["tasks"] == [tasks["other"][1]]
    assert _status(t, tasks)["bot"] == "open"
    # Effective on the next call: each killed token is refused, the survivor is not.
    for name in ("bob", "templated", "other"):
        key, _, token = tasks[name]
        receipt_ = _call(t, key, token)
        assert receipt_.effect is Effect.DENY
        assert receipt_.decision.reasons[0].code == "task.revoked"
    key, _, token = tasks["bot"]
    assert _call(t, key, token).effect is Effect.ALLOW
    # Durable: the revocations are in the store.
    for name in ("bob", "templated", "other"):
        row = t.tasks.get(tasks[name][1])
        assert t.store.token_revoked(row.token_id)


def test_kill_a_trust_domain_and_everything(fleet: tuple[Tether, dict[str, Any]]) -> None:
    t, tasks = fleet
    assert t.kill("elsewhere", trust_domain="other.example")["tasks"] == []
    killed = t.kill("all of acme", trust_domain="acme.example")["tasks"]
    assert sorted(killed) == sorted(task_id for _, task_id, _ in tasks.values())
    assert t.kill("again", everything=True)["tasks"] == []
    assert t.kill_switch("legacy verb")["tasks"] == []  # the old entry point still works


def test_kill_cascades_through_a_tree_of_100_tasks(permissive: Tether) -> None:
    """Root → 9 children → 10 grandchildren each: revoking the root refuses every
    descendant's next call."""
    t = permissive
    t.register_identity(OTHER, kind="agent", owner=OWNER)
    root_key = ProofKey()
    root = t.open_task(AGENT, proof_jwk=root_key.jwk, intent=_intent(max_calls=1000))
    members = [(root_key, root.task_id, root.token)]
    for _ in range(9):
        key = ProofKey()
        child = t.open_task(
            OTHER, proof_jwk=key.jwk, intent=_intent(max_calls=100), parent_task_id=root.task_id
        )
        members.append((key, child.task_id, child.token))
        for _ in range(10):
            gkey = ProofKey()
            grandchild = t.open_task(
                AGENT, proof_jwk=gkey.jwk, intent=_intent(max_calls=5), parent_task_id=child.task_id
            )
            members.append((gkey, grandchild.task_id, grandchild.token))
    assert len(members) == 100
    assert all(_call(t, key, token).effect is Effect.ALLOW for key, _, token in members)

    t.tasks.end(root.task_id, reason="root compromised", status="revoked")  # the root only
    for key, task_id, token in members:
        receipt = _call(t, key, token)
        assert receipt.effect is Effect.DENY, task_id
        assert receipt.decision.reasons[0].code in ("task.revoked", "token.revoked")
    assert all(t.tasks.get(task_id).status == "revoked" for _, task_id, _ in members)


def test_ending_the_root_cascades_to_every_descendant(permissive: Tether) -> None:
    t = permissive
    root_key = ProofKey()
    root = t.open_task(AGENT, proof_jwk=root_key.jwk, intent=_intent(max_calls=1000))
    members = []
    for _ in range(3):
        key = ProofKey()
        child = t.open_task(
            AGENT, proof_jwk=key.jwk, intent=_intent(max_calls=50), parent_task_id=root.task_id
        )
        gkey = ProofKey()
        grandchild = t.open_task(
            AGENT, proof_jwk=gkey.jwk, intent=_intent(), parent_task_id=child.task_id
        )
        members += [(key, child.token), (gkey, grandchild.token)]
    t.tasks.end(root.task_id, reason="revoked by operator", status="revoked")
    for key, token in members:
        assert _call(t, key, token).decision.reasons[0].code == "task.revoked"


# -- the CLI ---------------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    t = Tether.init(path, "acme.example")
    t.register_identity(AGENT, kind="agent", owner=OWNER)
    t.policies.load({"all.cedar": "permit (principal, action, resource);"})
    t.open_task(AGENT, proof_jwk=ProofKey().jwk, intent=_intent())
    t.close()
    return path


def _run(home: Path, *args: str, stdin: str | None = None) -> Any:
    # The operator at the store's host: break-glass (no server in these tests).
    return CliRunner().invoke(cli.app, ["--home", str(home), "--break-glass", *args], input=stdin)


def _open_count(home: Path) -> int:
    t = Tether.open(home)
    try:
        return len(t.store.list_tasks(status="open"))
    finally:
        t.close()


def test_cli_kill_refuses_unattended_without_yes(home: Path) -> None:
    result = _run(home, "kill", "--reason", "x", "--agent", AGENT)
    assert result.exit_code != 0
    assert isinstance(result.exception, UsageError)
    assert "--yes" in result.exception.message
    assert _open_count(home) == 1


def test_cli_kill_needs_a_scope(home: Path) -> None:
    result = _run(home, "kill", "--reason", "x", "--yes")
    assert isinstance(result.exception, UsageError)
    assert _open_count(home) == 1


def test_cli_kill_asks_when_interactive(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_interactive", lambda: True)
    declined = _run(home, "kill", "--reason", "x", "--owner", OWNER, stdin="n\n")
    assert declined.exit_code != 0
    assert _open_count(home) == 1
    accepted = _run(home, "kill", "--reason", "x", "--owner", OWNER, "--json", stdin="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert len(json.loads(accepted.output.strip().splitlines()[-1])["tasks"]) == 1
    assert _open_count(home) == 0


def test_cli_kill_with_yes_and_the_kill_switch_alias(home: Path) -> None:
    done = _run(home, "kill", "--reason", "x", "--all", "--yes", "--json")
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.output)["tasks"]) == 1
    refused = _run(home, "kill-switch", "--reason", "y")
    assert isinstance(refused.exception, UsageError)
    alias = _run(home, "kill-switch", "--reason", "y", "--yes", "--json")
    assert alias.exit_code == 0, alias.output
    assert json.loads(alias.output) == {"tasks": [], "leases": []}
    t = Tether.open(home)
    kills = [r for r in t.audit.tail(10) if r["kind"] == "kill_switch"]
    t.close()
    assert [k["detail"]["everything"] for k in kills] == [True, True]


def test_offboarding_racing_a_task_being_opened_revokes_it_too(permissive: Tether) -> None:
    """A task being opened (another node, another transaction) when its agent is
    offboarded: the offboarding waits for it and revokes it; no task stands open for a
    disabled agent. Then opening is refused."""
    import threading
    import time

    from .conftest import open_simple_task

    opened: dict[str, str] = {}
    holding = threading.Event()

    def open_slowly() -> None:
        with permissive.store.transaction():  # the opening commits late...
            opened["task_id"] = open_simple_task(permissive)[1]
            holding.set()
            time.sleep(0.5)  # ...and the offboarding arrives meanwhile

    opener = threading.Thread(target=open_slowly)
    opener.start()
    assert holding.wait(10)
    started = time.monotonic()
    _, revoked = permissive.disable_identity(AGENT)
    waited = time.monotonic() - started
    opener.join()
    assert waited >= 0.3  # it waited for the opening to commit...
    assert opened["task_id"] in revoked  # ...and revoked what it opened
    assert permissive.tasks.get(opened["task_id"]).status == "revoked"
    with pytest.raises(Exception, match="disabled"):
        open_simple_task(permissive)
    refused = permissive.audit.tail(1)[0]
    assert refused["kind"] == "task.open" and refused["effect"] == "deny"
