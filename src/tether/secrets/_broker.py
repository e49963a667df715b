"""The broker: leases that put a credential into one allowed call, never into an agent.

A lease binds a credential to one task: its lifetime never exceeds the task's, it is
renewed only within it, and it is revoked in the same transaction that ends the task
(explicitly, by cascade from a parent, by TTL, by offboarding the agent or by the kill
switch). Kinds:

- ``static``: a stored secret's current version (API key, password, OAuth refresh
  token, legacy service-account key), unsealed for the enforcement point to inject;
- ``postgres_role``: a per-lease PostgreSQL login role made from a ``postgres`` secret's
  template (:mod:`tether.secrets._postgres`), handed over as a connection string;
- ``downstream_token``: a Tether-signed token for one call to one service
  (:mod:`tether.secrets._downstream`), at most 60 s long.

Crash safety for dynamic credentials: the lease row (``pending``, cleanup ``pending``)
is committed *before* the role is created, so anything that exists outside Tether is
always named by a row. Revocation commits first; the role is dropped right after the
commit; if that fails (or the process dies first) the reaper finds the row
(``revoked``/``expired`` with cleanup ``pending``) and drops the role, at start-up and
periodically. A row left ``pending`` by a crash during creation is revoked by the reaper
after a grace period and its role (if any) dropped.

Every grant, renewal, revocation and cleanup leaves a receipt naming the agent, the
task, the tool, the secret and its version. No value is ever logged or recorded.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tether._errors import InfrastructureError, Rejected
from tether.audit import Auditor
from tether.audit._rows import TASK, task_fields
from tether.core._clock import Clock
from tether.core._credentials import Known
from tether.core._risk import Control, risk_tags
from tether.secrets._downstream import MAX_DOWNSTREAM_TTL, mint_downstream_token
from tether.secrets._postgres import PostgresRoles, role_name, safe_error
from tether.secrets._value import SecretValue
from tether.secrets._vault import Vault
from tether.store import LeaseRow, Store, TaskRow
from tether.tokens import KeyRing

log = logging.getLogger("tether.secrets")

PENDING_GRACE = 60.0
LEASE_KINDS = ("static", "postgres_role", "downstream_token")


class LeaseRejected(Rejected):
    """No lease: the task is not live, the call was not allowed, the secret is not for
    this tool, or the lease has ended."""

    code = "lease.denied"


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease and the credential it carries (``value`` prints as hidden)."""

    lease_id: str
    task_id: str
    agent_id: str
    kind: str
    secret: str | None
    version: int | None
    tool: str | None
    expires_at: float
    value: SecretValue

    def render(self, template: str = "{value}") -> str:
        """``template`` with ``{value}`` replaced by the credential (for a header, say)."""
        return template.replace("{value}", self.value.reveal())

    def to_dict(self) -> dict[str, Any]:
        """The lease without its value."""
        return {
            "lease_id": self.lease_id,
            "task_id": self.task_id,
            "agent_id": self.agent_id,
            "kind": self.kind,
            "secret": self.secret,
            "version": self.version,
            "tool": self.tool,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class ReapReport:
    expired: tuple[str, ...]
    revoked: tuple[str, ...]
    cleaned: tuple[str, ...]
    failed: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "expired": list(self.expired),
            "revoked": list(self.revoked),
            "cleaned": list(self.cleaned),
            "failed": list(self.failed),
        }


def lease_dict(row: LeaseRow) -> dict[str, Any]:
    """A lease row for listings (it holds no value)."""
    return {
        "lease_id": row.lease_id,
        "task_id": row.task_id,
        "agent_id": row.agent_id,
        "kind": row.kind,
        "secret": row.secret_name,
        "version": row.secret_version,
        "tool": row.tool,
        "status": row.status,
        "cleanup": row.cleanup,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "revoke_reason": row.revoke_reason,
        "detail": json.loads(row.detail_json),
    }


