"""Loading one decision's :class:`~tether.core.Snapshot` from the store.

Called inside the transaction that holds the locks of the task and its
ancestors, so everything read here is one consistent state. A node's memory
(:mod:`tether.cluster`: identities and revocations heard over events) is a
cache inside this load, never a second source of truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from tether._errors import InfrastructureError
from tether.audit._rows import (
    APPROVAL,
    TASK,
    RowTags,
    approval_fields,
    task_fields,
)
from tether.core._credentials import Known
from tether.core._decision import Grant, PendingApprovals, Snapshot, TaskState
from tether.core._flow import FlowPolicy, FlowState, ToolProfile
from tether.core._intent import Intent, decode_verified_intent
from tether.core._scanning import ScanLimits
from tether.core._verify import TaskClaims
from tether.store import IdentityRow, Store, TaskRow

if TYPE_CHECKING:
    from tether.cluster import NodeMemory

MAX_ANCESTORS = 16


class FlowUnavailable(InfrastructureError):
    """A task's stored flow state cannot be read: its calls are refused."""

    code = "flow.state_unavailable"


class SnapshotLoader:
    def __init__(self, store: Store, rows: RowTags) -> None:
        self._store = store
        #: Identities, tasks and approvals are read only when their tags check: a row a
        #: store writer added or edited without the KEK refuses the call
        #: (``store.row_tampered``) or grants nothing.
        self._rows = rows
        self._intents: dict[str, Intent] = {}
        #: A node's memory (:mod:`tether.cluster`); ``None`` in a lone process.
        self.memory: NodeMemory | None = None

    def _identity(self, spiffe_id: str) -> IdentityRow | None:
        memory = self.memory
        if memory is None:
            return self._rows.identity(spiffe_id)
        row = memory.identity(spiffe_id)
        if row is None:
            generation = memory.generation
            row = self._rows.identity(spiffe_id)
            if row is not None:
                memory.put_identity(row, generation)
        return row

    def _intent(self, row: TaskRow) -> Intent:
        intent = self._intents.get(row.intent_digest)
        if intent is None:
            intent = decode_verified_intent(row.intent_json, row.intent_digest, row.task_id)
            if len(self._intents) > 4096:
                self._intents.clear()
            self._intents[row.intent_digest] = intent
        return intent

    def state(self, row: TaskRow) -> TaskState:
        self._rows.require(TASK, row.task_id, task_fields(row))
        agent = self._identity(row.agent_id)
        intent = self._intent(row)
        return TaskState(
            task_id=row.task_id,
            agent_id=row.agent_id,
            agent_owner=agent.owner if agent else "",
            agent_kind=agent.kind if agent else "",
            agent_active=agent is not None and agent.status == "active",
            template=row.template,
            status=row.status,
            intent=intent,
            intent_digest=row.intent_digest,
            jkt=row.jkt,
            expires_at=row.expires_at,
            calls_used=row.calls_used,
            token_id=row.token_id,
            opened_at=row.opened_at,
            last_activity=(
                self._store.task_last_activity(row.task_id)
                if intent.idle_seconds is not None
                else None
            ),
            parent_task_id=row.parent_task_id,
        )

    def token_revoked(self, token_id: str) -> bool:
        known = self.memory.revoked(token_id) if self.memory is not None else None
        return known if known is not None else self._store.token_revoked(token_id)

    def flow(self, task_id: str) -> FlowState | None:
        try:  # RowTampered when missing or edited: refused
            return self._rows.flow_state(task_id)
        except msgspec.DecodeError as exc:
            raise FlowUnavailable(
                f"the flow state of task {task_id} cannot be read: {exc}"
            ) from None

    def load(
        self,
        claims: TaskClaims,
        *,
        proof_jti: str | None,
        profile: ToolProfile,
        flow_policy: FlowPolicy,
        known: tuple[Known, ...] = (),
        flows: bool = True,
        limits: ScanLimits | None = None,
    ) -> Snapshot:
        """The snapshot of the task ``claims`` name (with ``flows``: the tree's flow states)."""
        row = self._store.get_task(claims.task_id)
        if row is None:
            return Snapshot(task=None)
        task = self.state(row)
        ancestors: list[TaskState] = []
        parent_id = row.parent_task_id
        while parent_id is not None and len(ancestors) < MAX_ANCESTORS:
            parent = self._store.get_task(parent_id)
            if parent is None:
                break
            ancestors.append(self.state(parent))
            parent_id = parent.parent_task_id
        states: dict[str, FlowState] = {}
        if flows:
            for member in (task, *ancestors):
                state = self.flow(member.task_id)
                if state is not None:
                    states[member.task_id] = state
        return Snapshot(
            task=task,
            ancestors=tuple(ancestors),
            token_revoked=self.token_revoked(claims.token_id),
            proof_seen=self._store.proof_seen(proof_jti) if proof_jti is not None else False,
            flows=states,
            known_secrets=known,
            profile=profile,
            flow_policy=flow_policy,
            limits=limits or ScanLimits(),
        )

    def pending(
        self, task_id: str, tool: str, args_digest: str, now: float, limit: int
    ) -> PendingApprovals:
        """The task's approvals waiting for a human, and whether one is for this call."""
        rows = [
            r
            for r in self._store.list_approvals(status="pending")
            if r.task_id == task_id and r.expires_at > now
        ]
        same = any(r.tool == tool and r.args_digest == args_digest for r in rows)
        return PendingApprovals(count=len(rows), same_call=same, limit=limit)

    def grant(
        self, task_id: str, tool: str, args_digest: str, policy_digest: str, now: float
    ) -> Grant | None:
        """An approved, unexpired approval of exactly this call under this policy."""
        row = self._store.find_approval(
            task_id, tool, args_digest, "approved", unexpired_at=now, policy_digest=policy_digest
        )
        if row is None or not self._rows.authentic(APPROVAL, row.approval_id, approval_fields(row)):
            return None  # an approval written without the KEK approves nothing
        return Grant(approval_id=row.approval_id, decided_by=row.decided_by or "")
