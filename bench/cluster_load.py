"""Several ``tether serve`` nodes over one PostgreSQL store, driven over HTTP.

Used by ``bench/nodes.py`` (decisions per second with one, two and three nodes) and by
``tests/test_cluster.py`` (200 agents for 30 s, revocation on one node refused on the
others, a node SIGKILLed under load).

Every simulated agent is a real workload: its own identity, attested with a join token,
its own P-256 proof key; each call carries a fresh DPoP proof. An agent opens a task
whose intent allows ``load.read`` with a budget of ``budget`` calls, and calls until the
budget is spent, each call on the next node in turn (so one task's calls always land on
different nodes), then ends the task and opens another. The SDK's failover carries a
call to the next node when one is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tether import APIError, AsyncClient, ProofKey
from tether.store import url_with_schema

TRUST_DOMAIN = "acme.example"
PERMIT_ALL = "permit (principal, action, resource);"
BASE_URL = os.environ.get("TETHER_TEST_DATABASE", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fresh_schema(base_url: str = BASE_URL) -> tuple[str, str]:
    """Create an empty schema; return (its name, a database URL whose search path is it)."""
    name = "tether_load_" + secrets.token_hex(4)
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return name, url_with_schema(base_url, name)


def drop_schema(name: str, base_url: str = BASE_URL) -> None:
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


class Nodes:
    """``n`` node processes sharing one home's KEK and one database."""

    def __init__(self, home: Path, database_url: str, *, resync_interval: float = 2.0) -> None:
        self.home = home
        self.database_url = database_url
        self.env = {
            **os.environ,
            "TETHER_DATABASE_URL": database_url,
            "TETHER_RESYNC_INTERVAL": str(resync_interval),
        }
        self.procs: list[subprocess.Popen[bytes] | None] = []
        self.urls: list[str] = []
        self.admin = ""

    def _tether(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "tether", "--home", str(self.home), *args],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
        )
        return out.stdout

    def init(self) -> Nodes:
        self._tether("migrate")
        out = self._tether(
            "init", "--trust-domain", TRUST_DOMAIN, "--admin", "root@acme.example", "--json"
        )
        self.admin = json.loads(out)["admin_credential"]
        return self

    def start(self, count: int, *, cpus: list[int] | None = None) -> Nodes:
        for index in range(count):
            port = free_port()
            log = open(self.home / f"node-{index}.log", "ab")  # noqa: SIM115 - closed with the process
            cmd = [sys.executable, "-m", "tether", "--home", str(self.home), "serve"]
            cmd += ["--port", str(port), "--rate", "100000"]
            if cpus:
                cmd = ["taskset", "-c", str(cpus[index % len(cpus)]), *cmd]
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env)
            self.procs.append(proc)
            self.urls.append(f"http://127.0.0.1:{port}")
        for index, url in enumerate(self.urls):
            self._wait_ready(index, url)
        return self

    def _wait_ready(self, index: int, url: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return
            proc = self.procs[index]
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"node {index} did not become ready: "
            + (self.home / f"node-{index}.log").read_text()[-3000:]
        )

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            self.procs[index] = None

    def stop(self) -> None:
        for index, proc in enumerate(self.procs):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                self.procs[index] = None

    def live_urls(self) -> list[str]:
        return [u for u, p in zip(self.urls, self.procs, strict=True) if p is not None]


@dataclass
class Agent:
    spiffe_id: str
    client: AsyncClient


