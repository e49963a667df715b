"""Benchmark one full Tether decision against plain cedarpy on the same policy set.

Run ``.venv/bin/python bench/decide.py`` (or ``make bench``). See bench/README.md.

Measured, per policy-set size (10, 100, 1,000, 10,000 policies), in one process:

* ``tether.core.decide(...)``: token verification (cached by digest after first use),
  proof-of-possession verification (one ES256 signature check per call), the intent's
  capability match, the flow rules and Cedar through Tether's indexed snapshot: the
  pure path of the one pipeline (``core.verify`` then ``core.decide`` on a snapshot loaded
  once from the store); every proof is unique and generated outside the timed region.
* ``cedarpy.is_authorized(request, text, entities)``: plain Cedar, policies as raw text
  (what a naive integration does; the headline baseline).
* ``cedarpy.is_authorized(request, PolicySet, entities)``: plain Cedar, pre-parsed handle.
* ``Tether.authorize(...)``: decide over the SQLite store plus the store transaction and
  the audit receipt; and ``Tether.audit.append(...)`` alone (the receipt write).

Results: a markdown table on stdout and JSON in bench/results/decide.json.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import cedarpy

import tether
from tether import FrozenClock, ProofKey, Tether, parse_intent
from tether.core import (
    Call,
    Decision,
    PolicySnapshot,
    ProofVerifier,
    Sensitivity,
    SideEffect,
    Snapshot,
    TaskState,
    TokenVerifier,
    ToolProfile,
    call_digest,
    decide,
    match_capability,
    principal_entities,
    verify,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (10, 100, 1_000, 10_000)
TRUST_DOMAIN = "acme.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/bot"
CATALOGUE_ENTRY = ToolProfile(
    side_effect=SideEffect.READ, sensitivity=Sensitivity.INTERNAL, trusted=True
)
OWNER = "alice@acme.example"
ARGS: dict[str, Any] = {"recipient": "bob@acme.example", "amount": 42, "channel": "ops"}
DENY_ARGS: dict[str, Any] = {"recipient": "bob@acme.example", "amount": 9000, "channel": "ops"}
TARGET_US = 150.0
TARGET_SPEEDUP = 5.0
FLAT_TOLERANCE = 1.25  # "roughly flat": the slowest size within 25% of the fastest

# Policies that apply to every call_tool request (open resource scope), so both engines
# evaluate real conditions on every decision.
FIXED_POLICIES = (
    '@id("admit")\npermit(principal, action == Action::"open_task", resource);',
    '@id("admit-patterns")\n'
    'permit(principal, action == Action::"open_task_with_patterns", resource);',
    '@id("f_amount")\nforbid(principal, action == Action::"call_tool", resource)\n'
    "  when { context.args has amount && context.args.amount > 5000 };",
    '@id("f_recipient")\nforbid(principal, action == Action::"call_tool", resource)\n'
    '  when { context.args has recipient && context.args.recipient like "*@evil.example" };',
)
APPROVAL_POLICY = (
    '@id("a_prod")\n@approval("required")\n'
    'forbid(principal, action == Action::"call_tool", resource)\n'
    '  when { context.args has channel && context.args.channel == "prod" };'
)


# -- measurement ----------------------------------------------------------------------


@dataclass
class Stats:
    median_us: float
    p90_us: float
    min_us: float
    samples: int


def _percentile(sorted_ns: list[int], q: float) -> float:
    index = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[index] / 1000


def summarize(samples_ns: list[int]) -> Stats:
    ordered = sorted(samples_ns)
    return Stats(
        median_us=round(_percentile(ordered, 0.5), 2),
        p90_us=round(_percentile(ordered, 0.9), 2),
        min_us=round(ordered[0] / 1000, 2),
        samples=len(ordered),
    )


def measure(
    fn: Callable[[], object],
    *,
    iterations: int,
    warmup: int,
    budget_s: float | None = None,
    min_iterations: int = 20,
) -> Stats:
    """Time ``fn`` per call; stop at ``iterations`` or, past ``min_iterations``, at the budget."""
    for _ in range(warmup):
        fn()
    gc.collect()
    samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = None if budget_s is None else clock() + int(budget_s * 1e9)
    for _ in range(iterations):
        start = clock()
        fn()
        samples.append(clock() - start)
        if deadline is not None and len(samples) >= min_iterations and clock() > deadline:
            break
    return summarize(samples)


def measure_each(fn: Callable[[Any], object], inputs: list[Any], *, warmup: int) -> Stats:
    """Time ``fn(x)`` once per input (inputs are single-use, e.g. proofs)."""
    for x in inputs[:warmup]:
        fn(x)
    gc.collect()
    samples: list[int] = []
    clock = time.perf_counter_ns
    for x in inputs[warmup:]:
        start = clock()
        fn(x)
        samples.append(clock() - start)
    return summarize(samples)


# -- fixtures -------------------------------------------------------------------------


def policy_text(total: int, *, approval: bool) -> tuple[str, str, str]:
    """``total`` policies: the fixed ones plus one exact-scope permit per tool.

    Returns the Cedar text, the benchmarked tool (a permit in the middle of the set) and
    that permit's id.
    """
    fixed = [*FIXED_POLICIES, *([APPROVAL_POLICY] if approval else [])]
    tools = total - len(fixed)
    if tools < 1:
        raise SystemExit(f"at least {len(fixed) + 1} policies are needed, not {total}")
    permits = [
        f'@id("p{i}")\npermit(principal, action == Action::"call_tool", '
        f'resource == Tool::"svc{i}.op")\n'
        f"  when {{ context.calls_used < context.max_calls && "
        f'principal.trust_domain == "{TRUST_DOMAIN}" }};'
        for i in range(tools)
    ]
    target = tools // 2
    return "\n".join([*fixed, *permits]) + "\n", f"svc{target}.op", f"p{target}"


def cedar_request(
    state: TaskState, tool: str, args: dict[str, Any], chain_len: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request and entities Tether builds for this call (see core/_decision.py)."""
    principal, entities = principal_entities(state.agent_id, state.agent_owner, state.agent_kind)
    context = {
        "task_id": state.task_id,
        "template": state.template,
        "purpose": state.intent.purpose,
        "data_ceiling": str(state.intent.data_ceiling),
        "on_behalf_of": state.intent.on_behalf_of or "",
        "calls_used": state.calls_used,
        "max_calls": state.intent.budget.max_calls,
        "delegation_depth": chain_len - 1,
        "args": dict(args),
    }
    resource = {"type": "Tool", "id": tool}
    request = {
        "principal": principal,
        "action": {"type": "Action", "id": "call_tool"},
        "resource": resource,
        "context": context,
    }
    return request, [*entities, {"uid": resource, "attrs": {}, "parents": []}]


