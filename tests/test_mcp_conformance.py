"""MCP 2026-07-28 at the gateway, on the wire: headers checked against the body,
``server/discover``, per-caller caching scope; the older generation still served.

Attacker: an agent (or anything that holds a task's token and key) sending requests
whose HTTP headers say one thing and whose body another, the split an intermediary
routing or filtering on headers would act on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from tether import ProofKey, Tether

from .mcp_support.harness import (
    POLICIES,
    TOOLS_IDENTITY,
    GatewayServer,
    build_config,
    free_port,
    init_home,
    mcp_client,
    open_task,
    raw_call,
    receipts,
    sse_result,
    text_of,
    tools_upstream,
)

VERSION = "2026-07-28"
HEADER_MISMATCH = -32020
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "1"},
}


@dataclass
class Env:
    tether: Tether
    url: str
    key: ProofKey
    token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("conformance")
    home = base / "home"
    tether = init_home(home, {"tools": TOOLS_IDENTITY})
    port = free_port()
    config = build_config(
        port,
        base,
        [tools_upstream("tools", TOOLS_IDENTITY, protocol=VERSION)],
        approval={"mode": "input_required", "timeout_seconds": 0.2, "poll_interval_seconds": 0.05},
    )
    gateway = GatewayServer(home, config, port).start().pin_all()
    key, task = open_task(tether, ["tools.echo"], resource=gateway.url)
    try:
        yield Env(tether=tether, url=gateway.url, key=key, token=task.token)
    finally:
        gateway.stop()
        tether.close()


def _headers(env: Env, body: dict[str, Any], **extra: str) -> dict[str, str]:
    now = time.time()
    if body["method"] == "tools/call":
        params = body["params"]
        proof = env.key.prove(
            env.token, params["name"], params["arguments"], now=now, htm="POST", htu=env.url
        )
    else:
        proof = env.key.prove_request(env.token, htm="POST", htu=env.url, now=now)
    named = {"Mcp-Method": body["method"]}
    if body["method"] == "tools/call":
        named["Mcp-Name"] = body["params"]["name"]
    return {
        "Authorization": f"DPoP {env.token}",
        "DPoP": proof,
        "MCP-Protocol-Version": VERSION,
        **named,
        **extra,
    }


def _call(text: str = "hi") -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "tools.echo",
            "arguments": {"text": text},
            "_meta": ENVELOPE,
        },
    }


def test_matching_headers_are_served(env: Env) -> None:
    body = _call()
    response = raw_call(
        env.url, _headers(env, body, **{"Mcp-Method": "tools/call", "Mcp-Name": "tools.echo"}), body
    )
    assert response.status_code == 200, response.text
    message = sse_result(response)
    assert "result" in message, message


@pytest.mark.parametrize(
    "headers",
    [
        {"Mcp-Method": "tools/list", "Mcp-Name": "tools.echo"},
        {"Mcp-Method": "tools/call", "Mcp-Name": "tools.other"},
    ],
    ids=["method", "name"],
)
def test_a_header_that_disagrees_with_the_body_is_refused(
    env: Env, headers: dict[str, str]
) -> None:
    before = len([r for r in receipts(env.tether, "decision", 200)])
    body = _call()
    response = raw_call(env.url, _headers(env, body, **headers), body)
    assert response.status_code == 400, response.text
    assert sse_result(response)["error"]["code"] == HEADER_MISMATCH
    # Nothing was decided, let alone forwarded.
    assert len([r for r in receipts(env.tether, "decision", 200)]) == before


def test_server_discover_and_private_tool_lists(env: Env) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "server/discover",
        "params": {"_meta": ENVELOPE},
    }
    response = raw_call(env.url, _headers(env, body, **{"Mcp-Method": "server/discover"}), body)
    assert response.status_code == 200, response.text
    found = sse_result(response)["result"]
    assert VERSION in found["supportedVersions"]
    listing = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/list",
        "params": {"_meta": ENVELOPE},
    }
    response = raw_call(env.url, _headers(env, listing, **{"Mcp-Method": "tools/list"}), listing)
    assert response.status_code == 200, response.text
    result = sse_result(response)["result"]
    # What a caller sees depends on its task: no shared cache may hold it.
    assert result.get("cacheScope") == "private", result


# -- a held call at 2026-07-28: input_required, a sealed single-use requestState ------------

HOLD = """
@id("hold-this-echo")
@approval("required")
forbid (principal, action == Action::"call_tool", resource == Tool::"tools.echo")
when { context.args has text && context.args.text like "hold*" };
"""


def _decide_when_held(env: Env, task_id: str, *, approve: bool) -> threading.Thread:
    """A human (not the agent) who decides the task's held call once it appears."""

    def run() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for row in env.tether.approvals.list(status="pending"):
                if row.task_id == task_id:
                    env.tether.approvals.decide(
                        row.approval_id, approve=approve, by="carol@acme.example"
                    )
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def held(env: Env) -> Iterator[Env]:
    env.tether.policies.load({**POLICIES, "hold.cedar": HOLD})
    yield env
    env.tether.policies.load(POLICIES)


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "denied"])
def test_the_official_client_retries_a_held_call_until_a_human_decides(
    held: Env, approve: bool
) -> None:
    key, task = open_task(held.tether, ["tools.echo"], resource=held.url)
    human = _decide_when_held(held, task.task_id, approve=approve)

    async def run() -> Any:
        async with mcp_client(held.url, task.token, key, VERSION) as client:
            return await client.call_tool("tools.echo", {"text": "hold the line"})

    answer = anyio.run(run)
    human.join(timeout=30)
    decisions = [
        r for r in receipts(held.tether, "decision", 200) if r.get("task_id") == task.task_id
    ]
    if approve:
        assert not answer.is_error, answer
        assert "hold the line" in text_of(answer)
        # Held once, then allowed by the approval: two decisions, not one per poll.
        assert [d["effect"] for d in decisions] == ["approval_required", "allow"]
    else:
        assert answer.is_error
        assert "approval.denied" in text_of(answer)
        assert [d["effect"] for d in decisions] == ["approval_required", "deny"]


def test_a_request_state_is_single_use_and_sealed(held: Env) -> None:
    key, task = open_task(held.tether, ["tools.echo"], resource=held.url)
    local = Env(tether=held.tether, url=held.url, key=key, token=task.token)
    body = _call("hold on")
    first = raw_call(held.url, _headers(local, body), body)
    message = sse_result(first)
    assert "result" in message, message
    result = message["result"]
    assert result["resultType"] == "input_required", result
    state = result["requestState"]
    retry = {**body, "params": {**body["params"], "requestState": state}}
    again = sse_result(raw_call(held.url, _headers(local, retry), retry))["result"]
    assert again["resultType"] == "input_required"  # still pending: a fresh state
    assert again["requestState"] != state
    replayed = sse_result(raw_call(held.url, _headers(local, retry), retry))["result"]
    assert replayed["isError"] and "approval.state_replayed" in replayed["content"][0]["text"]
    # A state bit-flipped, or bound to other arguments, is refused by the seal.
    forged = {**body, "params": {**body["params"], "requestState": state[:-4] + "AAAA"}}
    assert (
        sse_result(raw_call(held.url, _headers(local, forged), forged))["error"]["code"] == -32602
    )
    moved = _call("hold other")
    moved["params"]["requestState"] = again["requestState"]
    refused = sse_result(raw_call(held.url, _headers(local, moved), moved))
    assert refused["error"]["code"] == -32602
