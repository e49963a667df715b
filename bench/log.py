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
* the time to export a bundle of every receipt and to verify it offline.

Results: a table on stdout and JSON in bench/results/log-STORE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
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


def run(store: str, verify_n: int) -> dict[str, Any]:
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
            chain_rates.append(_append_rate(chain, chain_t.clock, PER_ROUND))
            tree_rates.append(_append_rate(tree, tree_t.clock, PER_ROUND))
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
        "per_round": PER_ROUND,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=("memory", "file", "postgresql"), default="memory")
    parser.add_argument("--verify", type=int, default=100_000)
    args = parser.parse_args()
    result = run(args.store, args.verify)
    for key, value in result.items():
        print(f"| {key} | {value} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"log-{args.store}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
