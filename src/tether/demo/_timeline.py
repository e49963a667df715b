"""The demo's printed timeline: seconds since start, one line per step."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console

console = Console(highlight=False)
STYLE = {"allow": "bold green", "deny": "bold red", "approval_required": "bold yellow"}


class Timeline:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.effects: list[str] = []

    def say(self, text: str) -> None:
        console.print(f"[dim]{time.perf_counter() - self.start:7.3f}s[/]  {text}")

    def heading(self, text: str) -> None:
        console.print(f"\n[bold cyan]── {text}[/]")

    def effect(self, effect: str, what: str) -> None:
        """One decision's first line: its effect, then what was asked (rich markup)."""
        self.effects.append(effect)
        self.say(f"[{STYLE.get(effect, 'bold')}]{effect:>17}[/]  {what}")

    def detail(self, text: str) -> None:
        """A line under a decision (rich markup)."""
        self.say(f"{'':>17}  {text}")

    def verdict(
        self,
        tool: str,
        args: dict[str, Any],
        effect: str,
        reasons: list[dict[str, str]],
        receipt: Any,
        policies: list[str],
    ) -> None:
        reason = reasons[0]
        fired = f" [dim](policies: {', '.join(policies)})[/]" if policies else ""
        self.effect(effect, f"{tool} {json.dumps(args)}")
        self.detail(
            f"↳ {reason['code']}: {reason['message']}{fired} [dim]receipt #{receipt['seq']}[/]"
        )
