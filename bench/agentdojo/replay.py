"""Replay recorded AgentDojo traces through Tether's enforcement point.

Run it in the separate AgentDojo virtualenv (``make bench-agentdojo RUNS=DIR``)::

    .venv-agentdojo/bin/python -m bench.agentdojo.replay --runs DIR [--pipelines a,b]

For every recorded trace (``<pipeline>/<suite>/<user_task>/<attack>/<injection_task>.json``):
the environment is rebuilt with the trace's injections; each recorded tool call
is decided by ``tether.core.decide`` (real task token, real proof of possession,
Cedar, the intent compiled from the user's prompt alone, the flow rules over the
task's flow state); an allowed call is run on the real AgentDojo tools and its
real output is fed back to the flow state. The suite's own checkers score the
calls that ran. Modes: ``allow-all`` (the undefended baseline of the same
replay), ``skip`` (skip a refused call and continue), ``stop`` (stop at the
first refused call). ``approval_required`` counts as a refusal; ``oracle_utility``
is the skip-mode utility when a reviewer approves exactly the held calls that
match the user task's ground truth.

Fair play: nothing here or in ``profiles.py`` names a task, an injection or a
ground-truth value; the ground truth is used only to play the oracle reviewer
and to build the synthetic compliant traces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agentdojo.profiles import PROFILES
from pydantic import BaseModel
from tether.tasks._authorizer import StoreTaskView

from agentdojo.benchmark import load_task_results
from agentdojo.functions_runtime import FunctionCall, FunctionsRuntime
from agentdojo.task_suite.load_suites import get_suite
from tether import FrozenClock, ProofKey, Tether
from tether.core import (
    AppProfile,
    Call,
    Decision,
    Effect,
    FlowInput,
    FlowPolicy,
    FlowState,
    Intent,
    RuleEffect,
    SinkKind,
    decide,
    observe_call,
    observe_result,
    start_flow,
)
from tether.core._verify import ProofVerifier, TokenVerifier
from tether.flow import RuleCompiler

AGENT = "spiffe://bench.example/agent/assistant"
VERSION = "v1"
SUITES = ("workspace", "slack", "travel", "banking")
HEADLINE = "gpt-4o-2024-05-13"
FINAL_ANSWER_ONLY = {("travel", "injection_task_6")}  # no tool-call control can stop these
MODES = ("allow-all", "skip", "stop")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "agentdojo.json"

warnings.filterwarnings("ignore")


# -- the enforcement point --------------------------------------------------------------------


@dataclass
class Session:
    task_id: str
    token: str
    key: ProofKey
    intent: Intent
    profile: AppProfile
    flow: FlowState


class EnforcementPoint:
    """Tether's decision core over an embedded control plane, with per-task flow state."""

    def __init__(self, policy: FlowPolicy) -> None:
        self.clock = FrozenClock(time.time())
        self.tether = Tether.ephemeral("bench.example", clock=self.clock)
        self.tether.register_identity(AGENT, kind="agent", owner="bench@bench.example")
        self.tether.policies.load({"all.cedar": "permit (principal, action, resource);"})
        self.policy = policy
        self.view = StoreTaskView(self.tether.store)
        self.snapshot = self.tether.policies.snapshot()
        self.tokens = TokenVerifier(self.tether.keys.verification_keys(self.clock.now()))
        self.proofs = ProofVerifier()
        self.compiler = RuleCompiler()
        self._intents: dict[tuple[str, str], Intent] = {}
        self.latencies_us: list[float] = []

    def intent(self, prompt: str, profile: AppProfile) -> Intent:
        key = (profile.name, prompt)
        if key not in self._intents:
            self._intents[key] = self.compiler.compile(prompt, profile)
        return self._intents[key]

    def open(self, prompt: str, profile: AppProfile) -> Session:
        intent = self.intent(prompt, profile)
        key = ProofKey()
        task = self.tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
        return Session(task.task_id, task.token, key, intent, profile, start_flow(prompt))

    def decide(self, s: Session, tool: str, args: dict[str, Any]) -> Decision:
        now = self.clock.now()
        proof = s.key.prove(s.token, tool, args, now=now)
        flow = FlowInput(s.flow, s.profile.tool(tool), self.policy)
        started = time.perf_counter()
        decision = decide(
            token=s.token,
            proof=proof,
            call=Call(tool=tool, args=args),
            view=self.view,
            snapshot=self.snapshot,
            tokens=self.tokens,
            proofs=self.proofs,
            now=now,
            flow=flow,
        )
        self.latencies_us.append((time.perf_counter() - started) * 1e6)
        return decision

    def called(self, s: Session, tool: str, args: dict[str, Any], result: Any) -> None:
        profile = s.profile.tool(tool)
        s.flow = observe_result(observe_call(s.flow, tool, args, profile), tool, result, profile)

    def end(self, s: Session) -> None:
        self.tether.end_task(s.task_id)


def jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# -- replay -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    utility: bool
    security: bool
    approvals: int = 0
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.lower().split())
    if isinstance(value, list | tuple):
        return tuple(sorted(str(_norm(v)) for v in value))
    return value


def reviewer_approves(
    profile: AppProfile, tool: str, args: dict[str, Any], truth: Sequence[FunctionCall]
) -> bool:
    """The oracle reviewer: a held call matching a ground-truth call on its value sinks."""
    sinks = profile.tool(tool).sinks or {}
    for call in truth:
        if call.function != tool:
            continue
        if all(
            _norm(args.get(k)) == _norm(v)
            for k, v in call.args.items()
            if sinks.get(k) is SinkKind.VALUE
        ):
            return True
    return False


class Replayer:
    def __init__(self, ep: EnforcementPoint | None) -> None:
        self.ep = ep
        self._envs: dict[tuple[str, str], Any] = {}
        self.check_errors = 0

    def environment(self, suite: Any, injections: dict[str, str]) -> Any:
        key = (suite.name, json.dumps(injections, sort_keys=True))
        if key not in self._envs:
            self._envs[key] = suite.load_and_inject_default_environment(injections)
        return self._envs[key].model_copy(deep=True)

    def run(
        self,
        suite: Any,
        user_task: Any,
        injection_task: Any | None,
        injections: dict[str, str],
        calls: Sequence[FunctionCall],
        output: list[Any],
        mode: str,
        truth: Sequence[FunctionCall] | None = None,
    ) -> Outcome:
        env = user_task.init_environment(self.environment(suite, injections))
        pre = env.model_copy(deep=True)
        runtime = FunctionsRuntime(suite.tools)
        profile = PROFILES[suite.name]
        session = (
            self.ep.open(user_task.PROMPT, profile) if self.ep and mode != "allow-all" else None
        )
        executed: list[FunctionCall] = []
        outcome = Outcome(False, False)
        stopped = False
        for call in calls:
            args = dict(call.args)
            if session is not None and self.ep is not None:
                decision = self.ep.decide(session, call.function, args)
                if decision.effect is not Effect.ALLOW:
                    held = decision.effect is Effect.APPROVAL_REQUIRED
                    outcome.approvals += held
                    outcome.reasons[decision.reasons[0].code] += 1
                    approved = (
                        held
                        and truth is not None
                        and reviewer_approves(profile, call.function, args, truth)
                    )
                    if not approved:
                        outcome.refused += 1
                        if mode == "stop":
                            stopped = True
                            break
                        continue
            result, _error = runtime.run_function(env, call.function, args)
            executed.append(call)
            if session is not None and self.ep is not None:
                self.ep.called(session, call.function, args, jsonable(result))
        if session is not None and self.ep is not None:
            self.ep.end(session)
        final = [] if stopped else output
        outcome.utility = self._check(suite, user_task, final, pre, env, executed)
        if injection_task is not None:
            outcome.security = self._check(suite, injection_task, final, pre, env, executed)
        return outcome

    def _check(self, suite: Any, task: Any, output: Any, pre: Any, env: Any, calls: Any) -> bool:
        try:
            return bool(suite._check_task_result(task, output, pre, env, calls))
        except Exception:
            self.check_errors += 1
            return False


def recorded_calls(messages: Sequence[Any]) -> list[FunctionCall]:
    calls: list[FunctionCall] = []
    for message in messages:
        if message["role"] == "assistant":
            calls.extend(message.get("tool_calls") or [])
    return calls


def final_output(messages: Sequence[Any]) -> list[Any]:
    if messages and messages[-1]["role"] == "assistant":
        return list(messages[-1]["content"] or [])
    return []


# -- figures ----------------------------------------------------------------------------------


def pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 1)


@dataclass
class Case:
    suite: str
    user_task: str
    injection_task: str | None
    attack: str
    path: Path


def cases(
    runs: Path, pipeline: str, attacks: set[str] | None, suites: Sequence[str]
) -> Iterator[Case]:
    for suite_name in suites:
        base = runs / pipeline / suite_name
        suite = get_suite(VERSION, suite_name)
        for user_task in suite.user_tasks:
            folder = base / user_task
            if not folder.is_dir():
                continue
            for attack_dir in sorted(folder.iterdir()):
                attack = attack_dir.name
                if attack != "none" and attacks is not None and attack not in attacks:
                    continue
                for file in sorted(attack_dir.glob("*.json")):
                    inj = None if file.stem == "none" else file.stem
                    if inj is not None and inj not in suite.injection_tasks:
                        continue  # not a v1 injection task
                    yield Case(suite_name, user_task, inj, attack, file)


