"""The real ``tether`` CLI, driven as a user would: one process per verb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server_support import CLI, Server

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "demo"
AGENT = "spiffe://acme.example/agent/bill-payer"
PAYEE = "DE50526018159083016613"


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CLI]:
    server = Server(tmp_path / "home").start()
    c = CLI(tmp_path / "home", server)
    c.json(
        "identity",
        "register",
        AGENT,
        "--kind",
        "agent",
        "--owner",
        "alice@acme.example",
        "--description",
        "Pays bills",
    )
    c.json("template", "add", str(EXAMPLES / "templates" / "pay-bill.toml"))
    c.json("policy", "load", str(EXAMPLES / "policies"))
    # What the bank's tools do, for every door (an undescribed tool is refused).
    described = c.json(
        "catalogue", "load", str(EXAMPLES / "bank.catalogue.toml"), "--prefix", "bank"
    )
    assert "bank.send_money" in described["tools"]
    try:
        yield c
    finally:
        server.stop()


def test_full_path_with_a_template(cli: CLI) -> None:
    opened = cli.json(
        "task",
        "open",
        "--agent",
        AGENT,
        "--template",
        "pay-bill",
        "--param",
        f"payee={PAYEE}",
        "--param",
        "max_amount=1500",
    )
    assert set(opened) == {"task_id", "token", "expires_at"}
    task = opened["task_id"]
    key_file = cli.home / "tasks" / f"{task}.json"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    allow = cli.json("authorize", "--task", task, "--tool", "bank.read_bills", "--args", "{}")
    assert allow["effect"] == "allow" and allow["policies"] == ["read-bank-data"]
    assert allow["receipt"]["seq"] > 0 and len(allow["receipt"]["hash"]) == 64

    deny = cli.json("authorize", "--task", task, "--tool", "shell.exec", "--args", '{"cmd": "id"}')
    assert deny["effect"] == "deny"
    assert deny["reasons"][0]["code"] == "intent.no_capability"

    held = cli.json(
        "authorize",
        "--task",
        task,
        "--tool",
        "bank.send_money",
        "--args",
        json.dumps({"recipient": PAYEE, "amount": 1200}),
    )
    assert held["effect"] == "approval_required"
    assert "large-payments-need-a-human" in held["policies"]
    denied = cli.json("approval", "deny", held["approval_id"], "--comment", "not this month")
    assert denied["status"] == "denied"
    decided = cli.json("audit", "tail", "-n", "1")["records"][-1]
    assert decided["kind"] == "approval.decide"
    assert decided["detail"]["comment"] == "not this month"
    assert decided["chain"][0] == "root@acme.example"  # the credential's owner

    shown = cli.json("task", "show", task)
    assert shown["status"] == "open" and shown["calls_used"] == 1

    ended = cli.json("task", "end", task)
    assert ended["status"] == "ended"
    after = cli.json("authorize", "--task", task, "--tool", "bank.read_bills", "--args", "{}")
    assert after["effect"] == "deny" and after["reasons"][0]["code"] == "task.ended"

    verify = cli.json("audit", "verify")
    assert verify["ok"] is True and verify["records"] >= 9
    tail = cli.json("audit", "tail", "-n", "3")
    assert [r["kind"] for r in tail["records"]][-1] == "decision"


def test_inline_intent(cli: CLI, tmp_path: Path) -> None:
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "adhoc.cedar").write_text(
        'permit (principal, action == Action::"open_task", resource == Template::"adhoc");\n'
        'permit (principal, action == Action::"call_tool", resource);\n'
    )
    cli.json("policy", "load", str(tmp_path / "pol"))
    # The ticket tool reads internal records; what a ticket says is nobody's word.
    (tmp_path / "tickets.catalogue.toml").write_text(
        '[tools.read]\nside_effect = "read"\nsensitivity = "internal"\ntrusted = false\n'
    )
    cli.json("catalogue", "load", str(tmp_path / "tickets.catalogue.toml"), "--prefix", "tickets")
    intent = {
        "purpose": "Summarise the ticket",
        "capabilities": [{"tool": "tickets.read", "args": {"id": {"pattern": "^T-[0-9]+$"}}}],
        "budget": {"max_calls": 2},
        "ttl_seconds": 120,
    }
    opened = cli.json("task", "open", "--agent", AGENT, "--intent", json.dumps(intent))
    task = opened["task_id"]
    good = cli.json(
        "authorize", "--task", task, "--tool", "tickets.read", "--args", '{"id": "T-42"}'
    )
    bad = cli.json(
        "authorize",
        "--task",
        task,
        "--tool",
        "tickets.read",
        "--args",
        '{"id": "T-42; DROP TABLE"}',
    )
    assert good["effect"] == "allow"
    assert bad["effect"] == "deny" and bad["reasons"][0]["code"] == "intent.argument"


def test_lists_and_shows(cli: CLI) -> None:
    assert cli.json("identity", "list")["identities"][0]["spiffe_id"] == AGENT
    assert cli.json("identity", "show", AGENT)["owner"] == "alice@acme.example"
    assert cli.json("template", "list")["templates"][0]["name"] == "pay-bill"
    policies = cli.json("policy", "list")["policies"]
    assert {p["id"] for p in policies} >= {"read-bank-data", "large-payments-need-a-human"}
    bundle = cli.json("bundle")
    assert {k["use"] for k in bundle["keys"]} == {"jwt-svid", "x509-svid"}
    jwks = cli.json("bundle", "--format", "jwks")
    assert all(k["alg"] == "ES256" for k in jwks["keys"])


def test_attest_and_disable(cli: CLI, tmp_path: Path) -> None:
    join = cli.json("identity", "join-token", AGENT, "--ttl", "60")["join_token"]
    out = tmp_path / "svid"
    attested = cli.json("attest", "--join-token", join, "--out", str(out))
    assert attested["spiffe_id"] == AGENT
    assert oct((out / "svid.key").stat().st_mode & 0o777) == "0o600"
    replay = cli.run("attest", "--join-token", join, "--out", str(out), ok=False)
    assert replay.returncode == 1 and "join token" in replay.stderr
    task = cli.json(
        "task", "open", "--agent", AGENT, "--template", "pay-bill", "--param", f"payee={PAYEE}"
    )["task_id"]
    disabled = cli.json("identity", "disable", AGENT)
    assert disabled["status"] == "disabled" and disabled["revoked_tasks"] == [task]
    after = cli.json("authorize", "--task", task, "--tool", "bank.read_bills", "--args", "{}")
    assert after["reasons"][0]["code"] == "identity.disabled"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("identity", "show", "spiffe://acme.example/agent/nobody"), 2, "not registered"),
        (
            ("identity", "register", "spiffe://ACME/x", "--kind", "agent", "--owner", "a@b.c"),
            1,
            "trust domain",
        ),
        (("task", "open", "--agent", AGENT, "--intent", "{not json"), 2, "not valid JSON"),
        (("task", "open", "--agent", AGENT, "--template", "nope"), 2, "not defined"),
        (("authorize", "--task", "task_x", "--tool", "a", "--args", "[1]"), 2, "JSON object"),
        (("policy", "load", "/nonexistent"), 2, "not a directory"),
        (("frobnicate",), 2, "No such command"),
    ],
)
def test_errors_are_one_line_without_traceback(
    cli: CLI, args: tuple[str, ...], code: int, needle: str
) -> None:
    result = cli.run(*args, ok=False)
    assert result.returncode == code
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_home_option_and_uninitialised_home(tmp_path: Path, store_backend: str) -> None:
    c = CLI(tmp_path / "elsewhere")
    result = c.run(
        "--break-glass", "identity", "list", "--home", str(tmp_path / "missing"), ok=False
    )
    assert result.returncode == 2 and "tether init" in result.stderr
    c.json("init", "--trust-domain", "example.org", "--home", str(tmp_path / "h2"))
    assert (tmp_path / "h2" / "kek.key").exists()
    # On PostgreSQL the home holds the KEK only; the state is in the database.
    assert (tmp_path / "h2" / "tether.db").exists() is (store_backend == "sqlite")
    # A bootstrap job run again: refused, unless --exists-ok (then nothing changes).
    again = ("init", "--trust-domain", "example.org", "--home", str(tmp_path / "h2"))
    assert c.run(*again, ok=False).returncode == 2
    assert c.json(*again, "--exists-ok")["created"] is False


def test_authorize_without_held_key_is_refused_with_what_is_missing(cli: CLI) -> None:
    result = cli.run(
        "authorize", "--task", "task_unknown", "--tool", "bank.read_bills", "--args", "{}",
        ok=False,
    )  # fmt: skip
    assert result.returncode == 2 and "no task token held for task_unknown" in result.stderr


def test_demo_runs_and_shows_the_whole_path() -> None:
    result = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        [sys.executable, "-m", "tether.demo", "--once", "--examples", str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for needle in (
        "allow",
        "intent.no_capability",
        "approval_required",
        "task.ended",
        "identity.disabled",
        "audit chain verified",
        "validates it",
    ):
        assert needle in out, needle


def test_key_rotation_and_checkpoint(cli: CLI) -> None:
    """Keys and checkpoints are the store's own (no endpoint): break-glass only; the
    bundles come from the server."""
    refused = cli.run("keys", "rotate", ok=False)
    assert refused.returncode == 2 and "--break-glass" in refused.stderr
    before = {k["kid"] for k in cli.json("bundle", "--format", "jwks")["keys"]}
    rotated = cli.json("--break-glass", "keys", "rotate")
    after = {k["kid"] for k in cli.json("bundle", "--format", "jwks")["keys"]}
    assert after == before | {rotated["kid"]}
    ca = cli.json("--break-glass", "keys", "rotate", "--use", "x509-ca")
    assert ca["use"] == "x509-ca"
    x509_entries = [k for k in cli.json("bundle")["keys"] if k["use"] == "x509-svid"]
    assert len(x509_entries) == 2
    checkpoint = cli.json("--break-glass", "audit", "checkpoint")
    assert checkpoint["seq"] > 0
    assert cli.json("audit", "verify")["checkpoints"] >= 1


def test_rough_edges_of_the_cli(cli: CLI) -> None:
    """--version; task open --resource (a CLI-opened task the gateway accepts);
    --fail-on-deny exit codes; the approval id in the human output and whole in
    `approval list` at 80 columns."""
    import jwt

    version = cli.run("--version")
    assert version.stdout.strip().startswith("tether ") and version.returncode == 0
    gateway = "http://127.0.0.1:8766/mcp"
    opened = cli.json(
        "task", "open", "--agent", AGENT, "--template", "pay-bill",
        "--param", f"payee={PAYEE}", "--param", "max_amount=1500", "--resource", gateway,
    )  # fmt: skip
    claims = jwt.decode(opened["token"], options={"verify_signature": False})
    assert claims["aud"] == ["acme.example", gateway]
    task = opened["task_id"]

    allowed = cli.run("authorize", "--task", task, "--tool", "bank.read_bills", "--fail-on-deny")
    assert allowed.returncode == 0 and "receipt #" in allowed.stdout
    denied = cli.run(
        "authorize", "--task", task, "--tool", "shell.exec", "--args", "{}", "--fail-on-deny",
        ok=False,
    )  # fmt: skip
    assert denied.returncode == 1 and "deny" in denied.stdout
    args = json.dumps({"recipient": PAYEE, "amount": 1200})
    held = cli.run(
        "authorize", "--task", task, "--tool", "bank.send_money", "--args", args,
        "--fail-on-deny", ok=False,
    )  # fmt: skip
    assert held.returncode == 3
    approval = held.stdout.split("(approval ")[1].split(")")[0]
    assert approval.startswith("apr_") and len(approval) == 36
    listed = subprocess.run(
        [sys.executable, "-m", "tether", "approval", "list"],
        env={**cli.env, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert approval in listed.stdout  # whole, on one line
    assert cli.run("authorize", "--task", task, "--tool", "shell.exec").returncode == 0
