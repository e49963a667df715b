"""Replay recorded AgentDojo traces through Tether's enforcement pipeline.

Run it in the AgentDojo virtualenv (``make bench-agentdojo RUNS=DIR``)::

    .venv-agentdojo/bin/python -m bench.agentdojo.replay --runs DIR [--pipelines a,b]

For every recorded trace (``<pipeline>/<suite>/<user_task>/<attack>/<injection_task>.json``)
a task is opened on an in-process trust domain with the intent compiled from the user's
prompt alone (``tether.flow.RuleCompiler``); each recorded tool call goes through
``Tether.authorize`` (real task token, a fresh proof of possession per call, Cedar, the
flow rules over the task's flow state, the tool's profile from the trust domain's
catalogue), and the result of each allowed call is reported through ``Tether.observe``
(with its own proof), as the SDK does. That is what an agent gets.

Two sources of tool results:

- ``--outputs live`` (the default; needs the ``agentdojo`` package): each trace is
  replayed against the suite of the benchmark version it was recorded under
  (``benchmark_version``; files without it are v1), the environment rebuilt with the
  trace's injections, every allowed call run on AgentDojo's real tools, and the calls
  that ran scored by the suite's own checkers. Modes ``allow-all`` (the undefended
  baseline of the same replay), ``skip`` (skip a refused call and continue), ``stop``
  (stop at the first refused call). ``approval_required`` counts as a refusal;
  ``oracle_utility`` is the skip-mode utility when a reviewer approves (through
  ``Tether.decide_approval``) exactly the held calls that match the user task's ground
  truth.
- ``--outputs recorded`` (the trace alone, no ``agentdojo``): the recorded tool results
  are reported back instead of live ones. Nothing is scored; the figures are the calls
  refused and the injected calls refused. ``make test`` runs this mode on a few traces.

In both, a recorded call is *injected* when one of its arguments carries a value
(an e-mail address, a link, an account number) that the trace's injected text names and
the user's prompt does not: a lower bound, used only for reporting.

Fair play: nothing here or in ``profiles.py`` names a task, an injection or a
ground-truth value; the ground truth is used only to play the oracle reviewer
and to build the synthetic compliant traces.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import re
import sys
import tarfile
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from bench.agentdojo.profiles import PROFILES
from pydantic import BaseModel

from tether import FrozenClock, ProofKey, Receipt, Tether
from tether.core import (
    DECIDE_HTM,
    DECIDE_HTU,
    AppProfile,
    Effect,
    FlowPolicy,
    Intent,
    RuleEffect,
    SinkKind,
    ToolProfile,
)
from tether.enforcement import ObservationRefused
from tether.flow import RuleCompiler

AGENT = "spiffe://bench.example/agent/assistant"
REVIEWER = "reviewer@bench.example"
DEFAULT_VERSION = "v1"  # files without ``benchmark_version``
SUITES = ("workspace", "slack", "travel", "banking")
HEADLINE = "gpt-4o-2024-05-13"
FINAL_ANSWER_ONLY = {("travel", "injection_task_6")}  # no tool-call control can stop these
MODES = ("allow-all", "skip", "stop")
RECORDED_MODES = ("skip", "stop")
OUTPUTS = ("live", "recorded")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "agentdojo.json"

#: Every row of the JSON output has exactly these fields (scores are ``None`` where
#: nothing was scored: recorded outputs, or benign utility of the synthetic traces).
ROW_FIELDS = (
    "pipeline",
    "version",
    "outputs",
    "mode",
    "attack",
    "cases",
    "empty",
    "unknown",
    "asr",
    "asr_tool",
    "utility_under_attack",
    "benign_cases",
    "benign_utility",
    "approvals_per_task",
    "oracle_utility",
    "calls",
    "refused",
    "injected_calls",
    "injected_refused",
    "p50_us",
    "p99_us",
)

warnings.filterwarnings("ignore")


# -- traces -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedCall:
    function: str
    args: dict[str, Any]
    id: str | None


def text_of(content: Any) -> str:
    """A message's text: a plain string (older files) or content blocks (newer files)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(block.get("content") or "") for block in content if isinstance(block, dict)
        )
    return str(content)


# The values an injection can plant in a call: e-mail addresses, links, account numbers.
_VALUE = re.compile(
    r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|https?://[^\s<>\"'()]+"
    r"|\bwww\.[^\s<>\"'()]+"
    r"|\b[A-Z]{2}\d{2}[A-Z0-9]{8,30}\b"
)


