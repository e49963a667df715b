"""The console in Debian's Chromium (Playwright), against a live server with the demo's
data: sign in, the demo's identities and tasks, an approval approved on the page lets the
waiting agent's call through, a denial shows its reason, audit verification succeeds and
then names a tampered record, hostile arguments never run. Screenshots go to
``test-output/console/``."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console_support import CHROMIUM_ARGS, OUTPUT, XSS, LiveServer, require_chromium
from tether import Tether
from tether.core import Sensitivity, SideEffect, ToolProfile
from tether.demo._console import HELPER, IDENTITIES, PAYEE, Seeded, seed
from tether.gateway._profiles import profiles_from_file
from tether.sdk import ApprovalRequired

# One live server and one browser for the module; the tamper step edits the home's SQLite file.
pytestmark = pytest.mark.sqlite_only("one live server on a SQLite home, tampered through its file")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "demo"
NOTES_POLICY = """
@id("notes-need-a-human")
@approval("required")
forbid (principal, action == Action::"call_tool", resource == Tool::"notes.write");
@id("notes")
permit (principal, action == Action::"call_tool", resource == Tool::"notes.write");
"""


class World:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.tether = Tether.init(home, "acme.example")
        # What the tools do, for every door (an undescribed tool is refused): the bank's
        # catalogue, and a notes tool that writes internal records.
        self.tether.catalogue.load(
            {
                **profiles_from_file(EXAMPLES / "bank.catalogue.toml", "bank"),
                "notes.write": ToolProfile(
                    side_effect=SideEffect.WRITE, sensitivity=Sensitivity.INTERNAL, trusted=True
                ),
            },
            origin="tests",
        )
        self.admin = self.tether.credentials.create("admin", "root@acme.example")[1]
        self.approver = self.tether.credentials.create("approver", "bob@acme.example")[1]
        self.server = LiveServer(self.tether)
        self.url = self.server.url
        self.demo: Seeded = seed(
            self.url, self.admin, EXAMPLES, extra_policies={"notes.cedar": NOTES_POLICY}
        )


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_chromium()
    home = Path(tempfile.mkdtemp(prefix="tether-console-"))
    w = World(home / "home")
    yield w
    w.server.stop()
    w.tether.close()


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = require_chromium()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {OUTPUT}")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="tether-chromium-"),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        yield context
        context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    tab = browser.new_page()
    alerts: list[str] = []

    def on_dialog(dialog: Any) -> None:
        if dialog.type == "confirm":  # the console's own "are you sure?"
            dialog.accept()
        else:
            alerts.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

    refused: list[str] = []
    tab.on("dialog", on_dialog)
    tab.on(
        "console",
        lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
    )
    yield tab
    browser.clear_cookies()
    tab.close()
    assert alerts == [], f"a dialog fired: {alerts}"
    assert refused == [], f"the content security policy refused something: {refused}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(OUTPUT / f"{name}.png"), full_page=True)


def sign_in(page: Any, url: str, secret: str, target: str = "/console/identities") -> None:
    page.goto(url + target)
    assert "/console/sign-in" in page.url  # no session: the sign-in page
    page.fill("input[name=secret]", secret)
    page.click("button[type=submit]:has-text('Sign in')")
    page.wait_for_url(url + target)


def test_sign_in_shows_the_demos_identities_and_tasks(world: World, page: Any) -> None:
    sign_in(page, world.url, world.admin)
    shot(page, "01-identities")
    table = page.inner_text("#identities")
    for spiffe_id, _, _ in IDENTITIES:
        assert spiffe_id in table
    page.click("nav >> text=Tasks")
    page.wait_for_url(world.url + "/console/tasks")
    shot(page, "02-tasks")
    tasks = page.inner_text("#tasks")
    assert world.demo.task.task_id in tasks and world.demo.child.task_id in tasks
    assert "Pay the outstanding bill owed to " + PAYEE in tasks
    page.click(f"text={world.demo.task.task_id}")
    tree = page.inner_text("#tree")
    assert world.demo.child.task_id in tree and HELPER in tree
    shot(page, "03-task-tree")
    page.click("button:has-text('Sign out')")
    page.wait_for_url(world.url + "/console/sign-in")
    page.goto(world.url + "/console/tasks")
    assert "/console/sign-in" in page.url


def test_an_approval_on_the_page_lets_the_waiting_agent_through(world: World, page: Any) -> None:
    task = world.demo.task
    outcome: list[Any] = []

    def agent_waits() -> None:
        """The agent retries its held call until a human has answered (as over HTTP)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            verdict = task.authorize("bank.send_money", world.demo.held_args)
            outcome.append(verdict)
            if verdict.effect != "approval_required":
                return
            assert verdict.approval_id == world.demo.held_approval  # the same approval
            time.sleep(0.2)

    waiting = threading.Thread(target=agent_waits)
    waiting.start()
    sign_in(page, world.url, world.approver, "/console/approvals")
    card = page.locator(f"#{world.demo.held_approval}")
    assert "bank.send_money" in card.inner_text() and "1200" in card.inner_text()
    for _ in range(100):  # the agent is waiting on the held call
        if outcome:
            break
        time.sleep(0.1)
    assert outcome and outcome[0].effect == "approval_required"
    card.locator("input[name=comment]").fill("invoice INV-42 checked")
    shot(page, "04-approval-pending")
    card.locator("button[value=approve]").click()
    page.wait_for_url(world.url + "/console/approvals")
    assert "approved" in page.inner_text(".flash")
    waiting.join(timeout=60)
    assert outcome[-1].effect == "allow", outcome[-1]
    assert outcome[-1].reasons[0]["code"] == "approval.granted"
    page.goto(world.url + "/console/approvals?status=used")
    assert "invoice INV-42 checked" in page.inner_text(f"#{world.demo.held_approval}")
    shot(page, "05-approval-used")


