"""The store interface: every service owns its rows through it.

Implementations: :class:`tether.store.SQLiteStore` (embedded, WAL) and
:class:`tether.store.PostgresStore` (shared by several nodes). Every
method is a single statement or runs inside :meth:`Store.transaction`, so a
decision, the budget it spends, the proof id it consumes and its receipt
commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

import msgspec

T = TypeVar("T")


class KeyRow(msgspec.Struct, frozen=True):
    kid: str
    use: str  # jwt-svid | x509-ca
    sealed: bytes
    public_jwk: str
    cert_pem: str | None
    created_at: float
    retired_at: float | None = None
    verify_until: float | None = None
    #: Revoked: verifies nothing from this moment on (``tether keys revoke --now``).
    revoked_at: float | None = None
    #: HMAC of the row's public half and metadata under a key derived from the KEK
    #: (:meth:`tether.tokens.KeyRing.authenticate`); a row without a valid one is ignored.
    mac: str | None = None


class IdentityRow(msgspec.Struct, frozen=True):
    spiffe_id: str
    kind: str
    owner: str
    description: str
    status: str
    created_at: float
    disabled_at: float | None = None


class CredentialRow(msgspec.Struct, frozen=True):
    """An admin credential: a hashed secret with a role (admin, owner, approver, auditor)."""

    credential_id: str
    secret_hash: str
    role: str
    owner: str
    created_at: float
    disabled_at: float | None = None
    #: When it stops working by itself (``None``: never; only credentials made before
    #: credentials expired have none).
    expires_at: float | None = None


class ConsoleSessionRow(msgspec.Struct, frozen=True):
    """A signed-in console session: its id only as a SHA-256 hash (hex), never raw."""

    session_hash: str
    credential_id: str
    role: str
    owner: str
    created_at: float
    seen_at: float  # the last activity written (at most once a minute)
    expires_at: float  # the absolute end: sign-in plus 8 hours
    flash: str = ""  # one line shown on the next page, then cleared


class ApprovalRow(msgspec.Struct, frozen=True):
    """A human approval bound to one exact call of one task."""

    approval_id: str
    task_id: str
    agent_id: str
    tool: str
    args_digest: str
    args_json: str
    policy_digest: str
    reasons_json: str
    status: str  # pending | approved | denied | used | expired
    created_at: float
    expires_at: float
    decided_by: str | None = None
    decided_at: float | None = None


class TaskRow(msgspec.Struct, frozen=True):
    task_id: str
    agent_id: str
    parent_task_id: str | None
    template: str
    intent_json: str
    intent_digest: str
    jkt: str
    token_id: str
    status: str
    calls_used: int
    opened_at: float
    expires_at: float
    ended_at: float | None = None
    end_reason: str | None = None
    chain_json: str = "[]"


class RecordRow(msgspec.Struct, frozen=True):
    seq: int
    prev_hash: str
    hash: str
    body: str
    created_at: float


class HeadRow(msgspec.Struct, frozen=True):
    """A signed tree head: the Merkle root of the first ``size`` receipts, signed (a JWS)
    at ``at``; ``prev`` is the size of the head before it; ``frontier`` (JSON list of hex
    hashes) lets the next head extend the tree without reading every receipt."""

    size: int
    root: str
    at: float
    prev: int
    kid: str
    signature: str
    frontier: str
    created_at: float


class CheckpointRow(msgspec.Struct, frozen=True):
    seq: int
    hash: str
    signature: str
    created_at: float


class PolicyRow(msgspec.Struct, frozen=True):
    id: int
    digest: str
    sources_json: str
    schema: str
    loaded_at: float


class SecretRow(msgspec.Struct, frozen=True):
    """A brokered secret's name and what it is; its values live in :class:`SecretVersionRow`."""

    name: str
    kind: str
    description: str
    meta_json: str
    created_at: float
    created_by: str
    disabled_at: float | None = None


class SecretVersionRow(msgspec.Struct, frozen=True):
    """One version of a secret, sealed (AES-GCM envelope: a data key wrapped by the KMS)."""

    name: str
    version: int
    sealed: bytes
    wrapped_key: bytes
    kms_key_id: str
    created_at: float
    created_by: str
    retired_at: float | None = None
    usable_until: float | None = None


class LeaseRow(msgspec.Struct, frozen=True):
    """A brokered credential handed to an enforcement point for one task.

    ``status``: pending (intent recorded, the dynamic credential is being made) |
    active | revoked | expired. ``cleanup``: none (nothing outside Tether to undo) |
    pending (a dynamic credential may exist and must be destroyed) | done.
    """

    lease_id: str
    task_id: str
    agent_id: str
    kind: str  # static | postgres_role | downstream_token
    secret_name: str | None
    secret_version: int | None
    tool: str | None
    status: str
    cleanup: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    revoke_reason: str | None = None
    detail_json: str = "{}"


