"""Human approvals: bound to one exact call, single use, expiring.

An ``approval_required`` decision opens (or finds) a pending approval bound to
the task, the tool, the digest of the arguments and the digest of the policy
snapshot that asked for it. Identical calls share one pending approval, and a
task has at most ``max_pending`` waiting at once (approval fatigue is a flood of
distinct requests: the next is denied, with a receipt). An approver approves or
denies it; an approved approval lets exactly one identical call through, under the same policy
snapshot, before it expires. Replaying it, or presenting it for another call,
another task or after a policy change, does not work.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from tether._errors import Conflict, NotFound, Rejected, UsageError
from tether.approvals._review import text_flags
from tether.audit import Auditor
from tether.audit._rows import APPROVAL, approval_fields
from tether.core._clock import Clock
from tether.core._decision import DEFAULT_MAX_PENDING_APPROVALS
from tether.core._risk import Control, risk_tags
from tether.store import ApprovalRow, Store

DEFAULT_APPROVAL_TTL = 900.0
MAX_TREE_DEPTH = 16


class SeparationOfDuties(Rejected):
    """The human asked to decide has a stake in the call (403)."""

    code = "approval.separation_of_duties"


MAX_COMMENT = 1000


class Approvals:
    def __init__(
        self,
        store: Store,
        auditor: Auditor,
        clock: Clock,
        ttl: float = DEFAULT_APPROVAL_TTL,
        *,
        max_pending: int = DEFAULT_MAX_PENDING_APPROVALS,
    ) -> None:
        if max_pending < 1:
            raise UsageError("max_pending must be at least 1")
        self._store = store
        self._auditor = auditor
        self._clock = clock
        self.ttl = ttl
        #: Nobody decides a held call of their own agents (TETHER_SEPARATION_OF_DUTIES=off
        #: lifts it, for a trust domain with a single human).
        self.separation_of_duties = (
            os.environ.get("TETHER_SEPARATION_OF_DUTIES", "on").strip().lower() != "off"
        )
        #: Approvals one task may have waiting for a human at once; a call identical to a
        #: waiting one joins it (``$TETHER_MAX_PENDING_APPROVALS`` sets it for a process).
        self.max_pending = max_pending

    def request(
        self,
        *,
        task_id: str,
        agent_id: str,
        tool: str,
        args_digest: str,
        args: dict[str, Any],
        policy_digest: str,
        reasons: list[dict[str, str]],
    ) -> ApprovalRow:
        """The pending approval for this exact call (created if there is none)."""
        existing = self._store.find_approval(task_id, tool, args_digest, "pending")
        now = self._clock.now()
        if existing is not None and existing.expires_at > now and self._authentic(existing):
            return existing
        row = ApprovalRow(
            approval_id="apr_" + uuid.uuid4().hex,
            task_id=task_id,
            agent_id=agent_id,
            tool=tool,
            args_digest=args_digest,
            args_json=json.dumps(args, sort_keys=True),
            policy_digest=policy_digest,
            reasons_json=json.dumps(reasons),
            status="pending",
            created_at=now,
            expires_at=now + self.ttl,
        )
        self._store.add_approval(row)
        self._auditor.rows.tag(APPROVAL, row.approval_id, approval_fields(row))
        self._auditor.append_later(
            "approval.request",
            chain=[agent_id],
            task_id=task_id,
            tool=tool,
            args_digest=args_digest,
            effect="approval_required",
            detail={"approval_id": row.approval_id, "policy_digest": policy_digest},
            risk_tags=list(risk_tags(Control.APPROVAL)),
        )
        return row

    def granted(
        self, *, task_id: str, tool: str, args_digest: str, policy_digest: str
    ) -> ApprovalRow | None:
        """An approved, unexpired approval for exactly this call under this policy."""
        # Filtered in the query, so a stale or older approval never shadows a valid one.
        row = self._store.find_approval(
            task_id,
            tool,
            args_digest,
            "approved",
            unexpired_at=self._clock.now(),
            policy_digest=policy_digest,
        )
        return row if row is not None and self._authentic(row) else None

    def _authentic(self, row: ApprovalRow) -> bool:
        """Whether the approval was written (and decided) with the KEK: an approval a
        store writer added or flipped to approved grants nothing."""
        return self._auditor.rows.authentic(APPROVAL, row.approval_id, approval_fields(row))

    def _retag(self, approval_id: str) -> ApprovalRow:
        row = self._store.get_approval(approval_id)
        assert row is not None
        self._auditor.rows.tag(APPROVAL, approval_id, approval_fields(row))
        return row

    def consume(self, approval_id: str) -> bool:
        with self._store.transaction():
            if not self._store.use_approval(approval_id, self._clock.now()):
                return False
            self._retag(approval_id)
        return True

    def decide(self, approval_id: str, *, approve: bool, by: str, comment: str = "") -> ApprovalRow:
        """Approve or deny a pending approval; ``comment`` (the human's words, at most
        1,000 characters) is kept in the receipt of the decision."""
        if len(comment) > MAX_COMMENT:
            raise UsageError(f"a comment is at most {MAX_COMMENT} characters")
        row = self._store.get_approval(approval_id)
        if row is None or not self._authentic(row):
            # Refused as unknown: a pending approval added in the store without the KEK
            # (a call dressed up for a human to approve) is not one.
            raise NotFound(f"approval {approval_id} does not exist")
        if self.separation_of_duties:
            conflict = self.conflict_of_interest(row, by)
            if conflict is not None:
                self._auditor.append(
                    "approval.decide",
                    chain=[by, row.agent_id],
                    task_id=row.task_id,
                    tool=row.tool,
                    args_digest=row.args_digest,
                    effect="deny",
                    reasons=[{"code": SeparationOfDuties.code, "message": conflict}],
                    detail={"approval_id": approval_id, "status": row.status, "refused": True},
                    risk_tags=list(risk_tags(Control.APPROVAL, Control.AUDIT)),
                )
                raise SeparationOfDuties(conflict)
        status = "approved" if approve else "denied"
        with self._store.transaction():
            if not self._store.decide_approval(approval_id, status, by, self._clock.now()):
                raise Conflict(f"approval {approval_id} is {row.status} or expired, not pending")
            decided = self._retag(approval_id)
            self._auditor.append(
                "approval.decide",
                chain=[by, row.agent_id],
                task_id=row.task_id,
                tool=row.tool,
                args_digest=row.args_digest,
                effect="allow" if approve else "deny",
                detail={
                    "approval_id": approval_id,
                    "status": status,
                    **({"comment": comment} if comment else {}),
                },
                risk_tags=list(risk_tags(Control.APPROVAL, Control.AUDIT)),
            )
        return decided

    def conflict_of_interest(self, row: ApprovalRow, by: str) -> str | None:
        """Why ``by`` may not decide ``row``, or None: nobody decides a held call of an
        agent they own, of a delegation tree one of their agents is in, or of a task
        opened on their behalf (the four-eyes rule; ``separation_of_duties`` off lifts
        it, for a trust domain of one)."""
        who = by.strip().lower()
        if not who:
            return "the approver is not named"
        task = self._store.get_task(row.task_id)
        chain = list(json.loads(task.chain_json)) if task is not None else []
        tree: list[str] = []
        current = task
        for _ in range(MAX_TREE_DEPTH):  # the task and its ancestors, root last
            if current is None:
                break
            tree.append(current.task_id)
            intent = json.loads(current.intent_json)
            behalf = str(intent.get("on_behalf_of") or "").strip().lower()
            if behalf and behalf == who:
                return f"{by} may not decide a call of a task opened on their behalf"
            chain.extend(json.loads(current.chain_json))
            if current.parent_task_id is None:
                break
            current = self._store.get_task(current.parent_task_id)
        for spiffe_id in dict.fromkeys([row.agent_id, *chain]):
            identity = self._store.get_identity(spiffe_id)
            if identity is not None and identity.owner.strip().lower() == who:
                role = (
                    "the agent" if spiffe_id == row.agent_id else "an agent of its delegation tree"
                )
                return f"{by} owns {role} ({spiffe_id}) and may not decide its held calls"
        return None

    def review(self, row: ApprovalRow, viewer: str | None = None) -> dict[str, Any]:
        """What an approver must see beside the call: the agent's owner, the delegation
        chain, deceptive text in the arguments (:func:`text_flags`) and, for ``viewer``,
        why they may not decide it (``conflict``, None if they may)."""
        identity = self._store.get_identity(row.agent_id)
        task = self._store.get_task(row.task_id)
        conflict = None
        if viewer is not None and self.separation_of_duties:
            conflict = self.conflict_of_interest(row, viewer)
        return {
            "owner": identity.owner if identity is not None else "",
            "chain": list(json.loads(task.chain_json)) if task is not None else [row.agent_id],
            "flags": text_flags(json.loads(row.args_json)),
            "conflict": conflict,
        }

    def list(self, status: str | None = None) -> list[ApprovalRow]:
        return self._store.list_approvals(status=status)

    def get(self, approval_id: str) -> ApprovalRow:
        row = self._store.get_approval(approval_id)
        if row is None:
            raise NotFound(f"approval {approval_id} does not exist")
        return row
