"""Accepted risks: documented risk decisions (exception policies).

An owner (or an admin) records that a risk is accepted: which risk tag it is about
(``owasp-asi:ASI02``, ``owasp-nhi:NHI7``, ...), its scope in words (an agent, a tool,
a workflow), the justification, the approver who must sign it off, and an expiry. It
stays *pending* until that approver (a credential with the approver or admin role whose
email is the one named) accepts or rejects it; the recorder cannot approve their own.
An accepted risk shows in the risk report while it is in force and *lapses by itself*
at its expiry: nothing runs at that moment, its state is computed from the clock.

An accepted risk changes no decision: it documents why a finding is tolerated, for
whom, until when. Every step leaves a receipt. The recorder (or an admin) may withdraw
it while it is pending or in force; the approver's decision stays on the row and who
withdrew it is in the receipt.

The ``risk.record`` receipt holds the title, scope and justification and the
:func:`content_digest` of the row's fixed fields; the decision receipts hold the same
digest. :meth:`AcceptedRisks.check` compares each row with its receipts, so a row
changed in the database (its words, its approver, its expiry or its status) shows.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tether._errors import Conflict, NotFound, UsageError
from tether.audit import Auditor
from tether.core._canonical import digest
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.server._auth import Forbidden
from tether.store import Store
from tether.store._interface import AcceptedRiskRow

MAX_DAYS = 366
_TAG = re.compile(
    r"(owasp-asi:ASI(0[1-9]|10)|owasp-nhi:NHI([1-9]|10)|maestro:L[1-7]|"
    r"nist-ai-rmf:(GOVERN|MAP|MEASURE|MANAGE)(-[0-9]{1,2}\.[0-9]{1,2})?)"
)
#: The fields of a row that never change once recorded (the digest covers them).
CONTENT = (
    "risk_id",
    "title",
    "risk_tag",
    "scope",
    "justification",
    "recorded_by",
    "approver",
    "created_at",
    "expires_at",
)
_DECISIONS = {"risk.accept": "accepted", "risk.reject": "rejected", "risk.withdraw": "withdrawn"}
MATCHES = "row matches its receipt"


def content_digest(row: AcceptedRiskRow) -> str:
    """``sha256:`` of the canonical JSON of the row's fixed fields (:data:`CONTENT`)."""
    return digest({name: getattr(row, name) for name in CONTENT})


@dataclass(frozen=True)
class AcceptedRisk:
    row: AcceptedRiskRow
    state: str  # pending | in force | lapsed | rejected | withdrawn
    #: :data:`MATCHES`, or what differs between the row and its receipts.
    check: str = MATCHES

    @property
    def in_force(self) -> bool:
        return self.state == "in force"


def state_of(row: AcceptedRiskRow, now: float) -> str:
    if row.status == "accepted":
        return "in force" if row.expires_at > now else "lapsed"
    if row.status == "pending" and row.expires_at <= now:
        return "lapsed"
    return row.status


