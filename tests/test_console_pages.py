"""The web console through the real ASGI app: sessions, CSRF, roles, inert rendering,
approvals, audit verification, accepted risks, pagination."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import AGENT, OWNER, open_simple_task
from tests.console_support import XSS, console_client, csrf_of, sign_in
from tether import FrozenClock, ProofKey, Tether
from tether.console import CSP

PAGES = (
    "/console",
    "/console/identities",
    "/console/tasks",
    "/console/decisions",
    "/console/approvals",
    "/console/audit",
    "/console/audit/export.jsonl",
    "/console/risk",
)
APPROVAL_POLICY = """
permit (principal, action, resource);
@id("notes-need-a-human")
@approval("required")
forbid (principal, action == Action::"call_tool", resource == Tool::"notes.write");
"""


def credential(tether: Tether, role: str, email: str) -> str:
    return tether.credentials.create(role, email)[1]


def call(tether: Tether, key: ProofKey, token: str, tool: str, args: dict[str, Any]) -> Any:
    proof = key.prove(token, tool, args, now=tether.clock.now())
    return tether.authorize(token=token, proof=proof, tool=tool, args=args)


@pytest.fixture
def held(tether: Tether) -> dict[str, Any]:
    """A task with hostile arguments held for approval, a denied hostile tool name, and an
    identity whose description is a script."""
    tether.policies.load({"all.cedar": APPROVAL_POLICY})
    key, task_id, token = open_simple_task(tether, tools=("notes.write", "fs.read"))
    args = {"text": XSS[0], "title": XSS[1]}
    receipt = call(tether, key, token, "notes.write", args)
    assert str(receipt.decision.effect) == "approval_required"
    call(tether, key, token, XSS[0], {"path": XSS[1]})
    tether.register_identity(
        "spiffe://acme.example/agent/xss", kind="agent", owner=OWNER, description=XSS[1]
    )
    return {
        "key": key,
        "task_id": task_id,
        "token": token,
        "args": args,
        "approval_id": receipt.approval_id,
    }


@pytest.fixture
def admin(tether: Tether) -> str:
    return credential(tether, "admin", "root@acme.example")


def test_pages_without_a_session_redirect_to_sign_in(tether: Tether) -> None:
    with console_client(tether) as client:
        for path in PAGES:
            response = client.get(path, follow_redirects=False)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/console/sign-in"), path
        assert client.get("/", follow_redirects=False).headers["location"] == "/console"
        forged = client.get("/console/identities", cookies={"tether_console": "made-up"})
        assert "Sign in" in forged.text


def test_sign_in_sets_a_strict_session_cookie(tether: Tether, admin: str) -> None:
    with console_client(tether) as client:
        form = client.get("/console/sign-in")
        assert form.headers["content-security-policy"] == CSP
        assert form.headers["x-frame-options"] == "DENY"
        wrong = client.post(
            "/console/sign-in",
            data={"csrf": csrf_of(form.text), "secret": admin[:-2] + "xx"},
            follow_redirects=False,
        )
        assert wrong.status_code == 401
        assert "tether_console=" not in wrong.headers.get("set-cookie", "").replace(
            "tether_console_signin", ""
        )
        form = client.get("/console/sign-in")
        done = client.post(
            "/console/sign-in",
            data={"csrf": csrf_of(form.text), "secret": admin, "next": "https://evil.example/"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert done.headers["location"] == "/console"  # no open redirect
        cookie = next(c for c in done.headers.get_list("set-cookie") if "tether_console=" in c)
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback


def test_over_tls_the_cookie_is_secure_and_host_prefixed(tether: Tether, admin: str) -> None:
    with console_client(tether, base_url="https://127.0.0.1:8443") as client:
        form = client.get("/console/sign-in")
        done = client.post(
            "/console/sign-in",
            data={"csrf": csrf_of(form.text), "secret": admin},
            follow_redirects=False,
        )
        cookie = next(
            c for c in done.headers.get_list("set-cookie") if "__Host-tether_console=" in c
        )
        assert "Secure" in cookie and "Path=/;" in cookie + ";"


def test_sign_in_without_its_form_token_is_refused(tether: Tether, admin: str) -> None:
    with console_client(tether) as client:
        client.get("/console/sign-in")
        refused = client.post("/console/sign-in", data={"secret": admin}, follow_redirects=False)
        assert refused.status_code == 403
        assert "tether_console=" not in " ".join(refused.headers.get_list("set-cookie"))


def test_posts_without_the_csrf_token_are_refused_and_change_nothing(
    tether: Tether, admin: str
) -> None:
    with console_client(tether) as client:
        token = sign_in(client, admin)
        for data in (
            {"spiffe_id": AGENT},
            {"spiffe_id": AGENT, "csrf": token[:-1] + ("B" if token.endswith("A") else "A")},
        ):
            refused = client.post("/console/identities/offboard", data=data)
            assert refused.status_code == 403
            assert "security token" in refused.text
        cross = client.post(
            "/console/identities/offboard",
            data={"spiffe_id": AGENT, "csrf": token},
            headers={"Origin": "https://evil.example"},
        )
        assert cross.status_code == 403
        assert tether.identities.get(AGENT).status == "active"
        done = client.post(
            "/console/identities/offboard",
            data={"spiffe_id": AGENT, "csrf": token},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert tether.identities.get(AGENT).status == "disabled"


def test_hostile_arguments_render_inert_everywhere(
    tether: Tether, admin: str, held: dict[str, Any]
) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        pages = [
            "/console/identities",
            "/console/tasks",
            f"/console/tasks/{held['task_id']}",
            "/console/decisions",
            "/console/approvals",
            "/console/audit",
            f"/console/audit/trace?task_id={held['task_id']}",
            "/console/risk",
        ]
        shown = 0
        for path in pages:
            html = client.get(path).text
            for payload in XSS:
                assert payload not in html, path
                assert "<script>alert" not in html and "onerror=alert" not in html.replace(
                    "onerror=alert(1)&gt;", ""
                ), path
            shown += html.count("&lt;script&gt;alert(1)&lt;/script&gt;")
            assert '<script src="/console/static/console.js" defer></script>' in html
            assert html.count("<script") == 1, path  # only the console's own file
        assert shown >= 4  # approvals, decisions, audit, trace
        approvals = client.get("/console/approvals").text
        assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in approvals


def test_an_approval_on_the_page_lets_the_identical_call_through_once(
    tether: Tether, held: dict[str, Any]
) -> None:
    approver = credential(tether, "approver", "bob@acme.example")
    auditor = credential(tether, "auditor", "carol@acme.example")
    path = f"/console/approvals/{held['approval_id']}"
    with console_client(tether) as client:
        token = sign_in(client, auditor)
        refused = client.post(path, data={"csrf": token, "decision": "approve"})
        assert refused.status_code == 403  # auditors read only
    with console_client(tether) as client:
        token = sign_in(client, approver)
        page = client.get("/console/approvals").text
        assert held["approval_id"] in page and "a policy asks a human" in page
        done = client.post(
            path,
            data={"csrf": token, "decision": "approve", "comment": "checked with finance"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert "approved" in client.get("/console/approvals").text
        again = client.post(path, data={"csrf": token, "decision": "deny"})
        assert again.status_code == 409  # decided already: nothing changes
    retried = call(tether, held["key"], held["token"], "notes.write", held["args"])
    assert str(retried.decision.effect) == "allow"
    assert retried.decision.reasons[0].code == "approval.granted"
    decided = tether.store.records_page(kind="approval.decide", limit=1)[0]
    assert json.loads(decided.body)["detail"]["comment"] == "checked with finance"
    once_more = call(tether, held["key"], held["token"], "notes.write", held["args"])
    assert str(once_more.decision.effect) == "approval_required"


def test_a_denial_shows_its_reason_and_comment(
    tether: Tether, admin: str, held: dict[str, Any]
) -> None:
    with console_client(tether) as client:
        token = sign_in(client, admin)
        client.post(
            f"/console/approvals/{held['approval_id']}",
            data={"csrf": token, "decision": "deny", "comment": "not <b>this</b> one"},
        )
        denied = client.get("/console/approvals?status=denied").text
        assert held["approval_id"] in denied
        assert "a policy asks a human to approve this call first" in denied
        assert "not &lt;b&gt;this&lt;/b&gt; one" in denied
        assert "not &lt;b&gt;this&lt;/b&gt; one" in client.get("/console/audit").text


def test_roles_mirror_the_api(tether: Tether, held: dict[str, Any]) -> None:
    other = "spiffe://acme.example/agent/not-alices"
    tether.register_identity(other, kind="agent", owner="dave@acme.example")
    owner = credential(tether, "owner", OWNER)
    approver = credential(tether, "approver", "bob@acme.example")
    with console_client(tether) as client:
        token = sign_in(client, owner)
        assert client.get("/console/decisions").status_code == 403
        assert client.get("/console/audit").status_code == 403
        assert held["task_id"] in client.get("/console/tasks").text
        refused = client.post(
            "/console/identities/offboard", data={"csrf": token, "spiffe_id": other}
        )
        assert refused.status_code == 403
        assert tether.identities.get(other).status == "active"
        assert client.post("/console/kill", data={"csrf": token, "agent": AGENT}).status_code == 403
        ended = client.post(
            f"/console/tasks/{held['task_id']}/end", data={"csrf": token}, follow_redirects=False
        )
        assert ended.status_code == 303
        assert tether.tasks.get(held["task_id"]).status == "ended"
    with console_client(tether) as client:
        token = sign_in(client, approver)
        assert client.get("/console/decisions").status_code == 403
        assert client.get("/console/approvals").status_code == 200
        assert (
            client.post(
                "/console/identities/offboard", data={"csrf": token, "spiffe_id": AGENT}
            ).status_code
            == 403
        )


def test_owners_see_only_their_tasks(tether: Tether, held: dict[str, Any]) -> None:
    owner = credential(tether, "owner", "dave@acme.example")
    with console_client(tether) as client:
        sign_in(client, owner)
        assert held["task_id"] not in client.get("/console/tasks").text
        assert client.get(f"/console/tasks/{held['task_id']}").status_code == 403


def test_kill_from_the_page_revokes_the_agents_tasks(
    tether: Tether, admin: str, held: dict[str, Any]
) -> None:
    with console_client(tether) as client:
        token = sign_in(client, admin)
        page = client.get(f"/console/tasks/{held['task_id']}").text
        assert "Kill agent" in page and "End task" in page
        client.post("/console/kill", data={"csrf": token, "agent": AGENT, "reason": "drift"})
    assert tether.tasks.get(held["task_id"]).status == "revoked"
    after = call(tether, held["key"], held["token"], "fs.read", {"path": "/x"})
    assert str(after.decision.effect) == "deny"


def test_audit_verification_shows_success_then_the_tampered_record(
    tether: Tether, admin: str, held: dict[str, Any]
) -> None:
    with console_client(tether) as client:
        token = sign_in(client, admin)
        ok = client.post("/console/audit/verify", data={"csrf": token})
        assert ok.status_code == 200 and "Verified:" in ok.text
        tether.store.execute_unsafe(
            "UPDATE audit_records SET body = replace(body, '\"allow\"', '\"deny\"') WHERE seq = 2"
        )
        bad = client.post("/console/audit/verify", data={"csrf": token})
        assert "Verification FAILED at record 2" in bad.text


def test_export_is_json_lines_that_chain(tether: Tether, admin: str, held: dict[str, Any]) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        response = client.get("/console/audit/export.jsonl")
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    for before, after in itertools.pairwise(lines):
        assert after["prev_hash"] == before["hash"]
    from tether.audit._chain import record_hash
    from tether.core._canonical import canonical_json

    for line in lines:
        assert (
            record_hash(line["prev_hash"], canonical_json(line["record"]).decode()) == line["hash"]
        )


def test_trace_shows_the_delegation_tree(tether: Tether, admin: str, held: dict[str, Any]) -> None:
    helper = "spiffe://acme.example/agent/helper"
    tether.register_identity(helper, kind="agent", owner=OWNER)
    child = tether.open_task(
        helper,
        proof_jwk=ProofKey().jwk,
        intent=__import__("tether").parse_intent(
            {"purpose": "read", "capabilities": [{"tool": "fs.read"}], "budget": {"max_calls": 1}}
        ),
        parent_task_id=held["task_id"],
    )
    with console_client(tether) as client:
        sign_in(client, admin)
        trace = client.get(f"/console/audit/trace?task_id={child.task_id}").text
        assert held["task_id"] in trace and child.task_id in trace
        assert f"delegated by <code>{AGENT}</code>" in trace
        detail = client.get(f"/console/tasks/{held['task_id']}").text
        assert child.task_id in detail and "Delegation tree" in detail


def test_decisions_filter_and_page_by_keyset(tether: Tether, admin: str) -> None:
    tether.policies.load({"all.cedar": "permit (principal, action, resource);"})
    key, _, token = open_simple_task(tether, tools=("fs.read",), max_calls=200)
    for i in range(120):
        call(tether, key, token, "fs.read" if i % 2 else "fs.write", {"n": i})
    with console_client(tether) as client:
        sign_in(client, admin)
        first = client.get("/console/decisions?effect=deny&rule=intent.no_capability").text
        assert first.count("fs.write") >= 50 and "fs.read</code>" not in first
        assert 'id="next"' in first
        older = first.split('href="/console/decisions?')[-1].split('"')[0].replace("&amp;", "&")
        second = client.get("/console/decisions?" + older).text
        assert "fs.write" in second
        tagged = client.get("/console/decisions?risk_tag=owasp-asi:ASI02&tool=fs.read").text
        assert "fs.read" in tagged and "fs.write</code>" not in tagged
        assert 'http-equiv="refresh"' not in tagged
        following = client.get("/console/decisions?effect=deny&follow=1").text
        assert '<meta http-equiv="refresh" content="5">' in following


def test_the_session_ends_when_idle(tether: Tether, admin: str, clock: FrozenClock) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        assert client.get("/console/identities", follow_redirects=False).status_code == 200
        clock.advance(16 * 60)
        assert client.get("/console/identities", follow_redirects=False).status_code == 303


def test_a_disabled_credential_ends_its_session(tether: Tether) -> None:
    row, secret = tether.credentials.create("admin", "eve@acme.example")
    with console_client(tether) as client:
        sign_in(client, secret)
        tether.credentials.disable(row.credential_id, by="root@acme.example")
        assert client.get("/console/identities", follow_redirects=False).status_code == 303


def test_failed_changes_show_an_error_and_change_nothing(
    tether: Tether, admin: str, held: dict[str, Any]
) -> None:
    with console_client(tether) as client:
        token = sign_in(client, admin)
        missing = client.post(
            "/console/identities/offboard",
            data={"csrf": token, "spiffe_id": "spiffe://acme.example/agent/none"},
        )
        assert missing.status_code in (400, 404) and "Not done" in missing.text
        records = tether.store.last_record()
        bogus = client.post(
            f"/console/approvals/{held['approval_id']}", data={"csrf": token, "decision": "maybe"}
        )
        assert bogus.status_code == 400
        assert tether.approvals.get(held["approval_id"]).status == "pending"
        assert tether.store.last_record() == records


def _record_risk(client: TestClient[Any], token: str, **overrides: str) -> Any:
    data = {
        "csrf": token,
        "title": "Helper reads unlabelled statements",
        "risk_tag": "owasp-asi:ASI02",
        "scope": "spiffe://acme.example/agent/bot",
        "justification": "The statements tool is read-only and internal until Q3.",
        "approver": "bob@acme.example",
        "days": "7",
        **overrides,
    }
    return client.post("/console/risks", data=data, follow_redirects=False)


def test_an_accepted_risk_needs_its_approver_shows_in_the_report_and_lapses(
    tether: Tether, clock: FrozenClock
) -> None:
    owner = credential(tether, "owner", OWNER)
    approver = credential(tether, "approver", "bob@acme.example")
    other = credential(tether, "approver", "mallory@acme.example")
    auditor = credential(tether, "auditor", "carol@acme.example")
    with console_client(tether) as client:
        token = sign_in(client, auditor)
        assert _record_risk(client, token).status_code == 403
    with console_client(tether) as client:
        token = sign_in(client, owner)
        assert _record_risk(client, token, approver=OWNER).status_code == 400
        assert _record_risk(client, token, risk_tag="made-up:X").status_code == 400
        assert _record_risk(client, token).status_code == 303
    risk_id = tether.store.list_accepted_risks()[0].risk_id
    with console_client(tether) as client:
        token = sign_in(client, other)
        refused = client.post(f"/console/risks/{risk_id}", data={"csrf": token, "action": "accept"})
        assert refused.status_code == 403
    with console_client(tether) as client:
        token = sign_in(client, approver)
        client.post(f"/console/risks/{risk_id}", data={"csrf": token, "action": "accept"})
    with console_client(tether) as client:
        sign_in(client, owner)
        report = client.get("/console/risk").text
        assert '<td class="state">in force</td>' in report
        assert '<span class="flag">Helper reads unlabelled statements</span>' in report
        clock.advance(8 * 86400)
        sign_in(client, owner)
        lapsed = client.get("/console/risk").text
        assert '<td class="state">lapsed</td>' in lapsed
        assert '<span class="flag">Helper reads unlabelled statements</span>' not in lapsed
    kinds = [json.loads(r.body)["kind"] for r in tether.store.records_page(limit=30)]
    assert "risk.accept" in kinds and "risk.record" in kinds


def test_the_risk_report_counts_by_framework_over_a_period(
    tether: Tether, admin: str, held: dict[str, Any]
) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        report = client.get("/console/risk").text
        for heading in (
            "OWASP Top 10 for Agentic Applications",
            "OWASP Non-Human Identities Top 10",
            "CSA MAESTRO layer",
            "NIST AI RMF function",
        ):
            assert heading in report
        assert report.count('<svg class="chart"') == 4
        assert "ASI09 Human-Agent Trust Exploitation</td><td>0</td><td>2</td>" in report
        # Receipts are counted once each, whatever their number of tags.
        receipts = int(re.search(r'<span id="receipts">(\d+) tagged', report)[1])  # type: ignore[index]
        tags = int(re.search(r'<span id="tags">(\d+) tag', report)[1])  # type: ignore[index]
        findings = int(re.search(r'<span id="findings">(\d+) of them', report)[1])  # type: ignore[index]
        chain = tether.store.last_record()
        assert chain is not None and 0 < receipts <= chain.seq < tags
        assert findings == sum(
            1
            for r in tether.store.records_page(limit=10_000)
            if json.loads(r.body).get("effect") in ("deny", "approval_required")
            and json.loads(r.body).get("risk_tags")
        )
        empty = client.get("/console/risk?from=2001-01-01&to=2001-01-31").text
        assert "0 tagged receipt(s)" in empty
        assert client.get("/console/risk?from=2001-02-01&to=2001-01-01").status_code == 400


def test_the_inventory_flags_unowned_idle_and_standing_privileges(
    tether: Tether, admin: str, clock: FrozenClock
) -> None:
    idle = "spiffe://acme.example/agent/idle"
    orphan = "spiffe://acme.example/agent/orphan"
    tether.register_identity(idle, kind="agent", owner=OWNER)
    tether.register_identity(orphan, kind="agent", owner=OWNER)
    tether.store.execute_unsafe("UPDATE identities SET owner = '' WHERE spiffe_id = ?", (orphan,))
    tether.policies.load({"all.cedar": "permit (principal, action, resource);"})
    _, task_id, _ = open_simple_task(tether)
    with console_client(tether) as client:
        sign_in(client, admin)
        page = client.get("/console/identities").text
        assert page.count('class="flagged"') == 1 and "no owner" in page
        tether.store.execute_unsafe(
            "UPDATE tasks SET expires_at = opened_at + 7 * 86400 WHERE task_id = ?", (task_id,)
        )
        clock.advance(31 * 86400)
        # A month on, the first admin credential has expired: a fresh one signs in.
        _row, admin = tether.credentials.create("admin", "root@acme.example")
        sign_in(client, admin)
        page = client.get("/console/identities").text
        assert "standing privilege: 1 task(s) living over a day" in page
        assert page.count('<span class="flag">idle over 30 days</span>') == 3


def test_token_expiry_follows_renewals(tether: Tether, admin: str, clock: FrozenClock) -> None:
    from tether import parse_intent
    from tether.console._words import when

    tether.policies.load({"all.cedar": "permit (principal, action, resource);"})
    intent = parse_intent(
        {
            "purpose": "long",
            "capabilities": [{"tool": "fs.read"}],
            "ttl_seconds": 600,
            "token_ttl_seconds": 60,
        }
    )
    opened = tether.open_task(AGENT, proof_jwk=ProofKey().jwk, intent=intent)
    with console_client(tether) as client:
        sign_in(client, admin)
        page = client.get(f"/console/tasks/{opened.task_id}").text
        assert f"<dt>Token expires</dt><dd>{when(opened.token_expires_at)}</dd>" in page
        clock.advance(30)
        renewed = tether.renew_task(opened.task_id)
        sign_in(client, admin)
        page = client.get(f"/console/tasks/{opened.task_id}").text
        assert renewed.token_expires_at > opened.token_expires_at
        assert f"<dt>Token expires</dt><dd>{when(renewed.token_expires_at)}</dd>" in page


def test_plain_http_sign_in_is_refused_from_another_host(tether: Tether, admin: str) -> None:
    import asyncio

    import httpx

    from tests.console_support import settings
    from tether.server import create_app

    async def attempt(client_host: str) -> httpx.Response:
        transport = httpx.ASGITransport(
            app=create_app(tether, settings()), client=(client_host, 40000)
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://tether.example") as c:
            form = await c.get("/console/sign-in")
            return await c.post(
                "/console/sign-in", data={"csrf": csrf_of(form.text), "secret": admin}
            )

    remote = asyncio.run(attempt("203.0.113.5"))
    assert remote.status_code == 403 and "sign in over HTTPS" in remote.text
    assert "tether_console=" not in " ".join(remote.headers.get_list("set-cookie"))
    local = asyncio.run(attempt("127.0.0.1"))
    assert local.status_code == 303


def test_the_inventory_pages_by_spiffe_id(tether: Tether, admin: str) -> None:
    for i in range(60):
        tether.register_identity(f"spiffe://acme.example/tool/t{i:02d}", kind="tool", owner=OWNER)
    with console_client(tether) as client:
        sign_in(client, admin)
        first = client.get("/console/identities").text
        assert first.count("<code>spiffe://") == 50
        link = first.split('href="/console/identities?after=')[1].split('"')[0]
        second = client.get("/console/identities?after=" + link.replace("&amp;", "&")).text
        assert second.count("<code>spiffe://") == 11  # 60 tools and the agent
        assert "Next page" not in second


def _kinds(tether: Tether, kind: str) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in tether.store.records_page(kind=kind, limit=100)]


def test_every_role_signs_out_with_a_receipt(tether: Tether) -> None:
    auditor_row, auditor = tether.credentials.create("auditor", "carol@acme.example")
    with console_client(tether) as client:
        token = sign_in(client, auditor)
        done = client.post("/console/sign-out", data={"csrf": token}, follow_redirects=False)
        assert done.status_code == 303
        assert done.headers["location"] == "/console/sign-in"
        after = client.get("/console/identities", follow_redirects=False)
        assert after.status_code == 303 and "/console/sign-in" in after.headers["location"]
    (out,) = _kinds(tether, "console.sign_out")
    assert out["chain"] == ["carol@acme.example"]
    assert out["detail"]["credential_id"] == auditor_row.credential_id


def test_owners_see_only_the_identities_they_own(tether: Tether) -> None:
    theirs = "spiffe://acme.example/agent/daves"
    tether.register_identity(theirs, kind="agent", owner="dave@acme.example")
    owner = credential(tether, "owner", "dave@acme.example")
    with console_client(tether) as client:
        sign_in(client, owner)
        page = client.get("/console/identities").text
        assert theirs in page and AGENT not in page
    rows = tether.store.identity_summaries(owner="dave@acme.example")
    assert [r.identity.spiffe_id for r in rows] == [theirs]
    assert len(tether.store.identity_summaries()) == 2


def test_an_owner_sees_only_their_nodes_of_a_delegation_tree(
    tether: Tether, held: dict[str, Any]
) -> None:
    from tether import parse_intent

    helper = "spiffe://acme.example/agent/daves-helper"
    tether.register_identity(helper, kind="agent", owner="dave@acme.example")
    child = tether.open_task(
        helper,
        proof_jwk=ProofKey().jwk,
        intent=parse_intent(
            {
                "purpose": "summarise",
                "capabilities": [{"tool": "fs.read"}],
                "budget": {"max_calls": 1},
            }
        ),
        parent_task_id=held["task_id"],
    )
    dave = credential(tether, "owner", "dave@acme.example")
    with console_client(tether) as client:
        sign_in(client, dave)
        page = client.get(f"/console/tasks/{child.task_id}").text
        assert child.task_id in page and helper in page
        assert "another owner&#39;s task" in page or "another owner's task" in page
        assert held["task_id"] not in page and AGENT not in page
        assert "call(s) held for approval" not in page  # the other task's drift
    with console_client(tether) as client:
        sign_in(client, credential(tether, "owner", OWNER))
        page = client.get(f"/console/tasks/{held['task_id']}").text
        assert held["task_id"] in page and "another owner" in page
        assert child.task_id not in page and helper not in page


def test_audit_verification_runs_off_the_event_loop_one_at_a_time(
    tether: Tether, admin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tether.console._pages import _CONSOLES

    loops: list[bool] = []
    verify = tether.verify_audit

    def spy() -> Any:
        try:
            asyncio.get_running_loop()
            loops.append(True)
        except RuntimeError:
            loops.append(False)
        return verify()

    monkeypatch.setattr(tether, "verify_audit", spy)
    with console_client(tether) as client:
        token = sign_in(client, admin)
        assert "Verified:" in client.post("/console/audit/verify", data={"csrf": token}).text
        assert loops == [False]  # not on the event loop's thread
        console = _CONSOLES[tether]
        with console.verifying:  # one is running
            busy = client.post("/console/audit/verify", data={"csrf": token})
        assert busy.status_code == 429 and loops == [False]
        assert client.post("/console/audit/verify", data={"csrf": token}).status_code == 200


def test_a_public_https_url_decides_tls_and_origin(tether: Tether, admin: str) -> None:
    """Behind a TLS proxy the app sees plain HTTP from the proxy's address."""
    public = "https://tether.example"

    def signin_form(client: TestClient[Any]) -> tuple[str, dict[str, str]]:
        form = client.get("/console/sign-in")
        assert form.headers["strict-transport-security"].startswith("max-age=")
        pre = next(c for c in form.headers.get_list("set-cookie") if "__Host-" in c)
        assert "Secure" in pre and "Path=/;" in pre + ";"
        name, _, value = pre.split(";")[0].partition("=")
        # The browser sends the Secure cookie to the https origin; the proxy passes it on.
        return csrf_of(form.text), {"Cookie": f"{name}={value}"}

    with console_client(
        tether, base_url="http://10.0.0.5:8700", client_host="10.0.0.9", public_url=public
    ) as client:
        csrf, cookie = signin_form(client)
        cross = client.post(
            "/console/sign-in",
            data={"csrf": csrf, "secret": admin},
            headers={**cookie, "Origin": "http://10.0.0.5:8700"},
            follow_redirects=False,
        )
        assert cross.status_code == 403  # the request's own host is not the public origin
        csrf, cookie = signin_form(client)
        done = client.post(
            "/console/sign-in",
            data={"csrf": csrf, "secret": admin},
            headers={**cookie, "Origin": public},
            follow_redirects=False,
        )
        assert done.status_code == 303, done.text  # not loopback, yet TLS at the public origin
        session = next(
            c for c in done.headers.get_list("set-cookie") if "__Host-tether_console=" in c
        )
        assert "Secure" in session and "Path=/;" in session + ";"
        assert done.headers["strict-transport-security"].startswith("max-age=")


