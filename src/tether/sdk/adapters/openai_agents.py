"""OpenAI Agents SDK adapter: every ``FunctionTool`` call is authorized with Tether first,
and what an allowed call returns is reported to Tether before the model gets it.

::

    from agents import Agent, Runner, function_tool
    from tether.sdk.adapters.openai_agents import guard_function_tools

    @function_tool
    def send_money(recipient: str, amount: float) -> str: ...

    async with client.task(template="pay-bill", params={"payee": iban}) as task:
        tools = guard_function_tools(
            task, [read_bills, send_money],
            name_map={"read_bills": "bank.read_bills", "send_money": "bank.send_money"},
        )
        result = await Runner.run(Agent(name="payer", tools=tools), "Pay my bill")

**What is authorized.** The guarded tool is a copy of the original whose ``on_invoke_tool``
first authorizes the call: the tool is the Tether name (``name=`` / ``name_map=``, else the
tool's own name) and the arguments are the JSON object the model sent, which is what the
Agents SDK then validates into the function's arguments (strict schemas, the default, make
every parameter required, so the policy sees all of them). Only on ``allow`` does it call the
original invoker, so validation, context injection, failure handling and output handling are
the Agents SDK's own. Arguments that are not a JSON object cannot be authorized: the call is
refused without asking the server, and does not run.

**What is reported.** After an allowed call, what the original invoker returned is reported to
Tether (:meth:`tether.Task.report`) before it is handed back to the Agents SDK: a Pydantic
model (``ToolOutputText`` and the like) as its JSON dump, any other JSON value as it is,
anything else as ``str(output)``. An error the tool's ``failure_error_function`` turned into
the output is reported like any output (the model reads it); a call that raises reports
nothing. **Fails closed:** when the report fails, the tool raises :class:`ToolReportFailed` (a
:class:`tether.ReportFailed` and an ``AgentsException``, so ``Runner.run`` re-raises it as it
is) and the run stops without the model seeing the output.

**How a refusal surfaces.** The Agents SDK's contract for ``on_invoke_tool`` is: return a
string to report an error to the model, raise to fail the run. A refusal is something the
model should know about (to tell the user, or to stop trying), so by default the tool
*returns* :func:`tether.sdk.adapters.refusal_message` -- "Denied by Tether: ..." or "Approval
required by Tether: ... approval apr_... is pending" -- and the function never runs. With
``raise_on`` the run stops instead, with :class:`ToolDenied` or :class:`ToolApprovalRequired`:
these are :class:`tether.Denied` / :class:`tether.ApprovalRequired` and also the Agents SDK's
``AgentsException``, so ``Runner.run`` re-raises them as they are (it wraps other exceptions
in ``UserError``). ``raise_on={"approval_required"}`` suits a caller that waits for the human
and runs the agent again.

**Sync and async tasks.** The Agents SDK invokes tools on its event loop. An
:class:`tether.AsyncTask` authorizes on that loop; a sync :class:`tether.Task` authorizes in a
worker thread (``asyncio.to_thread``), so the loop is never blocked.

The copy keeps the original's name, description, schema, guardrails, ``needs_approval`` (the
Agents SDK's own human-in-the-loop step comes first, then Tether) and timeout (which now also
bounds the authorization). It has no ``__wrapped__``: the unguarded callable stays reachable
only through the original tool.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from agents import FunctionTool, Tool
from agents.exceptions import AgentsException
from agents.tool_context import ToolContext
from pydantic import BaseModel

from tether.sdk._errors import ApprovalRequired, Denied, ReportFailed
from tether.sdk._requests import Verdict
from tether.sdk.adapters import (
    AnyTask,
    aauthorize,
    areport,
    check_raise_on,
    refusal_message,
    tether_names,
)

__all__ = [
    "ToolApprovalRequired",
    "ToolDenied",
    "ToolReportFailed",
    "guard_function_tool",
    "guard_function_tools",
]


class ToolDenied(Denied, AgentsException):
    """A ``deny`` that stops the run (``raise_on`` names ``"deny"``)."""


class ToolApprovalRequired(ApprovalRequired, AgentsException):
    """An ``approval_required`` that stops the run; ``approval_id`` names the approval."""


class ToolReportFailed(ReportFailed, AgentsException):
    """An allowed call ran, but its output could not be reported: the run stops and the
    model never sees the output (``__cause__`` is the reporting error)."""


def _shown(output: Any) -> Any:
    """What is reported of a tool's output: Pydantic models (the Agents SDK's structured
    outputs) as their JSON dump, alone or in a list; anything else as it is."""
    if isinstance(output, BaseModel):
        return output.model_dump(mode="json")
    if isinstance(output, list | tuple) and any(isinstance(o, BaseModel) for o in output):
        return [_shown(item) for item in output]
    return output


def _arguments(args_json: str) -> dict[str, Any] | None:
    try:
        args = json.loads(args_json) if args_json.strip() else {}
    except ValueError:
        return None
    return args if isinstance(args, dict) else None


_UNREADABLE = Verdict(
    effect="deny",
    reasons=[
        {
            "code": "adapter.arguments",
            "message": "the arguments are not a JSON object, so the call cannot be authorized",
        }
    ],
    policies=[],
    risk_tags=[],
    receipt={},
    task_id=None,
    approval_id=None,
)


def _refuse(tool: str, verdict: Verdict, raise_on: frozenset[str]) -> str:
    if verdict.effect == "approval_required":
        if verdict.effect in raise_on:
            raise ToolApprovalRequired(tool, verdict.approval_id, verdict.reasons)
    elif "deny" in raise_on:  # deny, or any effect this SDK does not know: fail closed
        raise ToolDenied(tool, verdict.reasons, verdict.receipt)
    return refusal_message(tool, verdict)


def guard_function_tool(
    task: AnyTask,
    tool: FunctionTool,
    *,
    name: str | None = None,
    raise_on: Collection[str] = (),
) -> FunctionTool:
    """A copy of ``tool`` whose every call is authorized with ``task`` first, and whose
    allowed calls' outputs are reported before the model sees them (a failed report stops
    the run with :class:`ToolReportFailed`: fails closed).

    ``name`` is the Tether tool name (default: ``tool.name``, which stays the name the model
    sees). ``raise_on`` is a subset of ``{"deny", "approval_required"}``: those refusals stop
    the run with :class:`ToolDenied` / :class:`ToolApprovalRequired`; the others are returned
    to the model as the tool's result. A refused call never runs.
    """
    if not isinstance(tool, FunctionTool):
        raise TypeError(f"only FunctionTools can be guarded, not {type(tool).__name__}")
    effects = check_raise_on(raise_on)
    tether_tool = name or tool.name
    guarded = copy.copy(tool)
    invoke = guarded.on_invoke_tool  # the original invoker, bound to the copy

    async def on_invoke_tool(ctx: ToolContext[Any], args_json: str) -> Any:
        args = _arguments(args_json)
        verdict = _UNREADABLE if args is None else await aauthorize(task, tether_tool, args)
        if verdict.effect != "allow":
            return _refuse(tether_tool, verdict, effects)
        output = await invoke(ctx, args_json)
        try:
            await areport(task, tether_tool, verdict, _shown(output))
        except ReportFailed as failed:  # fails closed: the run stops, the output is withheld
            raise ToolReportFailed(
                failed.tool, failed.receipt, failed.reason, status=failed.status
            ) from failed.__cause__
        return output

    guarded.on_invoke_tool = on_invoke_tool
    return guarded


def guard_function_tools(
    task: AnyTask,
    tools: Sequence[FunctionTool],
    *,
    name_map: Mapping[str, str] | None = None,
    raise_on: Collection[str] = (),
) -> list[Tool]:
    """Guard each tool; ``name_map`` maps a tool's name to its Tether name.

    The list is typed as the ``list[Tool]`` that ``Agent(tools=...)`` takes; each item is a
    :class:`FunctionTool`.

    Tools the map does not name authorize under their own name.
    """
    for tool in tools:
        if not isinstance(tool, FunctionTool):
            raise TypeError(f"only FunctionTools can be guarded, not {type(tool).__name__}")
    names = tether_names([tool.name for tool in tools], name_map)
    return [
        guard_function_tool(task, tool, name=names[tool.name], raise_on=raise_on) for tool in tools
    ]
