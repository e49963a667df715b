"""LangChain adapter: every ``BaseTool`` call is authorized with Tether first, and what an
allowed call returns is reported to Tether before the caller gets it.

::

    from langchain_core.tools import tool
    from tether.sdk.adapters.langchain import guard_tools

    @tool
    def send_money(recipient: str, amount: float) -> str:
        "Send money."

    with client.task(template="pay-bill", params={"payee": iban}) as task:
        tools = guard_tools(task, [read_bills, send_money],
                            name_map={"read_bills": "bank.read_bills",
                                      "send_money": "bank.send_money"})
        message = tools[1].invoke(ai_message.tool_calls[0])   # a ToolMessage

**What is authorized.** :func:`guard_tool` returns a :class:`GuardedTool`, a ``BaseTool`` with
the wrapped tool's name, description and schemas (so ``bind_tools`` and tool-calling agents
see the same tool). ``invoke``/``ainvoke``/``run``/``arun`` authorize first: the tool is the
Tether name (``name=`` / ``name_map=``, else the tool's name) and the arguments are those the
caller passed -- a ``ToolCall``'s ``args`` as the model wrote them -- less the arguments
LangChain injects at run time (``InjectedToolArg``, ``InjectedToolCallId``, ``ToolRuntime``),
which the model does not control. A single string input authorizes as ``{<the tool's only
argument>: input}``. On ``allow`` the call is handed, unchanged, to the wrapped tool's own
``run``/``arun``: its validation, callbacks, ``handle_tool_error``, ``response_format`` and
``ToolMessage`` formatting apply as if it were called directly.

**What is reported.** After an allowed call, what the wrapped tool's ``run``/``arun`` returned
is reported to Tether (:meth:`tether.Task.report`) before ``invoke`` returns it: a
``ToolMessage``'s ``content`` (the model's view; with ``response_format="content_and_artifact"``
``[content, artifact]``, since the caller gets the artifact too), otherwise the output itself,
as JSON, else as ``str(output)``. A tool error that ``handle_tool_error`` turned into the
result is reported like any result (the model reads it); a call that raises out of the wrapped
tool reports nothing. **Fails closed:** when the report fails, :class:`tether.ReportFailed`
raises out of ``invoke``/``ainvoke`` and the output is withheld (the wrapped tool's callbacks
have already seen it end).

**How a refusal surfaces.** LangChain's idiom for "a tool failed, tell the model" is to raise
:class:`~langchain_core.tools.ToolException` and let the tool's ``handle_tool_error`` turn it
into the result. A refused call goes through the guarded tool's own ``BaseTool.run`` (so
callbacks see a tool start and end), which raises :class:`TetherRefusal` (a
``ToolException``) instead of running anything; ``handle_tool_error=True`` makes its message,
:func:`tether.sdk.adapters.refusal_message`, the result -- a ``ToolMessage`` with
``status="error"`` when invoked with a ``ToolCall``, the string otherwise. With ``raise_on``
the refusal raises :class:`tether.Denied` / :class:`tether.ApprovalRequired` out of
``invoke`` instead (callbacks see a tool error); ``raise_on={"approval_required"}`` suits a
caller that waits for the human and invokes the tool call again.

**Sync and async tasks.** ``ainvoke``/``arun`` authorize with an :class:`tether.AsyncTask` on
the event loop, or with a sync :class:`tether.Task` in a worker thread. ``invoke``/``run``
need a sync ``Task``: with an ``AsyncTask`` they raise ``TypeError`` and nothing runs.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, NoReturn

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, ToolException
from langchain_core.tools.base import ArgsSchema
from langchain_core.utils.pydantic import TypeBaseModel

from tether.sdk._client import AsyncTask, Task
from tether.sdk._errors import ApprovalRequired, Denied
from tether.sdk._requests import Verdict
from tether.sdk.adapters import (
    AnyTask,
    aauthorize,
    areport,
    authorize,
    check_raise_on,
    refusal_message,
    report,
    tether_names,
)

__all__ = ["GuardedTool", "TetherRefusal", "guard_tool", "guard_tools"]


class TetherRefusal(ToolException):
    """A refused call, reported to the model through ``handle_tool_error``."""

    def __init__(self, tool: str, verdict: Verdict) -> None:
        super().__init__(refusal_message(tool, verdict))
        self.tool = tool
        self.verdict = verdict


def _shown(output: Any) -> Any:
    """What is reported of a wrapped tool's output: a ``ToolMessage``'s content (with its
    artifact, if any, which reaches the caller too), else the output itself."""
    if isinstance(output, ToolMessage):
        return output.content if output.artifact is None else [output.content, output.artifact]
    if isinstance(output, list) and any(isinstance(item, ToolMessage) for item in output):
        return [_shown(item) for item in output]
    return output


# The refusal a GuardedTool's ``_run`` reports; set only around its own ``BaseTool.run``.
_REFUSED: ContextVar[Verdict | None] = ContextVar("tether_langchain_refused", default=None)


class GuardedTool(BaseTool):
    """A ``BaseTool`` that authorizes each call with ``task`` before ``wrapped`` runs it, and
    reports what an allowed call returned before handing it over."""

    wrapped: BaseTool
    """The tool that runs the allowed calls."""
    task: Task | AsyncTask
    """The task the calls are authorized with."""
    tether_tool: str
    """The tool name Tether authorizes (policies and intent capabilities name this)."""
    raise_on: frozenset[str] = frozenset()
    """Refusals (``deny``, ``approval_required``) raised rather than returned to the model."""

    # -- the wrapped tool's schemas --------------------------------------------------------
    @property
    def tool_call_schema(self) -> ArgsSchema:
        return self.wrapped.tool_call_schema

    @property
    def args(self) -> dict[str, Any]:
        return self.wrapped.args

    def get_input_schema(self, config: RunnableConfig | None = None) -> TypeBaseModel:
        return self.wrapped.get_input_schema(config)

    @functools.cached_property
    def _injected_args_keys(self) -> frozenset[str]:
        return self.wrapped._injected_args_keys

    # -- authorization ---------------------------------------------------------------------
    def _tether_args(self, tool_input: str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(tool_input, str):
            names = [k for k in self.wrapped.args if k != "kwargs"]
            return {names[0] if len(names) == 1 else "input": tool_input}
        return self.wrapped._filter_injected_args(dict(tool_input))

    def run(self, tool_input: str | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        verdict = authorize(self.task, self.tether_tool, self._tether_args(tool_input))
        if verdict.effect == "allow":
            output = self.wrapped.run(tool_input, *args, **kwargs)
            report(self.task, self.tether_tool, verdict, _shown(output))  # or ReportFailed
            return output
        token = _REFUSED.set(verdict)
        try:
            return super().run(tool_input, *args, **kwargs)
        finally:
            _REFUSED.reset(token)

    async def arun(self, tool_input: str | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        verdict = await aauthorize(self.task, self.tether_tool, self._tether_args(tool_input))
        if verdict.effect == "allow":
            output = await self.wrapped.arun(tool_input, *args, **kwargs)
            await areport(self.task, self.tether_tool, verdict, _shown(output))
            return output
        token = _REFUSED.set(verdict)
        try:
            return await super().arun(tool_input, *args, **kwargs)
        finally:
            _REFUSED.reset(token)

    def _refuse(self) -> NoReturn:
        verdict = _REFUSED.get()
        if verdict is None:  # reached without run/arun: never run anything unauthorized
            raise RuntimeError(f"{self.name}: a GuardedTool runs only through run/arun/invoke")
        if verdict.effect == "approval_required":
            if verdict.effect in self.raise_on:
                raise ApprovalRequired(self.tether_tool, verdict.approval_id, verdict.reasons)
        elif "deny" in self.raise_on:  # deny, or an effect this SDK does not know
            raise Denied(self.tether_tool, verdict.reasons, verdict.receipt)
        raise TetherRefusal(self.tether_tool, verdict)

    def _run(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()

    async def _arun(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse()


def guard_tool(
    task: AnyTask,
    tool: BaseTool,
    *,
    name: str | None = None,
    raise_on: Collection[str] = (),
) -> GuardedTool:
    """Wrap ``tool`` so every call is authorized with ``task`` first, and what an allowed
    call returns is reported before it is returned (a failed report raises
    :class:`tether.ReportFailed`: fails closed).

    ``name`` is the Tether tool name (default: ``tool.name``, which stays the name the model
    sees). ``raise_on`` is a subset of ``{"deny", "approval_required"}``: those refusals raise
    :class:`tether.Denied` / :class:`tether.ApprovalRequired`; the others become the tool's
    result through ``handle_tool_error``. A refused call never runs.
    """
    if not isinstance(tool, BaseTool):
        raise TypeError(f"only LangChain BaseTools can be guarded, not {type(tool).__name__}")
    return GuardedTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        verbose=tool.verbose,
        callbacks=tool.callbacks,
        tags=tool.tags,
        metadata=tool.metadata,
        handle_tool_error=True,
        handle_validation_error=tool.handle_validation_error,
        response_format=tool.response_format,
        extras=tool.extras,
        wrapped=tool,
        task=task,
        tether_tool=name or tool.name,
        raise_on=check_raise_on(raise_on),
    )


def guard_tools(
    task: AnyTask,
    tools: Sequence[BaseTool],
    *,
    name_map: Mapping[str, str] | None = None,
    raise_on: Collection[str] = (),
) -> list[GuardedTool]:
    """Guard each tool; ``name_map`` maps a tool's name to its Tether name.

    Tools the map does not name authorize under their own name.
    """
    for tool in tools:
        if not isinstance(tool, BaseTool):
            raise TypeError(f"only LangChain BaseTools can be guarded, not {type(tool).__name__}")
    names = tether_names([tool.name for tool in tools], name_map)
    return [guard_tool(task, tool, name=names[tool.name], raise_on=raise_on) for tool in tools]
