"""The CLI as a client of a running ``tether serve``: who may do what, who is named in
the receipt, break-glass, credentials from the environment or a 0600 file, replay."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .server_support import CLI, Server

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "demo"
AGENT = "spiffe://acme.example/agent/bill-payer"
PAYEE = "DE50526018159083016613"
ROOT_ADMIN = "root@acme.example"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, CLI]]:
    """A server over the demo's policies, templates and catalogue, and the root admin's
    CLI talking to it."""
    server = Server(tmp_path / "home").start()
    cli = CLI(tmp_path / "home", server)
    cli.json("identity", "register", AGENT, "--kind", "agent", "--owner", "alice@acme.example")
    cli.json("template", "add", str(EXAMPLES / "templates" / "pay-bill.toml"))
    cli.json("policy", "load", str(EXAMPLES / "policies"))
    cli.json("catalogue", "load", str(EXAMPLES / "bank.catalogue.toml"), "--prefix", "bank")
    try:
        yield server, cli
    finally:
        server.stop()


def _task(cli: CLI) -> str:
    opened = cli.json(
        "task", "open", "--agent", AGENT, "--template", "pay-bill",
        "--param", f"payee={PAYEE}", "--param", "max_amount=1500",
    )  # fmt: skip
    task: str = opened["task_id"]
    return task


def _traffic(cli: CLI) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The demo's calls: a read of the bills (allowed) and a payment (held for a human)."""
    task = _task(cli)
    read = cli.json("authorize", "--task", task, "--tool", "bank.read_bills")
    assert read["effect"] == "allow"
    args = json.dumps({"recipient": PAYEE, "amount": 1200})
    held = cli.json("authorize", "--task", task, "--tool", "bank.send_money", "--args", args)
    assert held["effect"] == "approval_required"
    return task, read, held


def _credential(cli: CLI, role: str, owner: str) -> str:
    issued = cli.json("admin", "create", "--role", role, "--owner", owner)
    assert issued["role"] == role and issued["owner"] == owner
    secret: str = issued["credential"]
    return secret


def _receipts(cli: CLI, kind: str) -> list[dict[str, Any]]:
    records = cli.json("audit", "tail", "-n", "200")["records"]
    return [r for r in records if r["kind"] == kind]


def test_a_lesser_credential_cannot_do_an_admins_work(served: tuple[Server, CLI]) -> None:
    """Plays an operator holding a narrower credential (an approver, an auditor) who
    tries the kill switch, a policy load, an offboarding and an approval through the
    CLI: the server refuses each (exit 1, the role named) and nothing changes."""
    _server, admin = served
    task, _read, held = _traffic(admin)
    approver = admin.as_(_credential(admin, "approver", "carol@acme.example"))
    auditor = admin.as_(_credential(admin, "auditor", "dave@acme.example"))

    for who, args in (
        (approver, ("kill", "--agent", AGENT, "--reason", "x", "--yes")),
        (approver, ("policy", "load", str(EXAMPLES / "policies"))),
        (approver, ("identity", "disable", AGENT)),
        (auditor, ("approval", "approve", held["approval_id"])),
        (auditor, ("admin", "list")),
    ):
        refused = who.run(*args, ok=False)
        assert refused.returncode == 1, (args, refused.stderr)
        assert re.search("may not do this|does not own", refused.stderr), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert admin.json("task", "show", task)["status"] == "open"
    assert admin.json("identity", "show", AGENT)["status"] == "active"
    pending = admin.json("approval", "list")["approvals"]
    assert [a["approval_id"] for a in pending] == [held["approval_id"]]
    # What each role may do, it does.
    assert auditor.json("audit", "tail", "-n", "1")["records"]
    assert approver.json("approval", "list")["approvals"]