def _values(text: str) -> set[str]:
    found = set()
    for match in _VALUE.findall(text):
        value = match.lower().rstrip(".,;:!?)]}'\"/")
        for prefix in ("https://", "http://", "www."):
            value = value.removeprefix(prefix)
        found.add(value)
    return found


@dataclass
class Trace:
    """One recorded run, read as what it is: its benchmark version, its calls, its outputs."""

    path: Path
    pipeline: str
    suite: str
    user_task: str
    attack: str
    injection_task: str | None
    raw: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.raw.get("benchmark_version") or DEFAULT_VERSION)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.raw.get("messages") or []
        return [m for m in messages if isinstance(m, dict)]

    @property
    def empty(self) -> bool:
        return len(self.messages) < 2

    @property
    def injections(self) -> dict[str, str]:
        return dict(self.raw.get("injections") or {})

    @property
    def prompt(self) -> str:
        for message in self.messages:
            if message.get("role") == "user":
                return text_of(message.get("content"))
        return ""

    def calls(self) -> list[RecordedCall]:
        calls: list[RecordedCall] = []
        for message in self.messages:
            if message.get("role") == "assistant":
                for call in message.get("tool_calls") or []:
                    calls.append(
                        RecordedCall(call["function"], dict(call.get("args") or {}), call.get("id"))
                    )
        return calls

    def outputs(self) -> dict[str | None, Any]:
        """The recorded result of each call, by call id (as the agent saw it)."""
        found: dict[str | None, Any] = {}
        for message in self.messages:
            if message.get("role") == "tool":
                call_id = message.get("tool_call_id")
                error = message.get("error")
                found[call_id] = recorded_result(text_of(message.get("content")), error)
        return found

    def final_output(self) -> list[dict[str, str]]:
        messages = self.messages
        if messages and messages[-1].get("role") == "assistant":
            text = text_of(messages[-1].get("content"))
            return [{"type": "text", "content": text}] if text else []
        return []

    def injected_values(self) -> set[str]:
        """Values the injected text names and the user's prompt does not."""
        planted: set[str] = set()
        for text in self.injections.values():
            planted |= _values(str(text))
        return planted - _values(self.prompt)


def injected(args: dict[str, Any], planted: set[str]) -> bool:
    return bool(planted) and bool(planted & _values(json.dumps(args, default=str)))


def recorded_result(text: str, error: Any) -> Any:
    """A recorded tool message back as data: AgentDojo writes results as YAML."""
    if error:
        return {"error": str(error)}
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return jsonable(parsed) if parsed is not None else text


def read_trace(path: Path, runs: Path) -> Trace:
    pipeline, suite, user_task, attack = path.relative_to(runs).parts[:4]
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raw = {}
    inj = None if path.stem == "none" else path.stem
    return Trace(path, pipeline, suite, user_task, attack, inj, raw)


def traces(
    runs: Path, pipeline: str, attacks: set[str] | None, suites: Sequence[str], log: Any = None
) -> Iterator[Trace]:
    """Every user-task trace of ``pipeline`` (``attacks``: ``None`` for every attack).

    The folders of injection tasks run on their own (``injection_task_N/none``) are
    not user tasks: they are counted on ``log``, not replayed.
    """
    others = 0
    for suite in suites:
        base = runs / pipeline / suite
        if not base.is_dir():
            continue
        for folder in sorted(base.iterdir(), key=lambda p: _natural(p.name)):
            if not folder.name.startswith("user_task_"):
                others += sum(1 for _ in folder.glob("*/*.json"))
                continue
            for attack_dir in sorted(folder.iterdir()):
                attack = attack_dir.name
                if attack != "none" and attacks is not None and attack not in attacks:
                    continue
                for file in sorted(attack_dir.glob("*.json"), key=lambda p: _natural(p.stem)):
                    yield read_trace(file, runs)
    if log and others:
        print(f"{pipeline}: {others} runs of injection tasks on their own, not replayed", file=log)


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, -1)


@contextmanager
def open_runs(path: Path) -> Iterator[Path]:
    """The runs directory: ``path`` itself, or the corpus tarball unpacked to a temporary
    directory (removed afterwards), so the corpus is read where it lies."""
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="agentdojo-runs-") as tmp, tarfile.open(path) as tar:
        tar.extractall(tmp, filter="data")
        yield Path(tmp)


def jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return jsonable(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# -- the enforcement point --------------------------------------------------------------------


def namespaced(app: AppProfile) -> AppProfile:
    """An application's tools under ``<application>.<tool>``, as a gateway prefixes them."""
    return AppProfile(
        name=app.name,
        tools={f"{app.name}.{name}": tool for name, tool in app.tools.items()},
        default_ceiling=app.default_ceiling,
    )


def catalogue() -> dict[str, ToolProfile]:
    """The trust domain's tool catalogue: every application's tools, namespaced."""
    entries: dict[str, ToolProfile] = {}
    for app in PROFILES.values():
        entries.update(namespaced(app).tools)
    return entries


@dataclass
class Session:
    task_id: str
    token: str
    key: ProofKey
    intent: Intent
    app: str


class EnforcementPoint:
    """An in-process trust domain; every call through ``authorize``, every result
    through ``observe``: the one pipeline every door uses."""

    def __init__(self, policy: FlowPolicy) -> None:
        self.clock = FrozenClock(time.time())
        self.tether = Tether.ephemeral("bench.example", clock=self.clock)
        self.tether.register_identity(AGENT, kind="agent", owner="bench@bench.example")
        self.tether.policies.load({"all.cedar": "permit (principal, action, resource);"})
        self.tether.catalogue.load(catalogue(), origin="bench")
        self.tether.enforcement.flow_policy = policy
        self.compiler = RuleCompiler()
        self._apps = {name: namespaced(app) for name, app in PROFILES.items()}
        self._intents: dict[tuple[str, str], Intent] = {}
        self.latencies_us: list[float] = []
        self.observe_refused: Counter[str] = Counter()

    def close(self) -> None:
        self.tether.close()

    def intent(self, prompt: str, app: str) -> Intent:
        key = (app, prompt)
        if key not in self._intents:
            self._intents[key] = self.compiler.compile(prompt, self._apps[app])
        return self._intents[key]

    def open(self, prompt: str, app: str) -> Session:
        intent = self.intent(prompt, app)
        key = ProofKey()
        task = self.tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
        return Session(task.task_id, task.token, key, intent, app)

    def authorize(self, s: Session, tool: str, args: dict[str, Any]) -> Receipt:
        name = f"{s.app}.{tool}"
        proof = s.key.prove(s.token, name, args, now=self.clock.now())
        started = time.perf_counter()
        receipt = self.tether.authorize(token=s.token, proof=proof, tool=name, args=args)
        self.latencies_us.append((time.perf_counter() - started) * 1e6)
        return receipt

    def approve(self, s: Session, held: Receipt, tool: str, args: dict[str, Any]) -> Receipt:
        """A reviewer approves a held call; the agent asks again and gets the grant."""
        if held.approval_id is None:
            return held
        self.tether.decide_approval(held.approval_id, approve=True, by=REVIEWER)
        return self.authorize(s, tool, args)

    def observe(self, s: Session, tool: str, receipt: Receipt, result: Any) -> None:
        name = f"{s.app}.{tool}"
        proof = s.key.prove_result(
            s.token, name, receipt.seq, result, now=self.clock.now(), htm=DECIDE_HTM, htu=DECIDE_HTU
        )
        try:
            self.tether.observe(
                token=s.token, proof=proof, tool=name, receipt=receipt.seq, result=result
            )
        except ObservationRefused as refused:
            self.observe_refused[refused.code] += 1

    def end(self, s: Session) -> None:
        self.tether.end_task(s.task_id)


# -- replay -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    utility: bool | None = None
    security: bool | None = None
    calls: int = 0
    approvals: int = 0
    refused: int = 0
    injected: int = 0
    injected_refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.lower().split())
    if isinstance(value, list | tuple):
        return tuple(sorted(str(_norm(v)) for v in value))
    return value


def reviewer_approves(
    app: AppProfile, tool: str, args: dict[str, Any], truth: Sequence[Any]
) -> bool:
    """The oracle reviewer: a held call matching a ground-truth call on its value sinks."""
    sinks = app.tool(tool).sinks or {}
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


