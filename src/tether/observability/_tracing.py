"""Tracing: every decision, and every tool call through the gateway, as an OpenTelemetry span.

Conventions followed (OpenTelemetry semantic conventions, status Development):

- the Model Context Protocol spans and their context propagation:
  ``open-telemetry/semantic-conventions-genai`` v0.1.0, ``docs/gen-ai/mcp.md``
  (general attributes such as ``error.type`` and ``jsonrpc.request.id`` from
  semantic conventions v1.41);
- the *execute tool* span: semantic conventions v1.41.0,
  ``docs/gen-ai/gen-ai-agent-spans.md`` ("Execute tool span"; since moved to
  ``docs/gen-ai/execute-tool.md`` of semantic-conventions-genai): name
  ``execute_tool {gen_ai.tool.name}``, kind ``INTERNAL``, content attributes opt-in.

Two spans, one trace:

``tools/call {tool}`` (kind ``SERVER``)
    The MCP server span of a gateway ``tools/call``. The official MCP SDK opens
    it (its server middleware: ``mcp.method.name``, ``mcp.protocol.version``,
    ``jsonrpc.request.id``, ``gen_ai.operation.name`` = ``execute_tool``,
    ``gen_ai.tool.name``, ``error.type`` = ``tool_error`` on an error result),
    parented on the ``traceparent``/``tracestate`` of the request's
    ``params._meta``. :func:`traced_tool_call` adds ``mcp.session.id`` when the
    request has one, ``gen_ai.tool.call.id`` and Tether's answer (``tether.*``);
    it opens the span itself, the same way, if no MCP span is current.

``execute_tool {tool}`` (kind ``INTERNAL``)
    One decision of the enforcement pipeline, whichever door asked (the
    gateway, ``POST /v1/decisions``, the in-process SDK), a child of the
    current span: the gateway's MCP span, the caller's W3C ``traceparent``
    header on the HTTP API (:func:`remote_parent`), or the embedding
    application's own span. ``gen_ai.operation.name`` = ``execute_tool``,
    ``gen_ai.tool.name``, the MCP attributes when the call came through the
    gateway, and ``error.type`` = the reason code (a bounded token, else
    ``_OTHER``) when the call is not allowed (``deny`` or
    ``approval_required``), with the span status ``ERROR``.

Tether's own attributes, all under ``tether.``: ``tether.effect``,
``tether.reason_codes``, ``tether.policies``, ``tether.risk_tags``,
``tether.receipt.seq``, ``tether.receipt.hash``, ``tether.task.id``,
``tether.agent.spiffe_id``, ``tether.delegation.chain``, ``tether.approval.id``,
``tether.upstream`` and ``tether.tool.spiffe_id`` (gateway calls).

Content (``gen_ai.tool.call.arguments``, ``gen_ai.tool.call.result``, as JSON
text) is recorded only when ``TETHER_OTEL_CAPTURE_CONTENT`` is ``1`` (or
``true``): arguments as the agent sent them, results as the gateway returns them
(scrubbed of secrets). Never a token, a proof or a brokered credential.

Export is configured by the standard ``OTEL_*`` variables
(:func:`configure_tracing`). With no tracer provider installed, every hook here
is a check of the global provider and a direct call: no span, no context, no
attribute is built.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, StatusCode

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tether.observability")

#: Set to ``1`` to record tool arguments and results on spans (off by default).
CAPTURE_CONTENT = "TETHER_OTEL_CAPTURE_CONTENT"
TRACER_NAME = "tether"

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

_CODE = re.compile(r"[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,30}){0,2}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_MAX_TOOL = 256


def enabled() -> bool:
    """Whether a tracer provider is installed (else every span would be a no-op)."""
    return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider | NoOpTracerProvider)


def capture_content() -> bool:
    """Whether tool arguments and results are recorded (``TETHER_OTEL_CAPTURE_CONTENT``)."""
    return os.environ.get(CAPTURE_CONTENT, "").strip().lower() in _TRUE


#: A proxy until a provider is installed, then that provider's tracer.
_TRACER = trace.get_tracer(TRACER_NAME)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _error_type(code: str) -> str:
    """A reason code as ``error.type``: the codes Tether writes have this shape; anything
    else is the conventions' fallback ``_OTHER`` (low cardinality, never data)."""
    return code if _CODE.fullmatch(code) else "_OTHER"


# -- the call as the gateway received it -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class McpCall:
    """What the MCP request said of a call, for the decision span beneath it."""

    method: str
    protocol_version: str | None
    request_id: str | None
    session_id: str | None


_MCP_CALL: ContextVar[McpCall | None] = ContextVar("tether_mcp_call", default=None)


def _mcp_attributes(call: McpCall) -> dict[str, Any]:
    attributes: dict[str, Any] = {"mcp.method.name": call.method}
    if call.protocol_version:
        attributes["mcp.protocol.version"] = call.protocol_version
    if call.session_id:
        attributes["mcp.session.id"] = call.session_id
    if call.request_id is not None:
        attributes["jsonrpc.request.id"] = call.request_id
        attributes["gen_ai.tool.call.id"] = call.request_id
    return attributes


