"""Framework adapters end to end: the real OpenAI Agents SDK and LangChain, driven by
scripted models (no network, no API key), authorizing against a real server process."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, ModelResponse, Runner, Usage, function_tool, set_tracing_disabled
from agents.models.interface import Model
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from tether import ApprovalRequired, AsyncClient, Client, Denied, ProofKey
from tether.core import digest
from tether.sdk.adapters.langchain import GuardedTool, guard_tools
from tether.sdk.adapters.openai_agents import (
    ToolApprovalRequired,
    ToolDenied,
    guard_function_tools,
)

from .server_support import Server

AGENT = "spiffe://acme.example/agent/bill-payer"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"
PAYEE = "DE50526018159083016613"
OTHER = "GB33BUKB20201555555555"
BANK = {"read_bills": "bank.read_bills", "send_money": "bank.send_money"}

set_tracing_disabled(True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "home").start()
    yield srv
    srv.stop()


def _admin(server: Server) -> Client:
    admin = Client(server.url, admin=server.admin)
    admin.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    files = {p.name: p.read_text() for p in (EXAMPLES / "policies").glob("*.cedar")}
    admin.load_policies(files)
    catalogue = tomllib.loads((EXAMPLES / "bank.catalogue.toml").read_text())
    admin.post("/v1/catalogue", {"tools": catalogue["tools"], "prefix": "bank"})
    admin.add_template(tomllib.loads((EXAMPLES / "templates" / "pay-bill.toml").read_text()))
    return admin


def _agent(server: Server, admin: Client) -> Client:
    agent = Client(server.url, key=ProofKey())
    agent.attest(admin.join_token(AGENT))
    return agent


async def _async_agent(server: Server, admin: Client) -> AsyncClient:
    agent = AsyncClient(server.url, key=ProofKey())
    await agent.attest(admin.join_token(AGENT))
    return agent


def _decisions(admin: Client, task_id: str) -> list[tuple[str, str, str]]:
    """(tool, effect, args digest) of each decision receipt of one task, oldest first."""
    records = admin.get("/v1/audit", task_id=task_id, limit="100")["records"]
    return [(r["tool"], r["effect"], r["args_digest"]) for r in records if r["kind"] == "decision"]


def _bank(ran: list[tuple[Any, ...]]) -> tuple[Any, Any]:
    """The two bank functions, plain Python, recording every call that actually runs."""

    def read_bills() -> str:
        """List the user's outstanding bills."""
        ran.append(("read_bills",))
        return json.dumps([{"payee": PAYEE, "amount": 120.0}])

    def send_money(recipient: str, amount: float) -> str:
        """Send money to an IBAN."""
        ran.append(("send_money", recipient, amount))
        return f"sent {amount} to {recipient}"

    return read_bills, send_money


# -- OpenAI Agents SDK ------------------------------------------------------------------------
class ScriptedModel(Model):
    """An Agents SDK model that answers with a fixed sequence of output items, and records
    the input it was given each turn (so a test can see what the model saw)."""

    def __init__(self, turns: Sequence[list[Any]]) -> None:
        self.turns = list(turns)
        self.inputs: list[list[Any]] = []

    async def get_response(
        self,
        system_instructions: str | None,
        input: Any,
        model_settings: Any,
        tools: Any,
        output_schema: Any,
        handoffs: Any,
        tracing: Any,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        self.inputs.append(list(input) if isinstance(input, list) else [input])
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


def _call(call_id: str, name: str, args: dict[str, Any]) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=call_id, call_id=call_id, type="function_call", name=name, arguments=json.dumps(args)
    )


def _say(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id="msg",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(text=text, type="output_text", annotations=[], logprobs=[])],
    )


def _outputs(items: list[Any]) -> dict[str, str]:
    """call_id -> the tool output the model was shown."""
    return {
        item["call_id"]: item["output"]
        for item in items
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    }


