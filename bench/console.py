"""The console's pages with 10,000 receipts and 500 identities: first-page latency.

Seeds a home on disk through the real services: 500 identities (every one with an owner),
tasks for 100 of them with real decisions (allowed, denied outside the intent, held for
a human) until the chain holds ``--receipts`` receipts. Then times, through the real ASGI
app (Litestar's test client, in process, signed in as an admin through the sign-in form),
the first page of every console page, ``--runs`` times each, and prints one JSON line per
page: median, p95, and the median divided by ``GET /healthz`` timed the same way (the
floor of one request through the app). The target is a first page under 200 ms; the
last line says whether every page met it. Verifying the whole chain (a POST that walks
every record and checkpoint) is timed too, and reported apart: it is not a page view.

    .venv/bin/python bench/console.py [--receipts 10000] [--identities 500] [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from typing import Any

from litestar.testing import TestClient

from tether import ProofKey, Tether, parse_intent
from tether.server import ServerSettings, create_app

POLICY = """
permit (principal, action, resource);
@id("notes-need-a-human")
@approval("required")
forbid (principal, action == Action::"call_tool", resource == Tool::"notes.write");
"""
TARGET_MS = 200.0


def seed(home: str, identities: int, receipts: int) -> tuple[Tether, str, str]:
    t = Tether.init(home, "bench.example")
    secret = t.credentials.create("admin", "root@bench.example")[1]
    t.policies.load({"all.cedar": POLICY})
    agents = []
    for i in range(identities):
        spiffe_id = f"spiffe://bench.example/agent/a{i:04d}"
        t.register_identity(spiffe_id, kind="agent", owner=f"owner{i % 25}@bench.example")
        agents.append(spiffe_id)
    intent = parse_intent(
        {
            "purpose": "bench",
            "capabilities": [{"tool": "fs.read"}, {"tool": "notes.write"}],
            "budget": {"max_calls": 100_000},
            "ttl_seconds": 3600,
        }
    )
    opened = []
    for spiffe_id in agents[:100]:
        key = ProofKey()
        opened.append((key, t.open_task(spiffe_id, proof_jwk=key.jwk, intent=intent)))
    first_task = opened[0][1].task_id
    n = 0
    last = t.store.last_record()
    while last is not None and last.seq < receipts:
        key, task = opened[n % len(opened)]
        if n % 10 == 9:
            tool, args = "fs.write", {"path": f"/etc/{n}"}  # denied: not in the intent
        elif n % 97 == 0:
            tool, args = "notes.write", {"text": f"note {n}"}  # held for a human
        else:
            tool, args = "fs.read", {"path": f"/data/{n}"}
        proof = key.prove(task.token, tool, args, now=t.clock.now())
        t.authorize(token=task.token, proof=proof, tool=tool, args=args)
        n += 1
        if n % 200 == 0:
            last = t.store.last_record()
    return t, secret, first_task


def timed(client: TestClient[Any], method: str, path: str, runs: int, **kw: Any) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        response = client.request(method, path, **kw)
        samples.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{method} {path}: HTTP {response.status_code}")
    return samples


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--receipts", type=int, default=10_000)
    parser.add_argument("--identities", type=int, default=500)
    parser.add_argument("--runs", type=int, default=30)
    options = parser.parse_args()
    home = tempfile.mkdtemp(prefix="tether-console-bench-") + "/home"
    started = time.perf_counter()
    t, secret, task_id = seed(home, options.identities, options.receipts)
    last = t.store.last_record()
    print(
        json.dumps(
            {
                "seeded": {
                    "receipts": last.seq if last else 0,
                    "identities": len(t.store.list_identities()),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            }
        ),
        flush=True,
    )
    settings = ServerSettings(log_level="WARNING", reap_interval=0, rate=0)
    pages = {
        "identities": "/console/identities",
        "tasks": "/console/tasks",
        "tasks (all)": "/console/tasks?status=all",
        "task": f"/console/tasks/{task_id}",
        "decisions": "/console/decisions",
        "decisions (effect=deny)": "/console/decisions?effect=deny",
        "decisions (rule)": "/console/decisions?rule=notes-need-a-human",
        "decisions (risk tag + agent)": (
            "/console/decisions?risk_tag=owasp-asi:ASI09&agent=spiffe://bench.example/agent/a0001"
        ),
        "approvals": "/console/approvals",
        "audit": "/console/audit",
        "trace": f"/console/audit/trace?task_id={task_id}",
        "risk report": "/console/risk",
    }
    ok = True
    # Over https, as behind TLS: a sign-in over plain HTTP is for loopback clients only, and
    # the test client reports no address.
    with TestClient(create_app(t, settings), base_url="https://127.0.0.1:8443") as client:
        form = client.get("/console/sign-in").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        client.post("/console/sign-in", data={"csrf": csrf.group(1), "secret": secret})
        floor = statistics.median(timed(client, "GET", "/healthz", options.runs))
        for name, path in pages.items():
            timed(client, "GET", path, 3)  # warm: templates compiled, pages cached by SQLite
            samples = timed(client, "GET", path, options.runs)
            median = statistics.median(samples)
            under = p95(samples) < TARGET_MS
            ok = ok and under
            print(
                json.dumps(
                    {
                        "page": name,
                        "median_ms": round(median, 2),
                        "p95_ms": round(p95(samples), 2),
                        "x_healthz": round(median / floor, 1),
                        "under_200ms": under,
                    }
                ),
                flush=True,
            )
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/audit").text)
        assert token is not None
        verify = timed(client, "POST", "/console/audit/verify", 5, data={"csrf": token.group(1)})
        print(
            json.dumps(
                {
                    "action": "verify the whole chain",
                    "median_ms": round(statistics.median(verify), 1),
                    "healthz_median_ms": round(floor, 2),
                }
            )
        )
    t.close()
    print(json.dumps({"every_first_page_p95_under_200ms": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