class Broker:
    """Leases over the vault; see the module docstring."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        keyring: KeyRing,
        auditor: Auditor,
        clock: Clock,
        *,
        postgres: PostgresRoles | None = None,
    ) -> None:
        self._store = store
        self._vault = vault
        self._keyring = keyring
        self._auditor = auditor
        self._clock = clock
        self.postgres = postgres or PostgresRoles()
        self._dynamic: dict[str, tuple[float, Known]] = {}
        self._cleanup_lock = threading.Lock()

    # -- granting -------------------------------------------------------------------------
    def _live_task(self, task_id: str, now: float) -> TaskRow:
        task = self._store.get_task(task_id)
        if task is None:
            raise LeaseRejected(f"task {task_id[:80]} is not known", code="lease.task")
        if task.status != "open" or task.expires_at <= now:
            raise LeaseRejected(f"task {task_id} is {task.status}", code="lease.task")
        if not self._auditor.rows.authentic(TASK, task.task_id, task_fields(task)):
            raise LeaseRejected(f"task {task_id} fails its authentication", code="lease.task")
        agent = self._auditor.rows.identity(task.agent_id)
        if agent is None or agent.status != "active":
            raise LeaseRejected(f"agent {task.agent_id} is disabled", code="lease.agent")
        return task

    @staticmethod
    def _check_receipt(receipt: Any, task_id: str, tool: str | None) -> None:
        decision = getattr(receipt, "decision", None)
        if decision is None or not getattr(decision, "allowed", False):
            raise LeaseRejected("a lease needs the receipt of an allowed call", code="lease.call")
        if decision.task_id != task_id or (tool is not None and decision.tool != tool):
            raise LeaseRejected("the receipt is for another task or tool", code="lease.call")

    def _expiry(self, task: TaskRow, now: float, ttl: float | None) -> float:
        expires = task.expires_at
        if ttl is not None:
            if ttl <= 0:
                raise LeaseRejected("a lease lives longer than 0 s", code="lease.ttl")
            expires = min(expires, now + ttl)
        return expires

    def _grant_receipt(self, task: TaskRow, row: LeaseRow, **extra: Any) -> None:
        self._auditor.append(
            "lease.grant",
            chain=json.loads(task.chain_json),
            task_id=task.task_id,
            intent_digest=task.intent_digest,
            tool=row.tool,
            effect="allow",
            detail={
                "lease_id": row.lease_id,
                "kind": row.kind,
                "secret": row.secret_name,
                "version": row.secret_version,
                "expires_at": row.expires_at,
                **extra,
            },
            risk_tags=list(risk_tags(Control.SECRET_BROKERING, Control.TASK_TOKEN)),
        )

    def lease(
        self,
        task_id: str,
        secret: str,
        *,
        tool: str,
        receipt: Any,
        ttl: float | None = None,
    ) -> Lease:
        """A lease on ``secret`` for the allowed call ``receipt`` records (of ``tool``)."""
        self._check_receipt(receipt, task_id, tool)
        row = self._vault.row(secret)
        if not self._vault.tool_allowed(row, tool):
            raise LeaseRejected(f"secret {secret} is not for tool {tool[:128]}", code="lease.tool")
        if row.kind == "postgres":
            return self._postgres_lease(task_id, secret, tool, ttl)
        now = self._clock.now()
        version, value = self._vault.current(secret)
        lease_id = "lease_" + uuid.uuid4().hex
        with self._store.transaction():
            task = self._live_task(task_id, now)
            lease = LeaseRow(
                lease_id=lease_id,
                task_id=task_id,
                agent_id=task.agent_id,
                kind="static",
                secret_name=secret,
                secret_version=version.version,
                tool=tool,
                status="active",
                cleanup="none",
                created_at=now,
                expires_at=self._expiry(task, now, ttl),
            )
            self._store.add_lease(lease)
            self._grant_receipt(task, lease, secret_kind=row.kind)
        return Lease(
            lease_id=lease_id,
            task_id=task_id,
            agent_id=task.agent_id,
            kind="static",
            secret=secret,
            version=version.version,
            tool=tool,
            expires_at=lease.expires_at,
            value=value,
        )

    def _postgres_lease(self, task_id: str, secret: str, tool: str, ttl: float | None) -> Lease:
        template = self._vault.meta(self._vault.row(secret)).postgres
        assert template is not None
        now = self._clock.now()
        lease_id = "lease_" + uuid.uuid4().hex
        role = role_name(template, lease_id)
        version, admin = self._vault.current(secret)
        # 1. The intent, durably, before anything exists outside Tether.
        with self._store.transaction():
            task = self._live_task(task_id, now)
            row = LeaseRow(
                lease_id=lease_id,
                task_id=task_id,
                agent_id=task.agent_id,
                kind="postgres_role",
                secret_name=secret,
                secret_version=version.version,
                tool=tool,
                status="pending",
                cleanup="pending",
                created_at=now,
                expires_at=self._expiry(task, now, ttl),
                detail_json=json.dumps({"role": role}),
            )
            self._store.add_lease(row)
        # 2. The role.
        password = SecretValue(secrets.token_urlsafe(32))
        try:
            dsn = self.postgres.tool_dsn(admin, template, role, password)
            self.postgres.create(admin, template, role, password, row.expires_at)
        except Exception as exc:
            message = safe_error(exc, admin, password)
            with self._store.transaction():
                self._store.revoke_leases("creation failed", self._clock.now(), lease_id=lease_id)
                self._auditor.append(
                    "lease.grant",
                    chain=json.loads(task.chain_json),
                    task_id=task_id,
                    tool=tool,
                    effect="deny",
                    reasons=[{"code": "lease.create_failed", "message": message}],
                    detail={"lease_id": lease_id, "kind": "postgres_role", "secret": secret},
                    risk_tags=list(risk_tags(Control.SECRET_BROKERING)),
                )
                self._store.after_commit(self.cleanup)
            raise InfrastructureError(
                f"cannot create the database role of lease {lease_id}", code="lease.create_failed"
            ) from None
        # 3. Live, unless the task ended meanwhile (then the role goes at once).
        with self._store.transaction():
            live = True
            try:
                task = self._live_task(task_id, self._clock.now())
            except LeaseRejected:
                live = False
            if live and self._store.activate_lease(lease_id):
                self._grant_receipt(task, row, role=role)
            else:
                live = False
                self._store.revoke_leases("task ended", self._clock.now(), lease_id=lease_id)
                self._store.after_commit(self.cleanup)
        if not live:
            raise LeaseRejected(f"task {task_id} ended while its lease was made", code="lease.task")
        self._dynamic[lease_id] = (row.expires_at, Known(f"{secret} (lease)", password.reveal()))
        return Lease(
            lease_id=lease_id,
            task_id=task_id,
            agent_id=task.agent_id,
            kind="postgres_role",
            secret=secret,
            version=version.version,
            tool=tool,
            expires_at=row.expires_at,
            value=dsn,
        )

    def downstream_token(
        self,
        task_id: str,
        *,
        audience: str,
        tool: str,
        receipt: Any,
        tool_identity: str | None = None,
        ttl: float = MAX_DOWNSTREAM_TTL,
    ) -> Lease:
        """A Tether-signed token for one call of ``tool`` to the service ``audience``."""
        self._check_receipt(receipt, task_id, tool)
        now = self._clock.now()
        lease_id = "lease_" + uuid.uuid4().hex
        with self._store.transaction():
            task = self._live_task(task_id, now)
            ttl = min(ttl, MAX_DOWNSTREAM_TTL, task.expires_at - now)
            token, jti, expires_at = mint_downstream_token(
                self._keyring,
                audience=audience,
                agent_id=task.agent_id,
                task_id=task_id,
                tool=tool,
                tool_identity=tool_identity,
                actors=tuple(json.loads(task.chain_json))[1:],
                now=now,
                ttl=ttl,
            )
            row = LeaseRow(
                lease_id=lease_id,
                task_id=task_id,
                agent_id=task.agent_id,
                kind="downstream_token",
                secret_name=None,
                secret_version=None,
                tool=tool,
                status="active",
                cleanup="none",
                created_at=now,
                expires_at=min(expires_at, task.expires_at),
                detail_json=json.dumps(
                    {"audience": audience, "jti": jti, "tool_identity": tool_identity}
                ),
            )
            self._store.add_lease(row)
            self._grant_receipt(task, row, audience=audience, jti=jti)
        return Lease(
            lease_id=lease_id,
            task_id=task_id,
            agent_id=task.agent_id,
            kind="downstream_token",
            secret=None,
            version=None,
            tool=tool,
            expires_at=row.expires_at,
            value=SecretValue(token),
        )

    # -- checking, renewing, revoking ------------------------------------------------------------
    def get(self, lease_id: str) -> LeaseRow:
        row = self._store.get_lease(lease_id)
        if row is None:
            raise LeaseRejected(f"lease {lease_id[:80]} is not known", code="lease.unknown")
        return row

    def check(self, lease_id: str) -> LeaseRow:
        """The lease if it is active, unexpired and its task is live; else raise."""
        row = self.get(lease_id)
        now = self._clock.now()
        if row.status != "active":
            raise LeaseRejected(f"lease {lease_id} is {row.status}", code="lease.ended")
        if row.expires_at <= now:
            raise LeaseRejected(f"lease {lease_id} has expired", code="lease.expired")
        self._live_task(row.task_id, now)
        return row

    def renew(self, lease_id: str, ttl: float | None = None) -> LeaseRow:
        """Extend a live lease, never past its task's expiry (nor its version's overlap)."""
        row = self.check(lease_id)
        now = self._clock.now()
        task = self._live_task(row.task_id, now)
        expires = self._expiry(task, now, ttl)
        if row.kind == "downstream_token":
            raise LeaseRejected(
                "a downstream token is not renewed: mint another", code="lease.kind"
            )
        if row.kind == "static" and row.secret_name and row.secret_version is not None:
            version = self._vault.version_row(row.secret_name, row.secret_version)
            if version is not None and version.usable_until is not None:
                expires = min(expires, version.usable_until)
        if expires <= row.expires_at:
            return row
        if row.kind == "postgres_role" and row.secret_name:
            _, admin = self._vault.current(row.secret_name)
            self.postgres.extend(admin, json.loads(row.detail_json)["role"], expires)
        with self._store.transaction():
            if not self._store.renew_lease(lease_id, expires):
                raise LeaseRejected(f"lease {lease_id} ended", code="lease.ended")
            self._auditor.append(
                "lease.renew",
                chain=json.loads(task.chain_json),
                task_id=task.task_id,
                tool=row.tool,
                effect="allow",
                detail={"lease_id": lease_id, "expires_at": expires},
                risk_tags=list(risk_tags(Control.SECRET_BROKERING)),
            )
        return self.get(lease_id)

    def revoke_for_task(self, task_id: str, reason: str, *, status: str = "revoked") -> list[str]:
        """Close the task's live leases; call inside the transaction that ends the task.
        Dynamic credentials are destroyed right after that transaction commits."""
        closed = self._store.revoke_leases(
            reason,
            self._clock.now(),
            task_id=task_id,
            status="expired" if status == "expired" else "revoked",
        )
        if closed:
            self._store.after_commit(self.cleanup)
        return closed

    def revoke(self, lease_id: str, reason: str, *, by: str = "tether") -> bool:
        with self._store.transaction():
            row = self.get(lease_id)
            closed = self._store.revoke_leases(reason, self._clock.now(), lease_id=lease_id)
            if closed:
                self._auditor.append(
                    "lease.revoke",
                    chain=[by],
                    task_id=row.task_id,
                    effect="allow",
                    detail={"lease_id": lease_id, "reason": reason},
                    risk_tags=list(risk_tags(Control.SECRET_BROKERING, Control.KILL_SWITCH)),
                )
                self._store.after_commit(self.cleanup)
        return bool(closed)

    def revoke_all(self, reason: str, *, by: str = "tether") -> list[str]:
        """The kill switch for credentials: every live lease, at once."""
        with self._store.transaction():
            closed = self._store.revoke_leases(reason, self._clock.now())
            self._auditor.append(
                "lease.revoke_all",
                chain=[by],
                effect="allow",
                detail={"reason": reason, "leases": closed},
                risk_tags=list(risk_tags(Control.SECRET_BROKERING, Control.KILL_SWITCH)),
            )
            self._store.after_commit(self.cleanup)
        return closed

    # -- destroying dynamic credentials ------------------------------------------------------------
    def cleanup(self) -> tuple[list[str], list[str]]:
        """Destroy what closed leases left outside Tether; ``(cleaned, failed)``."""
        cleaned: list[str] = []
        failed: list[str] = []
        with self._cleanup_lock:
            for row in self._store.list_leases(cleanup="pending"):
                if row.status not in ("revoked", "expired"):
                    continue
                try:
                    existed = self._destroy(row)
                except Exception as exc:
                    failed.append(row.lease_id)
                    log.warning(
                        "lease %s: cleanup failed, the reaper will retry: %s",
                        row.lease_id,
                        safe_error(exc),
                    )
                    continue
                self._dynamic.pop(row.lease_id, None)
                with self._store.transaction():
                    if self._store.finish_lease_cleanup(row.lease_id):
                        cleaned.append(row.lease_id)
                        self._auditor.append(
                            "lease.cleanup",
                            chain=[row.agent_id],
                            task_id=row.task_id,
                            tool=row.tool,
                            effect="allow",
                            detail={
                                "lease_id": row.lease_id,
                                "kind": row.kind,
                                "secret": row.secret_name,
                                "status": row.status,
                                "reason": row.revoke_reason,
                                "existed": existed,
                                **json.loads(row.detail_json),
                            },
                            risk_tags=list(
                                risk_tags(Control.SECRET_BROKERING, Control.CASCADING_REVOCATION)
                            ),
                        )
        return cleaned, failed

    def _destroy(self, row: LeaseRow) -> bool:
        if row.kind != "postgres_role" or row.secret_name is None:
            return False
        role = json.loads(row.detail_json).get("role")
        if not isinstance(role, str):
            return False
        _, admin = self._vault.current(row.secret_name)
        return self.postgres.drop(admin, role)

    def reap(self) -> ReapReport:
        """Expire what outlived its TTL, revoke leases on versions past their overlap and
        leases a crash left half-made, then destroy what they left behind."""
        now = self._clock.now()
        revoked: list[str] = []
        with self._store.transaction():
            expired = self._store.expire_leases(now)
            for row in self._store.list_leases(status="pending"):
                if row.created_at < now - PENDING_GRACE:
                    revoked += self._store.revoke_leases(
                        "creation did not finish", now, lease_id=row.lease_id
                    )
            for row in self._store.list_leases(status="active"):
                if row.kind != "static" or row.secret_name is None or row.secret_version is None:
                    continue
                version = self._vault.version_row(row.secret_name, row.secret_version)
                usable_until = version.usable_until if version is not None else None
                if usable_until is not None and usable_until <= now:
                    revoked += self._store.revoke_leases(
                        "secret version retired", now, lease_id=row.lease_id
                    )
            if expired or revoked:
                self._auditor.append(
                    "lease.reap",
                    effect="allow",
                    detail={"expired": expired, "revoked": revoked},
                    risk_tags=list(risk_tags(Control.SECRET_BROKERING, Control.TASK_TOKEN)),
                )
        cleaned, failed = self.cleanup()
        return ReapReport(tuple(expired), tuple(revoked), tuple(cleaned), tuple(failed))

    def needs_reaping(self) -> bool:
        overdue, pending = self._store.lease_counts(self._clock.now())
        return bool(overdue or pending)

    # -- hygiene ------------------------------------------------------------------------------
    def known(self) -> list[Known]:
        """Every credential value this broker hands out and that is still usable."""
        now = self._clock.now()
        for lease_id, (expires, _) in list(self._dynamic.items()):
            if expires <= now:
                self._dynamic.pop(lease_id, None)
        dynamic: Iterable[Known] = (known for _, known in self._dynamic.values())
        return [*self._vault.usable_values(), *dynamic]

    def list(self, *, task_id: str | None = None, status: str | None = None) -> list[LeaseRow]:
        return self._store.list_leases(task_id=task_id, status=status)