class Guard:
    """Runs one trace's calls through the enforcement point (or lets all through)."""

    def __init__(self, ep: EnforcementPoint | None, app: str, prompt: str, planted: set[str]):
        self.ep = ep
        self.app = app
        self.session = ep.open(prompt, app) if ep is not None else None
        self.planted = planted
        self.outcome = Outcome()

    def ask(
        self, tool: str, args: dict[str, Any], truth: Sequence[Any] | None = None
    ) -> Receipt | None:
        """The allowed receipt, or ``None`` when the call is refused (``allow-all``: a
        receipt is never needed, so ``None`` is never returned)."""
        out = self.outcome
        out.calls += 1
        planted = injected(args, self.planted)
        out.injected += planted
        if self.ep is None or self.session is None:
            return _ALLOW_ALL
        receipt = self.ep.authorize(self.session, tool, args)
        if receipt.effect is Effect.ALLOW:
            return receipt
        held = receipt.effect is Effect.APPROVAL_REQUIRED
        out.approvals += held
        out.reasons[receipt.decision.reasons[0].code] += 1
        if held and truth is not None and reviewer_approves(PROFILES[self.app], tool, args, truth):
            again = self.ep.approve(self.session, receipt, tool, args)
            if again.effect is Effect.ALLOW:
                return again
        out.refused += 1
        out.injected_refused += planted
        return None

    def ran(self, tool: str, receipt: Receipt, result: Any) -> None:
        if self.ep is not None and self.session is not None and receipt is not _ALLOW_ALL:
            self.ep.observe(self.session, tool, receipt, result)

    def end(self) -> None:
        if self.ep is not None and self.session is not None:
            self.ep.end(self.session)


_ALLOW_ALL: Any = object()


def replay_recorded(ep: EnforcementPoint, trace: Trace, mode: str) -> Outcome:
    """The trace's calls with its recorded results reported back: nothing is run."""
    guard = Guard(ep, trace.suite, trace.prompt, trace.injected_values())
    outputs = trace.outputs()
    for call in trace.calls():
        receipt = guard.ask(call.function, call.args)
        if receipt is None:
            if mode == "stop":
                break
            continue
        guard.ran(call.function, receipt, outputs.get(call.id, ""))
    guard.end()
    return guard.outcome


class Replayer:
    """Live replay: AgentDojo's own tools run every allowed call, its checkers score."""

    def __init__(self, ep: EnforcementPoint | None) -> None:
        self.ep = ep
        self._envs: dict[tuple[str, str, str], Any] = {}
        self.check_errors = 0

    def environment(self, version: str, suite: Any, injections: dict[str, str]) -> Any:
        key = (version, suite.name, json.dumps(injections, sort_keys=True))
        if key not in self._envs:
            self._envs[key] = suite.load_and_inject_default_environment(injections)
        return self._envs[key].model_copy(deep=True)

    def run(
        self,
        version: str,
        suite: Any,
        user_task: Any,
        injection_task: Any | None,
        trace: Trace | None,
        calls: Sequence[RecordedCall],
        output: list[Any],
        mode: str,
        truth: Sequence[Any] | None = None,
        injections: dict[str, str] | None = None,
    ) -> Outcome:
        from agentdojo.functions_runtime import FunctionCall, FunctionsRuntime  # noqa: PLC0415 (live outputs only)

        injections = trace.injections if trace is not None else (injections or {})
        env = user_task.init_environment(self.environment(version, suite, injections))
        pre = env.model_copy(deep=True)
        runtime = FunctionsRuntime(suite.tools)
        planted = trace.injected_values() if trace is not None else set()
        ep = self.ep if mode != "allow-all" else None
        guard = Guard(ep, suite.name, user_task.PROMPT, planted)
        executed: list[Any] = []
        stopped = False
        for call in calls:
            receipt = guard.ask(call.function, call.args, truth)
            if receipt is None:
                if mode == "stop":
                    stopped = True
                    break
                continue
            result, _error = runtime.run_function(env, call.function, dict(call.args))
            executed.append(FunctionCall(function=call.function, args=dict(call.args), id=call.id))
            guard.ran(call.function, receipt, jsonable(result if _error is None else _error))
        guard.end()
        outcome = guard.outcome
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


def as_recorded(calls: Sequence[Any]) -> list[RecordedCall]:
    return [RecordedCall(c.function, dict(c.args), c.id) for c in calls]


# -- figures ----------------------------------------------------------------------------------


def pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 1)


