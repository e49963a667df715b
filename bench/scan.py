"""Scanning untrusted text: time against input size, for every scanner Tether runs on it.

Run ``.venv/bin/python bench/scan.py`` (or ``make bench-scan``). See bench/README.md.

Each scanner that reads a tool result or a call's arguments (flow values, credential
detection and redaction, argument patterns of an intent) is fed the input that makes a
backtracking engine go quadratic or worse on its pattern, at 64 kB, 256 kB, 1 MB and
4 MB. Each size is 4x the one before: linear time shows as about 4x per step (quadratic
would be 16x). Expect one larger step where the text stops fitting in the CPU's cache
(usually 256 kB to 1 MB); the steps after it are 4x again. For comparison, the e-mail
pattern as the flow tracker ran it before (Python's backtracking ``re``) is timed at
4, 8 and 16 kB, in the same process.

Each figure is the fastest of ``--repeats`` runs (the JSON keeps the medians too): on a
machine shared with other work, the slower runs time the neighbours, not the scanner.

Results: a markdown table on stdout and JSON in bench/results/scan.json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tether import parse_intent
from tether.core import SideEffect, SinkKind, ToolProfile
from tether.core._credentials import Known, find_credentials, redact_text, redact_value
from tether.core._flow import atoms, read_result, start, ungrounded
from tether.core._intent import Sensitivity, match_capability

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = (64 * 1024, 256 * 1024, 1024 * 1024, 4096 * 1024)
LEGACY_SIZES = (4 * 1024, 8 * 1024, 16 * 1024)
LEGACY_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
FETCH = ToolProfile(side_effect=SideEffect.READ, sensitivity=Sensitivity.PUBLIC)
STATE = start("mail the summary to partner@acme.example")
#: Brokered values, as many as a busy deployment holds (their fingerprints: every form).
KNOWN = [Known(f"key-{i}", f"brk-{i:04d}-Q9vX2mLr7TzK") for i in range(200)]
INTENT = parse_intent(
    {
        "purpose": "look things up",
        "capabilities": [{"tool": "kb.search", "args": {"q": {"pattern": "(a+)+$"}}}],
    }
)


def fill(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


#: (scanner, what it is fed, how one run is made from a size).
CASES: list[tuple[str, str, Callable[[int], Callable[[], object]]]] = [
    ("flow atoms (e-mail)", "'a.' repeated", lambda n: lambda: atoms(fill("a.", n))),
    ("flow atoms (e-mail)", "'@' repeated", lambda n: lambda: atoms(fill("@", n))),
    ("flow atoms (e-mail)", "'a@' repeated", lambda n: lambda: atoms(fill("a@", n))),
    ("flow atoms (link)", "'www.' repeated", lambda n: lambda: atoms(fill("www.", n))),
    ("flow atoms (IBAN)", "'DE00 A A A...'", lambda n: lambda: atoms("DE00" + fill(" A", n))),
    ("flow atoms (many)", "'a@b.co ' repeated", lambda n: lambda: atoms(fill("a@b.co ", n))),
    (
        "flow result reading",
        "{'body': '@.'..., 'from': 'a@'...}",
        lambda n: (
            lambda: read_result({"body": fill("@.", n // 2), "from": fill("a@", n // 2)}, FETCH)
        ),
    ),
    (
        "flow sink argument",
        "'a@' repeated, as text",
        lambda n: lambda: ungrounded(STATE, fill("a@", n), SinkKind.TEXT),
    ),
    (
        "credential detection",
        "'sk-' + 'a-' repeated",
        lambda n: lambda: find_credentials({"body": "sk-" + fill("a-", n)}),
    ),
    (
        "credential detection",
        "'-----BEGIN PRIVATE KEY-----' + 'A'...",
        lambda n: lambda: find_credentials({"body": "-----BEGIN PRIVATE KEY-----" + fill("A", n)}),
    ),
    (
        "credential detection",
        "'a://' + 'b:' repeated + '@'",
        lambda n: lambda: find_credentials({"body": "a://" + fill("b:", n) + "@"}),
    ),
    (
        "credential detection",
        "'token ' repeated",
        lambda n: lambda: find_credentials({"body": fill("token ", n)}),
    ),
    (
        "credential detection",
        "'A1b2' repeated (one low-entropy run)",
        lambda n: lambda: find_credentials({"body": fill("A1b2", n)}),
    ),
    (
        "credential redaction",
        "'password=' repeated",
        lambda n: lambda: redact_text(fill("password=", n)),
    ),
    (
        "credential redaction",
        "prose with an address every 40 bytes",
        lambda n: (
            lambda: redact_value(
                {"text": fill("write to bob@acme.example about it. ", n)}, Counter()
            )
        ),
    ),
    (
        "brokered value detection",
        "'%4' repeated (percent-decoded view), 200 values",
        lambda n: lambda: find_credentials({"body": fill("%4", n)}, KNOWN),
    ),
    (
        "brokered value redaction",
        "a piece of one value, spaced, repeated; 200 values",
        lambda n: lambda: redact_text(fill("brk 0042 Q9vX2m ", n), known=KNOWN),
    ),
    (
        "brokered value redaction",
        "hex of one value, repeated; 200 values",
        lambda n: lambda: redact_text(fill(b"brk-0042-Q9vX2mLr7TzK".hex(), n), known=KNOWN),
    ),
    (
        "intent argument pattern",
        "'(a+)+$' against 'a...a!'",
        lambda n: lambda: match_capability(INTENT, "kb.search", {"q": fill("a", n) + "!"}),
    ),
]


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: on a shared machine the other runs measure the
    neighbours (the JSON also keeps the median)."""
    fn()
    gc.collect()
    samples = []
    for _ in range(repeats):
        start_ns = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start_ns)
    MEDIANS.append(statistics.median(samples) / 1e9)
    return min(samples) / 1e9


