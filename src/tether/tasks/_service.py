"""Tasks: opening (admission + task token), ending, expiry and revocation."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from tether._errors import AdmissionRejected, IdentityRejected, InvalidIntent, NotFound, Rejected
from tether.audit import Auditor, RowTampered
from tether.audit._rows import TASK, initial_flow, task_fields
from tether.core._clock import Clock
from tether.core._decision import (
    admission_context,
    call_context,
    call_entities,
    cedar_value,
    principal_entities,
)
from tether.core._delegation import DelegationRejected, check_narrowing
from tether.core._flow import FlowState, empty_flow_context
from tether.core._intent import (
    Capability,
    Intent,
    decode_verified_intent,
    intent_digest,
    intent_to_builtins,
    is_pattern,
    validate_intent,
)
from tether.core._risk import Control, risk_tags
from tether.core._spiffe_id import parse_spiffe_id
from tether.core._verify import jwk_thumbprint
from tether.identity import IdentityRegistry
from tether.policy import PolicyService
from tether.store import Store, TaskRow
from tether.tasks._templates import parse_template, render
from tether.tokens import KeyRing, mint_task_token

ADHOC_TEMPLATE = "adhoc"
_GLOBS = frozenset("*?[")
DEFAULT_TASK_TTL = 600


class OpenedTask(msgspec.Struct, frozen=True):
    task_id: str
    token: str
    expires_at: float
    intent_digest: str
    #: When this token runs out (the task's end, or sooner with ``token_ttl_seconds``).
    token_expires_at: float = 0.0


class RenewalRejected(Rejected):
    code = "renewal.refused"


def token_expiry(intent: Intent, now: float, task_expires_at: float) -> float:
    """A task token's ``exp``: the task's end, or sooner with ``token_ttl_seconds``."""
    if intent.token_ttl_seconds is None:
        return task_expires_at
    return min(task_expires_at, now + intent.token_ttl_seconds)


def _probe_args(cap: Capability) -> dict[str, Any]:
    """Sample arguments a capability allows (for re-checking it against policy)."""
    args: dict[str, Any] = {}
    for name, c in cap.args.items():
        value: Any = (
            c.equals
            if c.equals is not None
            else c.one_of[0]
            if c.one_of
            else c.max
            if c.max is not None
            else c.min
            if c.min is not None
            else c.prefix
        )
        if value is not None:
            args[name] = value
    return args


class LeaseRevoker(Protocol):
    """What a task's end does to the credentials leased for it (the secret broker)."""

    def revoke_for_task(self, task_id: str, reason: str, *, status: str = ...) -> list[str]: ...