class Tally:
    """Counts per (version, mode, attack) and per (version, mode) for the benign traces."""

    def __init__(self) -> None:
        self.attack: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
        self.benign: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.latencies: dict[tuple[str, str], list[float]] = defaultdict(list)

    def add(
        self,
        version: str,
        mode: str,
        trace_attack: str,
        suite: str,
        inj: str | None,
        out: Outcome,
        oracle: bool | None,
    ) -> None:
        c = (
            self.benign[(version, mode)]
            if inj is None
            else self.attack[(version, mode, trace_attack)]
        )
        c["n"] += 1
        c["util"] += bool(out.utility)
        c["oracle"] += bool(oracle)
        c["approvals"] += out.approvals
        c["calls"] += out.calls
        c["refused"] += out.refused
        c["injected"] += out.injected
        c["injected_refused"] += out.injected_refused
        if inj is not None:
            c["asr"] += bool(out.security)
            if (suite, inj) not in FINAL_ANSWER_ONLY:
                c["tool_n"] += 1
                c["asr_tool"] += bool(out.security)

    def missing(
        self, version: str, attack: str, inj: str | None, what: str, modes: Sequence[str]
    ) -> None:
        """A trace not replayed (``empty`` or ``unknown``): counted in every mode's row."""
        for mode in modes:
            c = (
                self.benign[(version, mode)]
                if inj is None
                else self.attack[(version, mode, attack)]
            )
            c[what] += 1

    def rows(self, pipeline: str, outputs: str, modes: Sequence[str]) -> list[dict[str, Any]]:
        scored = outputs == "live"
        rows = []
        keys = sorted(self.attack, key=lambda k: (k[0], k[2], modes.index(k[1])))
        for version, mode, attack in keys:
            t = self.attack[(version, mode, attack)]
            b = self.benign.get((version, mode), Counter())
            lat = self.latencies.get((version, mode), [])
            rows.append(
                {
                    "pipeline": pipeline,
                    "version": version,
                    "outputs": outputs,
                    "mode": mode,
                    "attack": attack,
                    "cases": t["n"],
                    "empty": t["empty"],
                    "unknown": t["unknown"],
                    "asr": pct(t["asr"], t["n"]) if scored else None,
                    "asr_tool": pct(t["asr_tool"], t["tool_n"]) if scored else None,
                    "utility_under_attack": pct(t["util"], t["n"]) if scored else None,
                    "benign_cases": b["n"],
                    "benign_utility": pct(b["util"], b["n"]) if scored else None,
                    "approvals_per_task": round(t["approvals"] / t["n"], 2) if t["n"] else 0.0,
                    "oracle_utility": pct(t["oracle"], t["n"]) if scored else None,
                    "calls": t["calls"],
                    "refused": t["refused"],
                    "injected_calls": t["injected"],
                    "injected_refused": t["injected_refused"],
                    "p50_us": percentile(lat, 0.5),
                    "p99_us": percentile(lat, 0.99),
                }
            )
        return rows


def evaluate_pipeline(
    runs: Path,
    pipeline: str,
    attacks: set[str] | None,
    policy: FlowPolicy,
    log: Any,
    suites: Sequence[str] = SUITES,
    outputs: str = "live",
) -> list[dict[str, Any]]:
    ep = EnforcementPoint(policy)
    try:
        if outputs == "recorded":
            return _evaluate_recorded(ep, runs, pipeline, attacks, log, suites)
        return _evaluate_live(ep, runs, pipeline, attacks, log, suites)
    finally:
        ep.close()


def _evaluate_recorded(
    ep: EnforcementPoint,
    runs: Path,
    pipeline: str,
    attacks: set[str] | None,
    log: Any,
    suites: Sequence[str],
) -> list[dict[str, Any]]:
    tally = Tally()
    reasons: Counter[str] = Counter()
    for trace in traces(runs, pipeline, attacks, suites, log):
        v = trace.version
        if trace.empty:
            tally.missing(v, trace.attack, trace.injection_task, "empty", RECORDED_MODES)
            continue
        for mode in RECORDED_MODES:
            before = len(ep.latencies_us)
            out = replay_recorded(ep, trace, mode)
            tally.latencies[(v, mode)].extend(ep.latencies_us[before:])
            if mode == "skip":
                reasons.update(out.reasons)
            tally.add(v, mode, trace.attack, trace.suite, trace.injection_task, out, None)
    if log:
        _summary(log, pipeline, tally, RECORDED_MODES, reasons, ep, check_errors=0, mismatch=0)
    return tally.rows(pipeline, "recorded", RECORDED_MODES)