def fired_ids(result: Any) -> set[str]:
    """The @id annotations of the policies a plain cedarpy result names."""
    by_reason = result.diagnostics.id_annotations_by_reason
    return {by_reason.get(r, r) for r in result.diagnostics.reasons}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.opts = args
        self.clock = FrozenClock(time.time())
        self.now = self.clock.now()
        if args.store == "disk":
            home = Path(tempfile.mkdtemp(prefix="tether-bench-")) / "home"
            self.t = Tether.init(home, TRUST_DOMAIN, clock=self.clock)
        else:
            self.t = Tether.ephemeral(TRUST_DOMAIN, clock=self.clock)
        self.t.register_identity(AGENT, kind="agent", owner=OWNER)
        self.t.catalogue.load({"svc*.op": CATALOGUE_ENTRY})
        self.key = ProofKey()
        self.intent = parse_intent(
            {
                "purpose": "bench",
                "capabilities": [
                    {"tool": "svc*.op", "args": {"channel": {"one_of": ["ops", "dev", "prod"]}}}
                ],
                "budget": {"max_calls": 10**9},
                "ttl_seconds": 3600,
            }
        )
        self.tokens = TokenVerifier(self.t.keys.verification_keys(self.now))
        self.proofs = ProofVerifier()
        self.task_id = ""
        self.token = ""

    def open_task(self) -> None:
        task = self.t.open_task(AGENT, proof_jwk=self.key.jwk, intent=self.intent)
        self.task_id, self.token = task.task_id, task.token

    def state(self) -> TaskState:
        row = self.t.store.get_task(self.task_id)
        assert row is not None
        return self.t.enforcement.loader.state(row)

    def snapshot(self, state: TaskState) -> Snapshot:
        return Snapshot(task=state, profile=CATALOGUE_ENTRY)

    def prove(self, tool: str, args: dict[str, Any], count: int) -> list[str]:
        return [self.key.prove(self.token, tool, args, now=self.now) for _ in range(count)]

    def decide(self, snapshot: PolicySnapshot, view: Snapshot, call: Call, proof: str) -> Decision:
        verified = verify(
            token=self.token,
            proof=proof,
            binding=call_digest(call.tool, call.args),
            tokens=self.tokens,
            proofs=self.proofs,
            now=self.now,
        )
        return decide(verified, view, call, snapshot, self.now)[0]

    def run_size(self, total: int) -> dict[str, Any]:
        o = self.opts
        text, tool, permit_id = policy_text(total, approval=not o.no_approval_policy)
        started = time.perf_counter()
        snapshot = self.t.policies.load({"gen.cedar": text})
        load_s = time.perf_counter() - started
        if not self.task_id:
            self.open_task()
        state = self.state()
        view = self.snapshot(state)
        call = Call(tool=tool, args=ARGS)
        policy_set = cedarpy.PolicySet.from_str(text)
        request, entities = cedar_request(state, tool, ARGS, len(state.chain) or 1)

        # Same decision from both engines (allow, by the same permit), and a deny check.
        first = self.decide(snapshot, view, call, self.prove(tool, ARGS, 1)[0])
        assert first.allowed, first.reasons
        assert set(first.policies) == {permit_id}, first.policies
        for policies in (text, policy_set):
            plain = cedarpy.is_authorized(request, policies, entities)
            assert plain.allowed, plain.diagnostics.errors
            assert fired_ids(plain) == {permit_id}, plain.diagnostics.reasons
        deny_call = Call(tool=tool, args=DENY_ARGS)
        denied = self.decide(snapshot, view, deny_call, self.prove(tool, DENY_ARGS, 1)[0])
        deny_request, _ = cedar_request(state, tool, DENY_ARGS, len(state.chain) or 1)
        plain_deny = cedarpy.is_authorized(deny_request, policy_set, entities)
        assert not denied.allowed and denied.reasons[0].code == "policy.forbid", denied.reasons
        assert not plain_deny.allowed and fired_ids(plain_deny) == {"f_amount"}
        assert set(denied.policies) == {"f_amount"}, denied.policies

        # 1. Tether decide (in-memory task view), one fresh proof per call.
        proofs = self.prove(tool, ARGS, o.iterations + o.warmup)
        decide_stats = measure_each(
            lambda p: self.decide(snapshot, view, call, p), proofs, warmup=o.warmup
        )

        # 2. Plain cedarpy, raw text (the naive baseline) and a pre-parsed PolicySet.
        text_stats = measure(
            lambda: cedarpy.is_authorized(request, text, entities),
            iterations=o.iterations,
            warmup=min(o.warmup, 5),
            budget_s=o.budget,
        )
        set_stats = measure(
            lambda: cedarpy.is_authorized(request, policy_set, entities),
            iterations=o.iterations,
            warmup=min(o.warmup, 20),
            budget_s=o.budget,
        )

        # 3. Full authorize: store-backed decide + transaction + receipt.
        auth_proofs = self.prove(tool, ARGS, o.authorize_iterations + o.warmup)

        def authorize(proof: str) -> None:
            receipt = self.t.authorize(token=self.token, proof=proof, tool=tool, args=ARGS)
            assert receipt.decision.allowed, receipt.decision.reasons

        authorize_stats = measure_each(authorize, auth_proofs, warmup=o.warmup)

        row: dict[str, Any] = {
            "policies": total,
            "tool": tool,
            "snapshot_load_s": round(load_s, 3),
            "bucket_policies": len(snapshot.applicable("call_tool", "Tool", tool)),
            "tether_decide": asdict(decide_stats),
            "plain_cedarpy_text": asdict(text_stats),
            "plain_cedarpy_policyset": asdict(set_stats),
            "speedup_vs_plain_text": round(text_stats.median_us / decide_stats.median_us, 1),
            "speedup_vs_policyset": round(set_stats.median_us / decide_stats.median_us, 2),
            "authorize": asdict(authorize_stats),
            "authorize_minus_decide_us": round(
                authorize_stats.median_us - decide_stats.median_us, 2
            ),
        }
        if total == o.profile_size:
            row["breakdown_us"] = self.breakdown(snapshot, view, call, request, entities)
            row["profile"] = self.profile(snapshot, view, call)
        return row

    def breakdown(
        self,
        snapshot: PolicySnapshot,
        view: Snapshot,
        call: Call,
        request: dict[str, Any],
        entities: list[dict[str, Any]],
    ) -> dict[str, float]:
        """Medians of decide's parts, called the way decide calls them (no profiler)."""
        o = self.opts
        state = view.task
        assert state is not None
        claims = self.tokens.verify(self.token, now=self.now)
        digest = call_digest(call.tool, call.args)
        proofs = self.prove(call.tool, call.args, o.iterations + o.warmup)

        def proof(p: str) -> None:
            self.proofs.verify(
                p,
                token=self.token,
                jkt=claims.jkt,
                htm="POST",
                htu="urn:tether:decide",
                call=digest,
                now=self.now,
            )

        parts = {
            "token_verify_cached": measure(
                lambda: self.tokens.verify(self.token, now=self.now),
                iterations=o.iterations,
                warmup=o.warmup,
            ),
            "proof_verify": measure_each(proof, proofs, warmup=o.warmup),
            "capability_match": measure(
                lambda: match_capability(state.intent, call.tool, call.args),
                iterations=o.iterations,
                warmup=o.warmup,
            ),
            "snapshot_evaluate": measure(
                lambda: snapshot.evaluate(
                    request["principal"],
                    "call_tool",
                    request["resource"],
                    request["context"],
                    entities,
                ),
                iterations=o.iterations,
                warmup=o.warmup,
            ),
        }
        return {name: stats.median_us for name, stats in parts.items()}

    def profile(self, snapshot: PolicySnapshot, view: Snapshot, call: Call) -> str:
        proofs = self.prove(call.tool, call.args, self.opts.iterations)
        profiler = cProfile.Profile()
        profiler.enable()
        for p in proofs:
            self.decide(snapshot, view, call, p)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.strip_dirs().sort_stats("cumulative").print_stats(15)
        return out.getvalue()

    def receipt_append(self) -> Stats:
        """``Auditor.append`` alone, with the fields authorize writes for an allow."""
        o = self.opts
        fields: dict[str, Any] = {
            "chain": [AGENT],
            "task_id": self.task_id,
            "intent_digest": "sha256:" + "0" * 64,
            "tool": "svc1.op",
            "args_digest": "sha256:" + "1" * 64,
            "effect": "allow",
            "reasons": [
                {
                    "code": "allow",
                    "message": "within intent capability 'svc*.op' and permitted by policy",
                }
            ],
            "policies": ["p1"],
            "risk_tags": ["owasp-asi:ASI01", "owasp-nhi:NHI2"],
            "latency_us": 100.0,
            "token_digest": "x" * 43,
        }
        return measure(
            lambda: self.t.audit.append("decision", **fields),
            iterations=o.authorize_iterations,
            warmup=o.warmup,
        )