def test_plain_http_keeps_the_loopback_rule_and_sends_no_hsts(tether: Tether, admin: str) -> None:
    with console_client(tether, client_host="testclient") as client:
        form = client.get("/console/sign-in")
        assert "strict-transport-security" not in form.headers
        refused = client.post(
            "/console/sign-in", data={"csrf": csrf_of(form.text), "secret": admin}
        )
        assert refused.status_code == 403 and "sign in over HTTPS" in refused.text
    with console_client(tether, public_url="http://127.0.0.1:8000") as client:
        form = client.get("/console/sign-in")
        assert "strict-transport-security" not in form.headers
        assert sign_in(client, admin)


def test_sign_ins_leave_receipts_without_the_secret(tether: Tether) -> None:
    row, secret = tether.credentials.create("auditor", "carol@acme.example")
    with console_client(tether) as client:
        form = client.get("/console/sign-in")
        wrong = secret[:-3] + "xyz"
        client.post("/console/sign-in", data={"csrf": csrf_of(form.text), "secret": wrong})
        sign_in(client, secret)
        client.get("/console/audit/export.jsonl?since=2001-01-01")
    failed, succeeded = reversed(_kinds(tether, "console.sign_in"))
    assert failed["effect"] == "deny" and failed["reasons"][0]["code"] == "credential.invalid"
    assert failed["detail"]["credential_id"] == row.credential_id and failed["chain"] == []
    assert succeeded["effect"] == "allow" and succeeded["chain"] == ["carol@acme.example"]
    assert succeeded["detail"] == {
        "credential_id": row.credential_id,
        "client": "127.0.0.1",
        "role": "auditor",
    }
    (export,) = _kinds(tether, "console.export")
    assert export["detail"] == {"credential_id": row.credential_id, "since": "2001-01-01"}
    bodies = " ".join(r.body for r in tether.store.iter_records())
    assert secret.split(".")[1] not in bodies and wrong.split(".")[1] not in bodies


