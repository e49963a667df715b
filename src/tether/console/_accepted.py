"""Accepted risks: documented risk decisions (exception policies).

An owner (or an admin) records that a risk is accepted: which risk tag it is about
(``owasp-asi:ASI02``, ``owasp-nhi:NHI7``, ...), its scope in words (an agent, a tool,
a workflow), the justification, the approver who must sign it off, and an expiry. It
stays *pending* until that approver (a credential with the approver or admin role whose
email is the one named) accepts or rejects it; the recorder cannot approve their own.
An accepted risk shows in the risk report while it is in force and *lapses by itself*
at its expiry: nothing runs at that moment, its state is computed from the clock.

An accepted risk changes no decision: it documents why a finding is tolerated, for
whom, until when. Every step leaves a receipt.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from tether._errors import Conflict, NotFound, UsageError
from tether.audit import Auditor
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


@dataclass(frozen=True)
class AcceptedRisk:
    row: AcceptedRiskRow
    state: str  # pending | in force | lapsed | rejected | withdrawn

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
        """The recorder (or an admin) withdraws an accepted risk before it lapses."""
        row = self.get(risk_id)
        if not admin and by.lower() != row.recorded_by.lower():
            raise Forbidden("only the recorder or an admin may withdraw an accepted risk")
        with self._store.transaction():
            if not self._store.decide_accepted_risk(risk_id, "withdrawn", by, self._clock.now()):
                raise Conflict(f"accepted risk {risk_id} is not in force")
            self._append("risk.withdraw", row, by)
        return self.get(risk_id)

    def get(self, risk_id: str) -> AcceptedRiskRow:
        for row in self._store.list_accepted_risks():
            if row.risk_id == risk_id:
                return row
        raise NotFound(f"accepted risk {risk_id} does not exist")

    def list(self) -> list[AcceptedRisk]:
        now = self._clock.now()
        return [AcceptedRisk(r, state_of(r, now)) for r in self._store.list_accepted_risks()]

    def _append(self, kind: str, row: AcceptedRiskRow, by: str) -> None:
        self._auditor.append(
            kind,
            chain=[by],
            effect="allow",
            detail={
                "risk_id": row.risk_id,
                "risk_tag": row.risk_tag,
                "approver": row.approver,
                "expires_at": row.expires_at,
            },
            risk_tags=sorted({row.risk_tag, *risk_tags(Control.AUDIT)}),
        )