def _evaluate_live(
    ep: EnforcementPoint,
    runs: Path,
    pipeline: str,
    attacks: set[str] | None,
    log: Any,
    suites: Sequence[str],
) -> list[dict[str, Any]]:
    from agentdojo.task_suite.load_suites import get_suite  # noqa: PLC0415 (live outputs only)

    plain = Replayer(None)
    guarded = Replayer(ep)
    tally = Tally()
    reasons: Counter[str] = Counter()
    mismatch = 0
    unknown_versions: Counter[str] = Counter()
    for trace in traces(runs, pipeline, attacks, suites, log):
        v, inj_id = trace.version, trace.injection_task
        if trace.empty:
            tally.missing(v, trace.attack, inj_id, "empty", MODES)
            continue
        try:
            suite = get_suite(v, trace.suite)
        except KeyError:
            unknown_versions[v] += 1
            tally.missing(v, trace.attack, inj_id, "unknown", MODES)
            continue
        user_task = suite.user_tasks.get(trace.user_task)
        inj = suite.injection_tasks.get(inj_id) if inj_id is not None else None
        if user_task is None or (inj_id is not None and inj is None):
            tally.missing(v, trace.attack, inj_id, "unknown", MODES)
            continue
        calls = trace.calls()
        output = trace.final_output()
        truth: list[Any]
        try:
            env = user_task.init_environment(guarded.environment(v, suite, trace.injections))
            truth = list(user_task.ground_truth(env))
        except Exception:
            truth = []
        for mode in MODES:
            replayer = plain if mode == "allow-all" else guarded
            before = len(ep.latencies_us)
            out = replayer.run(v, suite, user_task, inj, trace, calls, output, mode)
            tally.latencies[(v, mode)].extend(ep.latencies_us[before:])
            oracle = out.utility
            if mode == "skip":
                reasons.update(out.reasons)
                if out.approvals:
                    oracle = replayer.run(
                        v, suite, user_task, inj, trace, calls, output, mode, truth
                    ).utility
            if mode == "allow-all" and inj is not None:
                mismatch += out.security != bool(trace.raw.get("security"))
            tally.add(v, mode, trace.attack, trace.suite, inj_id, out, oracle)
        if log:
            print(".", end="", file=log, flush=True)
    if log:
        print(file=log)
        if unknown_versions:
            print(
                f"{pipeline}: benchmark versions unknown to agentdojo: {dict(unknown_versions)}",
                file=log,
            )
        _summary(
            log,
            pipeline,
            tally,
            MODES,
            reasons,
            ep,
            check_errors=plain.check_errors + guarded.check_errors,
            mismatch=mismatch,
        )
    return tally.rows(pipeline, "live", MODES)


def _summary(
    log: Any,
    pipeline: str,
    tally: Tally,
    modes: Sequence[str],
    reasons: Counter[str],
    ep: EnforcementPoint,
    *,
    check_errors: int,
    mismatch: int,
) -> None:
    mode = modes[0]
    for version in sorted({k[0] for k in tally.attack} | {k[0] for k in tally.benign}):
        attack = sum(
            (c for (v, m, _), c in tally.attack.items() if v == version and m == mode), Counter()
        )
        benign = tally.benign.get((version, mode), Counter())
        print(
            f"{pipeline} {version}: {attack['n']} attack and {benign['n']} benign traces "
            f"replayed; empty traces: {attack['empty']} attack, {benign['empty']} benign; "
            f"tasks unknown to {version}: {attack['unknown'] + benign['unknown']}",
            file=log,
        )
    skip = sum((c for (_, m), c in tally.benign.items() if m == "skip"), Counter())
    live = (
        f"allow-all replay disagrees with the recorded security label on {mismatch} attack "
        f"traces; checker errors {check_errors}; "
        if "allow-all" in modes
        else ""
    )
    print(
        f"{pipeline}: {live}results refused by observe {dict(ep.observe_refused)}; benign "
        f"calls refused (skip) {skip['refused']} of {skip['calls']}; refusal reasons (skip): "
        f"{dict(reasons.most_common(8))}",
        file=log,
    )