def test_failed_sign_ins_lock_the_credential_id(tether: Tether, clock: FrozenClock) -> None:
    row, secret = tether.credentials.create("admin", "eve@acme.example")
    _, other = tether.credentials.create("admin", "frank@acme.example")

    def attempt(client: TestClient[Any], presented: str) -> int:
        form = client.get("/console/sign-in")
        data = {"csrf": csrf_of(form.text), "secret": presented}
        return client.post("/console/sign-in", data=data, follow_redirects=False).status_code

    with console_client(tether) as client:
        for _ in range(5):
            assert attempt(client, secret[:-3] + "xyz") == 401
        assert attempt(client, secret) == 429  # the right secret too, for a while
        assert attempt(client, other) == 303  # another credential is not locked
        clock.advance(5 * 60 + 1)
        assert attempt(client, secret) == 303
    locked = [b for b in _kinds(tether, "console.sign_in") if b["effect"] == "deny"]
    assert locked[0]["reasons"][0]["code"] == "credential.locked"
    assert locked[0]["detail"]["credential_id"] == row.credential_id


def test_the_export_escapes_line_separators(tether: Tether, admin: str) -> None:
    tether.audit.append("note", detail={"text": "one\u2028two\u2029three é"})
    with console_client(tether) as client:
        sign_in(client, admin)
        body = client.get("/console/audit/export.jsonl").content
    assert "\u2028".encode() not in body and "\u2029".encode() not in body
    assert body.isascii() and b"\\u2028" in body
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert any(
        line["record"].get("detail") == {"text": "one\u2028two\u2029three é"} for line in lines
    )


