"""The one enforcement pipeline: every door decides, and observes results, through here.

The HTTP API (``POST /v1/decisions``, ``POST /v1/tasks/{id}/results``), the
in-process SDK path (:meth:`tether.Tether.authorize`) and the MCP gateway all
call :class:`Enforcement`; none of them checks a token, a task or a budget on
its own. One shape for every call::

    verify token + proof (pure, once)           core.verify
    └─ one transaction: lock the task and its ancestors
         snapshot = load(...)                   SnapshotLoader (node memory: a cache)
         decision, plan = core.decide(...)      pure
         apply(plan)                            proof, spend per ancestor, flow, approval
         append(receipt)
    └─ commit

A result comes back the same way (:meth:`Enforcement.observe`): verified,
then, under the same locks, its labels and values join the flow state of the
task and of every ancestor, with a receipt. Any error on the way is a deny
with a reason and a receipt; a refused call changes no task state (a door may
burn a refused call's proof).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from tether._errors import Rejected, TetherError
from tether.approvals import Approvals
from tether.audit import Auditor
from tether.core._clock import Clock
from tether.core._credentials import Known
from tether.core._decision import (
    DECIDE_HTM,
    DECIDE_HTU,
    Call,
    Decision,
    Effect,
    Plan,
    Reason,
    Refused,
    TaskState,
    Verified,
    check_call,
    check_live,
    decide,
    identify,
    observe,
    refusal,
    verify,
)
from tether.core._flow import (
    OVERSIZED,
    FlowPolicy,
    ResultReading,
    ToolProfile,
    observe_content,
    read_result,
    start,
)
from tether.core._labels import Label
from tether.core._risk import Control, risk_tags
from tether.core._scanning import Deadline, ScanExceeded, ScanLimits
from tether.core._verify import (
    PROOF_WINDOW,
    ProofVerifier,
    TaskClaims,
    TokenVerifier,
    call_digest,
)
from tether.enforcement._snapshot import SnapshotLoader
from tether.flow._catalogue import ToolCatalogue
from tether.observability import traced_decision
from tether.policy import PolicyService
from tether.store import Store
from tether.tokens import KeyRing

if TYPE_CHECKING:
    from tether.cluster import NodeMemory

PURGE_EVERY = 1024
#: How long "this decision's result was observed" is remembered (longer than any task).
RESULT_MEMORY = 7 * 24 * 3600.0


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


class Observation(msgspec.Struct, frozen=True):
    """A result observed: the labels it gave the task tree and the receipt that holds it."""

    task_id: str
    tool: str
    sensitivity: str
    untrusted: bool
    seq: int
    hash: str
    #: The result was too large, or took too long, to scan: the task tree is labelled
    #: as having read untrusted content whose values are unknown.
    oversized: bool = False


def read_untrusted(result: Any, profile: ToolProfile, limits: ScanLimits) -> ResultReading:
    """Scan a result within ``limits``: its values by trust, or :data:`OVERSIZED` when it
    is larger than ``max_result_bytes``, not JSON, or takes longer than ``scan_seconds``
    (never an error: what cannot be scanned counts as untrusted, never as unseen). Pure
    CPU work with no lock held: a door runs it in a worker thread."""
    try:
        size = len(msgspec.json.encode(result))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return OVERSIZED
    if size > limits.max_result_bytes:
        return OVERSIZED
    try:
        return read_result(result, profile, deadline=Deadline(limits.scan_seconds, time.monotonic))
    except ScanExceeded:
        return OVERSIZED


class ObservationRefused(Rejected):
    """A result could not be observed (its receipt, when there is one, says why)."""

    code = "result.refused"

    def __init__(self, code: str, message: str, seq: int | None = None) -> None:
        super().__init__(message, code=code)
        self.seq = seq


class _LostRace(Exception):
    def __init__(self, reason: Reason, *controls: Control) -> None:
        super().__init__(reason.message)
        self.reason, self.controls = reason, controls


class Enforcement:
    """Verify, lock, load, decide, apply, record: for decisions and for results."""

    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        policies: PolicyService,
        auditor: Auditor,
        clock: Clock,
        approvals: Approvals,
        catalogue: ToolCatalogue,
        *,
        known_secrets: Callable[[], list[Known]] | None = None,
    ) -> None:
        self.known_secrets = known_secrets
        self.catalogue = catalogue
        #: The flow rules in force at doors that do not configure their own.
        self.flow_policy = FlowPolicy()
        #: How much untrusted data one call or result may make this node scan.
        self.limits = ScanLimits()
        self._store = store
        self._keyring = keyring
        self._policies = policies
        self._auditor = auditor
        self._clock = clock
        self._approvals = approvals
        self.loader = SnapshotLoader(store, auditor.rows)
        self._proofs = ProofVerifier()
        self._tokens: TokenVerifier | None = None
        self._keys_version: tuple[str, ...] = ()
        self._decisions = 0

    def attach_memory(self, memory: NodeMemory) -> None:
        """Serve the hot path from a node's memory (see :mod:`tether.cluster`)."""
        self.loader.memory = memory
        self._policies.check_every_call = False

    # -- verification ---------------------------------------------------------------------
    def _token_verifier(self, now: float) -> TokenVerifier:
        keys = self._keyring.verification_keys(now)
        version = tuple(sorted(keys.keys))
        if self._tokens is None or version != self._keys_version:
            self._tokens, self._keys_version = TokenVerifier(keys), version
        return self._tokens

    def verify(
        self,
        *,
        token: str | None,
        proof: str | None,
        binding: str | None,
        htm: str = DECIDE_HTM,
        htu: str = DECIDE_HTU,
        resource: str | None = None,
        task_hint: str | None = None,
    ) -> Verified:
        """Verify a token and its proof once (raises :class:`~tether.core.Refused` or a
        :class:`~tether.TetherError`)."""
        now = self._clock.now()
        return verify(
            token=token,
            proof=proof,
            binding=binding,
            tokens=self._token_verifier(now),
            proofs=self._proofs,
            now=now,
            htm=htm,
            htu=htu,
            resource=resource,
            task_hint=task_hint,
        )

    def verify_token(self, token: str, *, now: float, check_times: bool = True) -> TaskClaims:
        """Verify a task token's signature, issuer, audience (and times); raise if bad.
        For introspection and revocation, which take a token without a proof."""
        return self._token_verifier(now).verify(token, now=now, check_times=check_times)

    def authenticate(self, verified: Verified, *, consume_proof: bool) -> TaskState:
        """The task of a verified request that is not a call, if its token is live; its
        proof is consumed when ``consume_proof`` (raises :class:`~tether.core.Refused`)."""
        now = self._clock.now()
        claims = verified.claims
        snapshot = self.loader.load(
            claims,
            proof_jti=None,
            profile=ToolProfile(),
            flow_policy=self.flow_policy,
            flows=False,
        )
        state = check_live(claims, snapshot, now)
        if consume_proof:
            self.consume(verified)
        return state

    def consume(self, verified: Verified) -> None:
        """Consume a verified proof, or raise :class:`~tether.core.Refused` if it was
        used before (one proof, one request)."""
        if not self._store.record_proof(verified.proof_jti, self._clock.now() + PROOF_WINDOW * 2):
            raise Refused(
                "proof.replayed",
                "proof has been used before",
                Control.SENDER_CONSTRAINED,
                claims=verified.claims,
            )

    def burn(self, verified: Verified) -> None:
        """Consume the proof of a call that was not allowed: one proof, one call."""
        self._store.record_proof(verified.proof_jti, self._clock.now() + PROOF_WINDOW * 2)

    # -- decisions ------------------------------------------------------------------------
    @traced_decision
    def decide(
        self,
        *,
        tool: str,
        args: dict[str, Any],
        token: str | None = None,
        proof: str | None = None,
        verified: Verified | None = None,
        task_id: str | None = None,
        htm: str = DECIDE_HTM,
        htu: str = DECIDE_HTU,
        resource: str | None = None,
        detail: dict[str, Any] | None = None,
        profile: ToolProfile | None = None,
        flow_policy: FlowPolicy | None = None,
        limits: ScanLimits | None = None,
    ) -> Receipt:
        """Decide, apply and record one call; ``detail`` is added to the receipt.

        ``profile`` is the tool's catalogue entry when the door knows it (the gateway's
        upstream catalogue); otherwise the trust domain's catalogue is asked.
        ``verified`` is a token and proof the door has verified already (the gateway
        authenticates every request before MCP sees it): they are not verified again.
        """
        started = time.perf_counter()
        now = self._clock.now()
        call = Call(tool=tool, args=args)
        limits = limits or self.limits
        try:
            check_call(call, limits.max_argument_bytes)
            if verified is None:
                verified = self.verify(
                    token=token,
                    proof=proof,
                    binding=call_digest(tool, args),
                    htm=htm,
                    htu=htu,
                    resource=resource,
                    task_hint=task_id,
                )
            elif task_id is not None and task_id != verified.claims.task_id:
                raise Refused(
                    "token.task_mismatch",
                    f"token belongs to task {verified.claims.task_id}, not {task_id}",
                    Control.TASK_TOKEN,
                )
        except Exception as exc:
            context = identify(None, call)
            claims = getattr(exc, "claims", None)
            if claims is not None:
                context.update(
                    task_id=claims.task_id,
                    agent_id=claims.subject,
                    chain=claims.chain,
                    intent_digest=claims.intent_digest,
                    token_digest=claims.token_digest,
                )
            decision = refusal(exc, context)
            record = self._store.grouped(lambda: self._append(decision, started, detail))
            return Receipt(decision, record.seq, record.hash, self._latency(started))
        self._decisions += 1
        if self._decisions % PURGE_EVERY == 0:
            self._store.purge_proofs(now)
        checked = verified

        def work() -> tuple[Decision, str | None, Any]:
            # One task's calls one at a time, across nodes: the budgets, flow states and
            # approvals of the tree are read and written under these row locks.
            self._store.lock_task(checked.claims.task_id)
            decision, approval_id = self._decide_locked(
                checked, call, now, profile, flow_policy, limits
            )
            return decision, approval_id, self._append(decision, started, detail)

        try:
            # In the node's commit group: answered once the commit holding it is durable.
            decision, approval_id, record = self._store.grouped(work)
        except Exception as exc:  # the store failed mid-way: nothing applied, still a receipt
            code = exc.code if isinstance(exc, TetherError) else "internal.error"
            decision = Decision(
                effect=Effect.DENY,
                reasons=(Reason(code, f"the decision could not be applied: {type(exc).__name__}"),),
                risk_tags=risk_tags(Control.PER_CALL_POLICY),
                **identify(verified, call),
            )
            failed = decision
            record = self._store.grouped(lambda: self._append(failed, started, detail))
            approval_id = None
        return Receipt(decision, record.seq, record.hash, self._latency(started), approval_id)

    def _decide_locked(
        self,
        verified: Verified,
        call: Call,
        now: float,
        profile: ToolProfile | None,
        flow_policy: FlowPolicy | None,
        limits: ScanLimits,
    ) -> tuple[Decision, str | None]:
        try:
            policy = self._policies.snapshot()
            shadow = self._policies.shadow()
            known = tuple(self.known_secrets()) if self.known_secrets is not None else ()
            snapshot = self.loader.load(
                verified.claims,
                proof_jti=verified.proof_jti,
                profile=profile if profile is not None else self.catalogue.profile(call.tool),
                flow_policy=flow_policy or self.flow_policy,
                known=known,
                limits=limits,
            )
        except Exception as exc:
            code = getattr(exc, "code", "internal.error")
            message = getattr(exc, "message", None) or type(exc).__name__
            decision = Decision(
                effect=Effect.DENY,
                reasons=(Reason(str(code), f"decision inputs unavailable: {message}"),),
                risk_tags=risk_tags(Control.PER_CALL_POLICY),
                **identify(verified, call),
            )
            return decision, None
        decision, plan = decide(verified, snapshot, call, policy, now, shadow)
        if plan.request_approval and decision.args_digest is not None:
            # Only a call that needs a human reads the approvals: a grant for exactly this
            # call, else the task's pending ones (their limit; the identical call's joins).
            task_id = verified.claims.task_id
            grant = self.loader.grant(task_id, call.tool, decision.args_digest, policy.digest, now)
            pending = self.loader.pending(
                task_id, call.tool, decision.args_digest, now, self._approvals.max_pending
            )
            snapshot = dataclasses.replace(snapshot, grant=grant, pending=pending)
            decision, plan = decide(verified, snapshot, call, policy, now, shadow)
        try:
            approval_id = self._apply(decision, plan, call, policy.digest, now, snapshot.task)
        except _LostRace as lost:
            return (
                msgspec.structs.replace(
                    decision,
                    effect=Effect.DENY,
                    reasons=(lost.reason,),
                    risk_tags=risk_tags(*lost.controls),
                ),
                None,
            )
        return decision, approval_id

    def _apply(
        self,
        decision: Decision,
        plan: Plan,
        call: Call,
        policy_digest: str,
        now: float,
        task: TaskState | None = None,
    ) -> str | None:
        """Carry out a plan inside the decision's transaction; the approval id, if any.
        ``task``: the task as this transaction read it (its row checked, under its lock)."""
        store = self._store
        if plan.request_approval:
            assert decision.task_id and decision.agent_id and decision.args_digest
            pending = self._approvals.request(
                task_id=decision.task_id,
                agent_id=decision.agent_id,
                tool=call.tool,
                args_digest=decision.args_digest,
                args=call.args,
                policy_digest=policy_digest,
                reasons=[{"code": r.code, "message": r.message} for r in decision.reasons],
            )
            return pending.approval_id
        if plan.record_proof is not None and not store.record_proof(
            plan.record_proof, now + PROOF_WINDOW * 2
        ):
            raise _LostRace(
                Reason("proof.replayed", "proof has been used before"), Control.SENDER_CONSTRAINED
            )
        if plan.use_approval is not None and not self._approvals.consume(plan.use_approval):
            raise _LostRace(
                Reason("approval.used", "the approval has been used already"), Control.APPROVAL
            )
        if plan.spend:
            # The locks make the snapshot current; spend_call re-checks anyway (the task's
            # token and life) so a store that lost a lock cannot overspend.
            if task is not None and task.task_id == plan.spend[0]:
                limit, token_id = task.intent.budget.max_calls, task.token_id
            else:
                row = store.get_task(plan.spend[0])
                limit = self.loader.state(row).intent.budget.max_calls if row else 0
                token_id = row.token_id if row else ""
            if not store.spend_call(plan.spend[0], limit, token_id=token_id, now=now):
                raise _LostRace(
                    Reason("budget.calls_exhausted", f"call budget of {limit} is spent"),
                    Control.INTENT_BINDING,
                )
            for ancestor in plan.spend[1:]:
                store.spend_call(ancestor, 1 << 62)
        for task_id, state in plan.flows:
            self._auditor.rows.put_flow_state(task_id, state, now)
        if plan.touch is not None:
            store.touch_task(plan.touch, now)
        return plan.use_approval

    def _append(self, decision: Decision, started: float, detail: dict[str, Any] | None) -> Any:
        # In a commit group, appended after every decision of the group (see
        # Auditor.append_later); its position is known once the group has committed.
        return self._auditor.append_later(
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
            latency_us=round(self._latency(started), 1),
            token_digest=decision.token_digest,
            detail=detail
            if decision.shadow is None
            else {**(detail or {}), "shadow": msgspec.to_builtins(decision.shadow)},
        )

    @staticmethod
    def _latency(started: float) -> float:
        return (time.perf_counter() - started) * 1e6

    # -- results --------------------------------------------------------------------------
    def observe(
        self,
        verified: Verified,
        *,
        tool: str,
        result: Any,
        decision_seq: int,
        profile: ToolProfile | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
        label: dict[str, Any] | None = None,
        reading: ResultReading | None = None,
        limits: ScanLimits | None = None,
    ) -> Observation:
        """Observe what ``tool`` returned for the allowed decision ``decision_seq``.

        The result's labels and values join the flow state of the task and every
        ancestor, the task is labelled with what it read, and a ``result`` receipt is
        appended, in one transaction under the tree's locks. ``result`` ``None`` records
        an answer with nothing to observe (an upstream failure). Raises
        :class:`ObservationRefused` (with a receipt) when the result cannot be taken.

        The result is scanned before any lock is taken, within ``limits`` (the node's
        by default), unless the door hands over its ``reading`` (scanned already, as the
        gateway does off its event loop). A result too large or too slow to scan is
        observed all the same: as untrusted content, oversized, whose values are unknown.
        """
        claims = verified.claims
        profile = profile if profile is not None else self.catalogue.profile(tool)
        if reading is None and result is not None:
            reading = read_untrusted(result, profile, limits or self.limits)
        oversized = reading is not None and reading.oversized
        # The result's own label (per-result: upstream, catalogue field, classifier), else
        # the tool's default; its origin goes into the receipt.
        labelled = (
            reading.label
            if reading is not None and reading.label is not None
            else Label(profile.sensitivity)
        )
        sensitivity = str(labelled.sensitivity)
        now = self._clock.now()
        base = {
            "chain": list(claims.chain),
            "task_id": claims.task_id,
            "intent_digest": claims.intent_digest,
            "tool": tool[:256],
            "token_digest": claims.token_digest,
        }

        def work() -> Any:
            controls = [Control.AUDIT, Control.INFORMATION_FLOW]
            self._store.lock_task(claims.task_id)
            try:
                self._check_decision(decision_seq, claims.task_id, tool)
                # One result per allowed call: a second report could only add what the
                # agent chose to say (a trusted-looking value that grounds a sink).
                if not self._store.record_proof(f"result:{decision_seq}", now + RESULT_MEMORY):
                    raise Refused(
                        "result.duplicate",
                        f"the result of decision {decision_seq} has been observed already",
                        Control.AUDIT,
                    )
                snapshot = self.loader.load(
                    claims, proof_jti=None, profile=profile, flow_policy=self.flow_policy
                )
                state, plan = observe(verified, snapshot, tool, result, now, reading=reading)
            except Exception as exc:
                code = str(getattr(exc, "code", "internal.error"))
                message = getattr(exc, "message", None) or type(exc).__name__
                refused = self._auditor.append(
                    "result",
                    **base,
                    effect="deny",
                    reasons=[{"code": code, "message": message}],
                    risk_tags=list(risk_tags(Control.AUDIT)),
                    detail={**(detail or {}), "decision_receipt": decision_seq},
                )
                # Returned, not raised: raised here it would roll back the very receipt
                # that says why (the refusal commits with it).
                return ObservationRefused(code, message, refused.seq)
            if reading is not None:
                for task_id, flow in plan.flows:
                    self._auditor.rows.put_flow_state(task_id, flow, now)
            if outcome in ("ok", "error"):
                extra = {"oversized": True} if oversized else {}
                self._store.add_task_label(
                    claims.task_id,
                    tool,
                    sensitivity,
                    profile.trusted and not oversized,
                    msgspec.json.encode(
                        {
                            **(label or {}),
                            **extra,
                            "label": labelled.to_dict(),
                            "outcome": outcome,
                            "decision_receipt": decision_seq,
                        }
                    ).decode(),
                    now,
                )
            if label and label.get("redactions"):
                controls = [*controls, Control.SECRET_BROKERING]
            reasons = [{"code": f"result.{outcome}", "message": f"the tool answered: {outcome}"}]
            if oversized:
                bounds = limits or self.limits
                reasons.append(
                    {
                        "code": "result.oversized",
                        "message": "the result was larger than "
                        f"{bounds.max_result_bytes} bytes, or took longer than "
                        f"{bounds.scan_seconds:g} s, to scan: the task has read untrusted "
                        "content whose values are unknown",
                    }
                )
            record = self._auditor.append_later(
                "result",
                **base,
                effect="allow",
                reasons=reasons,
                risk_tags=list(risk_tags(*controls)),
                detail={
                    **(detail or {}),
                    "outcome": outcome,
                    "sensitivity": sensitivity,
                    "label": labelled.to_dict(),
                    "trusted": profile.trusted and not oversized,
                    "oversized": oversized,
                    "decision_receipt": decision_seq,
                    "agent": state.agent_id,
                },
            )
            return record

        # In the node's commit group: answered once the commit holding it is durable.
        record = self._store.grouped(work)
        if isinstance(record, ObservationRefused):
            raise record
        return Observation(
            task_id=claims.task_id,
            tool=tool,
            sensitivity=sensitivity,
            untrusted=not profile.trusted or oversized,
            seq=record.seq,
            hash=record.hash,
            oversized=oversized,
        )

    def _check_decision(self, seq: int, task_id: str, tool: str) -> None:
        """A result answers an allowed decision of this task and tool, or it is refused."""
        row = self._store.get_record(seq) if isinstance(seq, int) and seq > 0 else None
        body = msgspec.json.decode(row.body) if row is not None else None
        if (
            not isinstance(body, dict)
            or body.get("kind") != "decision"
            or body.get("task_id") != task_id
            or body.get("tool") != tool
            or body.get("effect") != "allow"
        ):
            raise Refused(
                "result.unknown_decision",
                f"receipt {seq} is not an allowed decision of {tool} in task {task_id}",
                Control.AUDIT,
            )

    def observe_content(self, verified: Verified, *, source: str, text: str) -> None:
        """Mark the task tree as having read ``text``, content nobody vouches for (a tool
        description no operator reviewed, shown to the agent): no receipt of its own."""
        claims = verified.claims
        now = self._clock.now()
        with self._store.transaction():
            self._store.lock_task(claims.task_id)
            snapshot = self.loader.load(
                claims, proof_jti=None, profile=ToolProfile(), flow_policy=self.flow_policy
            )
            state = check_live(claims, snapshot, now)
            for member in (state, *snapshot.ancestors):
                before = snapshot.flows.get(member.task_id) or start(member.intent.request or "")
                after = observe_content(before, source, text)
                if after != before:
                    self._auditor.rows.put_flow_state(member.task_id, after, now)