@dataclass
class LoadReport:
    nodes: int
    agents: int
    seconds: float
    decisions: int = 0
    allowed: int = 0
    budget_denied: int = 0
    other_denied: int = 0
    errors: int = 0
    failovers: int = 0
    tasks: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    #: (seq, hash) of every receipt a client received.
    receipts: dict[int, str] = field(default_factory=dict, repr=False)
    #: task id -> allowed calls seen by clients, and the budget it had.
    allowed_per_task: dict[str, int] = field(default_factory=dict, repr=False)
    budget: int = 0
    #: Revocation probes: ms from node A acknowledging to every other node refusing.
    propagation_ms: list[float] = field(default_factory=list)
    #: Any allow for a revoked agent's task after its revocation was acknowledged.
    revoked_allowed: int = 0
    revoked_probes: int = 0
    #: Probe calls to a node that was killed meanwhile (neither allowed nor refused).
    revoked_unanswered: int = 0

    @property
    def rate(self) -> float:
        return self.decisions / self.seconds if self.seconds else 0.0

    def quantile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def rounded(self, values: list[float], q: float) -> float | None:
        return round(self.quantile(values, q), 2) if values else None

    def summary(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "agents": self.agents,
            "seconds": round(self.seconds, 2),
            "decisions": self.decisions,
            "decisions_per_s": round(self.rate, 1),
            "allowed": self.allowed,
            "budget_denied": self.budget_denied,
            "other_denied": self.other_denied,
            "errors": self.errors,
            "failovers": self.failovers,
            "tasks": self.tasks,
            "latency_ms_p50": self.rounded(self.latencies_ms, 0.5),
            "latency_ms_p99": self.rounded(self.latencies_ms, 0.99),
            "max_allowed_in_one_task": max(self.allowed_per_task.values(), default=0),
            "budget": self.budget,
            "revocation_probes": self.revoked_probes,
            "propagation_ms_p50": self.rounded(self.propagation_ms, 0.5),
            "propagation_ms_p99": self.rounded(self.propagation_ms, 0.99),
            "revoked_allowed": self.revoked_allowed,
            "revoked_probe_calls_unanswered": self.revoked_unanswered,
        }


async def enroll(
    urls: list[str], admin: str, count: int, prefix: str, *, concurrency: int = 16
) -> list[Agent]:
    """Register ``count`` agents, attest each with a join token, return their clients."""
    agents: list[Agent] = []
    gate = asyncio.Semaphore(concurrency)
    async with AsyncClient(urls, admin=admin) as root:

        async def one(i: int) -> Agent:
            spiffe_id = f"spiffe://{TRUST_DOMAIN}/agent/{prefix}-{i}"
            async with gate:
                await root.post(
                    "/v1/identities",
                    {"spiffe_id": spiffe_id, "kind": "agent", "owner": "load@acme.example"},
                )
                token = (await root.post("/v1/identities/join-token", {"spiffe_id": spiffe_id}))[
                    "join_token"
                ]
                rotated = urls[i % len(urls) :] + urls[: i % len(urls)]
                client = AsyncClient(rotated, key=ProofKey(), timeout=30.0)
                await client.attest(token)
            return Agent(spiffe_id, client)

        agents = list(await asyncio.gather(*(one(i) for i in range(count))))
    return agents


def intent(budget: int) -> dict[str, Any]:
    return {
        "purpose": "load",
        "capabilities": [{"tool": "load.read"}],
        "budget": {"max_calls": budget},
        "ttl_seconds": 600,
    }


async def _decide(
    agent: Agent, task_id: str, token: str, report: LoadReport
) -> dict[str, Any] | None:
    """One call on the agent's next node; None if every node failed."""
    client = agent.client
    client.requests.fail_over()  # round robin: one task's calls spread over the nodes
    assert client.key is not None
    before = client.requests.base_url
    started = time.perf_counter()
    try:
        body: dict[str, Any] = await client.send(
            client.requests.decision(
                token, client.key, "load.read", {"n": random.randrange(1 << 30)}
            )
        )
    except (httpx.HTTPError, APIError):
        report.errors += 1
        return None
    report.latencies_ms.append((time.perf_counter() - started) * 1000)
    if client.requests.base_url != before:
        report.failovers += 1
    receipt = body.get("receipt") or {}
    if "seq" in receipt:
        report.receipts[int(receipt["seq"])] = str(receipt["hash"])
    report.decisions += 1
    return body