def test_following_decisions_is_not_activity(
    tether: Tether, admin: str, clock: FrozenClock
) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        for _ in range(3):
            clock.advance(4 * 60)
            page = client.get("/console/decisions?follow=1", follow_redirects=False)
            assert page.status_code == 200
        clock.advance(3 * 60)
        ended = client.get("/console/decisions?follow=1", follow_redirects=False)
        assert ended.status_code == 303  # 15 minutes with nobody at the tab


def test_accepted_risk_receipts_pin_the_row(tether: Tether, clock: FrozenClock) -> None:
    owner = credential(tether, "owner", OWNER)
    approver = credential(tether, "approver", "bob@acme.example")
    with console_client(tether) as client:
        token = sign_in(client, owner)
        assert _record_risk(client, token).status_code == 303
        risk_id = tether.store.list_accepted_risks()[0].risk_id
        (recorded,) = _kinds(tether, "risk.record")
        assert recorded["detail"]["title"] == "Helper reads unlabelled statements"
        assert recorded["detail"]["scope"] == "spiffe://acme.example/agent/bot"
        assert recorded["detail"]["justification"].startswith("The statements tool")
        assert recorded["detail"]["digest"].startswith("sha256:")
        assert "row matches its receipt" in client.get("/console/risk").text
    with console_client(tether) as client:
        token = sign_in(client, approver)
        client.post(f"/console/risks/{risk_id}", data={"csrf": token, "action": "accept"})
    with console_client(tether) as client:
        sign_in(client, owner)
        assert "row matches its receipt" in client.get("/console/risk").text
        tether.store.execute_unsafe(
            "UPDATE accepted_risks SET justification = 'Anything goes, forever.' WHERE risk_id = ?",
            (risk_id,),
        )
        changed = client.get("/console/risk").text
        assert "row matches its receipt" not in changed
        assert "warning: the row differs from its risk.record receipt" in changed


