"""The SDK's failover between nodes, against a real ``tether serve`` and real sockets: a
port nobody listens on, and a server that answers every request with 503."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tether import APIError, Client, ProofKey

from .server_support import Server, free_port

pytestmark = pytest.mark.store_independent  # the client's behaviour; the node's store is moot

AGENT = "spiffe://acme.example/agent/failover"
INTENT = {"purpose": "failover", "capabilities": [{"tool": "t.read"}], "budget": {"max_calls": 9}}


class _Unavailable(BaseHTTPRequestHandler):
    """A node that cannot reach its store: 503 to everything, counting what it saw."""

    seen: ClassVar[list[str]] = []

    def _answer(self) -> None:
        type(self).seen.append(f"{self.command} {self.path}")
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body = b'{"error":"unavailable","error_description":"store unavailable"}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def unavailable() -> Iterator[str]:
    _Unavailable.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "home").start()
    yield srv
    srv.stop()


def _agent(server: Server, bases: list[str]) -> Client:
    admin = Client(server.url, admin=server.admin)
    admin.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    admin.load_policies({"all.cedar": "permit (principal, action, resource);"})
    read = {"side_effect": "read", "sensitivity": "internal", "trusted": True}
    admin.post("/v1/catalogue", {"tools": {"t.read": read}})
    agent = Client(bases, key=ProofKey())
    agent.requests.base_url = server.url  # attest on the live node
    agent.attest(admin.join_token(AGENT))
    return agent


def test_an_unreachable_node_is_skipped_for_every_request(server: Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    agent = _agent(server, [dead, server.url])
    agent.requests.base_url = dead
    task = agent.open_task(intent=INTENT)  # connection refused: never seen, so moved on
    assert agent.requests.base_url == server.url
    agent.requests.base_url = dead
    assert task.authorize("t.read").allowed
    assert agent.requests.base_url == server.url


def test_a_decision_moves_on_after_a_503_but_opening_a_task_does_not(
    server: Server, unavailable: str
) -> None:
    agent = _agent(server, [unavailable, server.url])
    agent.requests.base_url = unavailable
    with pytest.raises(APIError) as refused:
        agent.open_task(intent=INTENT)  # the node may have opened it: not sent twice
    assert refused.value.status == 503
    assert _Unavailable.seen == ["POST /v1/tasks"]
    agent.requests.base_url = server.url
    task = agent.open_task(intent=INTENT)
    agent.requests.base_url = unavailable
    verdict = task.authorize("t.read")  # a decision: a new one on the next node
    assert verdict.allowed
    assert _Unavailable.seen[-1] == "POST /v1/decisions"
    assert agent.requests.base_url == server.url


def test_every_node_failing_raises(unavailable: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = Client([dead, unavailable], admin="tadm_x")
    with pytest.raises(APIError) as failed:
        client.get("/healthz")
    assert failed.value.status == 503  # tried the dead node, then the unavailable one
    assert _Unavailable.seen == ["GET /healthz"]
    with pytest.raises(ValueError, match="at least one"):
        Client([], admin="x")