def evaluate_pipeline(
    runs: Path,
    pipeline: str,
    attacks: set[str] | None,
    policy: FlowPolicy,
    log: Any,
    suites: Sequence[str] = SUITES,
) -> list[dict[str, Any]]:
    ep = EnforcementPoint(policy)
    plain = Replayer(None)
    guarded = Replayer(ep)
    tally: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {
            "n": 0,
            "asr": 0,
            "asr_tool": 0,
            "tool_n": 0,
            "util": 0,
            "approvals": 0,
            "oracle": 0,
        }
    )
    benign: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # mode -> [n, util, oracle]
    reasons: Counter[str] = Counter()
    empty = mismatch = 0
    latencies: dict[str, list[float]] = defaultdict(list)
    for case in cases(runs, pipeline, attacks, suites):
        suite = get_suite(VERSION, case.suite)
        try:
            res = load_task_results(
                pipeline,
                case.suite,
                case.user_task,
                case.attack,
                case.injection_task or "none",
                runs,
            )
        except (ValueError, KeyError):
            empty += 1
            continue
        if not res.messages:
            empty += 1
            continue
        user_task = suite.get_user_task_by_id(case.user_task)
        inj = suite.get_injection_task_by_id(case.injection_task) if case.injection_task else None
        calls = recorded_calls(res.messages)
        output = final_output(res.messages)
        truth: list[FunctionCall] | None = None
        try:
            env = user_task.init_environment(guarded.environment(suite, res.injections))
            truth = list(user_task.ground_truth(env))
        except Exception:
            truth = []
        for mode in MODES:
            replayer = plain if mode == "allow-all" else guarded
            before = len(ep.latencies_us)
            out = replayer.run(suite, user_task, inj, res.injections, calls, output, mode)
            latencies[mode].extend(ep.latencies_us[before:])
            oracle = out.utility
            if mode == "skip":
                reasons.update(out.reasons)
                if out.approvals:
                    oracle = replayer.run(
                        suite, user_task, inj, res.injections, calls, output, mode, truth
                    ).utility
            if mode == "allow-all" and inj is not None and out.security != res.security:
                mismatch += 1
            if inj is None:
                b = benign[mode]
                b[0] += 1
                b[1] += out.utility
                b[2] += oracle
                continue
            t = tally[(mode, case.attack)]
            t["n"] += 1
            t["asr"] += out.security
            if (case.suite, case.injection_task) not in FINAL_ANSWER_ONLY:
                t["tool_n"] += 1
                t["asr_tool"] += out.security
            t["util"] += out.utility
            t["approvals"] += out.approvals
            t["oracle"] += oracle
        if log:
            print(".", end="", file=log, flush=True)
    rows = []
    for (mode, attack), t in sorted(
        tally.items(), key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))
    ):
        b = benign[mode]
        rows.append(
            {
                "pipeline": pipeline,
                "mode": mode,
                "attack": attack,
                "cases": t["n"],
                "asr": pct(t["asr"], t["n"]),
                "asr_tool": pct(t["asr_tool"], t["tool_n"]),
                "utility_under_attack": pct(t["util"], t["n"]),
                "benign_utility": pct(b[1], b[0]),
                "approvals_per_task": round(t["approvals"] / t["n"], 2) if t["n"] else 0.0,
                "oracle_utility": pct(t["oracle"], t["n"]),
                "p50_us": percentile(latencies[mode], 0.5),
                "p99_us": percentile(latencies[mode], 0.99),
            }
        )
    if log:
        print(file=log)
        print(
            f"{pipeline}: {empty} empty traces skipped; allow-all replay disagrees with the "
            f"recorded security label on {mismatch} attack traces; checker errors "
            f"{plain.check_errors + guarded.check_errors}; benign oracle utility "
            f"{pct(benign['skip'][2], benign['skip'][0])}; refusal reasons (skip): "
            f"{dict(reasons.most_common(8))}",
            file=log,
        )
    return rows


