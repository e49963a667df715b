"""Tracing: decisions and gateway tool calls as OpenTelemetry spans, for real.

The spans are read with the OpenTelemetry SDK's in-memory exporter (the API in
process, the gateway under uvicorn with a real upstream and the official MCP
client) and, for a ``tether serve`` process configured by ``OTEL_*`` variables,
as OTLP/HTTP protobuf at a receiver in this test.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from litestar.testing import TestClient
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tether import Client, ProofKey, Tether, parse_intent
from tether.observability import CAPTURE_CONTENT
from tether.server import create_app

from .conftest import AGENT, PERMIT_ALL, quiet
from .mcp_support.harness import (
    TOOLS_IDENTITY,
    GatewayServer,
    build_config,
    free_port,
    init_home,
    mcp_client,
    open_task,
    text_of,
    tools_upstream,
)
from .server_support import Server

pytestmark = pytest.mark.sqlite_only("spans do not depend on the store")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"
AGENT_TRACER = "scripted-agent"


# -- span capture -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """Every finished span of this process. A process has one tracer provider (set once):
    it is installed here unless one is already, and this exporter stops keeping spans
    once the module is done."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def _wait_for(
    exporter: InMemorySpanExporter, found: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The finished spans once ``found`` holds of them (a server span ends after its answer
    has left, so it may finish after the client has read it)."""
    deadline = time.monotonic() + 30
    while True:
        finished = list(exporter.get_finished_spans())
        if found(finished):
            return finished
        if time.monotonic() > deadline:
            names = [s.name for s in finished]
            raise AssertionError(f"spans never matched; finished: {names}")
        time.sleep(0.02)


def _named(finished: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _ancestors(span: ReadableSpan, finished: list[ReadableSpan]) -> list[int]:
    """The span ids above ``span``, nearest first, as far as they were recorded here."""
    by_id = {s.context.span_id: s for s in finished if s.context is not None}
    chain: list[int] = []
    parent = span.parent
    while parent is not None:
        chain.append(parent.span_id)
        above = by_id.get(parent.span_id)
        parent = above.parent if above is not None else None
    return chain


# -- the HTTP API, in process ---------------------------------------------------------------------
@dataclass
class Api:
    tether: Tether
    client: TestClient  # type: ignore[type-arg]
    key: ProofKey
    token: str

    def decide(self, tool: str, args: dict[str, Any], headers: dict[str, str]) -> Any:
        url = "http://testserver.local/v1/decisions"
        proof = self.key.prove(
            self.token, tool, args, now=self.tether.clock.now(), htm="POST", htu=url
        )
        response = self.client.post(
            "/v1/decisions",
            json={"tool": tool, "args": args},
            headers={"Authorization": f"DPoP {self.token}", "DPoP": proof, **headers},
        )
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def api() -> Iterator[Api]:
    t = Tether.ephemeral("acme.example")
    t.register_identity(AGENT, kind="agent", owner="a@acme.example")
    t.policies.load({"p.cedar": PERMIT_ALL})
    quiet(t)
    key = ProofKey()
    task = t.open_task(
        AGENT,
        proof_jwk=key.jwk,
        intent=parse_intent({"purpose": "p", "capabilities": [{"tool": "fs.read"}]}),
    )
    with TestClient(create_app(t)) as client:
        yield Api(t, client, key, task.token)
    t.close()


def _traceparent(span: trace.Span) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def test_an_allowed_call_is_an_execute_tool_span_in_the_callers_trace(
    api: Api, spans: InMemorySpanExporter
) -> None:
    agent = trace.get_tracer(AGENT_TRACER).start_span("invoke_agent bot")
    answer = api.decide("fs.read", {"path": "/etc/motd"}, _traceparent(agent))
    agent.end()
    assert answer["effect"] == "allow"
    (span,) = _named(list(spans.get_finished_spans()), "execute_tool fs.read")
    attributes = _attrs(span)
    assert span.kind is SpanKind.INTERNAL
    assert attributes["gen_ai.operation.name"] == "execute_tool"
    assert attributes["gen_ai.tool.name"] == "fs.read"
    assert attributes["tether.effect"] == "allow"
    assert attributes["tether.agent.spiffe_id"] == AGENT
    assert attributes["tether.task.id"] == answer["task_id"]
    assert attributes["tether.receipt.seq"] == answer["receipt"]["seq"]
    assert attributes["tether.receipt.hash"] == answer["receipt"]["hash"]
    assert list(attributes["tether.reason_codes"]) == [r["code"] for r in answer["reasons"]]
    assert list(attributes["tether.delegation.chain"]) == [AGENT]
    assert "error.type" not in attributes
    assert span.status.status_code is StatusCode.UNSET
    # A child of the agent's span: same trace, the agent's span as its parent.
    assert span.context is not None and span.parent is not None
    assert span.context.trace_id == agent.get_span_context().trace_id
    assert span.parent.span_id == agent.get_span_context().span_id
    assert span.parent.is_remote
    # Content is not recorded unless asked for; the token never is.
    assert "gen_ai.tool.call.arguments" not in attributes
    assert api.token not in json.dumps(attributes, default=str)
    assert "/etc/motd" not in json.dumps(attributes, default=str)


def test_a_denied_call_has_an_error_type_and_an_error_status(
    api: Api, spans: InMemorySpanExporter
) -> None:
    """A prompt-injected agent calls a tool its intent does not name: the span says so."""
    answer = api.decide("shell.exec", {"cmd": "id"}, {})
    assert answer["effect"] == "deny"
    code = answer["reasons"][0]["code"]
    (span,) = _named(list(spans.get_finished_spans()), "execute_tool shell.exec")
    attributes = _attrs(span)
    assert attributes["tether.effect"] == "deny"
    assert attributes["error.type"] == code
    assert span.status.status_code is StatusCode.ERROR
    assert span.parent is None  # no traceparent: a trace of its own


def test_an_unparseable_traceparent_starts_a_trace_of_its_own(
    api: Api, spans: InMemorySpanExporter
) -> None:
    """An unauthenticated network caller's garbage ``traceparent`` is ignored, not fatal."""
    answer = api.decide("fs.read", {}, {"traceparent": "00-zz-not-a-trace-01"})
    assert answer["effect"] == "allow"
    (span,) = _named(list(spans.get_finished_spans()), "execute_tool fs.read")
    assert span.parent is None


