"""Benchmark the secret broker: what a lease adds to an allowed call, and what a
per-task PostgreSQL role costs.

Run ``.venv/bin/python bench/broker.py`` (see bench/README.md). Measured in one process,
over the embedded SQLite store (in memory, or on disk with ``--store disk``):

* ``authorize``: ``Tether.authorize`` of an allowed call (the baseline; it includes the
  credential check of the arguments);
* ``lease per call``: ``Tether.lease`` of a static secret for that call (task liveness,
  the lease row and its receipt in one transaction, unsealing: KMS unwrap of the data key
  and AES-GCM decryption) plus rendering the header it is injected as;
* ``lease check per call``: what the gateway does before each call on a task's
  connection: ``Broker.check`` of the lease the connection holds, plus the header;
* ``downstream token per call``: ``Tether.downstream_token`` (an ES256 signature, a
  lease row and its receipt) plus the header;
* ``argument scan``: ``find_credentials`` over the call's arguments with the brokered
  values (already inside ``authorize``; shown alone);
* ``postgres role create`` / ``drop``: ``Tether.lease`` of a ``postgres`` secret (the
  intent row, ``CREATE ROLE ... VALID UNTIL`` with its grants, activation and receipt),
  and ``Tether.end_task`` (revocation, then ``NOLOGIN``, session termination,
  ``DROP OWNED``, ``DROP ROLE`` and the cleanup receipt), against the PostgreSQL server
  at ``--pg-dsn`` (skipped if it is unreachable).

Results: a markdown table on stdout and JSON in bench/results/broker.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from tether import ProofKey, Tether, parse_intent
from tether.secrets import find_credentials

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TRUST_DOMAIN = "acme.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/bench"
ARGS = {"invoice": "INV-2026-0042", "amount": 120, "note": "monthly hosting, EU region"}


def _stats(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "n": len(ordered),
        "median_us": round(statistics.median(ordered) / 1000, 1),
        "p90_us": round(ordered[int(len(ordered) * 0.9) - 1] / 1000, 1),
    }


def _time(fn: Callable[[], Any], n: int, warmup: int = 50) -> list[int]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - started)
    return samples


def _tether(store: str, tmp: Path) -> Tether:
    if store == "disk":
        t = Tether.init(tmp / "home", TRUST_DOMAIN)
    else:
        t = Tether.ephemeral(TRUST_DOMAIN)
    t.register_identity(AGENT, kind="agent", owner="bench@acme.example")
    t.policies.load({"all.cedar": "permit (principal, action, resource);"})
    return t


def _task(t: Tether, calls: int, ttl: int = 3600) -> tuple[ProofKey, str, str]:
    key = ProofKey()
    intent = parse_intent(
        {
            "purpose": "benchmark",
            "capabilities": [{"tool": "billing.*"}, {"tool": "db.query"}],
            "budget": {"max_calls": calls},
            "ttl_seconds": ttl,
        }
    )
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    return key, task.task_id, task.token


def bench_calls(t: Tether, n: int) -> dict[str, Any]:
    t.put_secret(
        "billing-key", "bk-" + uuid.uuid4().hex * 2, kind="api_key", meta={"tools": ["billing.*"]}
    )
    key, task_id, token = _task(t, calls=n * 4 + 400)
    proofs = [key.prove(token, "billing.charge", ARGS, now=t.clock.now()) for _ in range(n + 50)]
    it = iter(proofs)
    receipts = []

    def authorize() -> None:
        receipts.append(
            t.authorize(
                token=token,
                proof=next(it),
                tool="billing.charge",
                args=ARGS,
                side_effect="write",
            )
        )

    results: dict[str, Any] = {"authorize": _stats(_time(authorize, n))}
    receipt = receipts[-1]
    assert receipt.effect == "allow", receipt.decision.reasons

    def lease_per_call() -> None:
        lease = t.lease(task_id, "billing-key", tool="billing.charge", receipt=receipt)
        headers = {"Authorization": lease.render("Bearer {value}")}
        assert headers

    results["lease per call"] = _stats(_time(lease_per_call, n))
    held = t.lease(task_id, "billing-key", tool="billing.charge", receipt=receipt)

    def lease_check() -> None:
        t.broker.check(held.lease_id)
        headers = {"Authorization": held.render("Bearer {value}")}
        assert headers

    results["lease check per call"] = _stats(_time(lease_check, n))

    def downstream() -> None:
        lease = t.downstream_token(
            task_id, audience="https://billing.acme.example", tool="billing.charge", receipt=receipt
        )
        headers = {"Authorization": lease.render("Bearer {value}")}
        assert headers

    results["downstream token per call"] = _stats(_time(downstream, n))
    known = t.broker.known()
    results["argument scan"] = _stats(_time(lambda: find_credentials(ARGS, known), n))
    return results


def bench_postgres(t: Tether, dsn: str, n: int) -> dict[str, Any]:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            schema = "bench_" + uuid.uuid4().hex[:8]
            conn.execute(f"CREATE SCHEMA {schema}")
            conn.execute(f"CREATE TABLE {schema}.invoices (id int)")
    except Exception as exc:
        return {"skipped": f"PostgreSQL unreachable at --pg-dsn: {type(exc).__name__}"}
    prefix = "tb" + uuid.uuid4().hex[:6] + "_"
    t.put_secret(
        "bench-db",
        dsn,
        kind="postgres",
        meta={"postgres": {"grants": [{"schema": schema}], "role_prefix": prefix}},
    )
    create: list[int] = []
    drop: list[int] = []
    try:
        for _ in range(n):
            key, task_id, token = _task(t, calls=2)
            proof = key.prove(token, "db.query", {}, now=t.clock.now())
            receipt = t.authorize(
                token=token, proof=proof, tool="db.query", args={}, side_effect="read"
            )
            started = time.perf_counter_ns()
            t.lease(task_id, "bench-db", tool="db.query", receipt=receipt)
            create.append(time.perf_counter_ns() - started)
            started = time.perf_counter_ns()
            t.end_task(task_id)
            drop.append(time.perf_counter_ns() - started)
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (prefix + "%",)
            ).fetchone()
        assert left is not None and left[0] == 0, "roles left behind"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return {"create role (lease)": _stats(create), "drop role (end task)": _stats(drop)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--roles", type=int, default=50, help="tasks with a database role")
    parser.add_argument("--store", choices=("memory", "disk"), default="memory")
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = _tether(options.store, Path(tmp))
        calls = bench_calls(t, options.n)
        roles = bench_postgres(t, options.pg_dsn, options.roles)
        t.close()
    base = calls["authorize"]["median_us"]
    print(f"## Broker ({options.store} store, n={options.n})\n")
    print("| per allowed call | median µs | p90 µs | overhead vs authorize |")
    print("|---|---:|---:|---:|")
    for name, row in calls.items():
        extra = "" if name == "authorize" else f"+{row['median_us'] / base:.0%}"
        print(f"| {name} | {row['median_us']} | {row['p90_us']} | {extra} |")
    print("\n| per task, PostgreSQL role | median ms | p90 ms | n |")
    print("|---|---:|---:|---:|")
    if "skipped" in roles:
        print(f"| {roles['skipped']} | | | |")
    else:
        for name, row in roles.items():
            median, p90 = row["median_us"] / 1000, row["p90_us"] / 1000
            print(f"| {name} | {median:.2f} | {p90:.2f} | {row['n']} |")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "when": datetime.now(UTC).isoformat(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "store": options.store,
        "calls": calls,
        "postgres": roles,
    }
    (RESULTS / "broker.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