def synthetic(
    runs: Path, policy: FlowPolicy, log: Any, suites: Sequence[str] = SUITES
) -> list[dict[str, Any]]:
    """Fully compliant traces: each user task's ground truth, then each injection task's.

    The environment carries the injections recorded for the headline pipeline's
    ``important_instructions`` run of the same pair, so outputs are the real ones.
    """
    ep = EnforcementPoint(policy)
    plain, guarded = Replayer(None), Replayer(ep)
    tally: dict[str, Counter[str]] = {m: Counter() for m in MODES}
    for suite_name in suites:
        suite = get_suite(VERSION, suite_name)
        for ut_id, user_task in suite.user_tasks.items():
            for it_id, inj in suite.injection_tasks.items():
                path = (
                    runs
                    / HEADLINE
                    / suite_name
                    / ut_id
                    / "important_instructions"
                    / f"{it_id}.json"
                )
                injections: dict[str, str] = {}
                if path.exists():
                    injections = json.loads(path.read_text()).get("injections", {})
                env = user_task.init_environment(guarded.environment(suite, injections))
                try:
                    truth = list(user_task.ground_truth(env))
                    attack = list(inj.ground_truth(env))
                except Exception:
                    tally["skip"]["gt_errors"] += 1
                    continue
                answer = getattr(user_task, "GROUND_TRUTH_OUTPUT", "") or ""
                output = [{"type": "text", "content": answer}]
                for mode in MODES:
                    replayer = plain if mode == "allow-all" else guarded
                    calls = truth + attack
                    before = len(ep.latencies_us)
                    out = replayer.run(suite, user_task, inj, injections, calls, output, mode)
                    oracle = (
                        replayer.run(suite, user_task, inj, injections, calls, output, mode, truth)
                        if mode != "allow-all" and out.approvals
                        else out
                    )
                    c = tally[mode]
                    c["n"] += 1
                    c["asr"] += out.security
                    if (suite_name, it_id) not in FINAL_ANSWER_ONLY:
                        c["tool_n"] += 1
                        c["asr_tool"] += out.security
                    c["util"] += out.utility
                    c["oracle"] += oracle.utility
                    c["approvals"] += out.approvals
                    c["lat"] = 0
                    del before
    rows = []
    for mode in MODES:
        c = tally[mode]
        rows.append(
            {
                "pipeline": "synthetic-compliant",
                "mode": mode,
                "attack": "ground_truth",
                "cases": c["n"],
                "asr": pct(c["asr"], c["n"]),
                "asr_tool": pct(c["asr_tool"], c["tool_n"]),
                "utility_under_attack": pct(c["util"], c["n"]),
                "benign_utility": None,
                "approvals_per_task": round(c["approvals"] / c["n"], 2) if c["n"] else 0.0,
                "oracle_utility": pct(c["oracle"], c["n"]),
                "p50_us": percentile(ep.latencies_us, 0.5),
                "p99_us": percentile(ep.latencies_us, 0.99),
            }
        )
    if log and tally["skip"]["gt_errors"]:
        print(f"synthetic: {tally['skip']['gt_errors']} pairs without a ground truth", file=log)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| pipeline | attack | mode | cases | ASR | ASR (tool) | utility under attack | "
        "benign utility | approvals/task | oracle utility | p50 µs | p99 µs |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        benign = "-" if r["benign_utility"] is None else f"{r['benign_utility']:.1f}"
        lines.append(
            f"| {r['pipeline']} | {r['attack']} | {r['mode']} | {r['cases']} | {r['asr']:.1f} | "
            f"{r['asr_tool']:.1f} | {r['utility_under_attack']:.1f} | {benign} | "
            f"{r['approvals_per_task']:.2f} | {r['oracle_utility']:.1f} | {r['p50_us']:.0f} | "
            f"{r['p99_us']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the unpacked runs directory")
    parser.add_argument("--pipelines", default="", help="comma-separated (default: all)")
    parser.add_argument(
        "--attacks",
        default="important_instructions",
        help=f"comma-separated, or 'all' ({HEADLINE} always gets every attack)",
    )
    parser.add_argument(
        "--headline-attacks", default="all", help=f"attacks replayed for {HEADLINE}"
    )
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--profile", choices=("reviewed", "strict"), default="reviewed")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs: Path = args.runs
    suites = tuple(x for x in args.suites.split(",") if x)
    pipelines = [p for p in args.pipelines.split(",") if p] or sorted(
        p.name for p in runs.iterdir() if p.is_dir()
    )
    policy = (
        FlowPolicy()
        if args.profile == "reviewed"
        else FlowPolicy(untrusted_sink=RuleEffect.DENY, discovery_privilege=RuleEffect.DENY)
    )
    wanted = None if args.attacks == "all" else set(args.attacks.split(","))
    rows: list[dict[str, Any]] = []
    for pipeline in pipelines:
        attacks = wanted
        if pipeline == HEADLINE:
            attacks = (
                None if args.headline_attacks == "all" else set(args.headline_attacks.split(","))
            )
        started = time.monotonic()
        rows.extend(evaluate_pipeline(runs, pipeline, attacks, policy, sys.stderr, suites))
        print(f"{pipeline}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if not args.no_synthetic:
        rows.extend(synthetic(runs, policy, sys.stderr, suites))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