async def agent_loop(
    agent: Agent,
    budget: int,
    stop_at: float,
    report: LoadReport,
    think: tuple[float, float] | None = None,
) -> None:
    """Open a task, spend its budget (one more call to see the refusal), end it; repeat.

    ``think``: seconds (uniform between the two) between two calls, as a model's step
    takes between two tool calls; ``None`` calls back to back (closed loop)."""
    if think is not None:
        await asyncio.sleep(random.uniform(0, think[1]))  # agents do not start in step
    while time.monotonic() < stop_at:
        try:
            task = await agent.client.open_task(intent=intent(budget))
        except (httpx.HTTPError, APIError):
            report.errors += 1
            await asyncio.sleep(0.05)
            continue
        report.tasks += 1
        allowed = 0
        for _ in range(budget + 1):
            if time.monotonic() >= stop_at:
                break
            if think is not None:
                await asyncio.sleep(random.uniform(*think))
            body = await _decide(agent, task.task_id, task.token, report)
            if body is None:
                continue
            if body["effect"] == "allow":
                allowed += 1
                report.allowed += 1
            elif body["reasons"] and body["reasons"][0]["code"] == "budget.calls_exhausted":
                report.budget_denied += 1
            else:
                report.other_denied += 1
        report.allowed_per_task[task.task_id] = allowed
        with contextlib.suppress(httpx.HTTPError, APIError):
            await task.end()


async def revocation_probe(
    nodes: Nodes, victims: list[Agent], stop_at: float, report: LoadReport, *, every: float
) -> None:
    """Revoke victims one by one on node A; time until nodes B and C both refuse.

    A victim's next call after node A acknowledged the offboarding goes to every other
    live node at once; each must refuse. ``propagation`` is the time from the
    acknowledgement until the last of those refusals arrived."""
    async with AsyncClient(nodes.urls[0], admin=nodes.admin) as admin_a:
        for victim in victims:
            if time.monotonic() >= stop_at:
                return
            task = await victim.client.open_task(intent=intent(10_000))
            warm = await _decide(victim, task.task_id, task.token, report)
            assert warm is not None and warm["effect"] == "allow", warm
            await asyncio.sleep(every * random.random())
            others = [u for u in nodes.live_urls() if u != nodes.urls[0]]
            await admin_a.post("/v1/identities/disable", {"spiffe_id": victim.spiffe_id})
            acknowledged = time.perf_counter()

            async def call_on(url: str, v: Agent = victim, token: str = task.token) -> str | None:
                assert v.client.key is not None
                async with AsyncClient(url, key=v.client.key, svid=v.client.requests.svid) as c:
                    try:
                        body: dict[str, Any] = await c.send(
                            c.requests.decision(token, v.client.key, "load.read", {})
                        )
                    except httpx.TransportError:  # that node was killed meanwhile
                        return None
                return str(body["effect"])

            results = await asyncio.gather(*(call_on(u) for u in others))
            report.propagation_ms.append((time.perf_counter() - acknowledged) * 1000)
            report.revoked_probes += 1
            report.revoked_allowed += sum(1 for r in results if r == "allow")
            report.revoked_unanswered += sum(1 for r in results if r is None)


async def run_load(
    nodes: Nodes,
    agents: list[Agent],
    *,
    seconds: float,
    budget: int = 20,
    victims: list[Agent] | None = None,
    probe_every: float = 0.3,
    kill_at: float | None = None,
    kill_index: int = 2,
    think: tuple[float, float] | None = None,
    closed_loop: int = 0,
) -> LoadReport:
    """Drive ``agents`` for ``seconds``; the first ``closed_loop`` of them call back to
    back (no ``think`` time), so a node always has calls in flight."""
    report = LoadReport(nodes=len(nodes.urls), agents=len(agents), seconds=seconds, budget=budget)
    started = time.monotonic()
    stop_at = started + seconds
    jobs = [
        asyncio.create_task(
            agent_loop(a, budget, stop_at, report, None if i < closed_loop else think)
        )
        for i, a in enumerate(agents)
    ]
    if victims:
        jobs.append(
            asyncio.create_task(
                revocation_probe(nodes, victims, stop_at, report, every=probe_every)
            )
        )
    if kill_at is not None:

        async def killer() -> None:
            await asyncio.sleep(kill_at)
            await asyncio.to_thread(nodes.kill, kill_index)

        jobs.append(asyncio.create_task(killer()))
    await asyncio.gather(*jobs)
    report.seconds = time.monotonic() - started
    return report


def chain_rows(database_url: str) -> dict[int, str]:
    """Every receipt in the store: seq -> hash."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT seq, hash FROM audit_records").fetchall()
    return {int(seq): str(h) for seq, h in rows}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
