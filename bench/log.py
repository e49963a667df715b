"""Benchmark the verifiable audit log against the plain hash chain, and group commit.

Run from the repository root (no ``make`` needed)::

    PYTHONPATH=src .venv/bin/python bench/log.py --store file          # SQLite on disk
    PYTHONPATH=src .venv/bin/python bench/log.py --store memory        # CPU cost alone
    PYTHONPATH=src .venv/bin/python bench/log.py --store postgresql    # + 1/2/3 nodes
    PYTHONPATH=src .venv/bin/python bench/log.py --store postgresql --scale-only \
        --nodes 1,2,3 --writers 8 --seconds 4 --rounds 3                # group commit only

(``--store file``: SQLite on disk, synchronous=FULL; ``postgresql``: throwaway schemas of
``$TETHER_TEST_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/test``.)

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
* group commit (``Store.grouped``, as decisions use it): receipts/s appended by
  ``--writers`` threads per node for ``--seconds``, each receipt answered only once
  committed, with group commit off (``TETHER_GROUP_COMMIT=0``: one transaction and one
  commit per receipt, as before) and on (the default, 64 at most per commit), rounds
  alternating, medians quoted. With ``--store postgresql``: 1, 2 and 3 nodes
  (``--nodes``), each a separate process with its own store and connection pool on one
  schema of one trust domain; with ``--store file``: one SQLite node (its store is one
  writer). Each run's log is verified afterwards. Reported: appends/s per node count and
  mode, on/off ratio per node count, and the scaling factor of n nodes over one.

Results: a table on stdout and JSON in bench/results/log-STORE.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tether import FrozenClock, Tether
from tether.audit import Auditor, verify_bundle
from tether.store._group import DEFAULT_GROUP_LIMIT

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


def _node(
    home: str, url: str | None, writers: int, group: int, ready: Any, start: Any, stop: Any
) -> tuple[int, int, int]:
    """One node (run in its own process): ``writers`` threads appending receipts through
    ``Store.grouped`` from ``start`` to ``stop``; (receipts, groups, units grouped)."""
    node = Tether.open(home, database_url=url)
    node.store.group_commit = group
    done = [0] * writers

    def write(index: int) -> None:
        start.wait()
        while not stop.is_set():
            node.store.grouped(
                lambda: node.audit.append_later(
                    "decision", effect="allow", tool="fs.read", detail={"w": index}
                )
            )
            done[index] += 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    ready.release()
    for thread in threads:
        thread.join()
    committer = getattr(node.store, "committer", None)
    groups = getattr(committer, "groups", 0)
    units = getattr(committer, "units", 0)
    node.close()
    return sum(done), groups, units


def _node_main(args: tuple[Any, ...]) -> tuple[int, int, int]:
    return _node(*args)


def _fresh_home(store: str, tmp: Path, name: str) -> tuple[Path, str | None, Any]:
    """A new trust domain for one run: its home, its database URL (PostgreSQL: a fresh
    schema), and how to drop it."""
    home = tmp / name
    if store != "postgresql":
        Tether.init(home, "acme.example").close()
        return home, None, lambda: None
    from tether.store import migrate, url_with_schema  # noqa: PLC0415

    schema = f"bench_gc_{secrets.token_hex(4)}"
    url = url_with_schema(POSTGRES_URL, schema)
    migrate(url)
    Tether.init(home, "acme.example", database_url=url).close()

    def drop() -> None:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return home, url, drop


def _measure(
    store: str, tmp: Path, nodes: int, writers: int, group: int, seconds: float
) -> dict[str, Any]:
    """Receipts/s of ``nodes`` node processes with ``writers`` writers each, group commit
    ``group`` (0: off); the log verified afterwards."""
    home, url, drop = _fresh_home(store, tmp, f"gc-{nodes}-{group}-{secrets.token_hex(3)}")
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    ready, start, stop = manager.Semaphore(0), manager.Event(), manager.Event()
    try:
        with ctx.Pool(nodes) as pool:
            jobs = pool.map_async(
                _node_main,
                [(str(home), url, writers, group, ready, start, stop)] * nodes,
            )
            for _ in range(nodes):
                ready.acquire()
            began = time.perf_counter()
            start.set()
            time.sleep(seconds)
            stop.set()
            results = jobs.get()
            elapsed = time.perf_counter() - began
        check = Tether.open(home, database_url=url)
        report = check.audit.verify(sign=False)
        check.store.close()
        assert report.ok, report
        total = sum(r[0] for r in results)
        assert report.records >= total
        groups, units = sum(r[1] for r in results), sum(r[2] for r in results)
        return {
            "per_s": total / elapsed,
            "receipts": total,
            "per_commit": round(units / groups, 1) if groups else 1.0,
        }
    finally:
        manager.shutdown()
        drop()


def group_commit(
    store: str, nodes: list[int], writers: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """Appends/s with group commit off and on, by node count (medians of ``rounds``)."""
    result: dict[str, Any] = {"writers_per_node": writers, "seconds": seconds, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for n in nodes:
            rates: dict[str, list[float]] = {"off": [], "on": []}
            per_commit: list[float] = []
            for _ in range(rounds):
                for mode, group in (("off", 0), ("on", DEFAULT_GROUP_LIMIT)):
                    run_ = _measure(store, tmp, n, writers, group, seconds)
                    rates[mode].append(run_["per_s"])
                    if mode == "on":
                        per_commit.append(run_["per_commit"])
            off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
            result[f"{n}_nodes"] = {
                "off_per_s": round(off),
                "on_per_s": round(on),
                "on_over_off": round(on / off, 2),
                "receipts_per_commit_on": statistics.median(per_commit),
                "off_rounds": [round(r) for r in rates["off"]],
                "on_rounds": [round(r) for r in rates["on"]],
            }
        one = result.get("1_nodes")
        if one is not None:
            for n in nodes:
                row = result[f"{n}_nodes"]
                row["off_over_1_node"] = round(row["off_per_s"] / one["off_per_s"], 2)
                row["on_over_1_node"] = round(row["on_per_s"] / one["on_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=("memory", "file", "postgresql"), default="memory")
    parser.add_argument("--verify", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=PER_ROUND)
    parser.add_argument("--scale-only", action="store_true", help="group commit only")
    parser.add_argument("--nodes", default="1,2,3", help="PostgreSQL node counts")
    parser.add_argument("--writers", type=int, default=8, help="writer threads per node")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, Any] = {"store": args.store}
    if not args.scale_only:
        result.update(run(args.store, args.verify, args.per_round))
    if args.store != "memory":
        counts = [int(n) for n in args.nodes.split(",")] if args.store == "postgresql" else [1]
        result["group_commit"] = group_commit(
            args.store, counts, args.writers, args.seconds, args.rounds
        )
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, row in value.items():
                print(f"| {key}.{sub} | {row} |")
        else:
            print(f"| {key} | {value} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = f"log-{args.store}{'-group' if args.scale_only else ''}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
