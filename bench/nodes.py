"""Decisions per second with one, two and three ``tether serve`` nodes over PostgreSQL.

Run ``.venv/bin/python bench/nodes.py`` (about 2 minutes; needs PostgreSQL at
127.0.0.1:5432, database ``test``). See bench/README.md.

For each node count, in one run: a fresh schema, ``tether migrate``, ``tether init``,
the nodes started, ``--agents`` real workloads enrolled (join token, attestation, their
own proof keys), then ``--seconds`` of closed-loop load from this process: each agent
opens a task (budget ``--budget`` calls), calls ``load.read`` until the budget is spent,
each call on the next node in turn, ends the task, opens the next. Every call is a real
decision with a fresh DPoP proof and a receipt in the one chain.

The baseline is the one-node run of the same invocation: the table gives each count's
decisions per second, its ratio to one node, and the median and p99 latency. A second
table times the one receipt chain alone (receipts appended per second by one and by four
concurrent appenders, each in its own transaction): the ceiling it puts on a trust
domain's decisions per second. Results: markdown tables on stdout and JSON in
bench/results/nodes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.cluster_load import (  # noqa: E402 - the repository root first
    PERMIT_ALL,
    Nodes,
    drop_schema,
    enroll,
    fresh_schema,
    run_load,
)

from tether import Client  # noqa: E402

RESULTS = HERE / "results"


def one(count: int, args: argparse.Namespace) -> dict[str, Any]:
    name, url = fresh_schema()
    with tempfile.TemporaryDirectory() as home:
        nodes = Nodes(Path(home) / "home", url).init()
        try:
            nodes.start(count)
            admin = Client(nodes.urls[0], admin=nodes.admin)
            admin.load_policies({"all.cedar": PERMIT_ALL})
            read = {"side_effect": "read", "sensitivity": "internal", "trusted": True}
            admin.post("/v1/catalogue", {"tools": {"read": read}, "prefix": "load"})

            async def drive() -> dict[str, Any]:
                agents = await enroll(nodes.urls, nodes.admin, args.agents, "bench")
                # With several nodes, agents offboarded on node A one by one: the time until
                # every other node refuses them (revocation propagation).
                victims = (
                    await enroll(nodes.urls, nodes.admin, args.victims, "victim")
                    if count > 1
                    else []
                )
                try:
                    await run_load(nodes, agents, seconds=args.warmup, budget=args.budget)
                    report = await run_load(
                        nodes, agents, seconds=args.seconds, budget=args.budget, victims=victims
                    )
                    return report.summary()
                finally:
                    for a in agents + victims:
                        await a.client.aclose()

            return asyncio.run(drive())
        finally:
            nodes.stop()
            drop_schema(name)


def chain(appenders: int, seconds: float) -> dict[str, Any]:
    """Receipts appended per second to one trust domain's chain by ``appenders`` threads,
    each in its own transaction on its own connection: the ceiling the one chain puts on
    decisions per second, whatever the number of nodes."""
    from tether import Tether  # noqa: PLC0415

    name, url = fresh_schema()
    tether = Tether.ephemeral("acme.example", database_url=url)
    counts = [0] * appenders
    stop = time.monotonic() + seconds

    def work(index: int) -> None:
        while time.monotonic() < stop:
            tether.audit.append("bench.append", effect="allow", detail={"i": counts[index]})
            counts[index] += 1

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(appenders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert tether.audit.verify().ok
    finally:
        tether.close()
        drop_schema(name)
    return {"appenders": appenders, "appends_per_s": round(sum(counts) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--chain-seconds", type=float, default=5.0)
    parser.add_argument("--victims", type=int, default=30, help="agents revoked per run")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    rows = [one(n, args) for n in counts]
    appends = [chain(n, args.chain_seconds) for n in (1, 4)]
    base = rows[0]["decisions_per_s"] or 1.0
    print(f"\n{args.agents} agents, {args.seconds:.0f} s per run, {os.cpu_count()} CPUs\n")
    print("| nodes | decisions/s | vs 1 node | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['nodes']} | {row['decisions_per_s']:.0f} | "
            f"{row['decisions_per_s'] / base:.2f}x | {row['latency_ms_p50']} | "
            f"{row['latency_ms_p99']} | {row['errors']} |"
        )
    spread = [r for r in rows if r.get("propagation_ms_p99") is not None]
    if spread:
        print("\nRevocation on node A, refused on every other node (ms)\n")
        print("| nodes | probes | propagation p50 | p99 |")
        print("|---|---|---|---|")
        for row in spread:
            print(
                f"| {row['nodes']} | {row['revocation_probes']} | "
                f"{row['propagation_ms_p50']} | {row['propagation_ms_p99']} |"
            )
        slowest = max(float(r["propagation_ms_p99"]) for r in spread)
        print(f"\nTarget: propagation p99 <= 200 ms: {'yes' if slowest <= 200 else 'NO'}")
    print("\nThe one chain: receipts appended per second (each in its own transaction)\n")
    print("| concurrent appenders | appends/s |")
    print("|---|---|")
    for row in appends:
        print(f"| {row['appenders']} | {row['appends_per_s']:.0f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nodes.json").write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "args": vars(args),
                "runs": rows,
                "chain": appends,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