# -- decisions --------------------------------------------------------------------------------
def traced_decision(decide: Callable[P, R]) -> Callable[P, R]:
    """Wrap :meth:`tether.enforcement.Enforcement.decide` in an ``execute_tool`` span."""

    @functools.wraps(decide)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not enabled():
            return decide(*args, **kwargs)
        tool = str(kwargs.get("tool", ""))[:_MAX_TOOL]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool,
        }
        call = _MCP_CALL.get()
        if call is not None:
            attributes.update(_mcp_attributes(call))
        detail = kwargs.get("detail")
        if isinstance(detail, Mapping):
            if isinstance(upstream := detail.get("upstream"), str):
                attributes["tether.upstream"] = upstream
            if isinstance(identity := detail.get("tool_identity"), str):
                attributes["tether.tool.spiffe_id"] = identity
        if capture_content():
            attributes["gen_ai.tool.call.arguments"] = _json(kwargs.get("args"))
        with _TRACER.start_as_current_span(
            f"execute_tool {tool}", kind=SpanKind.INTERNAL, attributes=attributes
        ) as span:
            receipt = decide(*args, **kwargs)
            if span.is_recording():
                _record_receipt(span, receipt)
            return receipt

    return wrapper


def _record_receipt(span: trace.Span, receipt: Any) -> None:
    decision = receipt.decision
    effect = str(decision.effect)
    codes = [reason.code for reason in decision.reasons]
    attributes: dict[str, Any] = {
        "tether.effect": effect,
        "tether.reason_codes": codes,
        "tether.policies": list(decision.policies),
        "tether.risk_tags": list(decision.risk_tags),
        "tether.receipt.seq": receipt.seq,
        "tether.receipt.hash": receipt.hash,
        "tether.delegation.chain": list(decision.chain),
    }
    if decision.task_id:
        attributes["tether.task.id"] = decision.task_id
    if decision.agent_id:
        attributes["tether.agent.spiffe_id"] = decision.agent_id
    if receipt.approval_id:
        attributes["tether.approval.id"] = receipt.approval_id
    if effect != "allow":
        code = codes[0] if codes else "_OTHER"
        attributes["error.type"] = _error_type(code)
        span.set_status(StatusCode.ERROR, _error_type(code))
    span.set_attributes(attributes)


# -- gateway tool calls -----------------------------------------------------------------------
def traced_tool_call(
    handler: Callable[[S, Any, Any], Awaitable[R]],
) -> Callable[[S, Any, Any], Awaitable[R]]:
    """Wrap the gateway's ``tools/call`` handler: the MCP server span gets Tether's answer,
    and the decisions made while it runs get the request's MCP attributes."""

    @functools.wraps(handler)
    async def wrapper(self: S, ctx: Any, params: Any) -> R:
        if not enabled():
            return await handler(self, ctx, params)
        call = McpCall(
            method=str(getattr(ctx, "method", None) or "tools/call"),
            protocol_version=getattr(ctx, "protocol_version", None),
            request_id=None if ctx.request_id is None else str(ctx.request_id),
            session_id=_session_id(ctx),
        )
        span = trace.get_current_span()
        if _is_mcp_span(span, call.method):
            return await _answered(span, handler(self, ctx, params), call, params, own=False)
        # The MCP SDK opened no span for this request: open it as the conventions say.
        tool = str(getattr(params, "name", ""))[:_MAX_TOOL]
        with _TRACER.start_as_current_span(
            f"{call.method} {tool}",
            kind=SpanKind.SERVER,
            context=_extract(getattr(params, "meta", None)),
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool},
        ) as span:
            return await _answered(span, handler(self, ctx, params), call, params, own=True)

    return wrapper


async def _answered(
    span: trace.Span, answer: Awaitable[R], call: McpCall, params: Any, *, own: bool
) -> R:
    token = _MCP_CALL.set(call)
    try:
        result = await answer
    finally:
        _MCP_CALL.reset(token)
    if span.is_recording():
        attributes = _mcp_attributes(call)
        attributes.update(_answer_attributes(result))
        failed = bool(getattr(result, "is_error", False))
        if capture_content():
            attributes["gen_ai.tool.call.arguments"] = _json(
                getattr(params, "arguments", None) or {}
            )
            if not failed:
                attributes["gen_ai.tool.call.result"] = _json(_content(result))
        if own and failed:
            attributes["error.type"] = "tool_error"
            span.set_status(StatusCode.ERROR)
        span.set_attributes(attributes)
    return result


def _session_id(ctx: Any) -> str | None:
    request = getattr(ctx, "request", None)
    headers = getattr(request, "headers", None)
    value = headers.get("mcp-session-id") if headers is not None else None
    return str(value)[:256] if value else None


def _is_mcp_span(span: trace.Span, method: str) -> bool:
    name = getattr(span, "name", None)
    return span.is_recording() and isinstance(name, str) and name.startswith(method)