def test_a_recorder_withdraws_pending_and_accepted_risks(tether: Tether) -> None:
    owner = credential(tether, "owner", OWNER)
    approver = credential(tether, "approver", "bob@acme.example")
    with console_client(tether) as client:
        token = sign_in(client, owner)
        _record_risk(client, token, title="First")
        _record_risk(client, token, title="Second")
    first, second = sorted(tether.store.list_accepted_risks(), key=lambda r: r.title)
    with console_client(tether) as client:
        token = sign_in(client, approver)
        client.post(f"/console/risks/{second.risk_id}", data={"csrf": token, "action": "accept"})
    with console_client(tether) as client:
        token = sign_in(client, owner)
        assert 'value="withdraw"' in client.get("/console/risk").text
        for risk in (first, second):
            done = client.post(
                f"/console/risks/{risk.risk_id}",
                data={"csrf": token, "action": "withdraw"},
                follow_redirects=False,
            )
            assert done.status_code == 303
        again = client.post(
            f"/console/risks/{first.risk_id}", data={"csrf": token, "action": "withdraw"}
        )
        assert again.status_code == 409
        page = client.get("/console/risk").text
        assert page.count("row matches its receipt") == 2
    rows = {r.title: r for r in tether.store.list_accepted_risks()}
    assert rows["First"].status == "withdrawn" and rows["First"].decided_by is None
    assert rows["Second"].status == "withdrawn"
    assert rows["Second"].decided_by == "bob@acme.example"  # the approver's decision stays
    withdrawn = _kinds(tether, "risk.withdraw")
    assert [w["chain"] for w in withdrawn] == [[OWNER], [OWNER]]
    assert sorted(w["detail"]["was"] for w in withdrawn) == ["accepted", "pending"]
    tether.store.execute_unsafe(
        "UPDATE accepted_risks SET status = 'accepted', decided_by = 'bob@acme.example' "
        "WHERE risk_id = ?",
        (first.risk_id,),
    )
    with console_client(tether) as client:
        sign_in(client, owner)
        page = client.get("/console/risk").text
        assert "warning: the row is accepted, its receipts say withdrawn" in page
        assert page.count("row matches its receipt") == 1