class TaskService:
    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        registry: IdentityRegistry,
        policies: PolicyService,
        auditor: Auditor,
        clock: Clock,
        *,
        leases: LeaseRevoker | None = None,
        known_tools: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        #: Revokes a task's leases in the transaction that ends it (set by ``Tether``).
        self.leases = leases
        #: The tool names the trust domain knows (its catalogue's), which a capability
        #: pattern is expanded over for the admission policy (set by ``Tether``).
        self.known_tools = known_tools
        self._store = store
        self._keyring = keyring
        self._registry = registry
        self._policies = policies
        self._auditor = auditor
        self._clock = clock

    def _deny(
        self,
        kind: str,
        chain: list[str],
        code: str,
        message: str,
        *controls: Control,
        **fields: Any,
    ) -> None:
        self._auditor.append(
            kind,
            chain=chain,
            effect="deny",
            reasons=[{"code": code, "message": message}],
            risk_tags=list(risk_tags(*controls, Control.AUDIT)),
            **fields,
        )

    def open(
        self,
        agent_id: str,
        *,
        proof_jwk: dict[str, Any] | None = None,
        jkt: str | None = None,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        intent: Intent | None = None,
        on_behalf_of: str | None = None,
        parent: TaskRow | None = None,
        resources: tuple[str, ...] = (),
        request: str | None = None,
    ) -> OpenedTask:
        """Open a task for ``agent_id``; its token is bound to ``proof_jwk`` (or ``jkt``).

        With ``parent`` the task is a delegation: its intent must be within the
        parent's (see :func:`tether.core.check_narrowing`) and the parent's
        identity chain becomes its ``act`` chain.
        """
        now = self._clock.now()
        if (proof_jwk is None) == (jkt is None):
            raise AdmissionRejected(
                "give exactly one of proof_jwk or jkt", code="admission.request"
            )
        try:
            parsed = parse_spiffe_id(agent_id)
            if parsed.trust_domain != self._keyring.trust_domain:
                raise IdentityRejected(
                    f"{agent_id} is not in trust domain {self._keyring.trust_domain}",
                    code="identity.trust_domain",
                )
            agent = self._registry.get(str(parsed))
            if agent.kind != "agent":
                raise IdentityRejected(
                    f"{agent_id} is a {agent.kind}, not an agent", code="identity.kind"
                )
            if agent.status != "active":
                raise IdentityRejected(f"agent {agent_id} is disabled", code="identity.disabled")
        except (IdentityRejected, NotFound) as exc:
            self._deny(
                "task.open", [agent_id[:256]], exc.code, exc.message, Control.WORKLOAD_IDENTITY
            )
            raise
        if (template is None) == (intent is None):
            raise AdmissionRejected(
                "give either a template or an explicit intent", code="admission.request"
            )
        if template is not None:
            try:
                body = self._auditor.rows.template(template)
            except RowTampered as exc:
                self._deny(
                    "task.open", [agent.spiffe_id], exc.code, exc.message, Control.INTENT_BINDING
                )
                raise
            if body is None:
                self._deny(
                    "task.open",
                    [agent.spiffe_id],
                    "template.unknown",
                    f"template {template!r} is not defined",
                    Control.INTENT_BINDING,
                )
                raise NotFound(f"template {template!r} is not defined")
            try:
                intent = render(parse_template(json.loads(body)), params or {})
            except InvalidIntent as exc:
                self._deny(
                    "task.open", [agent.spiffe_id], exc.code, exc.message, Control.INTENT_BINDING
                )
                raise
        assert intent is not None
        name = template or ADHOC_TEMPLATE
        actors: tuple[str, ...] = ()
        if on_behalf_of is not None:
            intent = msgspec.structs.replace(intent, on_behalf_of=on_behalf_of)
        if request is not None:
            intent = msgspec.structs.replace(intent, request=request)
            validate_intent(intent)
        if parent is not None:
            intent, actors = self._narrow(agent.spiffe_id, parent, intent, now)
        digest = intent_digest(intent)
        if proof_jwk is not None:
            jkt = jwk_thumbprint(proof_jwk)
        assert jkt is not None

        # Admission policy: may this agent open this template / intent?
        outcome, patterns = self._admission(
            agent.spiffe_id, agent.owner, agent.kind, name, intent, delegated=parent is not None
        )
        if outcome.errors or not outcome.allowed or outcome.approval:
            message = (
                "admission policy error: " + "; ".join(outcome.errors)
                if outcome.errors
                else "approval required to open this task"
                if outcome.approval
                else f"no admission policy permits the capability patterns {patterns} "
                "(open_task_with_patterns)"
                if patterns
                else "no admission policy lets this agent open " + name
            )
            self._deny(
                "task.open",
                [agent.spiffe_id],
                "admission.denied",
                message,
                Control.INTENT_BINDING,
                Control.PER_CALL_POLICY,
                policies=list(outcome.policies),
                intent_digest=digest,
            )
            raise AdmissionRejected(message)

        task_id = "task_" + uuid.uuid4().hex
        expires_at = now + intent.ttl_seconds
        token_expires_at = token_expiry(intent, now, expires_at)
        token, token_id = mint_task_token(
            self._keyring,
            task_id=task_id,
            agent_id=agent.spiffe_id,
            template=name,
            intent=intent,
            intent_digest=digest,
            jkt=jkt,
            issued_at=now,
            expires_at=token_expires_at,
            actors=actors,
            resources=resources,
        )
        row = TaskRow(
            task_id=task_id,
            agent_id=agent.spiffe_id,
            parent_task_id=parent.task_id if parent else None,
            template=name,
            intent_json=msgspec.json.encode(intent_to_builtins(intent)).decode(),
            intent_digest=digest,
            jkt=jkt,
            token_id=token_id,
            status="open",
            calls_used=0,
            opened_at=now,
            expires_at=expires_at,
            chain_json=json.dumps([agent.spiffe_id, *actors]),
        )
        try:
            with self._store.transaction():
                # The agent is still active, and stays so until this task is in: an
                # offboarding on another node waits for it, then revokes it too.
                if self._store.lock_identity(agent.spiffe_id) != "active":
                    raise IdentityRejected(
                        f"agent {agent_id} is disabled", code="identity.disabled"
                    )
                self._store.add_task(row)
                self._auditor.rows.tag(TASK, row.task_id, task_fields(row))
                self._auditor.rows.put_flow(row.task_id, initial_flow(row.intent_json), now)
                if resources:
                    self._store.put_task_resources(task_id, json.dumps(list(resources)))
                self._auditor.append(
                    "task.open",
                    chain=[agent.spiffe_id, *actors],
                    task_id=task_id,
                    intent_digest=digest,
                    effect="allow",
                    policies=list(outcome.policies),
                    detail={
                        "template": name,
                        "token_id": token_id,
                        "expires_at": expires_at,
                        "token_expires_at": token_expires_at,
                        "jkt": jkt,
                        "purpose": intent.purpose,
                        "parent_task_id": parent.task_id if parent else None,
                        "on_behalf_of": intent.on_behalf_of,
                    },
                    risk_tags=list(
                        risk_tags(
                            Control.TASK_TOKEN, Control.INTENT_BINDING, Control.SENDER_CONSTRAINED
                        )
                    ),
                )
        except IdentityRejected as exc:
            self._deny(
                "task.open", [agent_id[:256]], exc.code, exc.message, Control.WORKLOAD_IDENTITY
            )
            raise
        return OpenedTask(
            task_id=task_id,
            token=token,
            expires_at=int(expires_at),
            intent_digest=digest,
            token_expires_at=int(token_expires_at),
        )

    def _admission(
        self, agent_id: str, owner: str, kind: str, name: str, intent: Intent, *, delegated: bool
    ) -> tuple[Any, list[str]]:
        """Evaluate the admission policy against the live snapshot: the outcome, and the
        capability patterns it refused (empty unless that is why it refuses).

        ``context.tools`` holds what the capabilities cover, not how they are written: a
        pattern is expanded over the known tool names (the catalogue's, and every name a
        policy writes), so ``shell.exe[c]``, ``shell.*`` and ``*`` all put ``shell.exec``
        there. Patterns the caller wrote (an explicit intent, a template parameter) also
        need ``open_task_with_patterns``: refused unless a policy permits them. Patterns
        an administrator wrote into a template, and those of a delegated task (proved
        within its admitted parent's), are the administrator's."""
        snapshot = self._policies.snapshot()
        known = set(snapshot.named_strings)
        if self.known_tools is not None:
            known.update(self.known_tools())
        principal, entities = principal_entities(agent_id, owner, kind)
        resource = {"type": "Template", "id": name}
        context = admission_context(intent, known)
        patterns: list[str] = context["patterns"]
        entities = [*entities, {"uid": resource, "attrs": {}, "parents": []}]
        outcome = snapshot.evaluate(principal, "open_task", resource, context, entities)
        if outcome.errors or not outcome.allowed or outcome.approval or delegated:
            return outcome, []
        authored = self._template_patterns(name)
        callers = [p for p in patterns if p not in authored]
        if not callers:
            return outcome, []
        widened = snapshot.evaluate(
            principal, "open_task_with_patterns", resource, context, entities
        )
        if widened.errors or not widened.allowed or widened.approval:
            return widened, callers
        return outcome, []

    def _template_patterns(self, name: str) -> frozenset[str]:
        """The capability patterns template ``name`` writes out itself (no parameter)."""
        body = self._auditor.rows.template(name) if name != ADHOC_TEMPLATE else None
        if body is None:
            return frozenset()
        caps = json.loads(body).get("intent", {}).get("capabilities", [])
        return frozenset(
            c["tool"]
            for c in caps
            if isinstance(c, dict)
            and isinstance(c.get("tool"), str)
            and is_pattern(c["tool"])
            and "{" not in c["tool"]
        )

    def renew(self, task_id: str) -> OpenedTask:
        """Mint a new token for an open task; the old one is revoked durably.

        Renewal re-checks what opening checked, against the *current* state: every
        identity in the chain is still active, every ancestor task is still open, the
        admission policy still admits the task, and every capability the task holds is
        still permitted by the current policy (a capability whose probe call, made with
        sample arguments its constraints allow, is denied with no evaluation error, is
        no longer permitted; glob capabilities are left to the per-call check). Either
        way a receipt is left.
        """
        now = self._clock.now()
        row = self.get(task_id)
        chain = list(json.loads(row.chain_json)) or [row.agent_id]
        intent = self.intent_of(row)
        snapshot = self._policies.snapshot()
        try:
            self._renewable(row, chain, intent, now)
        except Rejected as exc:
            self._deny(
                "task.renew",
                chain,
                exc.code,
                exc.message,
                Control.TASK_TOKEN,
                Control.PER_CALL_POLICY,
                task_id=task_id,
                intent_digest=row.intent_digest,
                policy_digest=snapshot.digest,
            )
            raise
        raw = self._store.get_task_resources(task_id)
        resources = tuple(json.loads(raw)) if raw else ()
        expires_at = token_expiry(intent, now, row.expires_at)
        token, token_id = mint_task_token(
            self._keyring,
            task_id=task_id,
            agent_id=row.agent_id,
            template=row.template,
            intent=intent,
            intent_digest=row.intent_digest,
            jkt=row.jkt,
            issued_at=now,
            expires_at=expires_at,
            actors=tuple(chain[1:]),
            resources=resources,
        )
        with self._store.transaction():
            if not self._store.set_task_token(task_id, token_id):
                raise RenewalRejected(f"task {task_id} is no longer open", code="task.ended")
            self._store.revoke_token(row.token_id, task_id, "renewed", now)
            self._auditor.append(
                "task.renew",
                chain=chain,
                task_id=task_id,
                intent_digest=row.intent_digest,
                effect="allow",
                detail={
                    "token_id": token_id,
                    "previous_token_id": row.token_id,
                    "token_expires_at": expires_at,
                    "policy_digest": snapshot.digest,
                },
                risk_tags=list(
                    risk_tags(Control.TASK_TOKEN, Control.INTENT_BINDING, Control.PER_CALL_POLICY)
                ),
            )
        return OpenedTask(
            task_id=task_id,
            token=token,
            expires_at=int(row.expires_at),
            intent_digest=row.intent_digest,
            token_expires_at=int(expires_at),
        )

    def _renewable(self, row: TaskRow, chain: list[str], intent: Intent, now: float) -> None:
        if row.status != "open":
            raise RenewalRejected(f"task {row.task_id} is {row.status}", code=f"task.{row.status}")
        if now >= row.expires_at:
            raise RenewalRejected(f"task {row.task_id} has expired", code="task.expired")
        if intent.idle_seconds is not None:
            last = self._store.task_last_activity(row.task_id)
            if now - max(last or 0.0, row.opened_at) >= intent.idle_seconds:
                raise RenewalRejected(f"task {row.task_id} is idle", code="task.idle")
        for spiffe_id in chain:
            identity = self._registry.lookup(spiffe_id)
            if identity is None or identity.status != "active":
                raise RenewalRejected(f"{spiffe_id} is disabled", code="identity.disabled")
        parent_id = row.parent_task_id
        while parent_id is not None:
            parent = self.get(parent_id)
            if parent.status != "open" or parent.expires_at <= now:
                raise RenewalRejected(
                    f"ancestor task {parent_id} is {parent.status}", code="delegation.parent"
                )
            parent_id = parent.parent_task_id
        agent = self._registry.lookup(row.agent_id)
        assert agent is not None
        outcome, _patterns = self._admission(
            agent.spiffe_id,
            agent.owner,
            agent.kind,
            row.template,
            intent,
            delegated=row.parent_task_id is not None,
        )
        if outcome.errors or not outcome.allowed or outcome.approval:
            raise RenewalRejected(
                "the admission policy no longer admits this task", code="admission.denied"
            )
        snapshot = self._policies.snapshot()
        for cap in intent.capabilities:
            if _GLOBS & set(cap.tool):
                continue
            args = {k: cedar_value(v) for k, v in _probe_args(cap).items()}
            context = call_context(
                task_id=row.task_id,
                template=row.template,
                intent=intent,
                calls_used=row.calls_used,
                chain=chain,
                args=args,
                flow=empty_flow_context(),
            )
            probe = snapshot.evaluate(
                {"type": "Agent", "id": agent.spiffe_id},
                "call_tool",
                {"type": "Tool", "id": cap.tool},
                context,
                call_entities(agent.spiffe_id, agent.owner, agent.kind, cap.tool),
            )
            if not probe.allowed and not probe.errors:
                raise RenewalRejected(
                    f"capability {cap.tool!r} is no longer permitted by policy"
                    + (f" (forbidden by {', '.join(probe.policies)})" if probe.policies else ""),
                    code="renewal.capability_revoked",
                )

    def tree(self, task_id: str) -> list[TaskRow]:
        """Every task of the delegation tree ``task_id`` belongs to, the root first."""
        row = self.get(task_id)
        while row.parent_task_id is not None:
            parent = self._store.get_task(row.parent_task_id)
            if parent is None:
                break
            row = parent
        rows, queue = [], [row]
        while queue:
            current = queue.pop(0)
            rows.append(current)
            queue.extend(self._store.list_tasks(parent_task_id=current.task_id))
        return rows

    def _narrow(
        self, agent_id: str, parent: TaskRow, intent: Intent, now: float
    ) -> tuple[Intent, tuple[str, ...]]:
        """Check a delegated intent against its parent's; return it and the actor chain."""
        self._auditor.rows.require(TASK, parent.task_id, task_fields(parent))
        parent_chain = tuple(json.loads(parent.chain_json))
        try:
            if parent.status != "open" or parent.expires_at <= now:
                raise DelegationRejected(
                    f"parent task {parent.task_id} is {parent.status}", code="delegation.parent"
                )
            parent_intent = self.intent_of(parent)
            if intent.on_behalf_of is None and parent_intent.on_behalf_of is not None:
                intent = msgspec.structs.replace(intent, on_behalf_of=parent_intent.on_behalf_of)
            used = self._flow_used(parent.task_id)
            check_narrowing(
                parent_intent,
                intent,
                parent_calls_left=parent_intent.budget.max_calls - parent.calls_used,
                parent_seconds_left=parent.expires_at - now,
                depth=len(parent_chain),
                parent_spent=used.spend,
                parent_tools_used=len(used.tools),
            )
        except DelegationRejected as exc:
            self._deny(
                "task.delegate",
                [agent_id, *parent_chain],
                exc.code,
                exc.message,
                Control.DELEGATION,
                task_id=parent.task_id,
            )
            raise
        return intent, parent_chain

    def _flow_used(self, task_id: str) -> FlowState:
        """What a task (and its subtree) has spent and which tools it used; unreadable
        state refuses the delegation (fail closed)."""
        try:
            raw = self._auditor.rows.flow(task_id)
        except RowTampered:
            raise DelegationRejected(
                f"the flow state of task {task_id} fails its authentication",
                code="delegation.parent",
            ) from None
        try:
            return msgspec.json.decode(raw, type=FlowState)
        except msgspec.DecodeError:
            raise DelegationRejected(
                f"the flow state of task {task_id} cannot be read", code="delegation.parent"
            ) from None

    def _stored(self, task_id: str) -> TaskRow:
        row = self._store.get_task(task_id)
        if row is None:
            raise NotFound(f"task {task_id} is not known")
        return row

    def get(self, task_id: str) -> TaskRow:
        """The task, its row authenticated (:class:`tether.audit.RowTampered` when a store
        writer added it, re-pointed its agent or parent, or re-opened it)."""
        row = self._stored(task_id)
        self._auditor.rows.require(TASK, row.task_id, task_fields(row))
        return row

    def intent_of(self, row: TaskRow) -> Intent:
        """The task's intent, checked against the digest its tokens carry."""
        return decode_verified_intent(row.intent_json, row.intent_digest, row.task_id)

    def end(self, task_id: str, *, reason: str = "ended", status: str = "ended") -> TaskRow:
        """End (or revoke) one task and revoke its token, durably, with a receipt. A task
        whose row fails its authentication is ended all the same (and stays untagged)."""
        row = self._stored(task_id)
        authentic = self._auditor.rows.authentic(TASK, row.task_id, task_fields(row))
        now = self._clock.now()
        with self._store.transaction():
            closed = self._store.close_task(task_id, status, reason, now)
            if closed and authentic:
                ended = self._stored(task_id)
                self._auditor.rows.tag(TASK, task_id, task_fields(ended))
            self._store.revoke_token(row.token_id, task_id, reason, now)
            leases = (
                self.leases.revoke_for_task(task_id, reason, status=status)
                if self.leases is not None
                else []
            )
            for child in self._store.list_tasks(parent_task_id=task_id, status="open"):
                self.end(child.task_id, reason=f"parent task {task_id} {status}", status="revoked")
            if closed:
                controls: tuple[Control, ...] = (Control.TASK_TOKEN, Control.CASCADING_REVOCATION)
                if status == "revoked":
                    controls += (Control.OFFBOARDING,)
                self._auditor.append(
                    f"task.{'end' if status == 'ended' else status}",
                    chain=[row.agent_id],
                    task_id=task_id,
                    intent_digest=row.intent_digest,
                    effect="allow",
                    detail={
                        "reason": reason,
                        "token_id": row.token_id,
                        "calls_used": row.calls_used,
                        **({"leases_revoked": leases} if leases else {}),
                    },
                    risk_tags=list(
                        risk_tags(*controls, *((Control.SECRET_BROKERING,) if leases else ()))
                    ),
                )
        return self._stored(task_id)

    def revoke_for_agent(self, agent_id: str, reason: str) -> list[str]:
        revoked = []
        for row in self._store.list_tasks(agent_id=agent_id, status="open"):
            self.end(row.task_id, reason=reason, status="revoked")
            revoked.append(row.task_id)
        return revoked

    def expire(self) -> list[str]:
        """Mark open tasks past their lifetime expired and revoke their tokens."""
        now = self._clock.now()
        expired = []
        for row in self._store.list_tasks(status="open"):
            if row.expires_at <= now:
                self.end(row.task_id, reason="ttl elapsed", status="expired")
                expired.append(row.task_id)
            elif '"idle_seconds"' in row.intent_json:
                idle = self.intent_of(row).idle_seconds
                last = self._store.task_last_activity(row.task_id)
                if idle is not None and now - max(last or 0.0, row.opened_at) >= idle:
                    self.end(row.task_id, reason=f"idle for {idle}s", status="expired")
                    expired.append(row.task_id)
        return expired