def _answer_attributes(result: Any) -> dict[str, Any]:
    """``tether.*`` from the answer's ``_meta`` (the decision, or the label of a result)."""
    meta = getattr(result, "meta", None)
    if not isinstance(meta, Mapping):
        return {}
    attributes: dict[str, Any] = {}
    decision = meta.get("tether/decision")
    label = meta.get("tether/label")
    if isinstance(decision, Mapping):
        attributes["tether.effect"] = str(decision.get("effect", ""))
        if isinstance(decision.get("code"), str):
            attributes["tether.reason_codes"] = [decision["code"]]
        receipt = decision.get("decision_receipt", decision.get("receipt"))
        if isinstance(receipt, int):
            attributes["tether.receipt.seq"] = receipt
        if isinstance(decision.get("receipt"), int) and "decision_receipt" in decision:
            attributes["tether.result.receipt.seq"] = decision["receipt"]
        if isinstance(decision.get("approval_id"), str):
            attributes["tether.approval.id"] = decision["approval_id"]
    elif isinstance(label, Mapping):
        attributes["tether.effect"] = "allow"
        if isinstance(label.get("decision_receipt"), int):
            attributes["tether.receipt.seq"] = label["decision_receipt"]
        if isinstance(label.get("receipt"), int):
            attributes["tether.result.receipt.seq"] = label["receipt"]
        if isinstance(label.get("sensitivity"), str):
            attributes["tether.result.sensitivity"] = label["sensitivity"]
        if isinstance(label.get("trusted"), bool):
            attributes["tether.result.trusted"] = label["trusted"]
    return attributes


def _content(result: Any) -> Any:
    """What a tool result says (its content and structured content, not its ``_meta``)."""
    dump = getattr(result, "model_dump", None)
    if dump is None:
        return result
    data = dump(mode="json", by_alias=True, exclude_none=True)
    return {key: value for key, value in data.items() if key != "_meta"}


# -- trace context from callers ----------------------------------------------------------------
def _extract(carrier: Any) -> otel_context.Context | None:
    """The remote parent in ``carrier`` (``traceparent``/``tracestate`` by the configured
    propagators), or ``None`` when it names no valid span."""
    if not carrier:
        return None
    try:
        extracted = propagate.extract(carrier)
    except (ValueError, TypeError):
        return None
    if not trace.get_current_span(extracted).get_span_context().is_valid:
        return None
    return extracted


@contextlib.contextmanager
def remote_parent(headers: Mapping[str, Any]) -> Iterator[None]:
    """Make the W3C ``traceparent`` (and ``tracestate``) of an HTTP request the parent of
    the spans opened inside (a decision joins the agent's trace as a child)."""
    extracted = _extract(headers) if enabled() else None
    if extracted is None:
        yield
        return
    token = otel_context.attach(extracted)
    try:
        yield
    finally:
        otel_context.detach(token)


def with_trace_context(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current span's ``traceparent`` (and ``tracestate``), for a
    request to Tether's HTTP API; ``headers`` itself when no span is current."""
    if not trace.get_current_span().get_span_context().is_valid:
        return headers
    carried = dict(headers)
    propagate.inject(carried)
    return carried


# -- export -----------------------------------------------------------------------------------
def configure_tracing() -> TracerProvider | None:
    """Install a tracer provider exporting as the standard ``OTEL_*`` variables say, and
    return it; ``None`` (nothing installed, spans stay no-ops) when none asks for export,
    when ``OTEL_SDK_DISABLED`` is true, or when a provider is installed already (an
    application embedding Tether keeps its own).

    Export is asked for by ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``;
    comma-separated) or, when it is unset, by an ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. OTLP is sent over HTTP (``http/protobuf``);
    its endpoint, headers, timeout and compression, the resource (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``), the sampler (``OTEL_TRACES_SAMPLER``) and the batch
    (``OTEL_BSP_*``) are the SDK's, from the same variables."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or enabled():
        return None
    names = _exporter_names(env)
    if not names:
        return None
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - only when exporting
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    from tether import __version__  # noqa: PLC0415

    exporters = [exporter for name in names if (exporter := _exporter(name, env)) is not None]
    if not exporters:
        return None
    detected = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    defaults: dict[str, Any] = {}
    if "OTEL_SERVICE_NAME" not in env and "service.name=" not in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        defaults["service.name"] = "tether"  # not the SDK's unknown_service
    if "service.version" not in detected.attributes:
        defaults["service.version"] = __version__
    provider = TracerProvider(resource=detected.merge(Resource(defaults)))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter_names(env: Mapping[str, str]) -> Sequence[str]:
    listed = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if listed:
        names = [name.strip().lower() for name in listed.split(",") if name.strip()]
        return [] if "none" in names else names
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        return ConsoleSpanExporter()
    if name != "otlp":
        log.warning("OTEL_TRACES_EXPORTER %r is not supported (otlp, console): ignored", name)
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        log.warning(
            "OTLP protocol %r is not supported (http/protobuf): traces are not exported",
            protocol,
        )
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    return OTLPSpanExporter()


__all__ = [
    "CAPTURE_CONTENT",
    "McpCall",
    "capture_content",
    "configure_tracing",
    "enabled",
    "remote_parent",
    "traced_decision",
    "traced_tool_call",
    "with_trace_context",
]
