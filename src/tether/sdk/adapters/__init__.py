"""Framework adapters: authorize every tool call an agent framework makes.

Each adapter wraps a framework's own tool object and returns one of the same kind, so it
drops into the framework unchanged. Before the wrapped tool runs, the call is authorized
with a :class:`tether.Task` or :class:`tether.AsyncTask`; a refused call never runs.

* :mod:`tether.sdk.adapters.openai_agents` -- OpenAI Agents SDK ``FunctionTool``\\ s.
* :mod:`tether.sdk.adapters.langchain` -- LangChain ``BaseTool``\\ s.

By default a refusal (``deny`` or ``approval_required``) is reported *to the model* as the
tool's result, in the framework's own way, so the agent can explain or change course; the
text comes from :func:`refusal_message`. ``raise_on={"deny", "approval_required"}`` (any
subset) raises instead, to stop the run: for instance on ``approval_required``, to wait for
a human and retry.

Tool names: Tether policies name tools like ``bank.send_money``, while model providers only
accept ``[a-zA-Z0-9_-]`` in tool names. The model-facing name stays the framework tool's
name; ``name=`` (one tool) or ``name_map=`` (model-facing name -> Tether name) says which
Tether tool a call authorizes as. Without them the two names are the same.

**Results are reported.** What an allowed call returns is reported to Tether (:func:`report`,
:meth:`tether.Task.report`) before the framework gets it, so the task's information-flow state
records what the agent read (an agent that read an injected page and then mails it out is
judged knowing it). What is reported is what the model is shown, as JSON, else as text. A call
that raises reports nothing. **Fails closed:** when the report fails (no answer, or the server
refuses it) the tool has run but its result is withheld: :class:`tether.ReportFailed` is raised
out of the tool, which stops the run rather than hand the model a result Tether did not
observe.

This package imports no framework; each submodule imports only its own, so ``import tether``
stays light.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from tether.sdk._client import AsyncTask, Task, areport_allowed, report_allowed
from tether.sdk._requests import Observation, Verdict

__all__ = [
    "REFUSALS",
    "AnyTask",
    "aauthorize",
    "areport",
    "authorize",
    "check_raise_on",
    "refusal_message",
    "report",
    "tether_names",
]

AnyTask = Task | AsyncTask
"""The task an adapter authorizes with: sync or async."""

REFUSALS = frozenset({"deny", "approval_required"})
"""The effects ``raise_on`` may name."""


def check_raise_on(raise_on: Collection[str]) -> frozenset[str]:
    """Validate ``raise_on``: a subset of :data:`REFUSALS`."""
    effects = frozenset(raise_on)
    unknown = effects - REFUSALS
    if unknown:
        raise ValueError(f"raise_on may name only {sorted(REFUSALS)}, not {sorted(unknown)}")
    return effects


def tether_names(names: Sequence[str], name_map: Mapping[str, str] | None) -> dict[str, str]:
    """Map model-facing tool names to Tether tool names (a name the map lacks maps to itself).

    A map may name more tools than are guarded, so one map can serve a whole toolset. A tool
    it misses authorizes under its own name, which is denied unless the task's intent grants
    that name: a missing entry fails closed.
    """
    mapping = name_map or {}
    return {name: mapping.get(name, name) for name in names}


def authorize(task: AnyTask, tool: str, args: dict[str, Any]) -> Verdict:
    """Authorize from synchronous code; an :class:`AsyncTask` cannot be used here."""
    if isinstance(task, AsyncTask):
        raise TypeError(
            f"{tool}: an AsyncTask authorizes only from async code; "
            "call the tool asynchronously or use a sync tether.Task"
        )
    return task.authorize(tool, args)


async def aauthorize(task: AnyTask, tool: str, args: dict[str, Any]) -> Verdict:
    """Authorize from async code; a sync :class:`Task` is called in a worker thread."""
    if isinstance(task, AsyncTask):
        return await task.authorize(tool, args)
    return await asyncio.to_thread(task.authorize, tool, args)


def report(task: AnyTask, tool: str, allowed: Verdict, result: Any) -> Observation:
    """Report from synchronous code what an allowed call returned; an :class:`AsyncTask`
    cannot be used here. Raises :class:`tether.ReportFailed` when the report fails."""
    if isinstance(task, AsyncTask):
        raise TypeError(
            f"{tool}: an AsyncTask reports only from async code; "
            "call the tool asynchronously or use a sync tether.Task"
        )
    return report_allowed(task, tool, allowed, result)


async def areport(task: AnyTask, tool: str, allowed: Verdict, result: Any) -> Observation:
    """Report from async code what an allowed call returned; a sync :class:`Task` reports in a
    worker thread. Raises :class:`tether.ReportFailed` when the report fails."""
    return await areport_allowed(task, tool, allowed, result)


def refusal_message(tool: str, verdict: Verdict) -> str:
    """The text a model sees for a refused call: the effect, the reasons, what to do next."""
    reasons = "; ".join(f"{r['message']} [{r['code']}]" for r in verdict.reasons) or "no reason"
    if verdict.effect == "approval_required":
        return (
            f"Approval required by Tether: {reasons}. The call to {tool} did not run; "
            f"approval {verdict.approval_id} is pending. The same call can be made again "
            "once a human approves it."
        )
    return f"Denied by Tether: {reasons}. The call to {tool} did not run."
