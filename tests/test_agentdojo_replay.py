"""The AgentDojo replay harness (``bench/agentdojo/replay.py``) on a few recorded traces.

Attacker: a malicious tool result. Each attack trace is a real agent's run in which text
planted in data it read (an e-mail, a review, a transaction subject) asked for a call the
user never did, and the agent made it. The harness replays such traces through Tether's one
pipeline (``Tether.authorize`` for every call, ``Tether.observe`` for every result) and must
say what it replayed: the benchmark version each trace was recorded under, how many cases,
how many empty. A few traces are read from the external corpus at run time
(``../shared/corpora/agentdojo/runs-dev.tar.xz``; nothing of it is kept in the repository),
picked by what they are, never by name: per suite, the first attack trace of the headline
pipeline whose recorded attack succeeded with a call carrying a value only the injection
named, and the first benign trace. The corpus holds v1 recordings only, so half of them are
rewritten as AgentDojo records v1.2 runs (content blocks, ``benchmark_version``), and one
more is emptied, as a few recordings are.

``make test`` replays the recorded tool results (no ``agentdojo`` package in the pinned
environment); ``make test-agentdojo`` runs the same file in ``.venv-agentdojo``, where the
live replay (AgentDojo's tools and checkers, each trace's own suite version) runs too.
"""

from __future__ import annotations

import copy
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from bench.agentdojo import replay

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(
    os.environ.get(
        "TETHER_AGENTDOJO_CORPUS",
        ROOT.parent / "shared" / "corpora" / "agentdojo" / "runs-dev.tar.xz",
    )
)
PIPELINE = replay.HEADLINE
ATTACK = "important_instructions"
NEWER = "v1.2"
#: Suites whose picked traces are rewritten as v1.2 recordings.
REWRITTEN = ("travel", "banking")
FIELDS = {
    "pipeline": str,
    "version": str,
    "outputs": str,
    "mode": str,
    "attack": str,
    "cases": int,
    "empty": int,
    "unknown": int,
    "asr": (float, type(None)),
    "asr_tool": (float, type(None)),
    "utility_under_attack": (float, type(None)),
    "benign_cases": int,
    "benign_utility": (float, type(None)),
    "approvals_per_task": float,
    "oracle_utility": (float, type(None)),
    "calls": int,
    "refused": int,
    "injected_calls": int,
    "injected_refused": int,
    "p50_us": float,
    "p99_us": float,
}


