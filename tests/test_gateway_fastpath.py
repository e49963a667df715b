"""The gateway's lean ``tools/call`` path: a 2026-07-28 call is answered without the MCP
SDK's server and sent to a stateless HTTP upstream over its pooled connection, with every
guarantee of the SDK path (one decision, denied calls never forwarded, answers scrubbed,
labelled and recorded, hostile answers refused, the SDK's header checks).

Which path a call took is read from counters (``Gateway.lean_calls``,
``Upstream.direct_calls``), never from timing. The upstreams are real: the bundled tool
server over streamable HTTP, and a hostile one (the SDK's ``MCPServer`` whose answers to
some calls are replaced on the wire) served in this process so what reached it is seen.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer

from tether import ProofKey, Tether

from .mcp_support import tool_server
from .mcp_support.harness import (
    TOOL_CATALOGUE,
    GatewayServer,
    HttpUpstream,
    build_config,
    free_port,
    init_home,
    mcp_client,
    open_task,
    raw_call,
    receipts,
    text_of,
)

WEBM = "spiffe://acme.example/tool/webm"
WEB = "spiffe://acme.example/tool/web"
VAULT = "spiffe://acme.example/tool/vault"
EVIL = "spiffe://acme.example/tool/evil"
VAULT_KEY = "vk-" + "Hq7Xr3Mc8Zb2Nm5Ts4Pw"
MAX_RESULT = 16 * 1024
MODERN = "2026-07-28"


@dataclass
class HostileUpstream:
    """An MCP server whose answers to some tools are replaced on the wire; it records
    every tool called on it."""

    port: int = field(default_factory=free_port)
    called: list[str] = field(default_factory=list)
    server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> HostileUpstream:
        mcp = MCPServer("hostile", version="1.0.0")

        @mcp.tool(description="Echo the text back.", structured_output=False)
        def echo(text: str) -> str:
            return text

        @mcp.tool(description="A large document.", structured_output=False)
        def flood() -> str:
            return ""

        @mcp.tool(description="A large document, as events.", structured_output=False)
        def flood_events() -> str:
            return ""

        @mcp.tool(description="An answer to another request.", structured_output=False)
        def wrong_id() -> str:
            return ""

        @mcp.tool(description="Not a tool result.", structured_output=False)
        def garbage() -> str:
            return ""

        inner = mcp.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
        called = self.called

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await inner(scope, receive, send)
                return
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            rpc = json.loads(body)
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            if rpc.get("method") != "tools/call":
                await inner(scope, replay, send)
                return
            name = rpc["params"]["name"]
            called.append(name)
            answer = _hostile(name, rpc["id"])
            if answer is None:
                await inner(scope, replay, send)
                return
            kind, chunks = answer
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]}
            )
            for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the hostile upstream did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True


def _hostile(name: str, rpc_id: Any) -> tuple[bytes, Iterator[bytes]] | None:
    """The replaced answer to tool ``name``: (content type, body chunks), or ``None``."""
    text = "A" * 1024
    if name == "flood":  # one JSON answer far above the bound, streamed without end in sight
        head = json.dumps(
            {"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [{"type": "text", "text": ""}]}}
        )
        return b"application/json", iter([head[:-4].encode()] + [text.encode()] * 2000)
    if name == "flood_events":  # notifications, never the answer
        note = json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": text},
            }
        )
        return b"text/event-stream", iter([f"event: message\ndata: {note}\n\n".encode()] * 2000)
    if name == "wrong_id":
        other = {
            "jsonrpc": "2.0",
            "id": 999_999,
            "result": {"content": [], "resultType": "complete"},
        }
        return b"application/json", iter([json.dumps(other).encode()])
    if name == "garbage":
        return b"application/json", iter(
            [
                b'{"jsonrpc": "2.0", "id": '
                + json.dumps(rpc_id).encode()
                + b', "result": {"content": "not a list"}}'
            ]
        )
    return None


@dataclass
class Env:
    tether: Tether
    gateway: GatewayServer
    hostile: HostileUpstream

    @property
    def url(self) -> str:
        return self.gateway.url

    def task(self, tools: list[str], **kwargs: Any) -> tuple[ProofKey, str, str]:
        key, task = open_task(self.tether, tools, resource=self.url, **kwargs)
        return key, task.task_id, task.token

    def upstream(self, name: str) -> Any:
        return self.gateway.gateway.upstreams[name]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("gateway-lean")
    home = base / "home"
    tether = init_home(home, {"webm": WEBM, "web": WEB, "vault": VAULT, "evil": EVIL})
    tether.put_secret("vault-key", VAULT_KEY, kind="api_key", meta={"tools": ["vault.*"]})
    http_upstream = HttpUpstream()
    hostile = HostileUpstream().start()
    evil_tools = {
        name: {"side_effect": "read", "sensitivity": "public", "trusted": False}
        for name in ("echo", "flood", "flood_events", "wrong_id", "garbage")
    }
    port = free_port()
    config = build_config(
        port,
        base,
        [
            {
                "name": "webm",
                "identity": WEBM,
                "protocol": MODERN,
                "http": {"url": http_upstream.url},
                "tools": TOOL_CATALOGUE,
            },
            {
                "name": "web",
                "identity": WEB,
                "protocol": "legacy",
                "http": {"url": http_upstream.url},
                "tools": TOOL_CATALOGUE,
            },
            {
                "name": "vault",
                "identity": VAULT,
                "protocol": MODERN,
                "http": {"url": http_upstream.url},
                "tools": TOOL_CATALOGUE,
                "credentials": [{"secret": "vault-key", "header": "X-Upstream-Key"}],
            },
            {
                "name": "evil",
                "identity": EVIL,
                "protocol": MODERN,
                "http": {"url": hostile.url},
                "tools": evil_tools,
            },
        ],
        limits={"max_result_bytes": MAX_RESULT},
    )
    gateway = GatewayServer(home, config, port).start().pin_all()
    try:
        yield Env(tether=tether, gateway=gateway, hostile=hostile)
    finally:
        gateway.stop()
        hostile.stop()
        http_upstream.stop()
        tether.close()


def _calls(
    env: Env, token: str, key: ProofKey, calls: list[tuple[str, dict[str, Any]]], mode: str = MODERN
) -> list[Any]:
    async def run() -> list[Any]:
        async with mcp_client(env.url, token, key, mode) as client:
            return [await client.call_tool(name, args) for name, args in calls]

    return anyio.run(run)


def _task_receipts(env: Env, kind: str, task_id: str) -> list[dict[str, Any]]:
    return [r for r in receipts(env.tether, kind, 300) if r.get("task_id") == task_id]


def test_a_modern_call_takes_the_lean_path_to_the_upstream(env: Env) -> None:
    key, task_id, token = env.task(["webm.*"])
    lean, direct = env.gateway.gateway.lean_calls, env.upstream("webm").direct_calls
    results = _calls(env, token, key, [("webm.echo", {"text": f"call {n}"}) for n in range(3)])
    assert [text_of(r) for r in results] == ["call 0", "call 1", "call 2"]
    assert env.gateway.gateway.lean_calls == lean + 3
    assert env.upstream("webm").direct_calls == direct + 3
    for result in results:
        label = result.meta["tether/label"]
        assert label["upstream"] == "webm" and label["sensitivity"] == "public"
        assert result.structured_content == {"result": text_of(result)}
    # Decided once per call, recorded once per answer.
    decisions = _task_receipts(env, "decision", task_id)
    assert [d["effect"] for d in decisions] == ["allow"] * 3
    assert [r["detail"]["outcome"] for r in _task_receipts(env, "result", task_id)] == ["ok"] * 3


def test_older_clients_and_session_upstreams_keep_the_sdk(env: Env) -> None:
    key, _task_id, token = env.task(["webm.*", "web.*"])
    lean = env.gateway.gateway.lean_calls
    webm, web = env.upstream("webm").direct_calls, env.upstream("web").direct_calls
    legacy = _calls(env, token, key, [("webm.echo", {"text": "old"})], mode="legacy")
    assert text_of(legacy[0]) == "old"
    assert env.gateway.gateway.lean_calls == lean  # a 2025-11-25 client: the SDK's server
    assert env.upstream("webm").direct_calls == webm + 1  # the upstream is still stateless
    modern = _calls(env, token, key, [("web.echo", {"text": "session"})])
    assert text_of(modern[0]) == "session"
    assert env.gateway.gateway.lean_calls == lean + 1
    assert env.upstream("web").direct_calls == web  # an upstream session: the SDK's client
    # Both paths answer alike.
    assert legacy[0].meta["tether/label"].keys() == modern[0].meta["tether/label"].keys()


def test_a_denied_call_never_reaches_the_upstream(env: Env) -> None:
    """A prompt-injected agent calls a tool outside its intent on the lean path: denied
    with a receipt, and the upstream never sees the call."""
    key, task_id, token = env.task(["evil.echo"])
    lean, direct = env.gateway.gateway.lean_calls, env.upstream("evil").direct_calls
    before = list(env.hostile.called)
    (result,) = _calls(env, token, key, [("evil.flood", {})])
    assert result.is_error and "denied [" in text_of(result)
    assert result.meta["tether/decision"]["effect"] == "deny"
    assert env.gateway.gateway.lean_calls == lean + 1
    assert env.upstream("evil").direct_calls == direct
    assert env.hostile.called == before
    (decision,) = _task_receipts(env, "decision", task_id)
    assert decision["effect"] == "deny" and decision["tool"] == "evil.flood"


def test_brokered_secrets_are_scrubbed_from_a_direct_answer(env: Env) -> None:
    """A malicious upstream echoes the credential it was given: the lean path scrubs it
    from the answer, labels and records the redaction."""
    key, task_id, token = env.task(["vault.*"])
    lean = env.gateway.gateway.lean_calls
    results = _calls(
        env, token, key, [("vault.whoami", {}), ("vault.get_credentials", {"service": "ci"})]
    )
    assert env.gateway.gateway.lean_calls == lean + 2
    connection = env.gateway.gateway.connections[(task_id, "vault")]
    assert connection.upstream.direct_calls == 2  # the task's own connection, called directly
    seen = json.loads(text_of(results[0]))
    assert seen["upstream_key"] == "[REDACTED:brokered]"
    assert seen["auth_headers"] == ["x-upstream-key"]  # never the agent's token or proof
    assert VAULT_KEY not in json.dumps(results[0].model_dump(mode="json"))
    assert results[0].meta["tether/label"]["redactions"] == {"brokered": 1}
    assert results[1].structured_content["token"] == "[REDACTED:github_token]"
    assert tool_server.GITHUB_TOKEN not in json.dumps(results[1].model_dump(mode="json"))
    recorded = _task_receipts(env, "result", task_id)
    assert recorded[0]["detail"]["redactions"] == {"brokered": 1}
    assert recorded[1]["detail"]["redactions"]["github_token"] >= 1


def test_hostile_answers_are_refused_fail_closed(env: Env) -> None:
    """A malicious upstream answers with a flood (one JSON answer, or events that never
    answer), an answer to another request, or a malformed result: nothing of it reaches
    the agent, the task counts as having read untrusted content, and every call has its
    result receipt."""
    key, task_id, token = env.task(["evil.*"], max_calls=20)
    direct = env.upstream("evil").direct_calls
    calls: list[tuple[str, dict[str, Any]]] = [
        ("evil.flood", {}),
        ("evil.flood_events", {}),
        ("evil.wrong_id", {}),
        ("evil.garbage", {}),
        ("evil.echo", {"text": "still served"}),
    ]
    flood, events, wrong, garbage, echo = _calls(env, token, key, calls)
    assert env.upstream("evil").direct_calls == direct + 5
    for result in (flood, events):
        assert result.is_error
        assert text_of(result).startswith("result withheld [result.oversized]"), text_of(result)
        assert "AAAA" not in text_of(result)
    for result in (wrong, garbage):
        assert result.is_error
        assert text_of(result).startswith("upstream failure [upstream.invalid_response]")
    assert text_of(echo) == "still served"
    outcomes = {r["tool"]: r["detail"]["outcome"] for r in _task_receipts(env, "result", task_id)}
    assert outcomes["evil.wrong_id"] == "upstream.invalid_response"
    assert outcomes["evil.garbage"] == "upstream.invalid_response"
    assert outcomes["evil.echo"] == "ok"
    sources = {source for source, *_ in env.tether.store.list_task_labels(task_id)}
    assert "evil.flood" in sources and "evil.flood_events" in sources


def _signed_headers(
    token: str, key: ProofKey, url: str, name: str, args: dict[str, Any]
) -> dict[str, str]:
    proof = key.prove(token, name, args, now=time.time(), htm="POST", htu=url)
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


def _modern_body(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {
            "name": name,
            "arguments": args,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }


def test_a_header_that_disagrees_with_the_body_is_refused_with_32020(env: Env) -> None:
    """A compromised agent names one tool in the routing header and calls another: the
    SDK's check answers -32020, the lean path does not take the call, nothing is decided."""
    key, task_id, token = env.task(["webm.*"])
    lean, direct = env.gateway.gateway.lean_calls, env.upstream("webm").direct_calls
    args = {"text": "x"}
    body = _modern_body("webm.send_email", {"to": "a@b.example", "body": "x"})
    headers = _signed_headers(token, key, env.url, "webm.send_email", body["params"]["arguments"])
    headers.update(
        {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "webm.echo"}
    )
    response = raw_call(env.url, headers, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == -32020
    # The same with the method header wrong.
    body = _modern_body("webm.echo", args)
    headers = _signed_headers(token, key, env.url, "webm.echo", args)
    headers.update(
        {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/list", "Mcp-Name": "webm.echo"}
    )
    response = raw_call(env.url, headers, body)
    assert response.status_code == 400 and response.json()["error"]["code"] == -32020
    assert env.gateway.gateway.lean_calls == lean
    assert env.upstream("webm").direct_calls == direct
    assert _task_receipts(env, "decision", task_id) == []
    # With matching headers, the same raw request takes the lean path and is answered.
    headers = _signed_headers(token, key, env.url, "webm.echo", args)
    headers.update(
        {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "webm.echo"}
    )
    response = raw_call(env.url, headers, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert answer["id"] == 5 and answer["result"]["content"][0]["text"] == "x"
    assert answer["result"]["resultType"] == "complete"
    assert answer["result"]["_meta"]["tether/label"]["upstream"] == "webm"
    assert env.gateway.gateway.lean_calls == lean + 1


def test_a_proof_serves_one_call_on_the_lean_path(env: Env) -> None:
    """A compromised agent replays the request of an allowed call: refused before any
    decision (the proof was consumed), the upstream called once."""
    key, task_id, token = env.task(["webm.*"])
    args = {"text": "once"}
    body = _modern_body("webm.echo", args)
    headers = _signed_headers(token, key, env.url, "webm.echo", args)
    headers.update(
        {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "webm.echo"}
    )
    direct = env.upstream("webm").direct_calls
    first = raw_call(env.url, headers, body)
    again = raw_call(env.url, headers, body)
    assert first.status_code == 200
    assert again.status_code == 401 and again.json()["error"]["data"]["reason"] == "proof.replayed"
    assert env.upstream("webm").direct_calls == direct + 1
    assert len(_task_receipts(env, "decision", task_id)) == 1