def test_approvals_page_by_keyset(tether: Tether, admin: str) -> None:
    tether.policies.load({"all.cedar": APPROVAL_POLICY})
    tether.approvals.max_pending = 100  # one task holds every pending approval paged here
    key, _, token = open_simple_task(tether, tools=("notes.write",), max_calls=200)
    for i in range(60):
        receipt = call(tether, key, token, "notes.write", {"n": i})
        assert str(receipt.decision.effect) == "approval_required"
    with console_client(tether) as client:
        sign_in(client, admin)
        first = client.get("/console/approvals").text
        assert first.count('<article class="approval"') == 50
        link = first.split('id="next" href="/console/approvals?')[1].split('"')[0]
        second = client.get("/console/approvals?" + link.replace("&amp;", "&")).text
        assert second.count('<article class="approval"') == 10
        assert 'id="next"' not in second
        ids = {
            a.split('"')[0] for a in (first + second).split('<article class="approval" id="')[1:]
        }
        assert len(ids) == 60
    page = tether.store.approvals_page(status="pending", limit=50)
    keys = [(r.created_at, r.approval_id) for r in page]
    assert keys == sorted(keys, reverse=True)


def test_forwarded_addresses_count_only_when_trusted(
    tether: Tether, admin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def attempt(forwarded: str) -> int:
        with console_client(tether, client_host="10.0.0.9") as client:
            form = client.get("/console/sign-in")
            return client.post(
                "/console/sign-in",
                data={"csrf": csrf_of(form.text), "secret": admin},
                headers={"X-Forwarded-For": forwarded},
                follow_redirects=False,
            ).status_code

    assert attempt("127.0.0.1") == 403  # not trusted: the proxy's own address counts
    monkeypatch.setenv("TETHER_TRUST_FORWARDED", "1")
    assert attempt("127.0.0.1, 198.51.100.7") == 403  # the nearest proxy's entry is last
    assert attempt("198.51.100.7, 127.0.0.1") == 303
    signed_in = [b for b in _kinds(tether, "console.sign_in") if b["effect"] == "allow"]
    assert signed_in[0]["detail"]["client"] == "127.0.0.1"


# -- sessions in the store: any node, any restart ------------------------------------------
@pytest.fixture
def nodes(tmp_path: Path, clock: FrozenClock) -> Iterator[tuple[Path, Tether, Tether]]:
    """Two Tethers over one home (and its database), as two nodes behind one balancer."""
    home = tmp_path / "home"
    first = Tether.init(home, "acme.example", clock=clock)
    second = Tether.open(home, clock=clock)
    yield home, first, second
    second.close()
    first.close()


def session_rows(tether: Tether) -> list[tuple[Any, ...]]:
    return tether.store.execute_fetch("SELECT * FROM console_sessions")


def seen_at(tether: Tether) -> float:
    (row,) = tether.store.execute_fetch("SELECT seen_at FROM console_sessions")
    return float(row[0])


def test_a_session_made_on_one_node_is_honoured_by_another(
    nodes: tuple[Path, Tether, Tether],
) -> None:
    _, first, second = nodes
    secret = credential(first, "admin", "root@acme.example")
    with console_client(first) as one, console_client(second) as two:
        token = sign_in(one, secret)
        two.cookies.update(one.cookies)
        page = two.get("/console/identities", follow_redirects=False)
        assert page.status_code == 200 and csrf_of(page.text) == token
        # A form posted to the other node passes its CSRF check and ends the session there.
        done = two.post("/console/sign-out", data={"csrf": token}, follow_redirects=False)
        assert done.status_code == 303
        assert one.get("/console/identities", follow_redirects=False).status_code == 303
        assert session_rows(first) == []


def test_a_sign_in_form_from_one_node_posts_to_another_once(
    nodes: tuple[Path, Tether, Tether],
) -> None:
    _, first, second = nodes
    secret = credential(first, "admin", "root@acme.example")
    with console_client(first) as one, console_client(second) as two:
        form = one.get("/console/sign-in")
        two.cookies.update(one.cookies)
        values = {"csrf": csrf_of(form.text), "secret": secret, "next": "/console/identities"}
        done = two.post("/console/sign-in", data=values, follow_redirects=False)
        assert done.status_code == 303
        again = one.post("/console/sign-in", data=values, follow_redirects=False)
        assert again.status_code == 403  # the form's token works once, on any node


def test_a_restarted_node_keeps_its_sessions(
    nodes: tuple[Path, Tether, Tether], clock: FrozenClock
) -> None:
    home, first, _ = nodes
    secret = credential(first, "admin", "root@acme.example")
    with console_client(first) as one:
        sign_in(one, secret)
        cookies = one.cookies
    restarted = Tether.open(home, clock=clock)
    try:
        with console_client(restarted) as again:
            again.cookies.update(cookies)
            assert again.get("/console/identities", follow_redirects=False).status_code == 200
    finally:
        restarted.close()


def test_the_store_never_holds_the_raw_session_id(tether: Tether, admin: str) -> None:
    with console_client(tether) as client:
        token = sign_in(client, admin)
        raw = client.cookies.get("tether_console")
        assert raw
    rows = session_rows(tether)
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0])
    assert raw not in stored and token not in stored
    assert rows[0][0] == hashlib.sha256(raw.encode()).hexdigest()
    proofs = " ".join(str(v) for r in tether.store.execute_fetch("SELECT * FROM proofs") for v in r)
    assert raw not in proofs and token not in proofs