def test_a_denial_shows_its_reason(world: World, page: Any) -> None:
    args = {"recipient": PAYEE, "amount": 1100.0}
    task = world.demo.agent.open_task(
        template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}
    )
    try:
        task.check("bank.send_money", args)
        raise AssertionError("not held")
    except ApprovalRequired as held:
        approval = str(held.approval_id)
    sign_in(page, world.url, world.approver, "/console/approvals")
    card = page.locator(f"#{approval}")
    card.locator("input[name=comment]").fill("duplicate of INV-42")
    card.locator("button[value=deny]").click()
    page.wait_for_url(world.url + "/console/approvals")
    page.goto(world.url + "/console/approvals?status=denied")
    denied = page.inner_text(f"#{approval}")
    assert "denied by bob@acme.example" in denied
    assert "duplicate of INV-42" in denied
    assert "a policy asks a human to approve this call first" in denied
    assert "large-payments-need-a-human" in denied
    shot(page, "06-denied")
    try:  # the agent's retry is held again (a new approval), never let through
        task.check("bank.send_money", args)
        raise AssertionError("a denied call went through")
    except ApprovalRequired as again:
        assert again.approval_id != approval


def test_hostile_arguments_never_run_in_the_browser(world: World, page: Any) -> None:
    agent = world.demo.agent
    hostile = agent.open_task(
        intent={
            "purpose": "Write a note " + XSS[0],
            "capabilities": [{"tool": "notes.write"}],
            "budget": {"max_calls": 3},
        }
    )
    assert hostile.authorize("notes.write", {"text": XSS[0], "title": XSS[1]}).effect == (
        "approval_required"
    )
    hostile.authorize(XSS[1], {"path": XSS[0]})
    sign_in(page, world.url, world.admin, "/console/approvals")
    assert XSS[0] in page.inner_text("main") and XSS[1] in page.inner_text("main")
    shot(page, "07-inert-approvals")
    for path in (
        "/console/decisions",
        "/console/tasks",
        f"/console/tasks/{hostile.task_id}",
        "/console/audit",
        f"/console/audit/trace?task_id={hostile.task_id}",
        "/console/risk",
    ):
        page.goto(world.url + path)
        assert page.evaluate("document.querySelectorAll('main script, main img').length") == 0
    page.goto(world.url + "/console/decisions")
    assert XSS[1] in page.inner_text("main")
    shot(page, "08-inert-decisions")


def test_the_risk_report_prints(world: World, page: Any) -> None:
    sign_in(page, world.url, world.admin, "/console/risk")
    assert page.locator("svg.chart").count() == 4
    shot(page, "09-risk-report")
    page.emulate_media(media="print")
    assert not page.locator("header.top").is_visible()
    page.emulate_media(media="screen")


def test_audit_verification_shows_success_then_the_tampered_record(world: World, page: Any) -> None:
    sign_in(page, world.url, world.admin, "/console/audit")
    page.click("#verify")
    result = page.inner_text("#verify-result")
    assert result.startswith("Verified:")
    shot(page, "10-audit-verified")
    db = sqlite3.connect(world.home / "tether.db")
    try:
        (body,) = db.execute("SELECT body FROM audit_records WHERE seq = 5").fetchone()
        db.execute(
            "UPDATE audit_records SET body = ? WHERE seq = 5", (body.replace('"allow"', '"deny"'),)
        )
        db.commit()
        page.click("#verify")
        failed = page.inner_text("#verify-result")
        shot(page, "11-audit-tampered")
        assert "Verification FAILED at record 5" in failed
    finally:
        db.execute("UPDATE audit_records SET body = ? WHERE seq = 5", (body,))
        db.commit()
        db.close()
    page.click("#verify")
    assert page.inner_text("#verify-result").startswith("Verified:")


