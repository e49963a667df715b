"""The demo through the MCP gateway: the bank's MCP server behind it, an agent in front.

The gateway (``examples/demo/gateway.toml``) launches ``python -m tether.demo._tools``
as its stdio upstream ``bank``, described by ``examples/demo/bank.catalogue.toml``.
The agent connects with the official MCP client, signing every request with its
task token and a DPoP proof (:class:`tether.TetherMCPAuth`), and sees the bank's
tools as ``bank.<tool>``: only those its task may call, each call decided again.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import mcp_types as types
from mcp import Client as MCPClient
from mcp.client.streamable_http import streamable_http_client
from rich.markup import escape

import tether
from tether.demo._timeline import Timeline
from tether.gateway import GatewayConfig, parse_config
from tether.sdk import Client, TetherMCPAuth
from tether.tokens import ProofKey

BANK = "spiffe://acme.example/tool/bank"
ACCOUNT = "DE02120300000000202051"
META_DECISION = "tether/decision"
META_LABEL = "tether/label"


def gateway_config(examples: Path, port: int, authorization_server: str) -> GatewayConfig:
    """``gateway.toml`` from the examples, served on ``port`` of 127.0.0.1.

    The upstream's ``python`` becomes this interpreter, which is given this
    ``tether`` package, whether installed or not.
    """
    file = examples / "gateway.toml"
    data: dict[str, Any] = tomllib.loads(file.read_text(encoding="utf-8"))
    data.update(
        resource=f"http://127.0.0.1:{port}/mcp",
        host="127.0.0.1",
        port=port,
        authorization_servers=[authorization_server],
    )
    package_root = str(Path(tether.__file__).resolve().parents[1])
    for upstream in data.get("upstreams", []):
        stdio = upstream.get("stdio")
        if isinstance(stdio, dict) and stdio.get("command") == "python":
            stdio["command"] = sys.executable
            stdio["env"] = {**stdio.get("env", {}), "PYTHONPATH": package_root}
    return parse_config(data, base=file.resolve().parent, source=str(file))


def _text(result: types.CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, types.TextContent))


def _short(text: str, width: int = 96) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def _call(
    line: Timeline, client: MCPClient, tool: str, args: dict[str, Any]
) -> types.CallToolResult:
    """One ``tools/call`` through the gateway, printed with its effect and receipts."""
    result = await client.call_tool(tool, args)
    meta = result.meta or {}
    what = f"{tool} {escape(json.dumps(args))} [dim](MCP tools/call)[/]"
    if result.is_error:
        decision = meta.get(META_DECISION, {})
        line.effect(str(decision.get("effect", "deny")), what)
        line.detail(
            f"↳ MCP error result: {escape(_text(result))} "
            f"[dim]receipt #{decision.get('receipt')}[/]"
        )
        return result
    label = meta.get(META_LABEL, {})
    receipts = f"receipts #{label.get('decision_receipt')} decision, #{label.get('receipt')} result"
    line.effect("allow", what)
    text = _text(result)
    if len(text) > 120 and "\n" not in text:
        text = _short(text)
    lines = text.splitlines() or [""]
    line.detail(f"↳ {escape(lines[0])}")
    for rest in lines[1:]:
        line.detail(f"  {escape(rest)}")
    redactions: dict[str, int] = label.get("redactions") or {}
    if redactions:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(redactions.items()))
        line.detail(
            f"↳ [bold magenta]the gateway redacted the upstream's secrets[/] ({kinds}) "
            f"before the agent saw them [dim]{receipts}[/]"
        )
    else:
        line.detail(
            f"↳ {label.get('sensitivity')} data from upstream {label.get('upstream')} "
            f"[dim]{receipts}[/]"
        )
    return result


async def _approve_when_held(line: Timeline, approver: Client, task_id: str) -> None:
    """A human (bob, over the HTTP API) approves the call the gateway is holding open."""
    while True:
        pending = await anyio.to_thread.run_sync(approver.approvals)
        held = [a for a in pending if a["task_id"] == task_id]
        if held:
            approval = held[0]
            reason = approval["reasons"][0]
            args = escape(json.dumps(approval["args"]))
            line.effect("approval_required", f"{approval['tool']} {args} [dim](MCP tools/call)[/]")
            line.detail(
                f"↳ {reason['code']}: {escape(reason['message'])}; the gateway holds "
                f"the call open ({approval['approval_id']})"
            )
            await anyio.to_thread.run_sync(approver.approve, approval["approval_id"])
            line.detail(
                f"bob@acme.example approved {approval['approval_id']}; "
                "the gateway decides the call again and forwards it"
            )
            return
        await anyio.sleep(0.05)


async def drive(
    line: Timeline,
    resource: str,
    token: str,
    key: ProofKey,
    *,
    approver: Client,
    task_id: str,
    payee: str,
    offered: list[str],
) -> None:
    """The agent's MCP session through the gateway, step by step on the timeline."""
    async with (
        httpx2.AsyncClient(auth=TetherMCPAuth(token, key), timeout=30) as http,
        MCPClient(streamable_http_client(resource, http_client=http)) as client,
    ):
        listed = sorted(tool.name for tool in (await client.list_tools()).tools)
        hidden = sorted(set(offered) - set(listed))
        line.say(
            f"official MCP client (protocol {client.protocol_version}) with TetherMCPAuth: "
            f"tools/list shows {len(listed)} of the {len(offered)} tools: {', '.join(listed)}"
        )
        if hidden:
            line.detail(
                f"↳ hidden: {', '.join(hidden)} (outside the task's intent; "
                "hidden is not callable either: every call is decided again)"
            )
        await _call(line, client, "bank.read_bills", {})
        await _call(line, client, "bank.close_account", {"iban": ACCOUNT})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_approve_when_held, line, approver, task_id)
            await _call(line, client, "bank.send_money", {"recipient": payee, "amount": 1200})
            tg.cancel_scope.cancel()
        await _call(line, client, "bank.read_balance", {})