# -- report ---------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| policies | tether decide median µs | p90 | plain cedarpy (text) median µs "
        "| cedarpy (pre-parsed PolicySet) median µs | speed-up vs plain |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, t, s = r["tether_decide"], r["plain_cedarpy_text"], r["plain_cedarpy_policyset"]
        lines.append(
            f"| {r['policies']:,} | {d['median_us']:.1f} | {d['p90_us']:.1f} "
            f"| {t['median_us']:,.1f} (n={t['samples']}) "
            f"| {s['median_us']:,.1f} (n={s['samples']}) "
            f"| {r['speedup_vs_plain_text']:,.1f}x |"
        )
    return "\n".join(lines)


def authorize_table(rows: list[dict[str, Any]], append: Stats) -> str:
    lines = [
        "| policies | authorize median µs | p90 | authorize - decide µs | snapshot load s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r["authorize"]
        lines.append(
            f"| {r['policies']:,} | {a['median_us']:.1f} | {a['p90_us']:.1f} "
            f"| {r['authorize_minus_decide_us']:.1f} | {r['snapshot_load_s']:.2f} |"
        )
    lines.append(
        f"\nreceipt append alone (Auditor.append, own transaction): median "
        f"{append.median_us:.1f} µs, p90 {append.p90_us:.1f} µs (n={append.samples})"
    )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    medians = [r["tether_decide"]["median_us"] for r in rows]
    at_1000 = next((r for r in rows if r["policies"] == 1_000), None)
    result: dict[str, Any] = {
        "max_median_us": max(medians),
        "median_within_target": max(medians) <= TARGET_US,
        "flatness_max_over_min": round(max(medians) / min(medians), 2),
        "flat": max(medians) / min(medians) <= FLAT_TOLERANCE,
    }
    if at_1000 is not None:
        result["speedup_at_1000"] = at_1000["speedup_vs_plain_text"]
        result["speedup_at_1000_meets_target"] = at_1000["speedup_vs_plain_text"] >= TARGET_SPEEDUP
    return result


def flow_growth(opts: argparse.Namespace) -> dict[str, Any]:
    """``Tether.authorize`` at call ``k`` of one task, each allowed call followed by its
    result (two new addresses and a link, trusted): the task's flow state grows with
    what it read. Returns the median µs over a window of calls around each ``k``."""
    bench = Bench(opts)
    text, tool, _ = policy_text(10, approval=not opts.no_approval_policy)
    bench.t.policies.load({"gen.cedar": text})
    bench.open_task()
    window = 20
    marks = sorted({int(k) for k in opts.flow_growth.split(",") if k.strip()})
    timings: dict[int, list[float]] = {k: [] for k in marks}
    for call in range(1, max(marks) + window + 1):
        proof = bench.key.prove(bench.token, tool, ARGS, now=bench.now)
        t0 = time.perf_counter()
        receipt = bench.t.authorize(token=bench.token, proof=proof, tool=tool, args=ARGS)
        elapsed = time.perf_counter() - t0
        assert receipt.decision.allowed, receipt.decision.reasons
        for k in marks:
            if k <= call < k + window:
                timings[k].append(elapsed)
        result = {
            "note": f"ask ops{call}@acme.example or lead{call}@acme.example, "
            f"see https://wiki.acme.example/page/{call}"
        }
        result_proof = bench.key.prove_result(
            bench.token,
            tool,
            receipt.seq,
            result,
            now=bench.now,
            htm="POST",
            htu="urn:tether:decide",
        )
        bench.t.observe(
            token=bench.token, proof=result_proof, tool=tool, receipt=receipt.seq, result=result
        )
    store = bench.t.store
    row = store.get_task_flow(bench.task_id) or b""
    deltas = store.task_flow_deltas(bench.task_id, 0, 1 << 40)
    return {
        "median_us_at_call": {
            str(k): round(sorted(v)[len(v) // 2] * 1e6, 1) for k, v in timings.items()
        },
        "flow_state_bytes_at_end": len(bench.t.audit.rows.flow(bench.task_id)),
        "flow_row_bytes_at_end": len(row),  # rewritten on each call
        "flow_deltas_at_end": len(deltas),  # appended, one per call that added values
        "flow_delta_bytes_at_end": sum(len(d) for _, d in deltas),
        "store": opts.store,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="comma-separated policy counts (default: %(default)s)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=2000,
        help="timed decisions per size (default: %(default)s)",
    )
    parser.add_argument(
        "--authorize-iterations",
        type=int,
        default=2000,
        help="timed authorize calls per size (default: %(default)s)",
    )
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument(
        "--budget",
        type=float,
        default=4.0,
        help="seconds per plain-cedarpy measurement before it stops early "
        "(never below 20 samples; default: %(default)s)",
    )
    parser.add_argument(
        "--profile-size",
        type=int,
        default=1_000,
        help="policy count to profile with cProfile (0: none)",
    )
    parser.add_argument(
        "--no-approval-policy",
        action="store_true",
        help='leave out the @approval("required") forbid (one Cedar call '
        "per decision instead of two)",
    )
    parser.add_argument(
        "--store",
        choices=("memory", "disk"),
        default="memory",
        help="SQLite in memory, or on disk in WAL mode with synchronous=FULL (one fsync "
        "per receipt) for the authorize figures (default: %(default)s)",
    )
    parser.add_argument(
        "--flow-growth",
        metavar="K,K",
        help="only time authorize at these calls of one task, each call's result observed "
        "(e.g. 10,1000): what the task's growing flow state costs a call",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "decide.json")
    opts = parser.parse_args()
    if opts.flow_growth:
        print(json.dumps(flow_growth(opts), indent=2))
        return
    sizes = [int(s) for s in opts.sizes.split(",") if s.strip()]

    started = time.perf_counter()
    bench = Bench(opts)
    rows = []
    for total in sizes:
        row = bench.run_size(total)
        rows.append(row)
        print(
            f"  {total:>6,} policies: decide {row['tether_decide']['median_us']:.1f} µs, "
            f"plain text {row['plain_cedarpy_text']['median_us']:,.1f} µs, "
            f"PolicySet {row['plain_cedarpy_policyset']['median_us']:,.1f} µs, "
            f"authorize {row['authorize']['median_us']:.1f} µs",
            flush=True,
        )
    append = bench.receipt_append()
    elapsed = time.perf_counter() - started

    print("\n## Tether decide vs plain cedarpy (medians, µs)\n")
    print(table(rows))
    print(
        "\nspeed-up vs plain = plain cedarpy with the raw policy text / tether decide "
        "(both medians). n = samples; plain cedarpy stops early at the time budget."
    )
    print("\n## Full authorize (store-backed decide + transaction + receipt)\n")
    print(authorize_table(rows, append))
    for r in rows:
        if "breakdown_us" in r:
            print(f"\n## decide parts at {r['policies']:,} policies (medians, µs)\n")
            for name, value in r["breakdown_us"].items():
                print(f"- {name}: {value:.1f}")
            print(
                f"\n## cProfile, {opts.iterations} decisions at {r['policies']:,} policies "
                "(top 15 by cumulative time)\n"
            )
            print(r["profile"])
    result = verdict(rows)
    print("## Targets\n")
    print(
        f"- median ≤ {TARGET_US:.0f} µs at every size: "
        f"{'yes' if result['median_within_target'] else 'NO'} "
        f"(slowest median {result['max_median_us']:.1f} µs)"
    )
    print(
        f"- roughly flat (slowest/fastest ≤ {FLAT_TOLERANCE}): "
        f"{'yes' if result['flat'] else 'NO'} ({result['flatness_max_over_min']})"
    )
    if "speedup_at_1000" in result:
        print(
            f"- ≥ {TARGET_SPEEDUP:.0f}x plain cedarpy (text) at 1,000 policies: "
            f"{'yes' if result['speedup_at_1000_meets_target'] else 'NO'} "
            f"({result['speedup_at_1000']:,.1f}x)"
        )

    document = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "machine": platform.machine(),
            "system": platform.system(),
            "cpus": os.cpu_count(),
            "tether": tether.__version__,
            "cedarpy": metadata.version("cedarpy"),
            "pyjwt": metadata.version("pyjwt"),
            "cryptography": metadata.version("cryptography"),
        },
        "settings": {
            "iterations": opts.iterations,
            "authorize_iterations": opts.authorize_iterations,
            "warmup": opts.warmup,
            "plain_cedarpy_budget_s": opts.budget,
            "approval_policy": not opts.no_approval_policy,
            "args": ARGS,
            "headline_baseline": "plain_cedarpy_text",
        },
        "targets": {
            "median_us": TARGET_US,
            "speedup_at_1000": TARGET_SPEEDUP,
            "flat_tolerance": FLAT_TOLERANCE,
        },
        "verdict": result,
        "sizes": rows,
        "receipt_append": asdict(append),
        "elapsed_s": round(elapsed, 1),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {opts.out} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