def test_changes_are_attributed_to_the_credential_never_to_by(
    served: tuple[Server, CLI],
) -> None:
    """Plays an approver who names someone else with --by: refused before anything is
    sent; without it, the receipt (and the approval) name the credential's owner. Kills,
    offboarding and policy loads name the admin credential's owner too."""
    _server, admin = served
    task, _read, held = _traffic(admin)
    approver = admin.as_(_credential(admin, "approver", "carol@acme.example"))

    posing = approver.run("approval", "approve", held["approval_id"], "--by", ROOT_ADMIN, ok=False)
    assert posing.returncode == 2
    assert "carol@acme.example" in posing.stderr and "--by" in posing.stderr
    assert admin.json("approval", "list")["approvals"][0]["status"] == "pending"

    approved = approver.json("approval", "approve", held["approval_id"], "--comment", "ok")
    assert approved["status"] == "approved" and approved["decided_by"] == "carol@acme.example"
    decided = _receipts(admin, "approval.decide")[-1]
    assert decided["chain"][0] == "carol@acme.example"
    assert approver.json("approval", "list", "--status", "approved")["approvals"]

    # --by naming the credential's own owner is accepted.
    admin.json("policy", "load", str(EXAMPLES / "policies"), "--by", ROOT_ADMIN)
    assert _receipts(admin, "policy.load")[-1]["chain"] == [ROOT_ADMIN]
    admin.json("kill", "--agent", AGENT, "--reason", "drill", "--yes")
    assert _receipts(admin, "kill_switch")[-1]["chain"] == [ROOT_ADMIN]
    assert admin.json("task", "show", task)["status"] == "revoked"
    admin.json("identity", "disable", AGENT)
    assert _receipts(admin, "identity.disable")[-1]["detail"]["by"] == ROOT_ADMIN


def test_break_glass_opens_the_store_and_leaves_a_receipt(served: tuple[Server, CLI]) -> None:
    """Break-glass: no server, no credential, the store opened with the KEK; a receipt
    says it was break-glass, who ran it (the OS user) and which command, and the change
    is attributed to break-glass:<user>, never to a name given with --by."""
    server, admin = served
    task = _task(admin)
    local = CLI(server.home)  # no TETHER_SERVER, no TETHER_TOKEN
    user = getpass.getuser()
    posing = local.run(
        "--break-glass", "kill", "--agent", AGENT, "--reason", "x", "--yes", "--by", ROOT_ADMIN,
        ok=False,
    )  # fmt: skip
    assert posing.returncode == 2 and f"break-glass:{user}" in posing.stderr
    assert admin.json("task", "show", task)["status"] == "open"

    killed = local.run(
        "kill", "--agent", AGENT, "--reason", "server down", "--yes", "--json",
        env={"TETHER_BREAK_GLASS": "1"},
    )  # fmt: skip
    assert json.loads(killed.stdout)["tasks"] == [task]
    glass = _receipts(admin, "cli.break_glass")
    assert glass[-1]["detail"]["os_user"] == user
    assert glass[-1]["detail"]["command"] == "tether kill"
    assert glass[-1]["chain"] == [f"break-glass:{user}"]
    assert _receipts(admin, "kill_switch")[-1]["chain"] == [f"break-glass:{user}"]
    assert admin.json("audit", "verify")["ok"] is True


def test_where_the_cli_finds_its_server_and_credential(
    served: tuple[Server, CLI], tmp_path: Path
) -> None:
    """Plays someone on the machine who could read a credential file left readable by
    group or others: the CLI refuses to use it. Without a server it says what to set;
    with no live admin left to ask, only the first admin credential is made locally."""
    server, admin = served
    bare = CLI(server.home)
    nowhere = bare.run("identity", "list", ok=False)
    assert nowhere.returncode == 2 and len(nowhere.stderr.strip().splitlines()) == 1
    for needle in ("TETHER_SERVER", "TETHER_TOKEN", "--break-glass"):
        assert needle in nowhere.stderr
    anonymous = bare.run("identity", "list", ok=False, env={"TETHER_SERVER": server.url})
    assert anonymous.returncode == 2 and "TETHER_TOKEN" in anonymous.stderr

    token_file = tmp_path / "token"
    token_file.write_text(server.admin + "\n")
    token_file.chmod(0o644)
    loose = bare.run(
        "--server", server.url, "--token-file", str(token_file), "identity", "list", ok=False
    )
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    assert loose.returncode == 2 and "readable or writable by group or others" in loose.stderr
    token_file.chmod(0o600)
    listed = bare.json("--server", server.url, "--token-file", str(token_file), "identity", "list")
    assert listed["identities"][0]["spiffe_id"] == AGENT
    via_env = bare.run(
        "identity", "list", env={"TETHER_SERVER": server.url, "TETHER_TOKEN_FILE": str(token_file)}
    )
    assert AGENT in via_env.stdout

    wrong = bare.run(
        "identity", "list", ok=False,
        env={"TETHER_SERVER": server.url, "TETHER_TOKEN": "tadm_0123456789abcdef." + "A" * 43},
    )  # fmt: skip
    assert wrong.returncode == 1 and "refused the credential" in wrong.stderr

    second = bare.run("admin", "create", "--role", "admin", "--owner", "eve@x.example", ok=False)
    assert second.returncode == 2 and "through the server" in second.stderr
    assert len(admin.json("admin", "list")["credentials"]) == 1