MEDIANS: list[float] = []


def run(repeats: int, legacy: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for scanner, fed, make in CASES:
        times = {size: best_seconds(make(size), repeats) for size in SIZES}
        medians = MEDIANS[-len(SIZES) :]
        first = times[SIZES[0]]
        rows.append(
            {
                "scanner": scanner,
                "input": fed,
                "ms": {str(size): round(t * 1000, 2) for size, t in times.items()},
                "median_ms": {
                    str(s): round(m * 1000, 2) for s, m in zip(SIZES, medians, strict=True)
                },
                "ratio_to_64k": {str(size): round(t / first, 1) for size, t in times.items()},
            }
        )
        print(f"  {scanner}: {fed}: " + ", ".join(f"{t * 1000:.1f} ms" for t in times.values()))
    out: dict[str, Any] = {"rows": rows}
    if legacy:
        times = {
            size: best_seconds(lambda s=size: list(LEGACY_EMAIL.finditer(fill("a.", s))), 3)
            for size in LEGACY_SIZES
        }
        out["legacy_email"] = {
            "input": "'a.' repeated",
            "ms": {str(size): round(t * 1000, 1) for size, t in times.items()},
            "ratio_to_4k": {
                str(size): round(t / times[LEGACY_SIZES[0]], 1) for size, t in times.items()
            },
        }
    return out


def _label(size: int) -> str:
    return f"{size // 1024} kB" if size < 1 << 20 else f"{size >> 20} MB"


def table(rows: list[dict[str, Any]]) -> str:
    steps = list(itertools.pairwise(SIZES))
    lines = [
        "| scanner | input | "
        + " | ".join(f"{_label(s)} ms" for s in SIZES)
        + " | "
        + " | ".join(f"{_label(b)} / {_label(a)}" for a, b in steps)
        + " |",
        "|---|---|" + "---:|" * (len(SIZES) + len(steps)),
    ]
    for r in rows:
        ms = [r["ms"][str(s)] for s in SIZES]
        ratios = [r["ms"][str(b)] / max(r["ms"][str(a)], 1e-3) for a, b in steps]
        lines.append(
            f"| {r['scanner']} | {r['input']} | "
            + " | ".join(f"{m:,.1f}" for m in ms)
            + " | "
            + " | ".join(f"{x:.1f}x" for x in ratios)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per size (the fastest is shown)"
    )
    parser.add_argument(
        "--no-legacy", action="store_true", help="skip the backtracking e-mail pattern"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scan.json")
    opts = parser.parse_args()
    started = time.perf_counter()
    result = run(opts.repeats, not opts.no_legacy)
    rows = result["rows"]
    print("\n## Scanning time against input size (best of --repeats runs)\n")
    print(table(rows))
    print("\nEach size is 4x the one before: linear is about 4x a step, quadratic 16x.")
    last = max(r["ms"][str(SIZES[-1])] / max(r["ms"][str(SIZES[-2])], 1e-3) for r in rows)
    print(
        f"\n- largest {_label(SIZES[-1])} / {_label(SIZES[-2])} ratio: {last:.1f}x "
        "(linear 4x, quadratic 16x)"
    )
    if "legacy_email" in result:
        legacy = result["legacy_email"]
        print(
            "- before (Python re, the flow tracker's e-mail pattern, 'a.' repeated): "
            + ", ".join(f"{int(k) // 1024} kB {v:,.1f} ms" for k, v in legacy["ms"].items())
            + " (x"
            + ", x".join(f"{v:.1f}" for v in legacy["ratio_to_4k"].values())
            + " per size: quadratic)"
        )
    document = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "sizes": list(SIZES),
        "repeats": opts.repeats,
        **result,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {opts.out} ({document['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