def test_activity_is_written_at_most_once_a_minute(
    tether: Tether, admin: str, clock: FrozenClock
) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        signed_in = seen_at(tether)
        clock.advance(30)
        assert client.get("/console/identities", follow_redirects=False).status_code == 200
        assert seen_at(tether) == signed_in  # within the minute: nothing written
        clock.advance(31)
        assert client.get("/console/identities", follow_redirects=False).status_code == 200
        assert seen_at(tether) == clock.now()
        clock.advance(5 * 60)
        assert client.get("/console/decisions?follow=1").status_code == 200
        assert seen_at(tether) == clock.now() - 5 * 60  # a refresh is no activity


def test_idle_and_absolute_ends_hold_across_nodes(
    nodes: tuple[Path, Tether, Tether], clock: FrozenClock
) -> None:
    _, first, second = nodes
    secret = credential(first, "admin", "root@acme.example")
    with console_client(first) as one, console_client(second) as two:
        sign_in(one, secret)
        two.cookies.update(one.cookies)
        # Activity on either node keeps the session, until 8 hours after sign-in.
        for step in range(47):
            clock.advance(10 * 60)
            client = two if step % 2 else one
            assert client.get("/console/identities", follow_redirects=False).status_code == 200
        clock.advance(10 * 60)  # 8 hours since sign-in
        assert two.get("/console/identities", follow_redirects=False).status_code == 303
        assert session_rows(first) == []
        sign_in(one, secret)
        two.cookies.update(one.cookies)
        clock.advance(15 * 60)
        assert two.get("/console/identities", follow_redirects=False).status_code == 303