class AcceptedRisks:
    def __init__(self, store: Store, auditor: Auditor, clock: Clock) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock

    def record(
        self,
        *,
        title: str,
        risk_tag: str,
        scope: str,
        justification: str,
        approver: str,
        days: int,
        by: str,
    ) -> AcceptedRiskRow:
        title, scope, justification, approver = (
            title.strip(),
            scope.strip(),
            justification.strip(),
            approver.strip().lower(),
        )
        if not title or len(title) > 200:
            raise UsageError("a title of 1 to 200 characters is needed")
        if not _TAG.fullmatch(risk_tag):
            raise UsageError("the risk tag must be one of the report's (e.g. owasp-asi:ASI02)")
        if not scope or len(scope) > 500:
            raise UsageError("a scope of 1 to 500 characters is needed")
        if len(justification) < 10 or len(justification) > 4000:
            raise UsageError("a justification of 10 to 4,000 characters is needed")
        if "@" not in approver or len(approver) > 320:
            raise UsageError("the approver is a person's email address")
        if approver == by.lower():
            raise UsageError("the approver must be someone other than the recorder")
        if not 1 <= days <= MAX_DAYS:
            raise UsageError(f"an accepted risk lasts 1 to {MAX_DAYS} days")
        now = self._clock.now()
        row = AcceptedRiskRow(
            risk_id="risk_" + secrets.token_hex(8),
            title=title,
            risk_tag=risk_tag,
            scope=scope,
            justification=justification,
            recorded_by=by,
            approver=approver,
            status="pending",
            created_at=now,
            expires_at=now + days * 86400.0,
        )
        with self._store.transaction():
            self._store.add_accepted_risk(row)
            self._append("risk.record", row, by)
        return row

    def decide(self, risk_id: str, *, accept: bool, by: str) -> AcceptedRiskRow:
        """The named approver accepts or rejects a pending accepted risk."""
        row = self.get(risk_id)
        if by.lower() != row.approver:
            raise Forbidden(f"only {row.approver} may decide on this accepted risk")
        if state_of(row, self._clock.now()) != "pending":
            raise Conflict(f"accepted risk {risk_id} is {state_of(row, self._clock.now())}")
        status = "accepted" if accept else "rejected"
        with self._store.transaction():
            if not self._store.decide_accepted_risk(risk_id, status, by, self._clock.now()):
                raise Conflict(f"accepted risk {risk_id} is no longer pending")
            self._append("risk.accept" if accept else "risk.reject", row, by)
        return self.get(risk_id)

    def withdraw(self, risk_id: str, *, by: str, admin: bool) -> AcceptedRiskRow:
        """The recorder (or an admin) withdraws an accepted risk while it is pending or in
        force. The approver's decision (if any) stays on the row; the receipt names who
        withdrew it."""
        row = self.get(risk_id)
        if not admin and by.lower() != row.recorded_by.lower():
            raise Forbidden("only the recorder or an admin may withdraw an accepted risk")
        state = state_of(row, self._clock.now())
        if state not in ("pending", "in force"):
            raise Conflict(f"accepted risk {risk_id} is {state}")
        with self._store.transaction():
            if not self._store.decide_accepted_risk(risk_id, "withdrawn", by, self._clock.now()):
                raise Conflict(f"accepted risk {risk_id} is neither pending nor in force")
            self._append("risk.withdraw", row, by, was=row.status)
        return self.get(risk_id)

    def get(self, risk_id: str) -> AcceptedRiskRow:
        for row in self._store.list_accepted_risks():
            if row.risk_id == risk_id:
                return row
        raise NotFound(f"accepted risk {risk_id} does not exist")

    def list(self) -> list[AcceptedRisk]:
        """Every accepted risk with its state and :meth:`check` of it."""
        now = self._clock.now()
        rows = self._store.list_accepted_risks()
        checks = self.check(rows)
        return [AcceptedRisk(r, state_of(r, now), checks[r.risk_id]) for r in rows]

    def check(self, rows: Sequence[AcceptedRiskRow]) -> dict[str, str]:
        """Per risk id, :data:`MATCHES` when the row's fixed fields have the digest of its
        ``risk.record`` receipt and its status and decider are those of its last decision
        receipt; otherwise what differs."""
        if not rows:
            return {}
        limit = 2 * len(rows) + 10
        recorded: dict[str, dict[str, Any]] = {}
        decided: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        for kind in ("risk.record", *_DECISIONS):
            for record in self._store.records_page(kind=kind, limit=limit):
                body = json.loads(record.body)
                detail = body.get("detail") or {}
                risk_id = str(detail.get("risk_id", ""))
                chain = body.get("chain") or [""]
                if kind == "risk.record":
                    recorded.setdefault(risk_id, detail)
                else:
                    step = (record.seq, kind, {**detail, "by": str(chain[0])})
                    decided.setdefault(risk_id, []).append(step)
        return {
            row.risk_id: _compare(row, recorded.get(row.risk_id), decided.get(row.risk_id, []))
            for row in rows
        }

    def _append(self, kind: str, row: AcceptedRiskRow, by: str, **extra: str) -> None:
        detail: dict[str, Any] = {
            "risk_id": row.risk_id,
            "risk_tag": row.risk_tag,
            "approver": row.approver,
            "expires_at": row.expires_at,
            "digest": content_digest(row),
            **extra,
        }
        if kind == "risk.record":
            detail.update(
                title=row.title,
                scope=row.scope,
                justification=row.justification,
                recorded_by=row.recorded_by,
                created_at=row.created_at,
            )
        self._auditor.append(
            kind,
            chain=[by],
            effect="allow",
            detail=detail,
            risk_tags=sorted({row.risk_tag, *risk_tags(Control.AUDIT)}),
        )


def _compare(
    row: AcceptedRiskRow,
    recorded: dict[str, Any] | None,
    decided: list[tuple[int, str, dict[str, Any]]],
) -> str:
    """:data:`MATCHES`, or the first difference between the row and its receipts."""
    if recorded is None:
        return "warning: no risk.record receipt for this row"
    if recorded.get("digest") != content_digest(row):
        return "warning: the row differs from its risk.record receipt"
    expected, decider = "pending", None
    for _, kind, detail in sorted(decided, key=lambda step: step[0]):
        if detail.get("digest") != content_digest(row):
            return f"warning: the row differs from its {kind} receipt"
        expected = _DECISIONS[kind]
        if kind != "risk.withdraw":  # a withdrawal keeps the approver's decision
            decider = str(detail["by"])
    if row.status != expected:
        return f"warning: the row is {row.status}, its receipts say {expected}"
    if (row.decided_by or "").lower() != (decider or "").lower():
        return "warning: the row's decider differs from its receipts"
    return MATCHES
