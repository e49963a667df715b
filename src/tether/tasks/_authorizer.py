"""The in-process enforcement point: decide a call, apply it, leave a receipt.

:func:`tether.core.decide` is pure; this module supplies what it reads (task
state from the store, keys, the live policy snapshot, the clock) and applies
what an ``allow`` implies (the proof id is consumed, one call of budget is
spent) in the same transaction as the receipt. A denied call changes no task
state; it only leaves its receipt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from tether.approvals import Approvals
from tether.audit import Auditor
from tether.core._clock import Clock
from tether.core._decision import (
    DECIDE_HTM,
    DECIDE_HTU,
    Call,
    Decision,
    Effect,
    Reason,
    TaskState,
    decide,
)
from tether.core._flow import FlowInput
from tether.core._intent import Intent, decode_intent
from tether.core._risk import Control, risk_tags
from tether.core._verify import PROOF_WINDOW, ProofVerifier, TaskClaims, TokenVerifier
from tether.policy import PolicyService
from tether.secrets._detect import Known, find_credentials
from tether.store import IdentityRow, Store, TaskRow
from tether.tokens import KeyRing

if TYPE_CHECKING:
    from tether.cluster import NodeMemory

PURGE_EVERY = 1024


class Receipt(msgspec.Struct, frozen=True):
    """A decision and the audit record that holds it."""

    decision: Decision
    seq: int
    hash: str
    latency_us: float
    approval_id: str | None = None

    @property
    def effect(self) -> Effect:
        return self.decision.effect

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "effect": str(d.effect),
            "reasons": [{"code": r.code, "message": r.message} for r in d.reasons],
            "policies": list(d.policies),
            "risk_tags": list(d.risk_tags),
            "task_id": d.task_id,
            "receipt": {"seq": self.seq, "hash": self.hash},
            "approval_id": self.approval_id,
        }


class StoreTaskView:
    """:class:`tether.core.TaskView` over the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._intents: dict[str, Intent] = {}
        self._local = threading.local()  # ``last`` is per thread: decisions may run in several
        #: A node's memory (:mod:`tether.cluster`): identities and revocations known
        #: without a store round trip. ``None`` in a lone process.
        self.memory: NodeMemory | None = None

    @property
    def last(self) -> TaskState | None:
        """The task state this thread's last :meth:`task` read (reused by the spend step)."""
        state: TaskState | None = getattr(self._local, "last", None)
        return state

    @last.setter
    def last(self, state: TaskState | None) -> None:
        self._local.last = state

    def _identity(self, spiffe_id: str) -> IdentityRow | None:
        memory = self.memory
        if memory is None:
            return self._store.get_identity(spiffe_id)
        row = memory.identity(spiffe_id)
        if row is None:
            generation = memory.generation
            row = self._store.get_identity(spiffe_id)
            if row is not None:
                memory.put_identity(row, generation)
        return row

    def task(self, task_id: str) -> TaskState | None:
        row = self._store.get_task(task_id)
        if row is None:
            return None
        agent = self._identity(row.agent_id)
        intent = self._intents.get(row.intent_digest)
        if intent is None:
            intent = self._intents[row.intent_digest] = decode_intent(row.intent_json)
        state = self.last = TaskState(
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
        return state

    def token_revoked(self, token_id: str) -> bool:
        known = self.memory.revoked(token_id) if self.memory is not None else None
        return known if known is not None else self._store.token_revoked(token_id)

    def proof_seen(self, jti: str) -> bool:
        return self._store.proof_seen(jti)


#: Side effects through which an argument leaves the task's hands (None: undescribed).
OUTBOUND = frozenset({"egress", "write", "destructive", None})


class Authorizer:
    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        policies: PolicyService,
        auditor: Auditor,
        clock: Clock,
        approvals: Approvals,
        *,
        known_secrets: Callable[[], list[Known]] | None = None,
    ) -> None:
        #: The brokered credential values to look for in arguments (set by ``Tether``).
        self.known_secrets = known_secrets
        self._approvals = approvals
        self._store = store
        self._keyring = keyring
        self._policies = policies
        self._auditor = auditor
        self._clock = clock
        self._view = StoreTaskView(store)
        self._proofs = ProofVerifier()
        self._tokens: TokenVerifier | None = None
        self._keys_version: tuple[str, ...] = ()
        self._decisions = 0

    def attach_memory(self, memory: NodeMemory) -> None:
        """Serve the hot path from a node's memory (see :mod:`tether.cluster`)."""
        self._view.memory = memory
        self._policies.check_every_call = False

    def _token_verifier(self, now: float) -> TokenVerifier:
        keys = self._keyring.verification_keys(now)
        version = tuple(sorted(keys.keys))
        if self._tokens is None or version != self._keys_version:
            self._tokens, self._keys_version = TokenVerifier(keys), version
        return self._tokens

    def verify_token(self, token: str, *, now: float, check_times: bool = True) -> TaskClaims:
        """Verify a task token's signature, issuer, audience (and times); raise if bad."""
        return self._token_verifier(now).verify(token, now=now, check_times=check_times)

    def authorize(
        self,
        *,
        token: str | None,
        proof: str | None,
        tool: str,
        args: dict[str, Any],
        task_id: str | None = None,
        htm: str = DECIDE_HTM,
        htu: str = DECIDE_HTU,
        resource: str | None = None,
        detail: dict[str, Any] | None = None,
        side_effect: str | None = None,
        flow: FlowInput | None = None,
    ) -> Receipt:
        """Decide, apply and record one call; ``detail`` is added to the receipt.

        After the core's decision, the call's arguments are checked for credentials
        (:meth:`_hygiene`): ``side_effect`` is the tool's (``read``, ``write``, ``egress``,
        ``destructive``) when the enforcement point knows it; ``None`` is treated as the
        most restrictive."""
        started = time.perf_counter()
        now = self._clock.now()
        self._view.last = None
        snapshot_digest = ""
        try:
            snapshot = self._policies.snapshot()
            snapshot_digest = snapshot.digest
            decision = decide(
                token=token,
                proof=proof,
                call=Call(tool=tool, args=args),
                view=self._view,
                snapshot=snapshot,
                tokens=self._token_verifier(now),
                proofs=self._proofs,
                now=now,
                task_hint=task_id,
                htm=htm,
                htu=htu,
                resource=resource,
                flow=flow,
            )
        except Exception as exc:  # decide never raises; its inputs' loaders might
            decision = Decision(
                effect=Effect.DENY,
                reasons=(
                    Reason(
                        "internal.error",
                        f"decision inputs unavailable: {type(exc).__name__}: {exc}",
                    ),
                ),
                risk_tags=risk_tags(Control.PER_CALL_POLICY),
                tool=str(tool)[:256],
            )
        latency_us = (time.perf_counter() - started) * 1e6
        self._decisions += 1
        if self._decisions % PURGE_EVERY == 0:
            self._store.purge_proofs(now)
        if decision.effect is not Effect.DENY:
            decision = self._hygiene(decision, args, side_effect)
        approval_id = None
        with self._store.transaction():
            if decision.task_id is not None:
                # One task's calls one at a time, across nodes: its budget (and its
                # ancestors'), flow state and approvals are read and written under the row
                # locks of the task and its ancestors.
                self._store.lock_task(decision.task_id)
            if decision.effect is Effect.APPROVAL_REQUIRED:
                decision, approval_id = self._approval(decision, args, snapshot_digest)
            if decision.allowed:
                decision = self._apply(decision, now, approval_id)
            record = self._auditor.append(
                "decision",
                chain=list(decision.chain),
                task_id=decision.task_id,
                intent_digest=decision.intent_digest,
                tool=decision.tool,
                args_digest=decision.args_digest,
                effect=str(decision.effect),
                reasons=[{"code": r.code, "message": r.message} for r in decision.reasons],
                policies=list(decision.policies),
                risk_tags=list(decision.risk_tags),
                latency_us=round(latency_us, 1),
                token_digest=decision.token_digest,
                detail=detail,
            )
        return Receipt(
            decision=decision,
            seq=record.seq,
            hash=record.hash,
            latency_us=latency_us,
            approval_id=approval_id,
        )

    def _hygiene(
        self, decision: Decision, args: dict[str, Any], side_effect: str | None
    ) -> Decision:
        """Deny a call that would carry a credential out (OWASP ASI03; NHI2, NHI7).

        A brokered secret's value in the arguments is refused for every tool (an agent
        never holds one; if it does, it leaked); any other recognised credential (known
        formats, high entropy, a member named like one) is refused for a tool that writes,
        sends or destroys, or whose side effect is not described. Checked before an
        approval is requested, so such arguments are never stored for a human to read.
        """
        if self.known_secrets is None:
            return decision
        try:
            known = self.known_secrets()
            findings = find_credentials(args, known)
        except Exception as exc:  # fail closed
            return msgspec.structs.replace(
                decision,
                effect=Effect.DENY,
                reasons=(
                    Reason("secret.check_failed", f"credential check failed: {type(exc).__name__}"),
                ),
                risk_tags=risk_tags(Control.SECRET_BROKERING),
            )
        outbound = side_effect in OUTBOUND
        refused = [f for f in findings if f.secret is not None or outbound]
        if not refused:
            return decision
        what = "; ".join(f.describe() for f in refused[:3])
        if outbound:
            code = "secret.egress"
            message = (
                f"{what}: a credential must not reach a tool that is "
                f"{side_effect or 'not described (treated as egress)'}"
            )
        else:
            code = "secret.brokered"
            message = f"{what}: brokered secrets are injected by Tether, never passed by an agent"
        return msgspec.structs.replace(
            decision,
            effect=Effect.DENY,
            reasons=(Reason(code, message),),
            policies=(),
            risk_tags=risk_tags(Control.SECRET_BROKERING, Control.PER_CALL_POLICY),
        )

    def _approval(
        self, decision: Decision, args: dict[str, Any], policy_digest: str
    ) -> tuple[Decision, str]:
        """Let an approved identical call through once, or open a pending approval."""
        assert decision.task_id and decision.tool and decision.args_digest and decision.agent_id
        granted = self._approvals.granted(
            task_id=decision.task_id,
            tool=decision.tool,
            args_digest=decision.args_digest,
            policy_digest=policy_digest,
        )
        if granted is not None:
            allowed = msgspec.structs.replace(
                decision,
                effect=Effect.ALLOW,
                reasons=(
                    Reason(
                        "approval.granted",
                        f"approved by {granted.decided_by} ({granted.approval_id})",
                    ),
                ),
            )
            return allowed, granted.approval_id
        pending = self._approvals.request(
            task_id=decision.task_id,
            agent_id=decision.agent_id,
            tool=decision.tool,
            args_digest=decision.args_digest,
            args=args,
            policy_digest=policy_digest,
            reasons=[{"code": r.code, "message": r.message} for r in decision.reasons],
        )
        return decision, pending.approval_id

    def _spend(
        self, task_id: str, limit: int, token_id: str, parent_id: str | None, now: float
    ) -> str | None:
        """Spend one call of the task and of every ancestor, or say why not.

        Runs inside the receipt's transaction (serialised), so the checks and the
        increments see one state. The task's token must still be the one decided on
        (a renewal or an end in between refuses), and a delegated task's calls count
        against every ancestor's budget too: children cannot multiply a budget.
        """
        ancestors: list[TaskRow] = []
        while parent_id is not None and len(ancestors) < 16:
            parent = self._store.get_task(parent_id)
            if parent is None:
                break
            ancestors.append(parent)
            parent_id = parent.parent_task_id
        for parent in ancestors:
            parent_limit = decode_intent(parent.intent_json).budget.max_calls
            if parent.status != "open" or parent.calls_used >= parent_limit:
                return f"the budget of ancestor task {parent.task_id} is spent"
        if not self._store.spend_call(task_id, limit, token_id=token_id, now=now):
            return f"call budget of {limit} is spent"
        for parent in ancestors:
            self._store.spend_call(parent.task_id, 1 << 62)
        return None

    def _apply(self, decision: Decision, now: float, approval_id: str | None) -> Decision:
        """Consume the proof and spend budget; a lost race turns the allow into a deny."""
        assert decision.task_id is not None and decision.proof_jti is not None
        if approval_id is not None and not self._approvals.consume(approval_id):
            return msgspec.structs.replace(
                decision,
                effect=Effect.DENY,
                reasons=(Reason("approval.used", "the approval has been used already"),),
                risk_tags=risk_tags(Control.APPROVAL),
            )
        if not self._store.record_proof(decision.proof_jti, now + PROOF_WINDOW * 2):
            return msgspec.structs.replace(
                decision,
                effect=Effect.DENY,
                reasons=(Reason("proof.replayed", "proof has been used before"),),
                risk_tags=risk_tags(Control.SENDER_CONSTRAINED),
            )
        last = self._view.last
        # Reuse the state decide just read; another thread may have replaced it: reload.
        state = last if last and last.task_id == decision.task_id else None
        state = state or self._view.task(decision.task_id)
        limit = state.intent.budget.max_calls if state else 0
        refusal = self._spend(
            decision.task_id,
            limit,
            state.token_id if state else "",
            state.parent_task_id if state else None,
            now,
        )
        if refusal is not None:
            return msgspec.structs.replace(
                decision,
                effect=Effect.DENY,
                reasons=(Reason("budget.calls_exhausted", refusal),),
                risk_tags=risk_tags(Control.INTENT_BINDING, Control.DELEGATION),
            )
        if state is not None and state.intent.idle_seconds is not None:
            self._store.touch_task(decision.task_id, now)
        return decision
