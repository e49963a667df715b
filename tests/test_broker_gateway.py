"""The gateway injects brokered credentials into HTTP upstreams: a leased secret as a
header on a per-task connection, and a Tether-signed per-call token; both are scrubbed
from what the upstream echoes, and the connection ends with the task."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tether import Tether
from tether.gateway import parse_config
from tether.gateway._config import ConfigError

from .mcp_support.harness import (
    TOOL_CATALOGUE,
    GatewayServer,
    HttpUpstream,
    build_config,
    free_port,
    init_home,
    mcp_client,
    open_task,
    text_of,
)

WEB = "spiffe://acme.example/tool/web"
SVC = "spiffe://acme.example/tool/svc"
WEB_KEY = "wk-" + "Lq8Zr2Nc5Vb9Xm3Ts7Pd"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tether, GatewayServer]]:
    base = tmp_path_factory.mktemp("broker-gateway")
    home = base / "home"
    tether = init_home(home, {"web": WEB, "svc": SVC})
    tether.put_secret("web-key", WEB_KEY, kind="api_key", meta={"tools": ["web.*"]})
    upstream = HttpUpstream()
    port = free_port()
    config = build_config(
        port,
        base,
        [
            {
                "name": "web",
                "identity": WEB,
                "http": {"url": upstream.url},
                "tools": TOOL_CATALOGUE,
                "credentials": [{"secret": "web-key", "header": "X-Upstream-Key"}],
            },
            {
                "name": "svc",
                "identity": SVC,
                "http": {"url": upstream.url},
                "tools": TOOL_CATALOGUE,
                "credentials": [
                    {"downstream_audience": "https://svc.acme.example", "header": "X-Upstream-Key"}
                ],
            },
        ],
    )
    server = GatewayServer(home, config, port).start().pin_all()
    yield tether, server
    server.stop()
    upstream.stop()
    tether.close()


def _whoami(url: str, token: str, key: Any, tool: str) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        async with mcp_client(url, token, key) as client:
            first = await client.call_tool(tool, {})
            second = await client.call_tool(tool, {})
            return [
                {"text": text_of(r), "meta": r.meta, "error": r.is_error} for r in (first, second)
            ]

    return anyio.run(run)


def test_a_leased_header_reaches_the_upstream_and_is_scrubbed_on_the_way_back(
    gateway: tuple[Tether, GatewayServer],
) -> None:
    tether, server = gateway
    key, task = open_task(tether, ["web.*"], resource=server.url)
    results = _whoami(server.url, task.token, key, "web.whoami")
    for result in results:
        assert not result["error"], result
        seen = json.loads(result["text"])
        assert seen["upstream_key"] == "[REDACTED:brokered]"  # it arrived, and was echoed
        assert WEB_KEY not in json.dumps(result)
        assert result["meta"]["tether/label"]["redactions"] == {"brokered": 1}
    (lease,) = tether.broker.list(task_id=task.task_id)
    assert (lease.secret_name, lease.status, lease.tool) == ("web-key", "active", "web.whoami")
    records = [r for r in tether.audit.tail(30) if r["kind"] == "result"]
    assert records[-1]["detail"]["leases"] == [lease.lease_id]
    # A second task gets a connection (and a lease) of its own.
    key2, task2 = open_task(tether, ["web.*"], resource=server.url)
    _whoami(server.url, task2.token, key2, "web.whoami")
    assert {k[0] for k in server.gateway.connections} >= {task.task_id, task2.task_id}
    # The task ends: the lease is revoked and its connection stopped.
    tether.end_task(task.task_id)
    assert tether.broker.get(lease.lease_id).status == "revoked"
    deadline = time.monotonic() + 10
    while (task.task_id, "web") in server.gateway.connections:
        assert time.monotonic() < deadline, "the connection outlived its lease"
        time.sleep(0.1)
    assert (task2.task_id, "web") in server.gateway.connections


def test_a_per_call_downstream_token_is_minted_for_every_call(
    gateway: tuple[Tether, GatewayServer],
) -> None:
    tether, server = gateway
    key, task = open_task(tether, ["svc.*"], resource=server.url)
    results = _whoami(server.url, task.token, key, "svc.whoami")
    for result in results:
        assert json.loads(result["text"])["upstream_key"] == "[REDACTED:jwt]"
    leases = tether.broker.list(task_id=task.task_id)
    assert [row.kind for row in leases] == ["downstream_token", "downstream_token"]
    for row in leases:
        detail = json.loads(row.detail_json)
        assert detail["audience"] == "https://svc.acme.example" and detail["tool_identity"] == SVC
        assert row.expires_at - row.created_at <= 60


def test_credentials_configuration_is_checked(tmp_path: Path) -> None:
    stdio = {"command": "python"}
    bad = [
        {"stdio": stdio, "credentials": [{"secret": "k", "header": "X-Key"}]},
        {"stdio": stdio, "credentials": [{"downstream_audience": "https://a", "env": "A"}]},
        {"stdio": stdio, "credentials": [{"secret": "k", "env": "A", "format": "no value"}]},
        {"stdio": stdio, "credentials": [{"env": "A"}]},
        {
            "http": {"url": "http://api.example/mcp"},
            "credentials": [{"secret": "k", "header": "K"}],
        },
        {"stdio": stdio, "credentials": [{"secret": "k", "env": "A"}, {"secret": "j", "env": "A"}]},
    ]
    for upstream in bad:
        data = {
            "resource": "http://127.0.0.1:9/mcp",
            "authorization_servers": ["https://tether.acme.example"],
            "upstreams": [{"name": "u", "identity": WEB, **upstream}],
        }
        with pytest.raises(ConfigError):
            parse_config(data, base=tmp_path)
