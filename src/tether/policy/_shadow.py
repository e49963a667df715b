"""Shadow mode: what a candidate policy set would have changed, from the receipts.

A set loaded with ``shadow`` is evaluated beside the live set on every call and
its effect is recorded on the call's receipt (``detail.shadow``: the candidate's
digest, its effect and the live set's effect at the same Cedar step). Nothing is
enforced. :func:`shadow_report` reads those receipts back: how many calls the
candidate saw and every call whose effect it would change ("would deny", "would
hold", "would allow"), so an operator designs policy from the agents' real
traffic before it bites.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tether.store import Store

#: How far back a report reads (receipts, newest first).
MAX_SCANNED = 100_000


@dataclass
class ShadowReport:
    digest: str | None
    evaluated: int = 0
    changes: dict[str, int] = field(default_factory=dict)  # "allow→deny": count
    changed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "evaluated": self.evaluated,
            "would_change": sum(self.changes.values()),
            "changes": dict(sorted(self.changes.items())),
            "changed": self.changed,
        }


def shadow_report(store: Store, digest: str | None, *, limit: int = 50) -> ShadowReport:
    """The decisions the shadow set ``digest`` saw, newest first (``limit`` listed)."""
    report = ShadowReport(digest)
    if not digest:
        return report
    before: int | None = None
    scanned = 0
    while scanned < MAX_SCANNED:
        page = store.records_page(before_seq=before, limit=500, kind="decision")
        if not page:
            break
        for row in page:
            scanned += 1
            body = json.loads(row.body)
            shadow = (body.get("detail") or {}).get("shadow")
            if not isinstance(shadow, dict) or shadow.get("digest") != digest:
                continue
            report.evaluated += 1
            live, effect = str(shadow.get("live")), str(shadow.get("effect"))
            if live == effect:
                continue
            key = f"{live}→{effect}"
            report.changes[key] = report.changes.get(key, 0) + 1
            if len(report.changed) < limit:
                chain = body.get("chain") or []
                report.changed.append(
                    {
                        "seq": row.seq,
                        "at": row.created_at,
                        "agent": chain[0] if chain else None,
                        "task_id": body.get("task_id"),
                        "tool": body.get("tool"),
                        "live": live,
                        "shadow": effect,
                        "effect": body.get("effect"),
                        "policies": shadow.get("policies", []),
                    }
                )
        before = page[-1].seq
    return report