class Store(Protocol):
    def transaction(self) -> AbstractContextManager[None]: ...
    def after_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` once the current transaction commits (at once outside one);
        dropped if it rolls back."""
        ...

    #: Group commit: the most decisions one commit holds (0: every one commits alone).
    group_commit: int

    def grouped(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a decision: its changes and its receipt) in the node's open commit
        group: concurrent decisions share one transaction and one commit, each isolated
        by a savepoint (one that raises is rolled back alone); returns ``work``'s result
        once the commit holding it is durable, then runs its ``after_commit`` callbacks.
        Inside a transaction of the calling thread it joins that transaction."""
        ...

    def defer(self, work: Callable[[], object]) -> bool:
        """Inside a decision run by :meth:`grouped`: run ``work`` in the group's transaction
        after every decision of the group, before its commit (dropped with the decision if
        it is rolled back); the audit log appends its receipts so, taking its lock last.
        False, and ``work`` not taken, anywhere else."""
        ...

    def close(self) -> None: ...

    def lock_task(self, task_id: str) -> None:
        """Hold the row locks of the task and its ancestors (root first) until the current
        transaction ends, so one task's calls are decided one at a time across nodes
        (SQLite: a no-op, its transactions are serialized already)."""
        ...

    def lock_identity(self, spiffe_id: str) -> str | None:
        """The identity's status (``None``: unknown), its row held shared until the current
        transaction ends: an offboarding on another node waits for a task being opened
        (and then revokes it), and an opening waits for an offboarding (and then sees it)."""
        ...

    def notify(self, channel: str, payload: str) -> None:
        """Tell the other nodes (PostgreSQL ``NOTIFY``), at commit of the current transaction
        or at once outside one (SQLite: a no-op, there is no other node)."""
        ...

    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...

    def add_key(self, row: KeyRow) -> None: ...
    def list_keys(self) -> list[KeyRow]: ...
    def update_key(self, row: KeyRow) -> None:
        """Replace the key's state: ``retired_at``, ``verify_until``, ``revoked_at``, ``mac``."""
        ...

    def add_identity(self, row: IdentityRow) -> None: ...
    def get_identity(self, spiffe_id: str) -> IdentityRow | None: ...
    def list_identities(self) -> list[IdentityRow]: ...
    def disable_identity(self, spiffe_id: str, at: float) -> bool: ...

    def add_join_token(self, token_hash: str, spiffe_id: str, expires_at: float) -> None: ...
    def consume_join_token(self, token_hash: str, now: float) -> str | None: ...
    def record_svid(self, serial: str, spiffe_id: str, kind: str, expires_at: float) -> None: ...

    def put_template(self, name: str, body: str, at: float) -> None: ...
    def get_template(self, name: str) -> str | None: ...
    def list_templates(self) -> list[tuple[str, str]]: ...

    def add_policy(self, digest: str, sources_json: str, schema: str, at: float) -> int: ...
    def active_policy_id(self) -> int | None: ...
    def active_policy(self) -> PolicyRow | None: ...

    def add_task(self, row: TaskRow) -> None: ...
    def get_task(self, task_id: str) -> TaskRow | None: ...
    def list_tasks(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        parent_task_id: str | None = None,
    ) -> list[TaskRow]: ...
    def close_task(self, task_id: str, status: str, reason: str, at: float) -> bool: ...
    def spend_call(
        self, task_id: str, max_calls: int, *, token_id: str | None = None, now: float | None = None
    ) -> bool:
        """One call more, if the task is open, under ``max_calls`` (and, when given, still on
        ``token_id`` and unexpired at ``now``)."""
        ...

    def add_credential(self, row: CredentialRow) -> None: ...
    def get_credential(self, credential_id: str) -> CredentialRow | None: ...
    def list_credentials(self) -> list[CredentialRow]: ...
    def disable_credential(self, credential_id: str, at: float) -> bool:
        """Disable an enabled credential; False if it is unknown or disabled already."""
        ...

    def add_console_session(self, row: ConsoleSessionRow) -> None: ...
    def get_console_session(self, session_hash: str) -> ConsoleSessionRow | None: ...
    def touch_console_session(self, session_hash: str, seen_at: float) -> None: ...
    def flash_console_session(self, session_hash: str, flash: str) -> None: ...
    def delete_console_session(self, session_hash: str) -> None: ...
    def purge_console_sessions(self, now: float, idle_before: float) -> int:
        """Delete the sessions past their absolute end (``expires_at <= now``) or not
        seen since ``idle_before``; the number deleted."""
        ...

    def add_approval(self, row: ApprovalRow) -> None: ...
    def get_approval(self, approval_id: str) -> ApprovalRow | None: ...
    def list_approvals(self, *, status: str | None = None) -> list[ApprovalRow]: ...
    def decide_approval(self, approval_id: str, status: str, by: str, at: float) -> bool: ...
    def find_approval(
        self,
        task_id: str,
        tool: str,
        args_digest: str,
        status: str,
        *,
        unexpired_at: float | None = None,
        policy_digest: str | None = None,
    ) -> ApprovalRow | None: ...
    def use_approval(self, approval_id: str, at: float) -> bool: ...

    def add_task_label(
        self,
        task_id: str,
        source: str,
        sensitivity: str,
        trusted: bool,
        detail_json: str,
        at: float,
    ) -> None: ...
    def list_task_labels(self, task_id: str) -> list[tuple[str, str, bool, str, float]]: ...
    def get_task_flow(self, task_id: str) -> bytes | None:
        """The task's encoded flow state (:class:`tether.core.FlowState`), if any."""
        ...

    def put_task_flow(self, task_id: str, state: bytes, at: float) -> None:
        """Store (or replace) the task's encoded flow state."""
        ...

    def put_task_flow_delta(self, task_id: str, seq: int, delta: bytes, at: float) -> None:
        """Store (or replace) the task's flow delta number ``seq`` (from 1)."""
        ...

    def task_flow_deltas(self, task_id: str, after: int, upto: int) -> list[tuple[int, bytes]]:
        """(seq, delta) of the task's flow deltas numbered above ``after`` up to ``upto``,
        in order."""
        ...

    def drop_task_flow_deltas(self, task_id: str) -> None:
        """Delete the task's flow deltas (its state is written whole again)."""
        ...

    def revoke_token(self, token_id: str, task_id: str, reason: str, at: float) -> None: ...
    def token_revoked(self, token_id: str) -> bool: ...
    def revocations_since(self, at: float) -> list[tuple[str, float]]:
        """(token id, revoked at) of the tokens revoked at or after ``at`` (node resync)."""
        ...

    def record_proof(self, jti: str, expires_at: float) -> bool: ...
    def proof_seen(self, jti: str) -> bool: ...
    def purge_proofs(self, before: float) -> int: ...

    def add_secret(self, row: SecretRow) -> None: ...
    def get_secret(self, name: str) -> SecretRow | None: ...
    def list_secrets(self) -> list[SecretRow]: ...
    def update_secret_meta(self, name: str, meta_json: str) -> None: ...
    def add_secret_version(self, row: SecretVersionRow) -> None: ...
    def list_secret_versions(self, name: str | None = None) -> list[SecretVersionRow]: ...
    def retire_secret_versions(self, name: str, at: float, usable_until: float) -> int: ...

    def add_lease(self, row: LeaseRow) -> None: ...
    def get_lease(self, lease_id: str) -> LeaseRow | None: ...
    def list_leases(
        self,
        *,
        task_id: str | None = None,
        status: str | None = None,
        cleanup: str | None = None,
    ) -> list[LeaseRow]: ...
    def activate_lease(self, lease_id: str) -> bool: ...
    def renew_lease(self, lease_id: str, expires_at: float) -> bool: ...
    def revoke_leases(
        self,
        reason: str,
        at: float,
        *,
        task_id: str | None = None,
        lease_id: str | None = None,
        status: str = "revoked",
    ) -> list[str]:
        """Close the live (pending or active) leases that match; return their ids."""
        ...

    def expire_leases(self, now: float) -> list[str]: ...
    def finish_lease_cleanup(self, lease_id: str) -> bool: ...
    def lease_counts(self, now: float) -> tuple[int, int]:
        """(live leases past their expiry, closed leases whose cleanup is pending)."""
        ...

    def insert_record(self, row: RecordRow, mac: str | None = None) -> None:
        """Append a receipt and its authentication tag (a KEK-derived HMAC of its body)."""
        ...

    def records_between(
        self, after: int, upto: int | None = None
    ) -> list[tuple[RecordRow, str | None]]:
        """Receipts with ``after < seq <= upto`` (all after ``after`` without ``upto``), in
        order, each with its tag (``None``: it has none)."""
        ...

    def iter_record_macs(self) -> Iterator[tuple[int, str]]:
        """(seq, tag) of every receipt that has one, in order."""
        ...

    def add_head(self, row: HeadRow) -> None: ...
    def last_head(self) -> HeadRow | None: ...
    def list_heads(self, upto: int | None = None) -> list[HeadRow]:
        """Signed tree heads in size order (of at most ``upto`` receipts when given)."""
        ...

    def last_record(self) -> RecordRow | None: ...
    def get_record(self, seq: int) -> RecordRow | None: ...
    def iter_records(self) -> Iterator[RecordRow]: ...
    def tail_records(self, limit: int) -> list[RecordRow]: ...
    def add_checkpoint(self, row: CheckpointRow) -> None: ...
    def list_checkpoints(self) -> list[CheckpointRow]: ...

    def execute_unsafe(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Raw statement, for tamper tests and operator repair only."""
        ...

    def execute_fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Raw query, for inspection and tests only."""
        ...

    # -- long-running tasks: token renewal, idleness ---------------------------------------
    def set_task_token(self, task_id: str, token_id: str) -> bool:
        """Make ``token_id`` the open task's current token; False if it is not open."""
        ...

    def put_task_resources(self, task_id: str, resources_json: str) -> None:
        """Remember the resource servers a task's tokens are addressed to (for renewal)."""
        ...

    def get_task_resources(self, task_id: str) -> str | None: ...
    def touch_task(self, task_id: str, at: float) -> None:
        """Record that a call of the task was allowed at ``at`` (idle tracking)."""
        ...

    def task_last_activity(self, task_id: str) -> float | None: ...

    # -- console queries -------------------------------------------------------------------
    # Read paths of the web console, paginated by keyset; record filters run in the database
    # (SQLite: json_extract/json_each over the canonical body; PostgreSQL: the same over jsonb).
    def records_page(
        self,
        *,
        before_seq: int | None = None,
        limit: int = 50,
        kind: str | None = None,
        agent: str | None = None,
        tool: str | None = None,
        effect: str | None = None,
        rule: str | None = None,
        risk_tag: str | None = None,
        task_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[RecordRow]:
        """Receipts newest first, below ``before_seq``, matching every filter given:
        ``agent`` is the chain's first member, ``rule`` a reason code or a policy id,
        ``risk_tag`` one of the receipt's tags, ``since``/``until`` bound ``created_at``."""
        ...

    def record_tag_counts(self, since: float, until: float) -> list[tuple[str, str, int]]:
        """(risk tag, effect, receipts) over receipts created in ``[since, until)``."""
        ...

    def record_effect_counts(self, since: float, until: float) -> dict[str, int]:
        """effect → receipts carrying at least one risk tag, created in ``[since, until)``
        (each receipt once, whatever its number of tags)."""
        ...

    def identity_summaries(
        self,
        *,
        after: str | None = None,
        limit: int = 50,
        now: float = 0.0,
        owner: str | None = None,
    ) -> list[IdentitySummaryRow]:
        """Identities in SPIFFE ID order after ``after`` (only ``owner``'s when given), each
        with its activity figures."""
        ...

    def approvals_page(
        self,
        *,
        status: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[ApprovalRow]:
        """Approvals newest first (by ``(created_at, approval_id)`` below ``before``),
        optionally of one status."""
        ...

    def tasks_page(
        self,
        *,
        status: str | None = None,
        owner: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[TaskRow]:
        """Tasks newest first (by ``(opened_at, task_id)`` below ``before``), optionally of
        one status and of the agents one owner owns."""
        ...

    def task_effect_counts(self, task_ids: list[str]) -> dict[str, dict[str, int]]:
        """Decision receipts per task and effect."""
        ...

    # -- authenticated rows ----------------------------------------------------------------
    def put_row_tag(self, kind: str, key: str, tag: str) -> None:
        """Set (or replace) the authentication tag of the row ``key`` of ``kind``
        (:class:`tether.audit.RowTags`)."""
        ...

    def get_row_tag(self, kind: str, key: str) -> str | None: ...
    def row_tags(self, kind: str) -> dict[str, str]:
        """Every tag of ``kind``, by row key."""
        ...

    def add_accepted_risk(self, row: AcceptedRiskRow) -> None: ...
    def list_accepted_risks(self) -> list[AcceptedRiskRow]: ...
    def decide_accepted_risk(self, risk_id: str, status: str, by: str, at: float) -> bool:
        """Move a pending accepted risk to ``status`` (accepted | rejected, with ``by`` and
        ``at`` as its decision), or a pending or accepted one to ``withdrawn`` (its decision,
        if any, is kept: who withdrew it is in the receipt); False if it is in no state to."""
        ...


class IdentitySummaryRow(msgspec.Struct, frozen=True):
    """An identity with what the inventory shows beside it."""

    identity: IdentityRow
    open_tasks: int
    last_activity: float | None  # the newest task opened, or call allowed
    svid_expires_at: float | None  # the newest SVID issued (attestation)
    long_tasks: int  # open tasks that live more than a day
    orphan_leases: int  # live leases of a task that is no longer open


class AcceptedRiskRow(msgspec.Struct, frozen=True):
    """A documented risk decision (an exception policy): it changes no decision; it lapses
    by itself at ``expires_at``."""

    risk_id: str
    title: str
    risk_tag: str
    scope: str
    justification: str
    recorded_by: str
    approver: str
    status: str  # pending | accepted | rejected | withdrawn
    created_at: float
    expires_at: float
    decided_by: str | None = None
    decided_at: float | None = None