def test_a_disabled_credential_ends_its_session_on_every_node(
    nodes: tuple[Path, Tether, Tether],
) -> None:
    _, first, second = nodes
    row, secret = first.credentials.create("admin", "eve@acme.example")
    with console_client(first) as one, console_client(second) as two:
        sign_in(one, secret)
        two.cookies.update(one.cookies)
        first.credentials.disable(row.credential_id, by="root@acme.example")
        assert two.get("/console/identities", follow_redirects=False).status_code == 303
        assert session_rows(first) == []
        assert one.get("/console/identities", follow_redirects=False).status_code == 303


def test_expired_sessions_are_purged_at_sign_in(
    tether: Tether, admin: str, clock: FrozenClock
) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
        clock.advance(16 * 60)
        sign_in(client, admin)
        raw = client.cookies.get("tether_console")
        assert raw
    assert [r[0] for r in session_rows(tether)] == [hashlib.sha256(raw.encode()).hexdigest()]


def test_the_reaper_deletes_expired_sessions(
    tether: Tether, admin: str, clock: FrozenClock
) -> None:
    with console_client(tether) as client:
        sign_in(client, admin)
    assert len(session_rows(tether)) == 1
    clock.advance(8 * 3600)
    with console_client(tether):  # the reaper runs once as the app starts
        deadline = time.monotonic() + 10
        while session_rows(tether) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert session_rows(tether) == []


def test_the_sign_in_form_is_rate_limited_per_address(tether: Tether) -> None:
    """Each form served records a one-time token in the store: a flood is refused."""
    with console_client(tether) as client:
        codes = [client.get("/console/sign-in").status_code for _ in range(40)]
    assert codes[:30] == [200] * 30
    assert 429 in codes[30:]


def test_an_ended_task_shows_its_token_void_not_expiring(tether: Tether, admin: str) -> None:
    """An ended task's token is void: the task list and page say so, never "in 1 min"."""
    tether.policies.load({"all.cedar": APPROVAL_POLICY})
    _key, task_id, _token = open_simple_task(tether)
    _key2, open_id, _token2 = open_simple_task(tether)
    tether.end_task(task_id)
    with console_client(tether) as client:
        sign_in(client, admin)
        listed = client.get("/console/tasks?status=all").text
        rows = {
            m.group(1): m.group(2)
            for m in re.finditer(
                r'<code>(task_[^<]+)</code>.*?<td class="token-expires">(.*?)</td>', listed, re.S
            )
        }
        assert "void: task ended" in rows[task_id]
        assert rows[open_id].startswith("in ")
        page = client.get(f"/console/tasks/{task_id}").text
        token_line = page.split("<dt>Token expires</dt>")[1].split("</dd>")[0]
        assert "void since" in token_line and "ended" in token_line and " in " not in token_line


def test_chart_labels_fit_and_keep_their_whole_text() -> None:
    """A long framework label is cut at a word with an ellipsis to fit the chart's label
    column, and its whole text stays the element's title; a short one is left whole."""
    from tether.console._report import LABEL_CHARS, Row, bar_chart

    long = Row(key="NHI7", name="Long-Lived Secrets and Overprivileged Identities", tag="x")
    short = Row(key="ASI01", name="Goal Hijack", tag="y", allow=1)
    svg = str(bar_chart([long, short]))
    labels = re.findall(r'<text class="chart-label"[^>]*><title>([^<]*)</title>([^<]*)</text>', svg)
    (long_title, long_shown), (short_title, short_shown) = labels
    assert long_title == "NHI7 Long-Lived Secrets and Overprivileged Identities"
    assert long_shown.endswith("…") and len(long_shown) <= LABEL_CHARS
    assert long_title.startswith(long_shown[:-1])
    assert long_shown[:-1].endswith(("Secrets", "and", "Overprivileged"))  # a whole word
    assert short_title == short_shown == "ASI01 Goal Hijack"