def test_openai_agents_run_allows_runs_and_denies_with_receipts(server: Server) -> None:
    admin = _admin(server)
    ran: list[tuple[Any, ...]] = []
    read_bills, send_money = (function_tool(fn) for fn in _bank(ran))
    paid = {"recipient": PAYEE, "amount": 120.0}
    stolen = {"recipient": OTHER, "amount": 120.0}
    model = ScriptedModel(
        [
            [_call("c1", "read_bills", {})],
            [_call("c2", "send_money", paid)],
            [_call("c3", "send_money", stolen)],
            [_say("Paid the bill; the second transfer was refused.")],
        ]
    )

    async def main() -> tuple[str, str]:
        agent = await _async_agent(server, admin)
        async with agent.task(
            template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}
        ) as task:
            tools = guard_function_tools(task, [read_bills, send_money], name_map=BANK)
            assert [t.name for t in tools] == ["read_bills", "send_money"]  # model-facing
            bot = Agent(name="bill-payer", instructions="Pay the bill.", model=model, tools=tools)
            result = await Runner.run(bot, "Pay my electricity bill.")
        await agent.aclose()
        return task.task_id, str(result.final_output)

    task_id, final = asyncio.run(main())
    assert final == "Paid the bill; the second transfer was refused."
    # The allowed calls ran; the denied one did not.
    assert ran == [("read_bills",), ("send_money", PAYEE, 120.0)]
    # The model saw each result, the denial included, before its final answer.
    seen = _outputs(model.inputs[-1])
    assert json.loads(seen["c1"]) == [{"payee": PAYEE, "amount": 120.0}]
    assert seen["c2"] == f"sent 120.0 to {PAYEE}"
    assert seen["c3"].startswith("Denied by Tether: ")
    assert "[intent.argument]" in seen["c3"] and "bank.send_money did not run" in seen["c3"]
    # One receipt per call, for the exact arguments the model sent.
    assert _decisions(admin, task_id) == [
        ("bank.read_bills", "allow", digest({})),
        ("bank.send_money", "allow", digest(paid)),
        ("bank.send_money", "deny", digest(stolen)),
    ]
    assert admin.verify_audit()["ok"] is True


def test_openai_agents_approval_required_runs_once_approved(server: Server) -> None:
    """A sync Task (authorized in a worker thread); the hold is returned to the model."""
    admin = _admin(server)
    agent = _agent(server, admin)
    ran: list[tuple[Any, ...]] = []
    _, send_money = (function_tool(fn) for fn in _bank(ran))
    large = {"recipient": PAYEE, "amount": 1200.0}

    def run_once(tools: list[Any]) -> ScriptedModel:
        model = ScriptedModel([[_call("c1", "send_money", large)], [_say("done")]])
        bot = Agent(name="bill-payer", model=model, tools=tools)
        asyncio.run(Runner.run(bot, "Pay the large bill."))
        return model

    with agent.task(template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}) as task:
        tools = guard_function_tools(task, [send_money], name_map=BANK)
        held = _outputs(run_once(tools).inputs[-1])["c1"]
        assert ran == []
        [pending] = admin.approvals()
        assert pending["tool"] == "bank.send_money" and pending["args"] == large
        assert held.startswith("Approval required by Tether: ")
        assert f"approval {pending['approval_id']} is pending" in held
        admin.approve(pending["approval_id"])
        done = _outputs(run_once(tools).inputs[-1])["c1"]
    assert done == f"sent 1200.0 to {PAYEE}"
    assert ran == [("send_money", PAYEE, 1200.0)]
    assert [effect for _, effect, _ in _decisions(admin, task.task_id)] == [
        "approval_required",
        "allow",
    ]


def test_openai_agents_raise_on_stops_the_run(server: Server) -> None:
    admin = _admin(server)
    ran: list[tuple[Any, ...]] = []
    _, send_money = (function_tool(fn) for fn in _bank(ran))

    async def main() -> None:
        agent = await _async_agent(server, admin)
        async with agent.task(
            template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}
        ) as task:
            tools = guard_function_tools(
                task, [send_money], name_map=BANK, raise_on={"deny", "approval_required"}
            )
            for args, error in (
                ({"recipient": OTHER, "amount": 5.0}, ToolDenied),
                ({"recipient": PAYEE, "amount": 1200.0}, ToolApprovalRequired),
            ):
                model = ScriptedModel([[_call("c1", "send_money", args)], [_say("unreachable")]])
                with pytest.raises(error) as stopped:
                    await Runner.run(Agent(name="b", model=model, tools=tools), "Pay.")
                assert len(model.inputs) == 1  # the run stopped at the refusal
            assert isinstance(stopped.value, ApprovalRequired) and stopped.value.approval_id
            with pytest.raises(ValueError, match="raise_on"):
                guard_function_tools(task, [send_money], raise_on={"allow"})
        await agent.aclose()

    asyncio.run(main())
    assert issubclass(ToolDenied, Denied)
    assert ran == []


