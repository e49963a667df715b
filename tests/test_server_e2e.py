"""The control plane over real HTTP on loopback: a server process, the SDK, the spiffe
package and authlib's OAuth client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from spiffe import JwtBundle, JwtSvid, TrustDomain

from tether import APIError, ApprovalRequired, Client, Denied, ProofKey

from .server_support import Server

AGENT = "spiffe://acme.example/agent/bill-payer"
HELPER = "spiffe://acme.example/agent/helper"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"
PAYEE = "DE50526018159083016613"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "home").start()
    yield srv
    srv.stop()


def _setup(server: Server) -> tuple[Client, Client]:
    admin = Client(server.url, admin=server.admin)
    admin.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    files = {p.name: p.read_text() for p in (EXAMPLES / "policies").glob("*.cedar")}
    admin.load_policies(files)
    import tomllib

    admin.add_template(tomllib.loads((EXAMPLES / "templates" / "pay-bill.toml").read_text()))
    # What the bank's tools do, for every door (an undescribed tool is refused).
    catalogue = tomllib.loads((EXAMPLES / "bank.catalogue.toml").read_text())
    loaded = admin.post("/v1/catalogue", {"tools": catalogue["tools"], "prefix": "bank"})
    assert "bank.send_money" in loaded["tools"]
    agent = Client(server.url, key=ProofKey())
    agent.attest(admin.join_token(AGENT))
    return admin, agent


def test_agent_path_over_http(server: Server) -> None:
    admin, agent = _setup(server)
    with agent.task(template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}) as task:
        assert task.authorize("bank.read_bills").allowed
        denied = task.authorize("shell.exec", {"cmd": "id"})
        assert denied.effect == "deny" and denied.reasons[0]["code"] == "intent.no_capability"

        def send_money(recipient: str, amount: float) -> str:
            return f"sent {amount} to {recipient}"

        pay = task.guarded(send_money, name="bank.send_money")
        assert pay(PAYEE, 120.0) == f"sent 120.0 to {PAYEE}"
        with pytest.raises(Denied) as refused:
            pay("GB33BUKB20201555555555", 10.0)
        assert refused.value.reasons[0]["code"] == "intent.argument"
        with pytest.raises(ApprovalRequired) as held:
            pay(PAYEE, 1200.0)
        approval = held.value.approval_id
        assert approval and admin.approvals()[0]["approval_id"] == approval
        admin.approve(approval, comment="invoice INV-7 checked <b>ok</b>")
        assert pay(PAYEE, 1200.0) == f"sent 1200.0 to {PAYEE}"
        decided = [r for r in admin.audit(20) if r["kind"] == "approval.decide"]
        assert decided[-1]["detail"]["comment"] == "invoice INV-7 checked <b>ok</b>"
        assert decided[-1]["detail"]["approval_id"] == approval
        token = task.token
    # The task ended on exit: its token is refused.
    state = admin.get(f"/v1/tasks/{task.task_id}")
    assert state["status"] == "ended"
    again = agent.send(agent.requests.decision(token, agent.key, "bank.read_bills", {}))  # type: ignore[arg-type]
    assert again["effect"] == "deny" and again["reasons"][0]["code"] == "task.ended"
    assert admin.verify_audit()["ok"] is True


def test_task_ends_on_exception_and_keyboard_interrupt(server: Server) -> None:
    admin, agent = _setup(server)
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with (
            pytest.raises(type(error)),
            agent.task(template="pay-bill", params={"payee": PAYEE}) as task,
        ):
            raise error
        assert admin.get(f"/v1/tasks/{task.task_id}")["status"] == "ended"


def test_spiffe_library_validates_svids_against_the_served_bundle(server: Server) -> None:
    _admin, agent = _setup(server)
    bundle_doc = httpx.get(f"{server.url}/.well-known/spiffe-bundle").json()
    jwt_keys = {"keys": [k for k in bundle_doc["keys"] if k["use"] == "jwt-svid"]}
    bundle = JwtBundle.parse(TrustDomain("acme.example"), json.dumps(jwt_keys).encode())
    svid = JwtSvid.parse_and_validate(
        agent.requests.svid,
        bundle,  # type: ignore[arg-type]
        {"spiffe://acme.example"},
    )
    assert str(svid.spiffe_id) == AGENT


def test_no_write_endpoint_is_reachable_unauthenticated(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    writes = [
        (path, m)
        for path, ops in schema["paths"].items()
        for m in ops
        if m in ("post", "put", "patch", "delete")
    ]
    assert len(writes) >= 10
    # /v1/attest/federated: the foreign SVID is the credential, as the join token is.
    open_by_design = {"/v1/decisions", "/v1/attest", "/v1/attest/federated", "/oauth2/token"}
    # The AuthZEN decision point: a task token in the body or headers; without one, a
    # false decision (counted like any unauthenticated refusal), not a 401.
    open_by_design |= {
        "/access/v1/evaluation",
        "/access/v1/evaluations",
        "/access/v1/search/action",
    }
    for path, method in writes:
        url = server.url + path.replace("{task_id}", "task_x").replace("{approval_id}", "apr_x")
        response = httpx.request(method.upper(), url, json={})
        if path in open_by_design:
            continue
        assert response.status_code == 401, (path, response.status_code, response.text)
        assert "DPoP" in response.headers["www-authenticate"]


def test_roles_are_enforced(server: Server) -> None:
    _admin, _ = _setup(server)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "admin",
            "create",
            "--role",
            "auditor",
            "--owner",
            "eve@acme.example",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TETHER_SERVER": server.url, "TETHER_TOKEN": server.admin},
    )
    auditor = Client(server.url, admin=json.loads(proc.stdout)["credential"])
    assert auditor.verify_audit()["ok"] is True
    with pytest.raises(APIError) as refused:
        auditor.register_identity(
            "spiffe://acme.example/agent/x", kind="agent", owner="eve@acme.example"
        )
    assert refused.value.status == 403
    wrong = Client(server.url, admin="tadm_0000000000000000." + "A" * 43)
    with pytest.raises(APIError) as unknown:
        wrong.verify_audit()
    assert unknown.value.status == 401


def test_workload_proof_replay_is_refused(server: Server) -> None:
    _, agent = _setup(server)
    url = f"{server.url}/v1/tasks"
    assert agent.key is not None and agent.requests.svid is not None
    proof = agent.key.prove_request(agent.requests.svid, htm="POST", htu=url, now=time.time())
    headers = {"Authorization": f"DPoP {agent.requests.svid}", "DPoP": proof}
    body = {"template": "pay-bill", "params": {"payee": PAYEE}}
    assert httpx.post(url, headers=headers, json=body).status_code == 201
    replay = httpx.post(url, headers=headers, json=body)
    assert replay.status_code == 401 and replay.json()["error"] == "proof.replayed"
    other_url = httpx.post(f"{server.url}/v1/templates", headers=headers, json={})
    assert other_url.status_code in (400, 401)


def test_restart_loses_nothing(server: Server) -> None:
    admin, agent = _setup(server)
    keep = agent.open_task(template="pay-bill", params={"payee": PAYEE})
    revoked = agent.open_task(template="pay-bill", params={"payee": PAYEE})
    assert keep.authorize("bank.read_bills").allowed
    revoked.end()
    before = admin.verify_audit()
    server.stop(signal.SIGKILL)
    server.start()
    after = admin.verify_audit()
    assert after["ok"] is True and after["records"] >= before["records"]
    assert keep.authorize("bank.read_balance").allowed  # in-flight task continues
    assert revoked.authorize("bank.read_bills").reasons[0]["code"] == "task.ended"
    assert admin.get(f"/v1/tasks/{keep.task_id}")["calls_used"] == 2


def test_authlib_token_exchange_introspection_and_revocation(
    server: Server, tmp_path: Path
) -> None:
    from authlib.integrations.httpx_client import OAuth2Client

    _admin, agent = _setup(server)
    # A user-token issuer the trust domain accepts as a token-exchange subject.
    user_key = ProofKey()
    jwks_file = tmp_path / "idp.json"
    jwks_file.write_text(
        json.dumps({"keys": [{**user_key.jwk, "kid": "idp-1", "alg": "ES256", "use": "sig"}]})
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "--home",
            str(server.home),
            "--break-glass",  # trusting an issuer is the store's own (no endpoint)
            "issuer",
            "--issuer",
            "https://idp.acme.example",
            "--audience",
            "tether",
            "--jwks",
            str(jwks_file),
        ],
        check=True,
        capture_output=True,
    )
    import time

    user_token = jwt.encode(
        {
            "iss": "https://idp.acme.example",
            "sub": "user-7",
            "aud": "tether",
            "exp": int(time.time()) + 300,
        },
        user_key.private_key,
        algorithm="ES256",
        headers={"kid": "idp-1"},
    )
    oauth = OAuth2Client(client_id="agent", token_endpoint_auth_method="none")
    token = oauth.fetch_token(
        f"{server.url}/oauth2/token",
        grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
        subject_token=user_token,
        subject_token_type="urn:ietf:params:oauth:token-type:jwt",
        actor_token=agent.requests.svid,
        actor_token_type="urn:ietf:params:oauth:token-type:jwt",
        scope="pay-bill",
        request_details=json.dumps({"params": {"payee": PAYEE}}),
    )
    assert token["issued_token_type"] == "urn:ietf:params:oauth:token-type:txn_token"
    claims = jwt.decode(token["access_token"], options={"verify_signature": False})
    assert claims["sub"] == AGENT and claims["obo"] == "user-7"
    assert claims["cnf"]["jkt"] == agent.key.thumbprint  # type: ignore[union-attr]

    admin_row = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tether",
                "admin",
                "create",
                "--role",
                "admin",
                "--owner",
                "ops@acme.example",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TETHER_SERVER": server.url, "TETHER_TOKEN": server.admin},
        ).stdout
    )
    cid, secret = admin_row["credential"][len("tadm_") :].split(".")
    rs = OAuth2Client(client_id=cid, client_secret=secret)
    active = rs.introspect_token(
        f"{server.url}/oauth2/introspect", token=token["access_token"]
    ).json()
    assert active["active"] is True and active["cnf"]["jkt"] == agent.key.thumbprint  # type: ignore[union-attr]
    assert active["txn"] == token["task_id"]
    revoked = rs.revoke_token(f"{server.url}/oauth2/revoke", token=token["access_token"])
    assert revoked.status_code == 200
    inactive = rs.introspect_token(
        f"{server.url}/oauth2/introspect", token=token["access_token"]
    ).json()
    assert inactive == {"active": False}
    garbage = rs.introspect_token(f"{server.url}/oauth2/introspect", token="nonsense").json()
    assert garbage == {"active": False}


def test_delegation_by_token_exchange(server: Server) -> None:
    admin, agent = _setup(server)
    admin.register_identity(HELPER, kind="agent", owner="alice@acme.example")
    helper = Client(server.url, key=ProofKey())
    helper.attest(admin.join_token(HELPER))
    parent = agent.open_task(template="pay-bill", params={"payee": PAYEE})
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": parent.token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:txn_token",
        "actor_token": helper.requests.svid or "",
        "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
    }
    narrow = {
        "purpose": "read the bills",
        "capabilities": [{"tool": "bank.read_bills"}],
        "budget": {"max_calls": 2},
        "ttl_seconds": 120,
    }
    admin.load_policies(
        {
            **{p.name: p.read_text() for p in (EXAMPLES / "policies").glob("*.cedar")},
            "adhoc.cedar": 'permit (principal, action == Action::"open_task", '
            'resource == Template::"adhoc");',
        }
    )
    url = f"{server.url}/oauth2/token"

    def parent_proof() -> dict[str, str]:
        assert agent.key is not None
        return {"DPoP": agent.key.prove_request(parent.token, htm="POST", htu=url, now=time.time())}

    # The parent token alone (no proof by its key) delegates nothing.
    bare = httpx.post(url, data={**form, "request_details": json.dumps({"intent": narrow})})
    assert bare.status_code == 400 and bare.json()["error"] == "invalid_grant"
    assert "proof" in bare.json()["error_description"]
    # Nor does a proof by the actor's own key.
    assert helper.key is not None
    stolen = httpx.post(
        url,
        data={**form, "request_details": json.dumps({"intent": narrow})},
        headers={
            "DPoP": helper.key.prove_request(parent.token, htm="POST", htu=url, now=time.time())
        },
    )
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    ok = httpx.post(
        url,
        data={**form, "request_details": json.dumps({"intent": narrow})},
        headers=parent_proof(),
    )
    assert ok.status_code == 200, ok.text
    claims = jwt.decode(ok.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == HELPER and claims["act"] == {"sub": AGENT}
    wide = {**narrow, "capabilities": [{"tool": "shell.exec"}]}
    refused = httpx.post(
        url, data={**form, "request_details": json.dumps({"intent": wide})}, headers=parent_proof()
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert "shell.exec" in refused.json()["error_description"]
    # Through the SDK: the parent delegates, the helper adopts and calls.
    handed = parent.delegate(helper.requests.svid or "", intent=narrow)
    child = helper.adopt(handed["task_id"], handed["access_token"])
    assert child.authorize("bank.read_bills").allowed
    # Another workload may not attach itself to someone else's task over /v1/tasks.
    with pytest.raises(APIError) as hijack:
        helper.open_task(intent=narrow, parent_task_id=parent.task_id)
    assert hijack.value.status == 403


def test_delegated_calls_spend_the_parents_budget(server: Server) -> None:
    admin, agent = _setup(server)
    admin.load_policies(
        {
            **{p.name: p.read_text() for p in (EXAMPLES / "policies").glob("*.cedar")},
            "adhoc.cedar": 'permit (principal, action == Action::"open_task", '
            'resource == Template::"adhoc");',
        }
    )
    one = {
        "purpose": "read",
        "capabilities": [{"tool": "bank.read_bills"}],
        "budget": {"max_calls": 1},
        "ttl_seconds": 300,
    }
    parent = agent.open_task(intent=one)
    child_intent = {**one, "ttl_seconds": 100}
    children = [
        agent.open_task(intent=child_intent, parent_task_id=parent.task_id) for _ in range(3)
    ]
    effects = [c.authorize("bank.read_bills").effect for c in children]
    assert effects.count("allow") == 1, effects


def test_metrics_and_health(server: Server) -> None:
    _, agent = _setup(server)
    with agent.task(template="pay-bill", params={"payee": PAYEE}) as task:
        task.authorize("bank.read_bills")
        task.authorize("shell.exec")
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # not public
    admin = {"Authorization": f"Bearer {server.admin}"}
    text = httpx.get(f"{server.url}/metrics", headers=admin).text
    assert 'tether_decisions_total{effect="allow",rule="allow",tool="bank.read_bills"} 1.0' in text
    # shell.exec is in no catalogue: its series is "other", not a name the caller chose
    assert 'effect="deny",rule="intent.no_capability",tool="other"' in text
    assert "tether_decision_seconds_bucket" in text
    assert "tether_approvals_pending" in text
    log = (server.home / "server.log").read_text()
    assert '"route": "/v1/decisions"' in log
    assert agent.requests.svid not in log and task.token not in log  # type: ignore[operator]


def test_task_for_a_resource_server_over_http(server: Server) -> None:
    _, agent = _setup(server)
    gateway = "https://gateway.acme.example/mcp"
    task = agent.open_task(template="pay-bill", params={"payee": PAYEE}, resources=[gateway])
    claims = jwt.decode(task.token, options={"verify_signature": False})
    assert claims["aud"] == ["acme.example", gateway]


def test_request_is_bound_and_dry_run_sees_flow_context(server: Server) -> None:
    admin, agent = _setup(server)
    task = agent.open_task(
        template="pay-bill",
        params={"payee": PAYEE},
        request=f"Please pay the electricity bill to {PAYEE}",
    )
    shown = admin.get(f"/v1/tasks/{task.task_id}")
    assert shown["intent"]["request"].endswith(PAYEE)
    files = {
        "flow.cedar": (
            '@id("no-send-after-untrusted")\n'
            'forbid (principal, action == Action::"call_tool", resource) '
            "when { context.flow.untrusted_read };\n"
            'permit (principal, action == Action::"call_tool", resource);'
        )
    }
    result = admin.post(
        "/v1/policies/dry-run",
        {"files": files, "agent": AGENT, "tool": "bank.read_bills", "args": {}},
    )
    assert result == {"effect": "allow", "policies": result["policies"], "errors": []}


def test_an_approval_comment_is_bounded(server: Server) -> None:
    admin, agent = _setup(server)
    with agent.task(template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}) as task:
        held = task.authorize("bank.send_money", {"recipient": PAYEE, "amount": 1200.0})
        assert held.effect == "approval_required" and held.approval_id
        with pytest.raises(APIError) as refused:
            admin.deny(held.approval_id, comment="x" * 1001)
        assert refused.value.status == 400
        assert admin.approvals()[0]["status"] == "pending"  # nothing changed
        admin.deny(held.approval_id, comment="not this month")
        assert admin.approvals(status="denied")[0]["approval_id"] == held.approval_id


def test_shadow_mode_over_http(server: Server) -> None:
    """POST /v1/policies with shadow: the live set still decides; GET
    /v1/policies/shadow lists the call the candidate would refuse; DELETE ends it."""
    admin, agent = _setup(server)
    files = {p.name: p.read_text() for p in (EXAMPLES / "policies").glob("*.cedar")}
    files["stricter.cedar"] = (
        '@id("no-bill-reading")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bank.read_bills");'
    )
    live = admin.get("/v1/policies")["digest"]
    shadow = admin.post("/v1/policies", {"files": files, "shadow": True})
    assert shadow["digest"] != live and admin.get("/v1/policies")["digest"] == live
    with agent.task(template="pay-bill", params={"payee": PAYEE}) as task:
        assert task.authorize("bank.read_bills").allowed  # not enforced
    report = admin.get("/v1/policies/shadow")
    assert report["digest"] == shadow["digest"] and report["changes"] == {"allow→deny": 1}
    assert report["changed"][0]["policies"] == ["no-bill-reading"]
    off = httpx.delete(
        f"{server.url}/v1/policies/shadow", headers={"Authorization": f"Bearer {server.admin}"}
    )
    assert off.status_code == 200 and off.json() == {"removed": shadow["digest"]}
    assert admin.get("/v1/policies/shadow")["digest"] is None
