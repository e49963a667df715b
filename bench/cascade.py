"""Cascading revocation: from revoking the root of a task tree to the last refusal.

A three-level delegation tree of 100 tasks (a root, 9 children, 10 grandchildren each),
every member with its own proof key and one allowed call already made. The timer starts
just before the root is revoked (``TaskService.end``: the root and, in the same
transaction, every descendant and its token) and stops when the last member's next call
(``Tether.authorize``, a fresh proof each, signed before the timer starts) has been
refused. Prints one JSON line: the median (and min/max) over ``--runs`` runs.

    .venv/bin/python bench/cascade.py [--runs 5] [--children 9] [--grandchildren 10] [--disk]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

from tether import Effect, ProofKey, Tether, parse_intent

ROOT = "spiffe://bench.example/agent/root"
HELPER = "spiffe://bench.example/agent/helper"


def _intent(max_calls: int, ttl: int) -> Any:
    return parse_intent(
        {
            "purpose": "cascade bench",
            "capabilities": [{"tool": "fs.read"}],
            "budget": {"max_calls": max_calls},
            "ttl_seconds": ttl,
        }
    )


def _tether(disk: bool) -> Tether:
    if disk:
        home = tempfile.mkdtemp(prefix="tether-cascade-")
        t = Tether.init(home, "bench.example")
    else:
        t = Tether.ephemeral("bench.example", checkpoint_every=64)
    t.register_identity(ROOT, kind="agent", owner="bench@bench.example")
    t.register_identity(HELPER, kind="agent", owner="bench@bench.example")
    t.policies.load({"all.cedar": "permit (principal, action, resource);"})
    return t


def one_run(children: int, grandchildren: int, disk: bool) -> dict[str, float]:
    t = _tether(disk)
    try:
        root_key = ProofKey()
        root = t.open_task(ROOT, proof_jwk=root_key.jwk, intent=_intent(100_000, 3600))
        members = [(root_key, root.token)]
        for _ in range(children):
            key = ProofKey()
            child = t.open_task(
                HELPER, proof_jwk=key.jwk, intent=_intent(1000, 3000), parent_task_id=root.task_id
            )
            members.append((key, child.token))
            for _ in range(grandchildren):
                gkey = ProofKey()
                grand = t.open_task(
                    ROOT, proof_jwk=gkey.jwk, intent=_intent(10, 2400), parent_task_id=child.task_id
                )
                members.append((gkey, grand.token))
        for key, token in members:  # every member is live before the revocation
            proof = key.prove(token, "fs.read", {}, now=t.clock.now())
            receipt = t.authorize(token=token, proof=proof, tool="fs.read", args={})
            assert receipt.effect is Effect.ALLOW
        proofs = [
            (token, key.prove(token, "fs.read", {}, now=t.clock.now())) for key, token in members
        ]

        started = time.perf_counter()
        t.tasks.end(root.task_id, reason="bench: root revoked", status="revoked")
        revoked = time.perf_counter()
        for token, proof in proofs:
            receipt = t.authorize(token=token, proof=proof, tool="fs.read", args={})
            if receipt.effect is not Effect.DENY:
                raise SystemExit(f"a descendant was not refused: {receipt.decision.reasons}")
        done = time.perf_counter()
        return {
            "tasks": float(len(members)),
            "revoke_ms": (revoked - started) * 1e3,
            "last_refusal_ms": (done - started) * 1e3,
        }
    finally:
        t.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--children", type=int, default=9)
    parser.add_argument("--grandchildren", type=int, default=10)
    parser.add_argument("--disk", action="store_true", help="a SQLite file, not :memory:")
    args = parser.parse_args(argv)
    runs = [one_run(args.children, args.grandchildren, args.disk) for _ in range(args.runs)]
    last = [r["last_refusal_ms"] for r in runs]
    line = {
        "bench": "cascade",
        "store": "sqlite-file" if args.disk else "sqlite-memory",
        "tasks": int(runs[0]["tasks"]),
        "levels": 3,
        "runs": args.runs,
        "revoke_ms_median": round(statistics.median(r["revoke_ms"] for r in runs), 2),
        "revocation_to_last_refusal_ms_median": round(statistics.median(last), 2),
        "revocation_to_last_refusal_ms_min": round(min(last), 2),
        "revocation_to_last_refusal_ms_max": round(max(last), 2),
    }
    sys.stdout.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