def test_an_owner_may_not_approve_her_own_agent_and_deceptive_text_is_flagged(
    world: World, page: Any
) -> None:
    """Attacker: a prompt-injected sub-agent, handed a task by the owner's agent, whose
    held call names a look-alike recipient (Cyrillic letters among Latin ones), hides a
    right-to-left override in its text and a zero-width space in a reference. The
    approval card shows the agent's owner and the delegation chain, flags the three
    tricks and shows the invisible characters as escapes; the owner of the agents of the
    delegation tree, holding an approver credential, gets no Approve button (separation
    of duties), another approver does."""
    from tether.demo._console import AGENT, OWNER
    from tether.sdk import Client
    from tether.tokens import ProofKey

    owners_approver = world.tether.credentials.create("approver", OWNER)[1]
    task = world.demo.agent.open_task(
        intent={
            "purpose": "Write a note",
            "capabilities": [{"tool": "notes.write"}],
            "budget": {"max_calls": 3},
        }
    )
    helper = Client(world.url, key=ProofKey())
    helper.attest(Client(world.url, admin=world.admin).join_token(HELPER, ttl=300))
    handed = task.delegate(
        helper.requests.svid or "",
        intent={
            "purpose": "Write one note",
            "capabilities": [{"tool": "notes.write"}],
            "budget": {"max_calls": 1},
            "ttl_seconds": 300,
        },
    )
    child = helper.adopt(handed["task_id"], handed["access_token"])
    deceptive = {
        "text": "wire it to p\u0430ypal-billing",
        "title": "invoice \u202egpj.exe",
        "ref": "INV-\u200b2026",
    }
    held = child.authorize("notes.write", deceptive)
    assert held.effect == "approval_required" and held.approval_id
    approval = str(held.approval_id)

    sign_in(page, world.url, owners_approver, "/console/approvals")
    card = page.locator(f"#{approval}")
    text = card.inner_text()
    assert OWNER in card.locator(".owner").inner_text()
    chain = card.locator(".chain").inner_text()
    assert AGENT in chain and HELPER in chain and "←" in chain
    assert "You may not decide this call" in text and "separation of duties" in text
    assert card.locator("button[value=approve]").count() == 0
    flags = card.locator(".flags").inner_text()
    assert "mixed script" in flags and "CYRILLIC and LATIN" in flags
    assert "bidi" in flags and "U+202E" in flags
    assert "zero width" in flags and "U+200B" in flags
    args = card.locator("pre.args").inner_text()
    assert "\\u202e" in args and "\\u200b" in args  # shown, not obeyed
    shot(page, "08-separation-of-duties")
    page.context.clear_cookies()

    sign_in(page, world.url, world.approver, "/console/approvals")  # bob owns nothing here
    card = page.locator(f"#{approval}")
    assert card.locator("button[value=approve]").count() == 1
    assert "You may not decide" not in card.inner_text()
    card.locator("button[value=deny]").click()
    page.wait_for_url(world.url + "/console/approvals")


def test_the_named_approver_accepts_a_risk_on_the_report(world: World, page: Any) -> None:
    """An owner records an accepted risk naming bob; bob, an approver, reaches the risk
    report from the navigation and accepts it there; it is then in force."""
    from tether.demo._console import OWNER

    owner = world.tether.credentials.create("owner", OWNER)[1]
    sign_in(page, world.url, owner, "/console/risk")
    form = page.locator("#record-risk")
    form.locator("input[name=title]").fill("Statements read without labels")
    form.locator("input[name=scope]").fill("the statement reader")
    form.locator("textarea[name=justification]").fill("Read-only, internal data, reviewed weekly.")
    form.locator("input[name=approver]").fill("bob@acme.example")
    form.locator("button[type=submit]").click()
    page.wait_for_url(world.url + "/console/risk")
    assert "awaiting bob@acme.example" in page.inner_text(".flash")
    page.context.clear_cookies()

    sign_in(page, world.url, world.approver, "/console/approvals")
    page.click("nav >> text=Risk report")
    page.wait_for_url(world.url + "/console/risk")
    row = page.locator("tr", has_text="Statements read without labels")
    row.locator("button[value=accept]").click()
    page.wait_for_url(world.url + "/console/risk")
    row = page.locator("tr", has_text="Statements read without labels")
    assert row.locator("td.state").inner_text() == "in force"
    shot(page, "12-accepted-risk")
