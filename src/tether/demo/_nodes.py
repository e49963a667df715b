"""The demo's "several nodes" step: a second node over the same store.

Over SQLite (``make demo``) the second node is a second ``Tether`` on the same file;
with ``TETHER_DATABASE_URL`` set it is a PostgreSQL node that also hears the first
one's changes through ``LISTEN/NOTIFY`` (see docs/deploy.md). Either way one task's
calls spread over both nodes share one budget, a revocation on one node is refused on
the other at the next call, and a client given both URLs rides over a node that stops.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tether import APIError, Client, ProofKey, Tether
from tether.demo._timeline import Timeline
from tether.server import ServerSettings, create_app

NIGHT_SHIFT = "spiffe://acme.example/agent/night-shift"


def _effect(line: Timeline, client: Client, token: str, node: str, tool: str) -> str:
    assert client.key is not None
    body = client.send(client.requests.decision(token, client.key, tool, {}))
    reason = body["reasons"][0]
    line.effect(body["effect"], f"{tool} [dim]on node {node}[/]")
    seq = body["receipt"]["seq"]
    line.detail(f"↳ {reason['code']}: {reason['message']} [dim]receipt #{seq}[/]")
    return str(body["effect"])


def several_nodes(
    line: Timeline,
    home: Path,
    url_a: str,
    port_b: int,
    admin_secret: str,
    serve: Callable[[Any, int, str], Any],
    stop: Callable[..., bool],
) -> bool:
    """Play the step; True if every property held."""
    tether_b = Tether.open(home)
    served = serve(create_app(tether_b, ServerSettings(log_level="WARNING")), port_b, "node-b")
    url_b = f"http://127.0.0.1:{port_b}"
    ok = True
    try:
        store = "PostgreSQL" if getattr(tether_b.store, "dsn", None) else "SQLite"
        line.say(f"node B serving on {url_b}, over the same {store} store as node A ({url_a})")
        admin_a = Client(url_a, admin=admin_secret)
        admin_a.register_identity(NIGHT_SHIFT, kind="agent", owner="alice@acme.example")
        agent = Client([url_a, url_b], key=ProofKey())
        agent.attest(admin_a.join_token(NIGHT_SHIFT))
        task = agent.open_task(template="pay-bill", params={"payee": "DE50526018159083016613"})
        line.say("one task, its calls alternating between the nodes (budget: 4 calls)")
        effects = []
        for turn in range(5):
            node = "AB"[turn % 2]
            agent.requests.base_url = url_a if node == "A" else url_b
            effects.append(_effect(line, agent, task.token, node, "bank.read_bills"))
        ok &= effects == ["allow"] * 4 + ["deny"]

        second = agent.open_task(template="pay-bill", params={"payee": "DE50526018159083016613"})
        admin_a.post(f"/v1/tasks/{second.task_id}/end")
        line.say("a second task, ended on node A; its next call goes to node B")
        agent.requests.base_url = url_b
        ok &= _effect(line, agent, second.token, "B", "bank.read_bills") == "deny"
        if store == "PostgreSQL":
            status = httpx.get(
                f"{url_b}/v1/node", headers={"Authorization": f"Bearer {admin_secret}"}
            ).json()
            line.say(
                f"node B heard {status['events']} change(s) through LISTEN/NOTIFY "
                f"(lag p50 {status['event_lag_ms_p50']} ms)"
            )
    finally:
        stop(*served)
        tether_b.close()
    line.say("node B stopped; the agent's client, given both nodes, fails over to node A")
    agent.requests.base_url = url_b
    try:
        third = agent.open_task(template="pay-bill", params={"payee": "DE50526018159083016613"})
        ok &= agent.requests.base_url == url_a
        ok &= _effect(line, agent, third.token, "A", "bank.read_bills") == "allow"
        third.end()
    except (httpx.HTTPError, APIError) as exc:
        line.say(f"[red]failover failed: {exc}[/]")
        ok = False
    agent.close()
    return ok