def test_replay_reports_what_a_candidate_set_would_change(
    served: tuple[Server, CLI], tmp_path: Path
) -> None:
    """The demo's traffic replayed: under the live set itself nothing changes; under a
    set that forbids a tool the traffic used, that call's decision changes (allow →
    deny, with its receipt, task and reason codes), and --fail-on-change exits 1."""
    _server, admin = served
    task, read, held = _traffic(admin)

    same = admin.json("replay", "--policies", str(EXAMPLES / "policies"), "--fail-on-change")
    assert same["would_change"] == 0 and same["changed"] == []
    assert same["replayed"] == 2 and same["candidate"] == same["live"]

    candidate = tmp_path / "candidate"
    shutil.copytree(EXAMPLES / "policies", candidate)
    (candidate / "no-reading.cedar").write_text(
        '@id("no-reading-bills")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.read_bills");\n'
    )
    report = admin.json("replay", "--policies", str(candidate))
    assert report["would_change"] == 1 and report["changes"] == {"allow→deny": 1}
    (change,) = report["changed"]
    assert change["seq"] == read["receipt"]["seq"]
    assert (change["task_id"], change["tool"]) == (task, "bank.read_bills")
    assert (change["old"], change["new"]) == ("allow", "deny")
    assert change["old_reasons"] == ["allow"] and change["new_reasons"] == ["policy.forbid"]
    assert change["policies"] == ["no-reading-bills"] and change["complete"] is True
    assert RFC3339.match(change["at"])

    failing = admin.run("replay", "--policies", str(candidate), "--fail-on-change", ok=False)
    assert failing.returncode == 1
    assert "allow→deny: 1" in failing.stdout and "bank.read_bills" in failing.stdout

    # A window after the traffic holds no decision; one around it holds both.
    later = admin.json("replay", "--policies", str(candidate), "--from", "2100-01-01T00:00:00Z")
    assert later["decisions"] == 0 and later["would_change"] == 0
    window = admin.json(
        "replay", "--policies", str(candidate), "--from", "2000-01-01T00:00:00Z",
        "--to", "2100-01-01T00:00:00Z",
    )  # fmt: skip
    assert window["would_change"] == 1 and window["from"] == "2000-01-01T00:00:00Z"
    replays = _receipts(admin, "policy.replay")
    assert replays[-1]["chain"] == [ROOT_ADMIN] and held["approval_id"]


def test_json_instants_version_and_completion(served: tuple[Server, CLI]) -> None:
    """--json gives instants as RFC 3339 (UTC, Z), never epoch numbers; --version;
    typer's shell completion is offered."""
    _server, admin = served
    opened = admin.json(
        "task", "open", "--agent", AGENT, "--template", "pay-bill", "--param", f"payee={PAYEE}"
    )
    assert RFC3339.match(opened["expires_at"]), opened["expires_at"]
    shown = admin.json("task", "show", opened["task_id"])
    assert RFC3339.match(shown["opened_at"]) and shown["ended_at"] is None
    identity = admin.json("identity", "show", AGENT)
    assert RFC3339.match(identity["created_at"])
    record = admin.json("audit", "tail", "-n", "1")["records"][0]
    assert RFC3339.match(record["at"])
    credentials = admin.json("admin", "list")["credentials"]
    assert all(RFC3339.match(c["expires_at"]) for c in credentials)

    assert admin.run("--version").stdout.startswith("tether ")
    helped = admin.run("--help", env={"COLUMNS": "200"}).stdout
    assert "--install-completion" in helped and "--show-completion" in helped
    assert "--server" in helped and "--break-glass" in helped
    # The installed `tether` script completes verbs (bash, here).
    script = "import sys; sys.argv[0] = 'tether'; import tether.cli; tether.cli.main()"
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env={**admin.env, "_TETHER_COMPLETE": "complete_bash", "COMP_WORDS": "tether approval ",
             "COMP_CWORD": "2"},
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert completed.stdout.split() == ["list", "approve", "deny"], completed.stderr