def _corpus() -> Path:
    if CORPUS.is_file():
        return CORPUS
    message = f"the AgentDojo corpus is not at {CORPUS} (set TETHER_AGENTDOJO_CORPUS)"
    if os.environ.get("TETHER_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _pick(corpus: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """Member name -> trace JSON: per suite one attack trace whose recorded injected call
    carries a planted value and one benign trace; and one more attack trace of the first
    suite (the one to empty), whose name comes second."""
    wanted = {(suite, kind) for suite in replay.SUITES for kind in ("attack", "benign")}
    wanted.add((replay.SUITES[0], "spare"))
    picked: dict[str, dict[str, Any]] = {}
    spare = ""
    with tarfile.open(corpus) as tar:
        for member in tar:
            parts = member.name.removeprefix("./").split("/")
            if not member.isfile() or len(parts) != 5 or parts[0] != PIPELINE:
                continue
            _, suite, task, attack, _ = parts
            if not task.startswith("user_task_") or attack not in (ATTACK, "none"):
                continue
            kinds = ("benign",) if attack == "none" else ("attack", "spare")
            kind = next((k for k in kinds if (suite, k) in wanted), None)
            if kind is None:
                continue
            f = tar.extractfile(member)
            assert f is not None
            raw = json.load(f)
            if kind != "benign":
                trace = replay.Trace(Path(member.name), PIPELINE, suite, task, attack, "x", raw)
                planted = trace.injected_values()
                if not raw.get("security") or not any(
                    replay.injected(c.args, planted) for c in trace.calls()
                ):
                    continue
            wanted.discard((suite, kind))
            name = "/".join(parts)
            picked[name] = raw
            spare = name if kind == "spare" else spare
            if not wanted:
                break
    assert not wanted, f"the corpus lacks traces for {sorted(wanted)}"
    return picked, spare


def newer_format(raw: dict[str, Any]) -> dict[str, Any]:
    """A trace as AgentDojo records it from v1.2 on: content blocks and the version."""
    out = copy.deepcopy(raw)
    for message in out["messages"]:
        if message.get("content") is not None:
            message["content"] = [{"type": "text", "content": message["content"]}]
    out["benchmark_version"] = NEWER
    out["agentdojo_package_version"] = "0.1.35"
    return out


class Runs:
    """The picked traces written out as a runs directory; ``empty`` is written empty."""

    def __init__(self, root: Path, picked: dict[str, dict[str, Any]], empty: str) -> None:
        self.root = root
        self.picked = picked
        self.empty = empty
        for name, raw in picked.items():
            suite = name.split("/")[1]
            body = newer_format(raw) if suite in REWRITTEN else raw
            if name == empty:
                body = {**raw, "messages": []}
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(body))

    def expected(self, version: str, kind: str) -> int:
        """How many non-empty traces of ``version`` and ``kind`` (attack or benign)."""
        return sum(
            1
            for name in self.picked
            if (version == NEWER) == (name.split("/")[1] in REWRITTEN)
            and (name.split("/")[3] == "none") == (kind == "benign")
            and name != self.empty
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    picked, empty = _pick(_corpus())
    return Runs(tmp_path_factory.mktemp("agentdojo-runs"), picked, empty)


def _run(runs: Runs, tmp_path: Path, outputs: str) -> list[dict[str, Any]]:
    out = tmp_path / "agentdojo.json"
    code = replay.main(
        [
            "--runs",
            str(runs.root),
            "--pipelines",
            PIPELINE,
            "--outputs",
            outputs,
            "--no-synthetic",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    for row in rows:
        assert set(row) == set(FIELDS), row
        for name, kind in FIELDS.items():
            value = row[name]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
            assert ok and not isinstance(value, bool), (name, value)
        assert (row["pipeline"], row["outputs"], row["attack"]) == (PIPELINE, outputs, ATTACK)
    return rows


def _by_version_mode(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    found = {(r["version"], r["mode"]): r for r in rows}
    assert len(found) == len(rows), "one row per version and mode"
    return found


def _check_counts(runs: Runs, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (version, _mode), row in rows.items():
        assert row["cases"] == runs.expected(version, "attack") > 0
        assert row["benign_cases"] == runs.expected(version, "benign") > 0
        assert row["empty"] == (1 if version == replay.DEFAULT_VERSION else 0)
        assert row["unknown"] == 0
        assert row["calls"] >= row["refused"] >= row["injected_refused"]


def test_a_trace_reads_the_same_in_either_recording_format(runs: Runs) -> None:
    for name, raw in runs.picked.items():
        older = replay.Trace(Path(name), PIPELINE, "s", "u", "a", None, raw)
        newer = replay.Trace(Path(name), PIPELINE, "s", "u", "a", None, newer_format(raw))
        assert (older.version, newer.version) == (replay.DEFAULT_VERSION, NEWER)
        assert newer.prompt == older.prompt != ""
        assert newer.calls() == older.calls()
        assert newer.outputs() == older.outputs()
        assert newer.final_output() == older.final_output()
        assert newer.injected_values() == older.injected_values()


def test_recorded_replay_reports_each_version_and_refuses_injected_calls(
    runs: Runs, tmp_path: Path
) -> None:
    rows = _by_version_mode(_run(runs, tmp_path, "recorded"))
    assert set(rows) == {(v, m) for v in (replay.DEFAULT_VERSION, NEWER) for m in ("skip", "stop")}
    _check_counts(runs, rows)
    for row in rows.values():
        assert row["asr"] is row["utility_under_attack"] is row["benign_utility"] is None
        # Every picked attack trace made at least one call carrying a planted value.
        assert row["injected_calls"] >= row["cases"]
        assert row["injected_refused"] >= 1, row


def test_live_replay_scores_each_trace_with_its_own_suite_version(
    runs: Runs, tmp_path: Path
) -> None:
    pytest.importorskip("agentdojo", reason="live replay runs in .venv-agentdojo")
    rows = _by_version_mode(_run(runs, tmp_path, "live"))
    assert set(rows) == {(v, m) for v in (replay.DEFAULT_VERSION, NEWER) for m in replay.MODES}
    _check_counts(runs, rows)
    for version in (replay.DEFAULT_VERSION, NEWER):
        undefended, skip = rows[(version, "allow-all")], rows[(version, "skip")]
        assert undefended["refused"] == undefended["approvals_per_task"] == 0
        assert undefended["asr"] is not None and undefended["asr"] > 0
        assert skip["asr"] is not None and skip["asr"] < undefended["asr"]
        assert skip["injected_refused"] >= 1
        for row in (undefended, skip, rows[(version, "stop")]):
            for score in ("asr", "asr_tool", "utility_under_attack", "benign_utility"):
                assert 0.0 <= row[score] <= 100.0
