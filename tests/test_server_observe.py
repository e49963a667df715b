"""Observability: OpenTelemetry spans when an SDK is configured (in process, real app)."""

from __future__ import annotations

from litestar.testing import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tether import ProofKey, Tether, parse_intent
from tether.server import create_app

from .conftest import AGENT, PERMIT_ALL, quiet

# A process sets its tracer provider once (later calls are ignored): one for every run.
_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


def test_decisions_emit_spans_when_an_exporter_is_configured() -> None:
    exporter = _EXPORTER
    trace.set_tracer_provider(_PROVIDER)
    exporter.clear()
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
        url = "http://testserver.local/v1/decisions"
        proof = key.prove(task.token, "fs.read", {}, now=t.clock.now(), htm="POST", htu=url)
        response = client.post(
            "/v1/decisions",
            json={"tool": "fs.read", "args": {}},
            headers={"Authorization": f"DPoP {task.token}", "DPoP": proof},
        )
        assert response.json()["effect"] == "allow", response.text
    spans = [s for s in exporter.get_finished_spans() if s.name == "tether.decide"]
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert attributes["tether.effect"] == "allow"
    assert attributes["tether.agent"] == AGENT
    assert task.token not in str(attributes)
