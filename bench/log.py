"""Benchmark the verifiable audit log against the plain hash chain, in one process.

Run ``.venv/bin/python bench/log.py [--store memory|file|postgresql] [--verify N]``
(``file``: SQLite on disk, synchronous=FULL; ``postgresql``: a throwaway schema of
``$TETHER_TEST_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``).

Measured:

* receipts/s appended by ``Auditor.append`` as it was (hash chain + a signed checkpoint
  every 64 receipts: no tags, no tree heads) and as it is now (the same, plus an HMAC tag
  per receipt, a signed tree head every 64 receipts, extended from the stored frontier);
  rounds alternate between the two, medians are quoted, and their ratio;
* the time to verify the whole log (``Auditor.verify``: chain, tags, checkpoints, tree
  heads) of ``--verify`` receipts (default 100,000; always SQLite in memory, so the figure
  is the verifier's work, not the disk's), extrapolated linearly to 1,000,000
  (every step of the walk is per receipt: one SHA-256 for the chain, one for the leaf,
  one HMAC, amortised tree nodes);
* the time to export a bundle of every receipt and to verify it offline;
* with ``--store postgresql``: receipts/s with one, two and three writers appending at
  once to one trust domain (each its own ``Tether`` and connection pool on the same
  schema, as nodes are; threads of this process, 5 s each): the one lock's ceiling.

Results: a table on stdout and JSON in bench/results/log-STORE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tether import FrozenClock, Tether
from tether.audit import Auditor, verify_bundle

ROUNDS = 7
PER_ROUND = 2000


POSTGRES_URL = os.environ.get(
    "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _tether(store: str, tmp: Path, name: str) -> Tether:
    clock = FrozenClock(time.time())
    if store == "memory":
        return Tether.ephemeral("acme.example", clock=clock, head_every=64)
    if store == "postgresql":
        return Tether.ephemeral(
            "acme.example", clock=clock, head_every=64, database_url=POSTGRES_URL
        )
    return Tether.init(tmp / name, "acme.example", clock=clock)


def _append_rate(auditor: Auditor, clock: FrozenClock, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        clock.advance(0.001)
        auditor.append("decision", effect="allow", tool="fs.read", detail={"i": i})
    return n / (time.perf_counter() - start)


def run(store: str, verify_n: int, per_round: int = PER_ROUND) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        chain_t = _tether(store, tmp, "chain")
        tree_t = _tether(store, tmp, "tree")
        assert isinstance(chain_t.clock, FrozenClock) and isinstance(tree_t.clock, FrozenClock)
        # As it was: chain and checkpoints only (no tag, no tree head ever due).
        chain = Auditor(
            chain_t.store, chain_t.keys, chain_t.clock, head_every=10**12, head_interval=1e12
        )
        tree = tree_t.audit
        chain_rates, tree_rates = [], []
        for _ in range(ROUNDS):
            chain_rates.append(_append_rate(chain, chain_t.clock, per_round))
            tree_rates.append(_append_rate(tree, tree_t.clock, per_round))
        chain_med, tree_med = statistics.median(chain_rates), statistics.median(tree_rates)
        heads = len(tree_t.store.list_heads())

        big = Tether.ephemeral("acme.example", clock=FrozenClock(time.time()), head_every=64)
        assert isinstance(big.clock, FrozenClock)
        _append_rate(big.audit, big.clock, verify_n)
        start = time.perf_counter()
        report = big.audit.verify(sign=False)
        verify_s = time.perf_counter() - start
        assert report.ok, report
        start = time.perf_counter()
        bundle = big.export_audit()
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        offline = verify_bundle(bundle, trust=big.jwks())
        offline_s = time.perf_counter() - start
        assert offline.ok, offline
        for t in (chain_t, tree_t, big):
            t.store.close()
    return {
        "store": store,
        "rounds": ROUNDS,
        "per_round": per_round,
        "chain_receipts_per_s_median": round(chain_med),
        "tree_receipts_per_s_median": round(tree_med),
        "tree_over_chain": round(tree_med / chain_med, 3),
        "tree_heads_signed": heads,
        "verify_receipts": report.records,
        "verify_s": round(verify_s, 3),
        "verify_1m_s_extrapolated": round(verify_s * 1_000_000 / report.records, 1),
        "export_all_s": round(export_s, 3),
        "offline_verify_s": round(offline_s, 3),
    }


def _write_until(i: int, node: Tether, stop: threading.Event, done: list[int]) -> None:
    while not stop.is_set():
        node.audit.append("decision", effect="allow", tool="fs.read", detail={"n": i})
        done[i] += 1


def writers(counts: list[int], seconds: float = 5.0) -> dict[str, float]:
    """Receipts/s with ``n`` writers on one PostgreSQL trust domain, for each ``n``."""
    from tether.store import PostgresStore  # noqa: PLC0415

    result: dict[str, float] = {}
    for n in counts:
        first = Tether.ephemeral("acme.example", database_url=POSTGRES_URL)
        dsn = getattr(first.store, "dsn", "")
        sealer = first.keys._sealer  # the nodes of one trust domain share the KEK
        nodes = [first] + [Tether(PostgresStore(dsn), sealer) for _ in range(n - 1)]
        counts_done = [0] * n
        stop = threading.Event()

        threads = [
            threading.Thread(target=_write_until, args=(i, t, stop, counts_done))
            for i, t in enumerate(nodes)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        result[str(n)] = round(sum(counts_done) / (time.perf_counter() - start))
        assert first.audit.verify(sign=False).ok
        for t in nodes[1:]:
            t.store.close()
        first.store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=("memory", "file", "postgresql"), default="memory")
    parser.add_argument("--verify", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=PER_ROUND)
    args = parser.parse_args()
    result: dict[str, Any] = run(args.store, args.verify, args.per_round)
    if args.store == "postgresql":
        result["receipts_per_s_by_writers"] = writers([1, 2, 3])
    for key, value in result.items():
        print(f"| {key} | {value} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"log-{args.store}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