def test_content_is_recorded_only_when_opted_in(
    api: Api, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.decide("fs.read", {"path": "/srv/a"}, {})
    (quiet_span,) = _named(list(spans.get_finished_spans()), "execute_tool fs.read")
    assert "gen_ai.tool.call.arguments" not in _attrs(quiet_span)
    spans.clear()
    monkeypatch.setenv(CAPTURE_CONTENT, "1")
    api.decide("fs.read", {"path": "/srv/b"}, {})
    (span,) = _named(list(spans.get_finished_spans()), "execute_tool fs.read")
    assert json.loads(_attrs(span)["gen_ai.tool.call.arguments"]) == {"path": "/srv/b"}
    assert api.token not in json.dumps(_attrs(span), default=str)


# -- the MCP gateway: uvicorn, a real upstream, the official MCP client ---------------------------
@dataclass
class Gw:
    tether: Tether
    gateway: GatewayServer


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    base = tmp_path_factory.mktemp("gateway-tracing")
    home = base / "home"
    tether = init_home(home, {"tools": TOOLS_IDENTITY})
    port = free_port()
    config = build_config(
        port, base, [tools_upstream("tools", TOOLS_IDENTITY, protocol="2026-07-28")]
    )
    gateway = GatewayServer(home, config, port).start().pin_all()
    try:
        yield Gw(tether, gateway)
    finally:
        gateway.stop()
        tether.close()


def _agent_calls(gw: Gw, tool: str, args: dict[str, Any]) -> tuple[trace.Span, Any]:
    """A scripted agent: its own span current while the official MCP client calls the
    gateway (the client carries the trace in ``params._meta.traceparent``)."""
    key, task = open_task(gw.tether, ["tools.echo"], resource=gw.gateway.url)
    tracer = trace.get_tracer(AGENT_TRACER)

    async def run() -> tuple[trace.Span, Any]:
        with tracer.start_as_current_span("invoke_agent coder") as agent:
            async with mcp_client(gw.gateway.url, task.token, key, "2026-07-28") as client:
                return agent, await client.call_tool(tool, args)

    return anyio.run(run)


def _server_span(finished: list[ReadableSpan], tool: str) -> ReadableSpan | None:
    """The one MCP server span of a call to ``tool`` (never two: the gateway opens one only
    when the MCP SDK did not)."""
    found = [s for s in finished if s.name == f"tools/call {tool}" and s.kind is SpanKind.SERVER]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_a_gateway_call_joins_the_agents_trace(gw: Gw, spans: InMemorySpanExporter) -> None:
    agent, result = _agent_calls(gw, "tools.echo", {"text": "hello"})
    assert not result.is_error and "hello" in text_of(result)
    finished = _wait_for(
        spans,
        lambda done: (
            _server_span(done, "tools.echo") is not None
            and bool(_named(done, "execute_tool tools.echo"))
        ),
    )
    server = _server_span(finished, "tools.echo")
    assert server is not None and server.context is not None
    (decision,) = _named(finished, "execute_tool tools.echo")
    trace_id = agent.get_span_context().trace_id
    assert decision.context is not None and decision.context.trace_id == trace_id
    assert server.context.trace_id == trace_id
    # agent -> MCP client span -> gateway's MCP server span -> the decision
    assert decision.parent is not None and decision.parent.span_id == server.context.span_id
    assert agent.get_span_context().span_id in _ancestors(decision, finished)

    on_server = _attrs(server)
    assert on_server["mcp.method.name"] == "tools/call"
    assert on_server["mcp.protocol.version"] == "2026-07-28"
    assert on_server["gen_ai.operation.name"] == "execute_tool"
    assert on_server["gen_ai.tool.name"] == "tools.echo"
    request_id = on_server["jsonrpc.request.id"]
    assert on_server["gen_ai.tool.call.id"] == request_id
    assert on_server["tether.effect"] == "allow"
    on_decision = _attrs(decision)
    assert on_decision["mcp.method.name"] == "tools/call"
    assert on_decision["mcp.protocol.version"] == "2026-07-28"
    assert on_decision["jsonrpc.request.id"] == request_id
    assert on_decision["gen_ai.tool.call.id"] == request_id
    assert on_decision["tether.effect"] == "allow"
    assert on_decision["tether.upstream"] == "tools"
    assert on_decision["tether.tool.spiffe_id"] == TOOLS_IDENTITY
    assert on_decision["tether.receipt.seq"] == on_server["tether.receipt.seq"]
    assert "mcp.session.id" not in on_decision  # the gateway is stateless: no session
    for attributes in (on_server, on_decision):
        assert "error.type" not in attributes
        assert "gen_ai.tool.call.arguments" not in attributes
        assert "gen_ai.tool.call.result" not in attributes


def test_a_denied_gateway_call_is_an_error_on_both_spans(
    gw: Gw, spans: InMemorySpanExporter
) -> None:
    """A prompt-injected agent sends e-mail its task never asked for: refused, and traced."""
    agent, result = _agent_calls(gw, "tools.send_email", {"to": "x@evil.example", "body": "b"})
    assert result.is_error
    code = result.meta["tether/decision"]["code"]
    finished = _wait_for(
        spans,
        lambda done: (
            _server_span(done, "tools.send_email") is not None
            and bool(_named(done, "execute_tool tools.send_email"))
        ),
    )
    server = _server_span(finished, "tools.send_email")
    (decision,) = _named(finished, "execute_tool tools.send_email")
    assert server is not None
    assert _attrs(decision)["error.type"] == code
    assert _attrs(decision)["tether.effect"] == "deny"
    assert decision.status.status_code is StatusCode.ERROR
    assert _attrs(server)["error.type"] == "tool_error"  # the MCP conventions' value
    assert _attrs(server)["tether.effect"] == "deny"
    assert list(_attrs(server)["tether.reason_codes"]) == [code]
    assert server.status.status_code is StatusCode.ERROR
    assert decision.context is not None
    assert decision.context.trace_id == agent.get_span_context().trace_id


def test_the_gateway_opens_the_mcp_span_when_the_mcp_sdk_does_not(
    gw: Gw, spans: InMemorySpanExporter
) -> None:
    """Without the MCP SDK's server middleware the gateway's span is the same: a server span
    parented on ``params._meta.traceparent``, with the conventions' attributes."""
    server = gw.gateway.gateway.server
    saved = list(server.middleware)
    server.middleware[:] = [m for m in saved if type(m).__name__ != "OpenTelemetryMiddleware"]
    assert len(server.middleware) < len(saved)
    try:
        agent, result = _agent_calls(gw, "tools.echo", {"text": "alone"})
        _agent, refused = _agent_calls(gw, "tools.send_email", {"to": "a@b.example", "body": ""})
    finally:
        server.middleware[:] = saved
    assert not result.is_error and refused.is_error
    finished = _wait_for(
        spans,
        lambda done: all(
            _server_span(done, tool) is not None for tool in ("tools.echo", "tools.send_email")
        ),
    )
    echo = _server_span(finished, "tools.echo")
    assert echo is not None and echo.context is not None
    (decision,) = _named(finished, "execute_tool tools.echo")
    assert decision.parent is not None and decision.parent.span_id == echo.context.span_id
    assert echo.context.trace_id == agent.get_span_context().trace_id
    assert agent.get_span_context().span_id in _ancestors(echo, finished)
    on_echo = _attrs(echo)
    assert on_echo["mcp.method.name"] == "tools/call"
    assert on_echo["mcp.protocol.version"] == "2026-07-28"
    assert on_echo["gen_ai.operation.name"] == "execute_tool"
    assert on_echo["gen_ai.tool.name"] == "tools.echo"
    assert on_echo["jsonrpc.request.id"] == on_echo["gen_ai.tool.call.id"]
    assert on_echo["tether.effect"] == "allow"
    assert "error.type" not in on_echo
    denied = _server_span(finished, "tools.send_email")
    assert denied is not None
    assert _attrs(denied)["error.type"] == "tool_error"
    assert denied.status.status_code is StatusCode.ERROR


def test_gateway_content_is_recorded_only_when_opted_in(
    gw: Gw, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT, "1")
    _agent, result = _agent_calls(gw, "tools.echo", {"text": "recorded"})
    assert not result.is_error
    finished = _wait_for(spans, lambda done: _server_span(done, "tools.echo") is not None)
    server = _server_span(finished, "tools.echo")
    assert server is not None
    on_server = _attrs(server)
    assert json.loads(on_server["gen_ai.tool.call.arguments"]) == {"text": "recorded"}
    assert "recorded" in on_server["gen_ai.tool.call.result"]
    assert "_meta" not in json.loads(on_server["gen_ai.tool.call.result"])
    (decision,) = _named(finished, "execute_tool tools.echo")
    assert json.loads(_attrs(decision)["gen_ai.tool.call.arguments"]) == {"text": "recorded"}


# -- OTLP/HTTP export from `tether serve`, configured by OTEL_* variables --------------------------
class Receiver:
    """A tiny OTLP/HTTP receiver: POST /v1/traces, protobuf, decoded with opentelemetry-proto."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                received.paths.append(self.path)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                received.requests.append(message)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received, with its resource's attributes."""
        found: list[tuple[dict[str, Any], Any]] = []
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _otlp_attrs(span: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            values[attribute.key] = [v.string_value for v in value.array_value.values]
        else:
            values[attribute.key] = getattr(value, kind)
    return values


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.stop()


def test_tether_serve_exports_decisions_over_otlp_http(
    tmp_path: Path,
    receiver: Receiver,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tether serve`` with ``OTEL_EXPORTER_OTLP_ENDPOINT`` exports its decision spans; the
    SDK client puts the agent's trace in ``traceparent``, so they are its children."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tether-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    server = Server(tmp_path / "home").start()
    try:
        admin = Client(server.url, admin=server.admin)
        admin.register_identity(AGENT, kind="agent", owner="alice@acme.example")
        admin.load_policies({"p.cedar": PERMIT_ALL})
        catalogue = tomllib.loads((EXAMPLES / "bank.catalogue.toml").read_text())
        admin.post("/v1/catalogue", {"tools": catalogue["tools"], "prefix": "bank"})
        agent = Client(server.url, key=ProofKey())
        agent.attest(admin.join_token(AGENT))
        with (
            trace.get_tracer(AGENT_TRACER).start_as_current_span("invoke_agent bill") as root,
            agent.task(
                intent={"purpose": "read bills", "capabilities": [{"tool": "bank.read_bills"}]}
            ) as task,
        ):
            assert task.authorize("bank.read_bills").allowed
            assert not task.authorize("shell.exec", {"cmd": "id"}).allowed
        deadline = time.monotonic() + 30
        while len([s for _, s in receiver.spans() if s.name.startswith("execute_tool")]) < 2:
            assert time.monotonic() < deadline, f"spans never arrived: {receiver.paths}"
            time.sleep(0.05)
    finally:
        server.stop()
    assert set(receiver.paths) == {"/v1/traces"}
    received = {s.name: (resource, s) for resource, s in receiver.spans()}
    resource, allowed = received["execute_tool bank.read_bills"]
    _, denied = received["execute_tool shell.exec"]
    assert resource["service.name"] == "tether-under-test"
    context = root.get_span_context()
    for span in (allowed, denied):
        assert span.trace_id == context.trace_id.to_bytes(16, "big")
        assert span.parent_span_id == context.span_id.to_bytes(8, "big")
    assert _otlp_attrs(allowed)["tether.effect"] == "allow"
    assert _otlp_attrs(allowed)["tether.agent.spiffe_id"] == AGENT
    assert _otlp_attrs(denied)["tether.effect"] == "deny"
    assert _otlp_attrs(denied)["error.type"] == "intent.no_capability"


@pytest.mark.store_independent
def test_no_exporter_configured_means_no_provider() -> None:
    """Without OTEL_* export variables nothing is installed and spans stay no-ops; with
    OTEL_SDK_DISABLED nothing either (a fresh process: the provider is set once)."""
    script = textwrap.dedent(
        """
        import os
        for name in list(os.environ):
            if name.startswith("OTEL_"):
                del os.environ[name]
        from opentelemetry import trace
        from tether.observability import configure_tracing, enabled
        assert configure_tracing() is None and not enabled()
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
        os.environ["OTEL_SDK_DISABLED"] = "true"
        assert configure_tracing() is None and not enabled()
        os.environ["OTEL_SDK_DISABLED"] = "false"
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
        assert configure_tracing() is None and not enabled()
        del os.environ["OTEL_TRACES_EXPORTER"]
        provider = configure_tracing()
        assert provider is not None and enabled()
        assert provider.resource.attributes["service.name"] == "tether"
        assert trace.get_tracer_provider() is provider
        assert configure_tracing() is None  # installed once
        provider.shutdown()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
