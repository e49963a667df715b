"""The MCP gateway for real: uvicorn on loopback, the official MCP client, real upstreams.

Upstreams: ``mcp-server-git`` over stdio on a temporary repository (2025-11-25
handshake), the bundled tool server over stdio (2026-07-28) and over
streamable HTTP (auto), a second stdio copy that is crashed and hung, and a
server that answers with garbage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp.shared.auth import ProtectedResourceMetadata
from mcp.shared.exceptions import MCPError

from tether import FrozenClock, ProofKey, Tether
from tether.core._verify import PROOF_WINDOW
from tether.enforcement._unauthenticated import UnauthenticatedTraffic

from .mcp_support import tool_server
from .mcp_support.harness import (
    AGENT,
    EXAMPLES,
    GARBAGE_SERVER,
    GIT_IDENTITY,
    TOOLS_IDENTITY,
    GatewayServer,
    HttpUpstream,
    build_config,
    free_port,
    git_upstream,
    init_home,
    make_git_repo,
    mcp_client,
    open_task,
    raw_call,
    receipts,
    sse_result,
    text_of,
    tools_upstream,
    wait_for_port,
)
from .server_support import home_database

WEB_IDENTITY = "spiffe://acme.example/tool/web"
FRAGILE_IDENTITY = "spiffe://acme.example/tool/fragile"
JUNK_IDENTITY = "spiffe://acme.example/tool/junk"
UPSTREAM_KEY = "k-" + "upstream-credential-of-the-gateway"
EVERYTHING = [
    "git.git_status",
    "git.git_log",
    "git.git_diff*",
    "git.git_show",
    "git.git_add",
    "git.git_commit",
    "git.git_reset",
    "tools.*",
    "web.*",
    "webm.*",
    "fragile.*",
    "junk.*",
]


@dataclass
class Env:
    tether: Tether
    gateway: GatewayServer
    repo: Path
    home: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    def task(self, tools: list[str], **kwargs: Any) -> tuple[ProofKey, str, str]:
        key, task = open_task(self.tether, tools, resource=self.url, **kwargs)
        return key, task.task_id, task.token


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("gateway")
    repo = make_git_repo(base / "repo")
    home = base / "home"
    identities = {
        "git": GIT_IDENTITY,
        "tools": TOOLS_IDENTITY,
        "web": WEB_IDENTITY,
        "fragile": FRAGILE_IDENTITY,
        "junk": JUNK_IDENTITY,
    }
    tether = init_home(home, identities)
    http_upstream = HttpUpstream()
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    port = free_port()
    config = build_config(
        port,
        base,
        [
            git_upstream(repo, protocol="legacy"),
            tools_upstream("tools", TOOLS_IDENTITY, protocol="2026-07-28"),
            {
                "name": "web",
                "identity": WEB_IDENTITY,
                "protocol": "legacy",
                "http": {
                    "url": http_upstream.url,
                    "headers": {"X-Upstream-Key": "env:TEST_UPSTREAM_KEY"},
                },
                "tools": tools_upstream("web", WEB_IDENTITY)["tools"],
            },
            {
                "name": "webm",
                "identity": WEB_IDENTITY,
                "protocol": "2026-07-28",
                "http": {"url": http_upstream.url},
                "tools": tools_upstream("webm", WEB_IDENTITY)["tools"],
            },
            tools_upstream("fragile", FRAGILE_IDENTITY, call_timeout_seconds=2.0),
            {
                "name": "junk",
                "identity": JUNK_IDENTITY,
                "protocol": "legacy",
                "call_timeout_seconds": 3.0,
                "stdio": {"command": sys.executable, "args": [str(GARBAGE_SERVER)]},
                "tools": {"noise": {"side_effect": "read", "sensitivity": "public"}},
            },
        ],
        approval={"mode": "wait", "timeout_seconds": 4, "poll_interval_seconds": 0.1},
    )
    gateway = GatewayServer(home, config, port).start().pin_all()
    # Each refusal's receipt is examined here: sample every one (interval 0); the default
    # sampling (one receipt per address per minute) is tested on its own gateway below.
    gateway.gateway.unauthenticated = UnauthenticatedTraffic(interval=0.0, rate=0.0)
    try:
        yield Env(tether=tether, gateway=gateway, repo=repo, home=home)
    finally:
        gateway.stop()
        http_upstream.stop()
        tether.close()
        os.environ.pop("TEST_UPSTREAM_KEY", None)


def _decisions(env: Env, task_id: str) -> list[dict[str, Any]]:
    return [r for r in receipts(env.tether, "decision", 200) if r.get("task_id") == task_id]


# -- discovery and authentication ------------------------------------------------------------


def test_protected_resource_metadata(env: Env) -> None:
    expected_url = env.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
    for url in (expected_url, env.url.replace("/mcp", "/.well-known/oauth-protected-resource")):
        response = httpx.get(url)
        assert response.status_code == 200
        body = response.json()
        metadata = ProtectedResourceMetadata.model_validate(body)
        assert str(metadata.resource).rstrip("/") == env.url
        assert body["resource"] == env.url
        assert body["authorization_servers"] == ["https://tether.acme.example"]
        assert body["bearer_methods_supported"] == ["header"]
        assert body["dpop_signing_alg_values_supported"] == ["ES256"]
        assert body["dpop_bound_access_tokens_required"] is True


def test_no_token_gets_401_with_challenge_and_a_receipt(env: Env) -> None:
    before = len(receipts(env.tether, "gateway.reject", 500))
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    response = raw_call(env.url, {}, body)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("DPoP ")
    assert "error=" not in challenge  # no credentials: no error code (RFC 6750 §3)
    metadata_url = env.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp")
    assert f'resource_metadata="{metadata_url}"' in challenge
    assert response.json()["error"]["data"]["reason"] == "token.missing"
    rejects = receipts(env.tether, "gateway.reject", 500)
    assert len(rejects) == before + 1
    assert rejects[-1]["reasons"][0]["code"] == "token.missing"
    assert rejects[-1]["effect"] == "deny"


def test_unauthenticated_refusals_are_sampled_and_rate_limited(env: Env) -> None:
    """Attacker: an unauthenticated network caller hammering the gateway with no token
    and with garbage tokens. The store is not theirs to fill: one receipt per source
    address per interval says how many were refused, past the address's rate it is
    answered 429, and a caller with a live token on the same address is unaffected."""
    gateway = env.gateway.gateway
    saved = gateway.unauthenticated
    gateway.unauthenticated = UnauthenticatedTraffic(rate=5.0, burst=20.0, interval=60.0)
    try:
        before = len(receipts(env.tether, "gateway.reject", 5000))
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        statuses = []
        with httpx.Client(timeout=10) as client:
            for i in range(60):
                headers = {} if i % 2 else {"Authorization": f"DPoP garbage.{i}.x", "DPoP": "x"}
                statuses.append(client.post(env.url, headers=headers, json=body).status_code)
        assert set(statuses[:20]) == {401} and statuses.count(429) >= 30, statuses
        rejects = receipts(env.tether, "gateway.reject", 5000)[before:]
        assert len(rejects) == 1, rejects
        assert rejects[0]["detail"]["refused"] == 1 and rejects[0]["detail"]["source"]
        # A live token's call on the same address still goes through.
        key, _task_id, token = env.task(["git.git_status"])
        call = _status_call(env)
        ok = raw_call(env.url, _signed(token, key, env.url, call), call)
        assert ok.status_code == 200, ok.text
    finally:
        gateway.unauthenticated = saved


def test_official_client_without_credentials_is_refused(env: Env) -> None:
    from mcp import Client

    async def connect() -> None:
        async with Client(env.url, mode="legacy"):
            pass

    with pytest.raises(BaseException) as refused:
        anyio.run(connect)
    errors = _leaves(refused.value)
    assert any(isinstance(e, MCPError) and "401" in e.message for e in errors), errors


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def test_foreign_host_header_is_refused_before_authentication(env: Env) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    response = raw_call(env.url, {"Host": "evil.example"}, body)
    assert response.status_code == 421


def test_bearer_downgrade_is_refused(env: Env) -> None:
    _key, _task_id, token = env.task(["git.git_status"])
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    response = raw_call(env.url, {"Authorization": f"Bearer {token}"}, body)
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert receipts(env.tether, "gateway.reject")[-1]["reasons"][0]["code"] == "token.scheme"


def test_upstreams_speak_both_protocol_generations(env: Env) -> None:
    gateway = env.gateway.gateway
    versions = {name: u.protocol_version for name, u in gateway.upstreams.items()}
    assert versions == {
        "git": "2025-11-25",  # stdio, initialize handshake
        "tools": "2026-07-28",  # stdio, stateless
        "web": "2025-11-25",  # streamable HTTP with a session
        "webm": "2026-07-28",  # streamable HTTP, stateless
        "fragile": "2026-07-28",  # stdio, negotiated (auto)
        "junk": "2025-11-25",
    }
    key, _task_id, token = env.task(["web.echo", "webm.echo"])

    async def both() -> list[str]:
        async with mcp_client(env.url, token, key, "auto") as client:
            return [
                text_of(await client.call_tool(f"{name}.echo", {"text": name}))
                for name in ("web", "webm")
            ]

    assert anyio.run(both) == ["web", "webm"]


# -- per-caller views and per-call decisions ------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28", "auto"])
def test_tools_list_is_filtered_per_task(env: Env, mode: str) -> None:
    key, _task_id, token = env.task(EVERYTHING)
    narrow_key, _narrow_id, narrow_token = env.task(["git.git_status"])

    async def listing(token: str, key: ProofKey) -> tuple[str, set[str]]:
        async with mcp_client(env.url, token, key, mode) as client:
            result = await client.list_tools()
            return client.protocol_version, {tool.name for tool in result.tools}

    version, names = anyio.run(listing, token, key)
    assert version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
    assert {"git.git_status", "git.git_log", "git.git_commit", "git.git_add"} <= names
    assert {"tools.echo", "tools.read_config", "web.fetch_page", "junk.noise"} <= names
    assert "git.git_reset" not in names  # a policy forbids it
    assert "git.git_checkout" not in names  # not in the intent
    assert "tools.undescribed" not in names  # undescribed: secret, above the ceiling
    _version, narrow = anyio.run(listing, narrow_token, narrow_key)
    assert narrow == {"git.git_status"}


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_git_reads_are_allowed_with_receipts(env: Env, mode: str) -> None:
    key, task_id, token = env.task(["git.git_status", "git.git_log"])

    async def reads() -> tuple[Any, Any]:
        async with mcp_client(env.url, token, key, mode) as client:
            status = await client.call_tool("git.git_status", {"repo_path": str(env.repo)})
            log = await client.call_tool("git.git_log", {"repo_path": str(env.repo)})
            return status, log

    status, log = anyio.run(reads)
    assert not status.is_error and "Repository status" in text_of(status)
    assert not log.is_error and "initial commit" in text_of(log)
    label = status.meta["tether/label"]
    assert label["sensitivity"] == "internal" and label["trusted"] is True
    decisions = _decisions(env, task_id)
    assert [d["effect"] for d in decisions] == ["allow", "allow"]
    for decision in decisions:
        assert decision["chain"] == [AGENT]
        assert decision["detail"]["upstream"] == "git"
        assert decision["detail"]["tool_identity"] == GIT_IDENTITY
    results = [r for r in receipts(env.tether, "result") if r.get("task_id") == task_id]
    assert {r["detail"]["outcome"] for r in results} == {"ok"}
    labels = env.tether.store.list_task_labels(task_id)
    assert [source for source, *_ in labels] == ["git.git_status", "git.git_log"]


def test_git_commit_outside_the_intent_is_denied(env: Env) -> None:
    key, task_id, token = env.task(["git.git_status"])

    async def commit() -> Any:
        async with mcp_client(env.url, token, key, "legacy") as client:
            return await client.call_tool(
                "git.git_commit", {"repo_path": str(env.repo), "message": "sneaky"}
            )

    result = anyio.run(commit)
    assert result.is_error
    assert "intent.no_capability" in text_of(result)
    assert result.meta["tether/decision"]["code"] == "intent.no_capability"
    [decision] = _decisions(env, task_id)
    assert decision["effect"] == "deny"
    assert decision["detail"]["tool_identity"] == GIT_IDENTITY


def test_policy_forbidden_tool_is_denied(env: Env) -> None:
    key, task_id, token = env.task(["git.git_reset"])

    async def reset() -> Any:
        async with mcp_client(env.url, token, key, "2026-07-28") as client:
            return await client.call_tool("git.git_reset", {"repo_path": str(env.repo)})

    result = anyio.run(reset)
    assert result.is_error and "policy.forbid" in text_of(result)
    assert _decisions(env, task_id)[0]["policies"] == ["no-resets"]


def test_git_commit_waits_for_a_human_approval(env: Env) -> None:
    key, task_id, token = env.task(["git.git_add", "git.git_commit", "git.git_log"])
    (env.repo / "notes.txt").write_text("approved change\n")
    approver = Tether.open(env.home, database_url=home_database(env.home))

    async def approve_when_asked() -> str:
        while True:
            pending = [a for a in approver.approvals.list("pending") if a.task_id == task_id]
            if pending:
                approver.decide_approval(
                    pending[0].approval_id, approve=True, by="bob@acme.example"
                )
                return pending[0].approval_id
            await anyio.sleep(0.05)

    async def scenario() -> tuple[Any, Any, str]:
        async with mcp_client(env.url, token, key, "auto") as client:
            added = await client.call_tool(
                "git.git_add", {"repo_path": str(env.repo), "files": ["notes.txt"]}
            )
            approval_id = ""

            async def approve() -> None:
                nonlocal approval_id
                approval_id = await approve_when_asked()

            async with anyio.create_task_group() as tg:
                tg.start_soon(approve)
                committed = await client.call_tool(
                    "git.git_commit", {"repo_path": str(env.repo), "message": "add notes"}
                )
            return added, committed, approval_id

    try:
        added, committed, approval_id = anyio.run(scenario)
    finally:
        approver.close()
    assert not added.is_error
    assert not committed.is_error, text_of(committed)
    log = subprocess.run(
        ["git", "log", "--oneline"], cwd=env.repo, capture_output=True, text=True, check=True
    )
    assert "add notes" in log.stdout
    effects = [(d["tool"], d["effect"]) for d in _decisions(env, task_id)]
    assert effects == [
        ("git.git_add", "allow"),
        ("git.git_commit", "approval_required"),
        ("git.git_commit", "allow"),
    ]
    granted = _decisions(env, task_id)[-1]
    assert granted["reasons"][0]["code"] == "approval.granted"
    assert granted["detail"]["approval_id"] == approval_id


def test_denied_approval_is_an_error_result(env: Env) -> None:
    key, task_id, token = env.task(["git.git_commit"])
    approver = Tether.open(env.home, database_url=home_database(env.home))

    async def scenario() -> Any:
        async with mcp_client(env.url, token, key, "legacy") as client:

            async def deny() -> None:
                while True:
                    pending = [
                        a for a in approver.approvals.list("pending") if a.task_id == task_id
                    ]
                    if pending:
                        approver.decide_approval(
                            pending[0].approval_id, approve=False, by="bob@acme.example"
                        )
                        return
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                tg.start_soon(deny)
                return await client.call_tool(
                    "git.git_commit", {"repo_path": str(env.repo), "message": "no"}
                )

    try:
        result = anyio.run(scenario)
    finally:
        approver.close()
    assert result.is_error and text_of(result).startswith("approval denied")
    assert result.meta["tether/decision"]["effect"] == "approval_required"
    assert result.meta["tether/decision"]["approval_status"] == "denied"
    assert result.meta["tether/decision"]["approval_id"].startswith("apr_")
    assert [d["effect"] for d in _decisions(env, task_id)] == ["approval_required"]


def test_unanswered_approval_times_out_with_a_resumable_reference(env: Env) -> None:
    key, task_id, token = env.task(["git.git_diff_staged", "git.git_commit"])
    args = {"repo_path": str(env.repo), "message": "nothing staged"}

    async def commit() -> tuple[Any, float]:
        async with mcp_client(env.url, token, key, "2026-07-28") as client:
            started = time.monotonic()
            result = await client.call_tool("git.git_commit", args)
            return result, time.monotonic() - started

    held, waited = anyio.run(commit)
    assert held.is_error and 3.5 < waited < 15
    approval_id = held.meta["tether/decision"]["approval_id"]
    assert approval_id in text_of(held)
    env.tether.decide_approval(approval_id, approve=True, by="bob@acme.example")
    again, waited = anyio.run(commit)  # the identical call, a fresh proof: no wait now
    assert waited < 3 and again.meta.get("tether/label") is not None, text_of(again)
    effects = [d["effect"] for d in _decisions(env, task_id)]
    assert effects == ["approval_required", "allow"]


# -- results: secrets, labels, untrusted content --------------------------------------------


def test_secrets_are_redacted_labelled_and_recorded(env: Env) -> None:
    key, task_id, token = env.task(["tools.read_config", "tools.get_credentials"])

    async def read() -> tuple[Any, Any]:
        async with mcp_client(env.url, token, key, "2026-07-28") as client:
            config = await client.call_tool("tools.read_config", {})
            creds = await client.call_tool("tools.get_credentials", {"service": "ci"})
            return config, creds

    config, creds = anyio.run(read)
    text = text_of(config)
    for secret in (
        tool_server.AWS_KEY,
        tool_server.OPENAI_KEY,
        tool_server.GITHUB_TOKEN,
        tool_server.SLACK_TOKEN,
        tool_server.JWT,
        "s3cr3t-pw",
        "MIGHAgEAMBMGByqGSM49",
    ):
        assert secret not in text
    assert "service: billing" in text and "region: eu-west-1" in text
    assert "postgres://app:[REDACTED:connection_password]@db.internal" in text
    label = config.meta["tether/label"]
    assert label["sensitivity"] == "confidential"
    assert label["redactions"]["aws_access_key"] == 1
    assert label["redactions"]["private_key"] == 1
    assert creds.structured_content["token"] == "[REDACTED:github_token]"
    assert tool_server.GITHUB_TOKEN not in json.dumps(creds.model_dump(mode="json"))
    results = [r for r in receipts(env.tether, "result") if r.get("task_id") == task_id]
    assert results[0]["detail"]["redactions"]["github_token"] == 1
    assert any(tag.startswith("owasp-nhi:NHI2") for tag in results[0]["risk_tags"])
    labels = env.tether.store.list_task_labels(task_id)
    assert labels[0][1] == "confidential"
    assert json.loads(labels[0][3])["redactions"]["slack_token"] == 1


def test_untrusted_content_cannot_flow_to_an_egress_sink(env: Env) -> None:
    key, task_id, token = env.task(["web.fetch_page", "web.send_email"])
    clean_key, clean_id, clean_token = env.task(["web.send_email"])
    email = {"to": "partner@acme.example", "body": "weekly report"}

    async def browse_then_mail() -> tuple[Any, Any]:
        async with mcp_client(env.url, token, key, "auto") as client:
            page = await client.call_tool("web.fetch_page", {"url": "https://example.com"})
            sent = await client.call_tool("web.send_email", email)
            return page, sent

    async def mail_only() -> Any:
        async with mcp_client(env.url, clean_token, clean_key, "auto") as client:
            return await client.call_tool("web.send_email", email)

    page, sent = anyio.run(browse_then_mail)
    assert not page.is_error and page.meta["tether/label"]["trusted"] is False
    # The core's flow rule (reviewed profile): held for a human, never sent unreviewed.
    assert sent.is_error and "flow.untrusted_sink" in text_of(sent)
    assert sent.meta["tether/decision"]["effect"] == "approval_required"
    labels = env.tether.store.list_task_labels(task_id)
    assert [(source, trusted) for source, _s, trusted, _d, _a in labels] == [
        ("web.fetch_page", False)
    ]
    state = env.tether.audit.rows.flow_state(task_id)
    assert state.untrusted_sources == ("web.fetch_page",)
    assert "attacker@evil.example" in state.untrusted_values
    held = _decisions(env, task_id)[-1]
    assert held["effect"] == "approval_required"
    assert held["reasons"][0]["code"] == "flow.untrusted_sink"
    assert held["detail"]["tool_identity"] == WEB_IDENTITY
    assert held["detail"]["flow_profile"] == "reviewed"
    ok = anyio.run(mail_only)
    assert not ok.is_error and "sent 13 characters" in text_of(ok)
    assert _decisions(env, clean_id)[-1]["effect"] == "allow"


def test_the_agents_token_never_reaches_the_upstream(env: Env) -> None:
    key, _task_id, token = env.task(["web.whoami"])

    async def ask() -> Any:
        async with mcp_client(env.url, token, key, "legacy") as client:
            return await client.call_tool("web.whoami", {})

    seen = json.loads(text_of(anyio.run(ask)))
    assert seen["auth_headers"] == ["x-upstream-key"]
    assert seen["upstream_key"] == UPSTREAM_KEY


def test_undescribed_tool_is_refused_by_its_default_class(env: Env) -> None:
    key, task_id, token = env.task(["tools.undescribed"])

    async def call() -> Any:
        async with mcp_client(env.url, token, key, "2026-07-28") as client:
            return await client.call_tool("tools.undescribed", {"text": "hi"})

    result = anyio.run(call)
    assert result.is_error and "flow.data_ceiling" in text_of(result)
    assert "not described" in text_of(result)
    assert _decisions(env, task_id)[-1]["detail"]["tool_class"]["described"] is False


def test_unknown_tool_is_denied_with_a_receipt(env: Env) -> None:
    key, task_id, token = env.task(["*"])

    async def call() -> Any:
        async with mcp_client(env.url, token, key, "legacy") as client:
            return await client.call_tool("nowhere.tool", {})

    result = anyio.run(call)
    assert result.is_error and "gateway.unknown_tool" in text_of(result)
    assert _decisions(env, task_id)[-1]["reasons"][0]["code"] == "gateway.unknown_tool"


# -- adversarial ----------------------------------------------------------------------------


def _signed(token: str, key: ProofKey, url: str, body: dict[str, Any]) -> dict[str, str]:
    now = time.time()
    if body["method"] == "tools/call":
        params = body["params"]
        proof = key.prove(token, params["name"], params["arguments"], now=now, htm="POST", htu=url)
    else:
        proof = key.prove_request(token, htm="POST", htu=url, now=now)
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


def _status_call(env: Env) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "git.git_status", "arguments": {"repo_path": str(env.repo)}},
    }


def _assert_refused(env: Env, response: httpx.Response, error: str, reason: str) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("DPoP ") and f'error="{error}"' in challenge
    assert "resource_metadata=" in challenge
    assert response.json()["error"]["data"]["reason"] == reason
    last = receipts(env.tether, "gateway.reject")[-1]
    assert last["reasons"][0]["code"] == reason
    assert last["effect"] == "deny"


def test_expired_token_is_refused(env: Env) -> None:
    past = Tether.open(
        env.home, clock=FrozenClock(time.time() - 3600), database_url=home_database(env.home)
    )
    try:
        key, task = open_task(past, ["git.git_status"], resource=env.url, ttl_seconds=60)
    finally:
        past.close()
    body = _status_call(env)
    response = raw_call(env.url, _signed(task.token, key, env.url, body), body)
    _assert_refused(env, response, "invalid_token", "token.expired")


def test_token_for_another_audience_is_refused(env: Env) -> None:
    key, task = open_task(env.tether, ["git.git_status"], resource="https://other.acme.example/mcp")
    body = _status_call(env)
    response = raw_call(env.url, _signed(task.token, key, env.url, body), body)
    _assert_refused(env, response, "invalid_token", "token.audience")
    assert receipts(env.tether, "gateway.reject")[-1]["task_id"] == task.task_id


def test_token_of_an_ended_task_is_refused(env: Env) -> None:
    key, task_id, token = env.task(["git.git_status"])
    env.tether.end_task(task_id)
    body = _status_call(env)
    response = raw_call(env.url, _signed(token, key, env.url, body), body)
    _assert_refused(env, response, "invalid_token", "task.ended")


def test_replayed_and_retargeted_proofs_are_refused(env: Env) -> None:
    key, task_id, token = env.task(["git.git_status", "git.git_log"])
    body = _status_call(env)
    headers = _signed(token, key, env.url, body)
    first = raw_call(env.url, headers, body)
    assert first.status_code == 200
    assert not sse_result(first)["result"]["isError"]
    _assert_refused(env, raw_call(env.url, headers, body), "invalid_dpop_proof", "proof.replayed")
    # A fresh proof for git_status presented with another call.
    other = _status_call(env)
    other["params"] = {"name": "git.git_log", "arguments": {"repo_path": str(env.repo)}}
    fresh = _signed(token, key, env.url, body)
    _assert_refused(env, raw_call(env.url, fresh, other), "invalid_dpop_proof", "proof.call")
    # A proof for another URL.
    elsewhere = _signed(token, key, env.url + "/other", body)
    _assert_refused(env, raw_call(env.url, elsewhere, body), "invalid_dpop_proof", "proof.target")
    # A replayed list request (its proof is consumed at the door).
    listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
    list_headers = _signed(token, key, env.url, listing)
    assert raw_call(env.url, list_headers, listing).status_code == 200
    _assert_refused(
        env, raw_call(env.url, list_headers, listing), "invalid_dpop_proof", "proof.replayed"
    )
    assert [d["effect"] for d in _decisions(env, task_id)] == ["allow"]


def test_a_denied_calls_proof_cannot_be_reused(env: Env) -> None:
    key, _task_id, token = env.task(["git.git_status"])
    body = _status_call(env)
    body["params"] = {"name": "git.git_log", "arguments": {"repo_path": str(env.repo)}}
    headers = _signed(token, key, env.url, body)
    denied = sse_result(raw_call(env.url, headers, body))
    assert denied["result"]["isError"]
    _assert_refused(env, raw_call(env.url, headers, body), "invalid_dpop_proof", "proof.replayed")


# -- robustness -----------------------------------------------------------------------------


def test_crash_hang_and_garbage_upstreams(env: Env) -> None:
    key, task_id, token = env.task(EVERYTHING, max_calls=100)

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with mcp_client(env.url, token, key, "auto") as client:
            out["crash"] = await client.call_tool("fragile.crash", {})
            out["git_after_crash"] = await client.call_tool(
                "git.git_status", {"repo_path": str(env.repo)}
            )
            started = time.monotonic()

            async def hang() -> None:
                out["hang"] = await client.call_tool("fragile.sleep", {"seconds": 30})
                out["hang_seconds"] = time.monotonic() - started

            async with anyio.create_task_group() as tg:
                tg.start_soon(hang)
                await anyio.sleep(0.2)
                # Served while the hung call is still waiting.
                out["during_hang"] = await client.call_tool("tools.echo", {"text": "meanwhile"})
                out["during_hang_seconds"] = time.monotonic() - started
            out["garbage"] = await client.call_tool("junk.noise", {})
            out["tools_still_fine"] = await client.call_tool("tools.echo", {"text": "still here"})
            deadline = time.monotonic() + 20
            while True:  # the supervisor restarts the crashed upstream
                out["recovered"] = await client.call_tool("fragile.echo", {"text": "back"})
                if not out["recovered"].is_error or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.2)
        return out

    out = anyio.run(scenario)
    assert out["crash"].is_error
    assert "upstream.unavailable" in text_of(out["crash"])
    assert not out["git_after_crash"].is_error
    assert out["hang"].is_error and "upstream.timeout" in text_of(out["hang"])
    assert out["hang_seconds"] < 10
    assert text_of(out["during_hang"]) == "meanwhile"
    assert out["during_hang_seconds"] < out["hang_seconds"]
    assert out["garbage"].is_error
    assert text_of(out["garbage"]).startswith("upstream failure [upstream.invalid_response]"), (
        text_of(out["garbage"])
    )
    assert text_of(out["tools_still_fine"]) == "still here"
    assert not out["recovered"].is_error and text_of(out["recovered"]) == "back"
    outcomes = {
        r["tool"]: r["detail"]["outcome"]
        for r in receipts(env.tether, "result", 200)
        if r.get("task_id") == task_id
    }
    assert outcomes["fragile.crash"] == "upstream.unavailable"
    assert outcomes["fragile.sleep"] == "upstream.timeout"
    assert outcomes["junk.noise"].startswith("upstream.")
    assert outcomes["fragile.echo"] == "ok"
    # Failed calls leave no label: the task did not read anything from them.
    sources = {source for source, *_ in env.tether.store.list_task_labels(task_id)}
    assert "fragile.crash" not in sources and "junk.noise" not in sources


def test_audit_chain_still_verifies(env: Env) -> None:
    assert env.tether.verify_audit().ok


# -- the command-line entry point, in its own process ----------------------------------------


def test_run_gateway_in_a_subprocess_with_return_mode_approvals(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path / "repo")
    home = tmp_path / "home"
    tether = init_home(home, {"git": GIT_IDENTITY})
    tether.load_policies(EXAMPLES / "policies")
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        "\n".join(
            [
                f'resource = "http://127.0.0.1:{port}/mcp"',
                'authorization_servers = ["https://tether.acme.example"]',
                f"port = {port}",
                "[approval]",
                'mode = "return"',
                "[[upstreams]]",
                'name = "git"',
                f'identity = "{GIT_IDENTITY}"',
                f"catalogue = {json.dumps(str(EXAMPLES / 'git.catalogue.toml'))}",
                "[upstreams.stdio]",
                f"command = {json.dumps(sys.executable)}",
                f'args = ["-m", "mcp_server_git", "--repository", {json.dumps(str(repo))}]',
            ]
        )
    )
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tether.gateway import run_gateway; "
            "run_gateway(sys.argv[1], sys.argv[2])",
            str(config),
            str(home),
        ],
        stdout=log,
        stderr=log,
    )
    try:
        wait_for_port(port, timeout=60)
        url = f"http://127.0.0.1:{port}/mcp"
        key, task = open_task(tether, ["git.*"], resource=url)
        args = {"repo_path": str(repo), "message": "empty"}

        async def listing() -> set[str]:
            async with mcp_client(url, task.token, key, "legacy") as client:
                return {tool.name for tool in (await client.list_tools()).tools}

        async def call() -> Any:
            async with mcp_client(url, task.token, key, "auto") as client:
                return await client.call_tool("git.git_commit", args)

        names = anyio.run(listing)
        assert {"git.git_status", "git.git_log", "git.git_commit", "git.git_add"} <= names
        assert "git.git_reset" not in names
        held = anyio.run(call)
        assert held.is_error
        decision = held.meta["tether/decision"]
        assert decision["effect"] == "approval_required"
        assert decision["approval_id"] in text_of(held)
        tether.decide_approval(decision["approval_id"], approve=True, by="bob@acme.example")
        again = anyio.run(call)
        # Approved: the identical call goes through (git then has nothing to commit).
        assert again.meta.get("tether/label") is not None, text_of(again)
        last = [r for r in receipts(tether, "decision") if r.get("task_id") == task.task_id]
        assert [r["effect"] for r in last] == ["approval_required", "allow"]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        tether.close()


def test_approval_wait_is_capped_by_the_proof_window() -> None:
    from tether.gateway._config import MAX_APPROVAL_WAIT

    assert MAX_APPROVAL_WAIT < PROOF_WINDOW