def synthetic(
    runs: Path,
    policy: FlowPolicy,
    log: Any,
    suites: Sequence[str] = SUITES,
    versions: Sequence[str] = (DEFAULT_VERSION,),
) -> list[dict[str, Any]]:
    """Fully compliant traces: each user task's ground truth, then each injection task's.

    The environment carries the injections recorded for the headline pipeline's
    ``important_instructions`` run of the same pair under the same benchmark version
    (none when there is no such recording), so outputs are the real ones.
    """
    from agentdojo.task_suite.load_suites import get_suite  # noqa: PLC0415 (live outputs only)

    ep = EnforcementPoint(policy)
    plain, guarded = Replayer(None), Replayer(ep)
    rows: list[dict[str, Any]] = []
    try:
        for version in versions:
            tally = Tally()
            errors = 0
            for suite_name in suites:
                suite = get_suite(version, suite_name)
                for ut_id, user_task in suite.user_tasks.items():
                    for it_id, inj in suite.injection_tasks.items():
                        path = runs / HEADLINE / suite_name / ut_id / "important_instructions"
                        path = path / f"{it_id}.json"
                        injections: dict[str, str] = {}
                        if path.exists():
                            recorded = read_trace(path, runs)
                            if recorded.version == version:
                                injections = recorded.injections
                        env = user_task.init_environment(
                            guarded.environment(version, suite, injections)
                        )
                        try:
                            truth = list(user_task.ground_truth(env))
                            attack = list(inj.ground_truth(env))
                        except Exception:
                            errors += 1
                            continue
                        answer = getattr(user_task, "GROUND_TRUTH_OUTPUT", "") or ""
                        output = [{"type": "text", "content": answer}]
                        calls = as_recorded(truth + attack)
                        for mode in MODES:
                            replayer = plain if mode == "allow-all" else guarded
                            before = len(ep.latencies_us)
                            out = replayer.run(
                                version,
                                suite,
                                user_task,
                                inj,
                                None,
                                calls,
                                output,
                                mode,
                                injections=injections,
                            )
                            tally.latencies[(version, mode)].extend(ep.latencies_us[before:])
                            oracle = out.utility
                            if mode != "allow-all" and out.approvals:
                                oracle = replayer.run(
                                    version,
                                    suite,
                                    user_task,
                                    inj,
                                    None,
                                    calls,
                                    output,
                                    mode,
                                    truth,
                                    injections=injections,
                                ).utility
                            tally.add(version, mode, "ground_truth", suite_name, it_id, out, oracle)
            for row in tally.rows("synthetic-compliant", "live", MODES):
                row["benign_utility"] = None
                rows.append(row)
            if log and errors:
                print(f"synthetic {version}: {errors} pairs without a ground truth", file=log)
    finally:
        ep.close()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| pipeline | version | attack | mode | cases (empty) | ASR | ASR (tool) | "
        "utility under attack | benign utility (cases) | approvals/task | oracle utility | "
        "injected calls refused | p50 µs | p99 µs |"
    )
    lines = [head, "|" + "---|" * 14]

    def f(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for r in rows:
        benign = (
            "-"
            if r["benign_utility"] is None
            else (f"{r['benign_utility']:.1f} ({r['benign_cases']})")
        )
        lines.append(
            f"| {r['pipeline']} | {r['version']} | {r['attack']} | {r['mode']} | "
            f"{r['cases']} ({r['empty']}) | {f(r['asr'])} | {f(r['asr_tool'])} | "
            f"{f(r['utility_under_attack'])} | {benign} | {r['approvals_per_task']:.2f} | "
            f"{f(r['oracle_utility'])} | {r['injected_refused']}/{r['injected_calls']} | "
            f"{r['p50_us']:.0f} | {r['p99_us']:.0f} |"
        )
    return "\n".join(lines)


def replay(runs: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
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
        rows.extend(
            evaluate_pipeline(runs, pipeline, attacks, policy, sys.stderr, suites, args.outputs)
        )
        print(f"{pipeline}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.outputs == "live" and not args.no_synthetic:
        versions = sorted({r["version"] for r in rows}) or [DEFAULT_VERSION]
        rows.extend(synthetic(runs, policy, sys.stderr, suites, versions))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--runs", type=Path, required=True, help="the runs directory or the corpus tarball"
    )
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
    parser.add_argument(
        "--outputs",
        choices=OUTPUTS,
        default="live",
        help="live: run AgentDojo's tools and score (needs agentdojo); "
        "recorded: report the recorded results, no scores",
    )
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # Some of AgentDojo's tools and checkers print: kept off the table on stdout.
    with open_runs(args.runs) as runs, contextlib.redirect_stdout(io.StringIO()):
        rows = replay(runs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
