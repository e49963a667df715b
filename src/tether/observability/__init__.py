"""Observability shared by every door: OpenTelemetry traces of decisions and tool calls.

(The HTTP API's Prometheus metrics and JSON logs are the server's own:
:mod:`tether.server._observe`.) See :mod:`tether.observability._tracing`.
"""

from tether.observability._tracing import (
    CAPTURE_CONTENT,
    McpCall,
    capture_content,
    configure_tracing,
    enabled,
    remote_parent,
    traced_decision,
    traced_tool_call,
    with_trace_context,
)

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