# -- LangChain --------------------------------------------------------------------------------
def _tool_loop(
    model: GenericFakeChatModel, tools: Sequence[BaseTool], prompt: str
) -> list[BaseMessage]:
    """The classic tool-calling loop: ask the model, run each tool call, repeat."""
    by_name = {t.name: t for t in tools}
    messages: list[BaseMessage] = [HumanMessage(prompt)]
    while True:
        reply = model.invoke(messages)
        messages.append(reply)
        if not isinstance(reply, AIMessage) or not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(by_name[call["name"]].invoke(call))


def _tool_call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "name": name, "args": args, "type": "tool_call"}


def test_langchain_tool_calls_allow_runs_and_denies_with_receipts(server: Server) -> None:
    admin = _admin(server)
    agent = _agent(server, admin)
    ran: list[tuple[Any, ...]] = []
    read_bills, send_money = (tool(fn) for fn in _bank(ran))
    paid = {"recipient": PAYEE, "amount": 120.0}
    stolen = {"recipient": OTHER, "amount": 120.0}
    model = GenericFakeChatModel(
        messages=iter(
            [
                AIMessage("", tool_calls=[_tool_call("c1", "read_bills", {})]),
                AIMessage(  # two calls in one turn: one allowed, one denied
                    "",
                    tool_calls=[
                        _tool_call("c2", "send_money", paid),
                        _tool_call("c3", "send_money", stolen),
                    ],
                ),
                AIMessage("Paid the bill; the second transfer was refused."),
            ]
        )
    )
    with agent.task(template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}) as task:
        tools = guard_tools(task, [read_bills, send_money], name_map=BANK)
        assert all(isinstance(t, GuardedTool) for t in tools)
        # The model is offered exactly the unwrapped tools' schemas.
        assert [convert_to_openai_tool(t) for t in tools] == [
            convert_to_openai_tool(t) for t in (read_bills, send_money)
        ]
        messages = _tool_loop(model, tools, "Pay my electricity bill.")
    assert ran == [("read_bills",), ("send_money", PAYEE, 120.0)]
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    assert results["c1"].status == "success" and PAYEE in str(results["c1"].content)
    assert results["c2"].status == "success"
    assert results["c2"].content == f"sent 120.0 to {PAYEE}"
    assert results["c3"].status == "error" and results["c3"].name == "send_money"
    assert str(results["c3"].content).startswith("Denied by Tether: ")
    assert "[intent.argument]" in str(results["c3"].content)
    assert messages[-1].content == "Paid the bill; the second transfer was refused."
    assert _decisions(admin, task.task_id) == [
        ("bank.read_bills", "allow", digest({})),
        ("bank.send_money", "allow", digest(paid)),
        ("bank.send_money", "deny", digest(stolen)),
    ]
    assert admin.verify_audit()["ok"] is True


def test_langchain_async_approval_required_raises_then_runs_once_approved(
    server: Server,
) -> None:
    admin = _admin(server)
    ran: list[tuple[Any, ...]] = []
    _, send_money = (tool(fn) for fn in _bank(ran))
    large = {"recipient": PAYEE, "amount": 1200.0}
    call = _tool_call("c1", "send_money", large)

    async def main() -> str:
        agent = await _async_agent(server, admin)
        async with agent.task(
            template="pay-bill", params={"payee": PAYEE, "max_amount": 1500}
        ) as task:
            [held_as_result] = guard_tools(task, [send_money], name_map=BANK)
            [pay] = guard_tools(task, [send_money], name_map=BANK, raise_on={"approval_required"})
            # Default: the hold is the tool's (error) result, for the model to read.
            message = await held_as_result.ainvoke(call)
            assert isinstance(message, ToolMessage) and message.status == "error"
            assert str(message.content).startswith("Approval required by Tether: ")
            # raise_on: the hold raises, with the approval to wait for.
            with pytest.raises(ApprovalRequired) as held:
                await pay.ainvoke(call)
            # An AsyncTask cannot authorize from sync code: nothing runs.
            with pytest.raises(TypeError, match="AsyncTask"):
                pay.invoke(call)
            assert ran == []
            [pending] = await asyncio.to_thread(admin.approvals)
            assert held.value.approval_id == pending["approval_id"]
            assert pending["approval_id"] in str(message.content)  # the same pending approval
            await asyncio.to_thread(admin.approve, pending["approval_id"])
            done = await pay.ainvoke(call)
        await agent.aclose()
        assert isinstance(done, ToolMessage) and done.status == "success"
        return task.task_id

    task_id = asyncio.run(main())
    assert ran == [("send_money", PAYEE, 1200.0)]
    assert [effect for _, effect, _ in _decisions(admin, task_id)] == [
        "approval_required",
        "approval_required",
        "allow",
    ]
