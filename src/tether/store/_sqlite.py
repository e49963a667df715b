"""The embedded store: SQLite in WAL mode, one file under the Tether home."""

# Queries are built from this module's column lists and fixed fragments only; every value
# is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tether._errors import Conflict, InfrastructureError
from tether.store._group import GroupCommit, group_limit_from_env
from tether.store._interface import (
    AcceptedRiskRow,
    ApprovalRow,
    CheckpointRow,
    ConsoleSessionRow,
    CredentialRow,
    HeadRow,
    IdentityRow,
    IdentitySummaryRow,
    KeyRow,
    LeaseRow,
    PolicyRow,
    RecordRow,
    SecretRow,
    SecretVersionRow,
    TaskRow,
)
from tether.store.migrations.sqlite import (
    v2_verifiable_log,
    v3_credential_expiry,
    v4_flow_deltas,
)

SCHEMA_VERSION = "4"
_CREDENTIAL_COLS = "credential_id, secret_hash, role, owner, created_at, disabled_at, expires_at"
T = TypeVar("T")
_KEY_COLS = (
    "kid, use, sealed, public_jwk, cert_pem, created_at, retired_at, verify_until, revoked_at, mac"
)
_HEAD_COLS = "size, root, at, prev, kid, signature, frontier, created_at"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signing_keys (
  kid TEXT PRIMARY KEY, use TEXT NOT NULL, sealed BLOB NOT NULL, public_jwk TEXT NOT NULL,
  cert_pem TEXT, created_at REAL NOT NULL, retired_at REAL, verify_until REAL,
  revoked_at REAL, mac TEXT);
CREATE TABLE IF NOT EXISTS identities (
  spiffe_id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, description TEXT NOT NULL,
  status TEXT NOT NULL, created_at REAL NOT NULL, disabled_at REAL);
CREATE TABLE IF NOT EXISTS join_tokens (
  token_hash TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, expires_at REAL NOT NULL, used_at REAL);
CREATE TABLE IF NOT EXISTS svids (
  serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, kind TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS templates (name TEXT PRIMARY KEY, body TEXT NOT NULL, updated_at REAL);
CREATE TABLE IF NOT EXISTS policy_snapshots (
  id INTEGER PRIMARY KEY AUTOINCREMENT, digest TEXT NOT NULL, sources_json TEXT NOT NULL,
  schema TEXT NOT NULL, loaded_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, parent_task_id TEXT, template TEXT NOT NULL,
  intent_json TEXT NOT NULL, intent_digest TEXT NOT NULL, jkt TEXT NOT NULL,
  token_id TEXT NOT NULL, status TEXT NOT NULL, calls_used INTEGER NOT NULL,
  opened_at REAL NOT NULL, expires_at REAL NOT NULL, ended_at REAL, end_reason TEXT,
  chain_json TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS tasks_agent ON tasks (agent_id, status);
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks (parent_task_id);
CREATE TABLE IF NOT EXISTS revocations (
  token_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, reason TEXT NOT NULL, revoked_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
  credential_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, role TEXT NOT NULL,
  owner TEXT NOT NULL, created_at REAL NOT NULL, disabled_at REAL, expires_at REAL);
CREATE TABLE IF NOT EXISTS approvals (
  approval_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, agent_id TEXT NOT NULL, tool TEXT NOT NULL,
  args_digest TEXT NOT NULL, args_json TEXT NOT NULL, policy_digest TEXT NOT NULL,
  reasons_json TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
  expires_at REAL NOT NULL, decided_by TEXT, decided_at REAL);
CREATE INDEX IF NOT EXISTS approvals_call ON approvals (task_id, tool, args_digest, status);
CREATE INDEX IF NOT EXISTS approvals_created ON approvals (created_at, approval_id);
CREATE TABLE IF NOT EXISTS task_labels (
  task_id TEXT NOT NULL, source TEXT NOT NULL, sensitivity TEXT NOT NULL, trusted INTEGER NOT NULL,
  detail_json TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS task_labels_task ON task_labels (task_id);
CREATE TABLE IF NOT EXISTS task_flow (
  task_id TEXT PRIMARY KEY, state BLOB NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS task_flow_deltas (
  task_id TEXT NOT NULL, seq INTEGER NOT NULL, delta BLOB NOT NULL, at REAL NOT NULL,
  PRIMARY KEY (task_id, seq));
CREATE TABLE IF NOT EXISTS proofs (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (
  name TEXT PRIMARY KEY, kind TEXT NOT NULL, description TEXT NOT NULL, meta_json TEXT NOT NULL,
  created_at REAL NOT NULL, created_by TEXT NOT NULL, disabled_at REAL);
CREATE TABLE IF NOT EXISTS secret_versions (
  name TEXT NOT NULL REFERENCES secrets (name), version INTEGER NOT NULL, sealed BLOB NOT NULL,
  wrapped_key BLOB NOT NULL, kms_key_id TEXT NOT NULL, created_at REAL NOT NULL,
  created_by TEXT NOT NULL, retired_at REAL, usable_until REAL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS leases (
  lease_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, agent_id TEXT NOT NULL, kind TEXT NOT NULL,
  secret_name TEXT, secret_version INTEGER, tool TEXT, status TEXT NOT NULL, cleanup TEXT NOT NULL,
  created_at REAL NOT NULL, expires_at REAL NOT NULL, revoked_at REAL, revoke_reason TEXT,
  detail_json TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS leases_task ON leases (task_id, status);
CREATE INDEX IF NOT EXISTS leases_live ON leases (status, expires_at);
CREATE INDEX IF NOT EXISTS leases_cleanup ON leases (cleanup, status);
CREATE TABLE IF NOT EXISTS audit_records (
  seq INTEGER PRIMARY KEY, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, body TEXT NOT NULL,
  created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
  seq INTEGER PRIMARY KEY, hash TEXT NOT NULL, signature TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit_macs (seq INTEGER PRIMARY KEY, mac TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_heads (
  size INTEGER PRIMARY KEY, root TEXT NOT NULL, at REAL NOT NULL, prev INTEGER NOT NULL,
  kid TEXT NOT NULL, signature TEXT NOT NULL, frontier TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS accepted_risks (
  risk_id TEXT PRIMARY KEY, title TEXT NOT NULL, risk_tag TEXT NOT NULL, scope TEXT NOT NULL,
  justification TEXT NOT NULL, recorded_by TEXT NOT NULL, approver TEXT NOT NULL,
  status TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, decided_by TEXT,
  decided_at REAL);
CREATE TABLE IF NOT EXISTS console_sessions (
  session_hash TEXT PRIMARY KEY, credential_id TEXT NOT NULL, role TEXT NOT NULL,
  owner TEXT NOT NULL, created_at REAL NOT NULL, seen_at REAL NOT NULL,
  expires_at REAL NOT NULL, flash TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS row_tags (
  kind TEXT NOT NULL, key TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (kind, key));
CREATE INDEX IF NOT EXISTS tasks_opened ON tasks (opened_at, task_id);
CREATE INDEX IF NOT EXISTS audit_records_task ON audit_records (json_extract(body, '$.task_id'));
"""


def _private_files(path: str) -> None:
    """The store file exists with mode 0600 before SQLite opens it (so it is never
    created with the umask's 0644), and it and its WAL and shared-memory files are
    0600 on every open, whatever they were left at. SQLite gives the journal files
    the database file's mode."""
    if path == ":memory:" or path.startswith("file:"):
        return
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(name):
            os.chmod(name, 0o600)


class SQLiteStore:
    """The SQLite implementation of :class:`tether.store.Store`."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            _private_files(self.path)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed receipt survives power loss, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_DDL)
        except (sqlite3.Error, OSError) as exc:
            raise InfrastructureError(f"cannot open store {self.path}: {exc}") from None
        self._lock = threading.RLock()
        #: Read-only connections, one per thread, for the key set every decision reads
        #: before its transaction: WAL lets them read the last commit while a commit
        #: group holds ``_lock`` through its fsync (opened on first use; none in memory).
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._depth = 0
        self._owner = 0  # the thread whose transaction is open (while _depth > 0)
        self._after_commit: list[Callable[[], object]] = []
        #: The most decisions one commit holds (:meth:`grouped`); 0: group commit off.
        self.group_commit = group_limit_from_env()
        #: The commit queue :meth:`grouped` hands decisions to.
        self.committer = GroupCommit(self, self.group_commit or 1)
        self._in_unit = False  # a unit of a commit group is running (on self._owner)
        self._deferred: list[Callable[[], object]] = []
        version = self.get_meta("schema_version")
        if version is None:  # new: its tables were made at the newest version
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: str) -> None:
        """Bring a store made by an older Tether to :data:`SCHEMA_VERSION`."""
        steps = {"2": v2_verifiable_log, "3": v3_credential_expiry, "4": v4_flow_deltas}
        with self.transaction():
            for target in range(int(version) + 1, int(SCHEMA_VERSION) + 1):
                step = steps.get(str(target))
                if step is None:
                    raise InfrastructureError(f"no migration to schema version {target}")
                for statement in step.STATEMENTS:
                    self._run(statement)
                self.set_meta("schema_version", step.VERSION)

    # -- plumbing -----------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        callbacks: list[Callable[[], object]] = []
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._run("BEGIN IMMEDIATE")
                self._owner = threading.get_ident()
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._after_commit.clear()
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                try:
                    self._run("COMMIT")
                finally:
                    callbacks, self._after_commit = self._after_commit, []
        # Committed (the callbacks were taken under the lock, so none of another
        # thread's transaction can be among them): run what waited for the commit.
        for callback in callbacks:
            callback()

    def after_commit(self, callback: Callable[[], object]) -> None:
        with self._lock:
            if self._depth > 0:
                if callback not in self._after_commit:  # once per commit is enough
                    self._after_commit.append(callback)
                return
        callback()

    # -- group commit (tether.store._group) --------------------------------------------
    def grouped(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a decision: its changes and its receipt) in this store's open
        commit group, isolated by a savepoint, and return once the commit holding it is
        durable; its ``after_commit`` callbacks run then, in this thread. Inside a
        transaction of this thread, or with :attr:`group_commit` 0, it is simply
        ``with transaction(): work()``."""
        mine = self._depth > 0 and self._owner == threading.get_ident()
        if self.group_commit <= 0 or mine:
            with self.transaction():
                return work()
        self.committer.limit = self.group_commit
        return self.committer.run(work)

    def defer(self, work: Callable[[], object]) -> bool:
        """Inside a decision of a commit group: run ``work`` in the group's transaction
        after every decision of the group, before its commit (dropped if the decision is
        rolled back). False, and ``work`` not taken, anywhere else."""
        if not (self._in_unit and self._owner == threading.get_ident()):
            return False
        self._deferred.append(work)
        return True

    def _group_begin(self) -> None:
        self._lock.acquire()
        try:
            self._run("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        self._owner = threading.get_ident()
        self._depth, self._after_commit = 1, []

    def _group_savepoint(self, may_yield: bool) -> None:
        del may_yield  # SQLite's writer holds every row: nothing to yield to
        self._depth, self._after_commit, self._deferred = 1, [], []
        self._run("SAVEPOINT tether_unit")
        self._in_unit = True

    def _group_release(
        self,
    ) -> tuple[str, list[Callable[[], object]], list[Callable[[], object]]]:
        callbacks, self._after_commit = self._after_commit, []
        deferred, self._deferred = self._deferred, []
        self._depth, self._in_unit = 1, False
        if not self._db.in_transaction:  # SQLite rolled it back (disk full, I/O error)
            raise InfrastructureError("store error: the transaction was rolled back")
        self._run("RELEASE SAVEPOINT tether_unit")
        return "kept", callbacks, deferred

    def _group_callbacks(self) -> list[Callable[[], object]]:
        callbacks, self._after_commit = self._after_commit, []
        return callbacks

    def _group_rollback(self) -> bool:
        self._depth, self._after_commit, self._deferred = 1, [], []
        self._in_unit = False
        if not self._db.in_transaction:
            raise InfrastructureError("store error: the transaction was rolled back")
        self._run("ROLLBACK TO SAVEPOINT tether_unit")
        self._run("RELEASE SAVEPOINT tether_unit")
        return False

    def _group_commit(self) -> None:
        try:
            self._run("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth, self._after_commit, self._deferred = 0, [], []
            self._in_unit = False
            self._lock.release()

    def _group_abort(self) -> None:
        try:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
        finally:
            self._depth, self._after_commit, self._deferred = 0, [], []
            self._in_unit = False
            self._lock.release()

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"already exists: {exc}") from None
        except sqlite3.Error as exc:
            raise InfrastructureError(f"store error: {exc}") from None

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._run(sql, params).fetchone()
        return row

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._run(sql, params).fetchall()
        return rows

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._reader_lock:
            for reader in self._reader_conns:
                reader.close()
            self._reader_conns.clear()

    def _read_committed(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` as last committed, through the reader connection, so a read
        outside any transaction never waits for a commit group's fsync. Inside this
        thread's transaction (which may have changed them), or in memory, through the
        main connection."""
        if (
            self.path == ":memory:"
            or self.path.startswith("file:")
            or (self._depth > 0 and self._owner == threading.get_ident())
        ):
            return self._all(sql)
        try:
            reader: sqlite3.Connection | None = getattr(self._readers, "conn", None)
            if reader is None:
                reader = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30.0
                )
                reader.execute("PRAGMA query_only=ON")
                with self._reader_lock:
                    self._reader_conns.append(reader)
                self._readers.conn = reader
            rows: list[tuple[Any, ...]] = reader.execute(sql).fetchall()
            return rows
        except sqlite3.Error as exc:
            raise InfrastructureError(f"store error: {exc}") from None

    def lock_task(self, task_id: str) -> None:
        """A no-op: ``BEGIN IMMEDIATE`` serializes every transaction already."""

    def lock_identity(self, spiffe_id: str) -> str | None:
        """The identity's status (transactions are serialized: no lock needed)."""
        row = self._one("SELECT status FROM identities WHERE spiffe_id = ?", (spiffe_id,))
        return None if row is None else str(row[0])

    def notify(self, channel: str, payload: str) -> None:
        """A no-op: an embedded store has no other node to tell."""

    def execute_unsafe(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._run(sql, params)

    def execute_fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._all(sql, params)

    # -- meta -----------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._run(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- keys -----------------------------------------------------------------------
    def add_key(self, row: KeyRow) -> None:
        self._run(
            f"INSERT INTO signing_keys ({_KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.kid,
                row.use,
                row.sealed,
                row.public_jwk,
                row.cert_pem,
                row.created_at,
                row.retired_at,
                row.verify_until,
                row.revoked_at,
                row.mac,
            ),
        )

    def list_keys(self) -> list[KeyRow]:
        return [
            KeyRow(*r)
            for r in self._read_committed(
                f"SELECT {_KEY_COLS} FROM signing_keys ORDER BY created_at, rowid"
            )
        ]

    def update_key(self, row: KeyRow) -> None:
        self._run(
            "UPDATE signing_keys SET retired_at = ?, verify_until = ?, revoked_at = ?, mac = ? "
            "WHERE kid = ?",
            (row.retired_at, row.verify_until, row.revoked_at, row.mac, row.kid),
        )

    # -- identities -------------------------------------------------------------------
    def add_identity(self, row: IdentityRow) -> None:
        self._run(
            "INSERT INTO identities VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.spiffe_id,
                row.kind,
                row.owner,
                row.description,
                row.status,
                row.created_at,
                row.disabled_at,
            ),
        )

    def get_identity(self, spiffe_id: str) -> IdentityRow | None:
        row = self._one("SELECT * FROM identities WHERE spiffe_id = ?", (spiffe_id,))
        return None if row is None else IdentityRow(*row)

    def list_identities(self) -> list[IdentityRow]:
        return [IdentityRow(*r) for r in self._all("SELECT * FROM identities ORDER BY spiffe_id")]

    def disable_identity(self, spiffe_id: str, at: float) -> bool:
        cur = self._run(
            "UPDATE identities SET status = 'disabled', disabled_at = ? "
            "WHERE spiffe_id = ? AND status = 'active'",
            (at, spiffe_id),
        )
        return cur.rowcount == 1

    def add_join_token(self, token_hash: str, spiffe_id: str, expires_at: float) -> None:
        self._run(
            "INSERT INTO join_tokens VALUES (?, ?, ?, NULL)", (token_hash, spiffe_id, expires_at)
        )

    def consume_join_token(self, token_hash: str, now: float) -> str | None:
        row = self._one(
            "UPDATE join_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL "
            "AND expires_at > ? RETURNING spiffe_id",
            (now, token_hash, now),
        )
        return None if row is None else str(row[0])

    def record_svid(self, serial: str, spiffe_id: str, kind: str, expires_at: float) -> None:
        self._run("INSERT INTO svids VALUES (?, ?, ?, ?)", (serial, spiffe_id, kind, expires_at))

    # -- templates and policies ---------------------------------------------------------
    def put_template(self, name: str, body: str, at: float) -> None:
        self._run(
            "INSERT INTO templates VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "body = excluded.body, updated_at = excluded.updated_at",
            (name, body, at),
        )

    def get_template(self, name: str) -> str | None:
        row = self._one("SELECT body FROM templates WHERE name = ?", (name,))
        return None if row is None else str(row[0])

    def list_templates(self) -> list[tuple[str, str]]:
        return [
            (str(a), str(b)) for a, b in self._all("SELECT name, body FROM templates ORDER BY name")
        ]

    def add_policy(self, digest: str, sources_json: str, schema: str, at: float) -> int:
        row = self._one(
            "INSERT INTO policy_snapshots (digest, sources_json, schema, loaded_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (digest, sources_json, schema, at),
        )
        assert row is not None
        return int(row[0])

    def active_policy_id(self) -> int | None:
        row = self._one("SELECT max(id) FROM policy_snapshots")
        return None if row is None or row[0] is None else int(row[0])

    def active_policy(self) -> PolicyRow | None:
        row = self._one("SELECT * FROM policy_snapshots ORDER BY id DESC LIMIT 1")
        return None if row is None else PolicyRow(*row)

    # -- tasks ------------------------------------------------------------------------
    def add_task(self, row: TaskRow) -> None:
        self._run(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.task_id,
                row.agent_id,
                row.parent_task_id,
                row.template,
                row.intent_json,
                row.intent_digest,
                row.jkt,
                row.token_id,
                row.status,
                row.calls_used,
                row.opened_at,
                row.expires_at,
                row.ended_at,
                row.end_reason,
                row.chain_json,
            ),
        )

    def get_task(self, task_id: str) -> TaskRow | None:
        row = self._one("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        return None if row is None else TaskRow(*row)

    def list_tasks(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        parent_task_id: str | None = None,
    ) -> list[TaskRow]:
        sql, params = "SELECT * FROM tasks WHERE 1=1", []
        if parent_task_id is not None:
            sql += " AND parent_task_id = ?"
            params.append(parent_task_id)
        if agent_id is not None:
            sql += " AND agent_id = ?"
            params.append(agent_id)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        return [TaskRow(*r) for r in self._all(sql + " ORDER BY opened_at", tuple(params))]

    def close_task(self, task_id: str, status: str, reason: str, at: float) -> bool:
        cur = self._run(
            "UPDATE tasks SET status = ?, end_reason = ?, ended_at = ? "
            "WHERE task_id = ? AND status = 'open'",
            (status, reason, at, task_id),
        )
        return cur.rowcount == 1

    def spend_call(
        self, task_id: str, max_calls: int, *, token_id: str | None = None, now: float | None = None
    ) -> bool:
        sql = (
            "UPDATE tasks SET calls_used = calls_used + 1 WHERE task_id = ? "
            "AND status = 'open' AND calls_used < ?"
        )
        params: list[Any] = [task_id, max_calls]
        if token_id is not None:
            sql += " AND token_id = ?"
            params.append(token_id)
        if now is not None:
            sql += " AND expires_at > ?"
            params.append(now)
        cur = self._run(sql, tuple(params))
        return cur.rowcount == 1

    # -- credentials and approvals -----------------------------------------------------
    def add_credential(self, row: CredentialRow) -> None:
        self._run(
            "INSERT INTO credentials (credential_id, secret_hash, role, owner, created_at, "
            "disabled_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.credential_id,
                row.secret_hash,
                row.role,
                row.owner,
                row.created_at,
                row.disabled_at,
                row.expires_at,
            ),
        )

    def get_credential(self, credential_id: str) -> CredentialRow | None:
        row = self._one(
            f"SELECT {_CREDENTIAL_COLS} FROM credentials WHERE credential_id = ?", (credential_id,)
        )
        return None if row is None else CredentialRow(*row)

    def list_credentials(self) -> list[CredentialRow]:
        return [
            CredentialRow(*r)
            for r in self._all(f"SELECT {_CREDENTIAL_COLS} FROM credentials ORDER BY created_at")
        ]

    def disable_credential(self, credential_id: str, at: float) -> bool:
        cur = self._run(
            "UPDATE credentials SET disabled_at = ? WHERE credential_id = ? "
            "AND disabled_at IS NULL",
            (at, credential_id),
        )
        return cur.rowcount == 1

    def add_console_session(self, row: ConsoleSessionRow) -> None:
        self._run(
            "INSERT INTO console_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.session_hash,
                row.credential_id,
                row.role,
                row.owner,
                row.created_at,
                row.seen_at,
                row.expires_at,
                row.flash,
            ),
        )

    def get_console_session(self, session_hash: str) -> ConsoleSessionRow | None:
        row = self._one("SELECT * FROM console_sessions WHERE session_hash = ?", (session_hash,))
        return None if row is None else ConsoleSessionRow(*row)

    def touch_console_session(self, session_hash: str, seen_at: float) -> None:
        self._run(
            "UPDATE console_sessions SET seen_at = max(seen_at, ?) WHERE session_hash = ?",
            (seen_at, session_hash),
        )

    def flash_console_session(self, session_hash: str, flash: str) -> None:
        self._run(
            "UPDATE console_sessions SET flash = ? WHERE session_hash = ?", (flash, session_hash)
        )

    def delete_console_session(self, session_hash: str) -> None:
        self._run("DELETE FROM console_sessions WHERE session_hash = ?", (session_hash,))

    def purge_console_sessions(self, now: float, idle_before: float) -> int:
        return self._run(
            "DELETE FROM console_sessions WHERE expires_at <= ? OR seen_at <= ?",
            (now, idle_before),
        ).rowcount

    def add_approval(self, row: ApprovalRow) -> None:
        self._run(
            "INSERT INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.approval_id,
                row.task_id,
                row.agent_id,
                row.tool,
                row.args_digest,
                row.args_json,
                row.policy_digest,
                row.reasons_json,
                row.status,
                row.created_at,
                row.expires_at,
                row.decided_by,
                row.decided_at,
            ),
        )

    def get_approval(self, approval_id: str) -> ApprovalRow | None:
        row = self._one("SELECT * FROM approvals WHERE approval_id = ?", (approval_id,))
        return None if row is None else ApprovalRow(*row)

    def list_approvals(self, *, status: str | None = None) -> list[ApprovalRow]:
        if status is None:
            rows = self._all("SELECT * FROM approvals ORDER BY created_at")
        else:
            rows = self._all(
                "SELECT * FROM approvals WHERE status = ? ORDER BY created_at", (status,)
            )
        return [ApprovalRow(*r) for r in rows]

    def approvals_page(
        self,
        *,
        status: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[ApprovalRow]:
        sql = "SELECT * FROM approvals WHERE 1=1"
        params: list[Any] = []
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        if before is not None:
            sql += " AND (created_at < ? OR (created_at = ? AND approval_id < ?))"
            params.extend([before[0], before[0], before[1]])
        sql += " ORDER BY created_at DESC, approval_id DESC LIMIT ?"
        params.append(limit)
        return [ApprovalRow(*r) for r in self._all(sql, tuple(params))]

    def decide_approval(self, approval_id: str, status: str, by: str, at: float) -> bool:
        cur = self._run(
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? "
            "WHERE approval_id = ? AND status = 'pending' AND expires_at > ?",
            (status, by, at, approval_id, at),
        )
        return cur.rowcount == 1

    def find_approval(
        self,
        task_id: str,
        tool: str,
        args_digest: str,
        status: str,
        *,
        unexpired_at: float | None = None,
        policy_digest: str | None = None,
    ) -> ApprovalRow | None:
        sql = (
            "SELECT * FROM approvals WHERE task_id = ? AND tool = ? AND args_digest = ? "
            "AND status = ?"
        )
        params: list[Any] = [task_id, tool, args_digest, status]
        if unexpired_at is not None:
            sql += " AND expires_at > ?"
            params.append(unexpired_at)
        if policy_digest is not None:
            sql += " AND policy_digest = ?"
            params.append(policy_digest)
        row = self._one(sql + " ORDER BY created_at LIMIT 1", tuple(params))
        return None if row is None else ApprovalRow(*row)

    def use_approval(self, approval_id: str, at: float) -> bool:
        cur = self._run(
            "UPDATE approvals SET status = 'used' WHERE approval_id = ? AND "
            "status = 'approved' AND expires_at > ?",
            (approval_id, at),
        )
        return cur.rowcount == 1

    # -- labels of what a task has read -------------------------------------------------
    def add_task_label(
        self,
        task_id: str,
        source: str,
        sensitivity: str,
        trusted: bool,
        detail_json: str,
        at: float,
    ) -> None:
        self._run(
            "INSERT INTO task_labels VALUES (?, ?, ?, ?, ?, ?)",
            (task_id, source, sensitivity, int(trusted), detail_json, at),
        )

    def list_task_labels(self, task_id: str) -> list[tuple[str, str, bool, str, float]]:
        rows = self._all(
            "SELECT task_id, source, sensitivity, trusted, detail_json, at "
            "FROM task_labels WHERE task_id = ? ORDER BY at",
            (task_id,),
        )
        return [(str(r[1]), str(r[2]), bool(r[3]), str(r[4]), float(r[5])) for r in rows]

    # -- a task's information-flow state (tether.core.FlowState, encoded) -----------------
    def get_task_flow(self, task_id: str) -> bytes | None:
        row = self._one("SELECT state FROM task_flow WHERE task_id = ?", (task_id,))
        return None if row is None else bytes(row[0])

    def put_task_flow(self, task_id: str, state: bytes, at: float) -> None:
        self._run(
            "INSERT INTO task_flow VALUES (?, ?, ?) ON CONFLICT (task_id) DO UPDATE SET "
            "state = excluded.state, updated_at = excluded.updated_at",
            (task_id, state, at),
        )

    def put_task_flow_delta(self, task_id: str, seq: int, delta: bytes, at: float) -> None:
        self._run(
            "INSERT INTO task_flow_deltas VALUES (?, ?, ?, ?) ON CONFLICT (task_id, seq) "
            "DO UPDATE SET delta = excluded.delta, at = excluded.at",
            (task_id, seq, delta, at),
        )

    def task_flow_deltas(self, task_id: str, after: int, upto: int) -> list[tuple[int, bytes]]:
        rows = self._all(
            "SELECT seq, delta FROM task_flow_deltas WHERE task_id = ? AND seq > ? "
            "AND seq <= ? ORDER BY seq",
            (task_id, after, upto),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def drop_task_flow_deltas(self, task_id: str) -> None:
        self._run("DELETE FROM task_flow_deltas WHERE task_id = ?", (task_id,))

    # -- revocations and proofs ---------------------------------------------------------
    def revoke_token(self, token_id: str, task_id: str, reason: str, at: float) -> None:
        self._run(
            "INSERT INTO revocations VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (token_id, task_id, reason, at),
        )

    def token_revoked(self, token_id: str) -> bool:
        return self._one("SELECT 1 FROM revocations WHERE token_id = ?", (token_id,)) is not None

    def revocations_since(self, at: float) -> list[tuple[str, float]]:
        rows = self._all(
            "SELECT token_id, revoked_at FROM revocations WHERE revoked_at >= ?", (at,)
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    def record_proof(self, jti: str, expires_at: float) -> bool:
        cur = self._run(
            "INSERT INTO proofs VALUES (?, ?) ON CONFLICT DO NOTHING", (jti, expires_at)
        )
        return cur.rowcount == 1

    def proof_seen(self, jti: str) -> bool:
        return self._one("SELECT 1 FROM proofs WHERE jti = ?", (jti,)) is not None

    def purge_proofs(self, before: float) -> int:
        return self._run("DELETE FROM proofs WHERE expires_at < ?", (before,)).rowcount

    # -- audit ------------------------------------------------------------------------
    def insert_record(self, row: RecordRow, mac: str | None = None) -> None:
        self._run(
            "INSERT INTO audit_records VALUES (?, ?, ?, ?, ?)",
            (row.seq, row.prev_hash, row.hash, row.body, row.created_at),
        )
        if mac is not None:
            self._run("INSERT INTO audit_macs VALUES (?, ?)", (row.seq, mac))

    def records_between(
        self, after: int, upto: int | None = None
    ) -> list[tuple[RecordRow, str | None]]:
        rows = self._all(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, r.created_at, m.mac "
            "FROM audit_records r LEFT JOIN audit_macs m ON m.seq = r.seq "
            "WHERE r.seq > ? AND r.seq <= ? ORDER BY r.seq",
            (after, upto if upto is not None else 2**62),
        )
        return [(RecordRow(*r[:5]), r[5]) for r in rows]

    def iter_record_macs(self) -> Iterator[tuple[int, str]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, mac FROM audit_macs ORDER BY seq").fetchall()
        for seq, mac in rows:
            yield int(seq), str(mac)

    def add_head(self, row: HeadRow) -> None:
        self._run(
            f"INSERT INTO audit_heads ({_HEAD_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.size,
                row.root,
                row.at,
                row.prev,
                row.kid,
                row.signature,
                row.frontier,
                row.created_at,
            ),
        )

    def last_head(self) -> HeadRow | None:
        row = self._one(f"SELECT {_HEAD_COLS} FROM audit_heads ORDER BY size DESC LIMIT 1")
        return None if row is None else HeadRow(*row)

    def list_heads(self, upto: int | None = None) -> list[HeadRow]:
        rows = self._all(
            f"SELECT {_HEAD_COLS} FROM audit_heads WHERE size <= ? ORDER BY size",
            (upto if upto is not None else 2**62,),
        )
        return [HeadRow(*r) for r in rows]

    def last_record(self) -> RecordRow | None:
        row = self._one("SELECT * FROM audit_records ORDER BY seq DESC LIMIT 1")
        return None if row is None else RecordRow(*row)

    def get_record(self, seq: int) -> RecordRow | None:
        row = self._one("SELECT * FROM audit_records WHERE seq = ?", (seq,))
        return None if row is None else RecordRow(*row)

    def iter_records(self) -> Iterator[RecordRow]:
        with self._lock:
            cursor = self._db.execute("SELECT * FROM audit_records ORDER BY seq")
            rows = cursor.fetchall()
        for r in rows:
            yield RecordRow(*r)

    def tail_records(self, limit: int) -> list[RecordRow]:
        rows = self._all("SELECT * FROM audit_records ORDER BY seq DESC LIMIT ?", (limit,))
        return [RecordRow(*r) for r in reversed(rows)]

    def add_checkpoint(self, row: CheckpointRow) -> None:
        self._run(
            "INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?)",
            (row.seq, row.hash, row.signature, row.created_at),
        )

    def list_checkpoints(self) -> list[CheckpointRow]:
        return [
            CheckpointRow(*r) for r in self._all("SELECT * FROM audit_checkpoints ORDER BY seq")
        ]

    # -- secrets ------------------------------------------------------------------------
    def add_secret(self, row: SecretRow) -> None:
        self._run(
            "INSERT INTO secrets VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.name,
                row.kind,
                row.description,
                row.meta_json,
                row.created_at,
                row.created_by,
                row.disabled_at,
            ),
        )

    def get_secret(self, name: str) -> SecretRow | None:
        row = self._one("SELECT * FROM secrets WHERE name = ?", (name,))
        return None if row is None else SecretRow(*row)

    def list_secrets(self) -> list[SecretRow]:
        return [SecretRow(*r) for r in self._all("SELECT * FROM secrets ORDER BY name")]

    def update_secret_meta(self, name: str, meta_json: str) -> None:
        self._run("UPDATE secrets SET meta_json = ? WHERE name = ?", (meta_json, name))

    def add_secret_version(self, row: SecretVersionRow) -> None:
        self._run(
            "INSERT INTO secret_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.name,
                row.version,
                row.sealed,
                row.wrapped_key,
                row.kms_key_id,
                row.created_at,
                row.created_by,
                row.retired_at,
                row.usable_until,
            ),
        )

    def list_secret_versions(self, name: str | None = None) -> list[SecretVersionRow]:
        if name is None:
            rows = self._all("SELECT * FROM secret_versions ORDER BY name, version")
        else:
            rows = self._all(
                "SELECT * FROM secret_versions WHERE name = ? ORDER BY version", (name,)
            )
        return [SecretVersionRow(*r) for r in rows]

    def retire_secret_versions(self, name: str, at: float, usable_until: float) -> int:
        cur = self._run(
            "UPDATE secret_versions SET retired_at = ?, usable_until = ? "
            "WHERE name = ? AND retired_at IS NULL",
            (at, usable_until, name),
        )
        return cur.rowcount

    # -- leases -------------------------------------------------------------------------
    def add_lease(self, row: LeaseRow) -> None:
        self._run(
            "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.lease_id,
                row.task_id,
                row.agent_id,
                row.kind,
                row.secret_name,
                row.secret_version,
                row.tool,
                row.status,
                row.cleanup,
                row.created_at,
                row.expires_at,
                row.revoked_at,
                row.revoke_reason,
                row.detail_json,
            ),
        )

    def get_lease(self, lease_id: str) -> LeaseRow | None:
        row = self._one("SELECT * FROM leases WHERE lease_id = ?", (lease_id,))
        return None if row is None else LeaseRow(*row)

    def list_leases(
        self,
        *,
        task_id: str | None = None,
        status: str | None = None,
        cleanup: str | None = None,
    ) -> list[LeaseRow]:
        sql, params = "SELECT * FROM leases WHERE 1=1", []
        for column, value in (("task_id", task_id), ("status", status), ("cleanup", cleanup)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        return [LeaseRow(*r) for r in self._all(sql + " ORDER BY created_at", tuple(params))]

    def activate_lease(self, lease_id: str) -> bool:
        cur = self._run(
            "UPDATE leases SET status = 'active' WHERE lease_id = ? AND status = 'pending'",
            (lease_id,),
        )
        return cur.rowcount == 1

    def renew_lease(self, lease_id: str, expires_at: float) -> bool:
        cur = self._run(
            "UPDATE leases SET expires_at = ? WHERE lease_id = ? AND status = 'active'",
            (expires_at, lease_id),
        )
        return cur.rowcount == 1

    def revoke_leases(
        self,
        reason: str,
        at: float,
        *,
        task_id: str | None = None,
        lease_id: str | None = None,
        status: str = "revoked",
    ) -> list[str]:
        sql = (
            "UPDATE leases SET status = ?, revoked_at = ?, revoke_reason = ? "
            "WHERE status IN ('pending', 'active')"
        )
        params: list[Any] = [status, at, reason]
        if task_id is not None:
            sql += " AND task_id = ?"
            params.append(task_id)
        if lease_id is not None:
            sql += " AND lease_id = ?"
            params.append(lease_id)
        return [str(r[0]) for r in self._all(sql + " RETURNING lease_id", tuple(params))]

    def expire_leases(self, now: float) -> list[str]:
        rows = self._all(
            "UPDATE leases SET status = 'expired', revoked_at = ?, revoke_reason = 'ttl elapsed' "
            "WHERE status IN ('pending', 'active') AND expires_at <= ? RETURNING lease_id",
            (now, now),
        )
        return [str(r[0]) for r in rows]

    def finish_lease_cleanup(self, lease_id: str) -> bool:
        cur = self._run(
            "UPDATE leases SET cleanup = 'done' WHERE lease_id = ? AND cleanup = 'pending' "
            "AND status IN ('revoked', 'expired')",
            (lease_id,),
        )
        return cur.rowcount == 1

    def lease_counts(self, now: float) -> tuple[int, int]:
        row = self._one(
            "SELECT "
            "(SELECT count(*) FROM leases WHERE status IN ('pending', 'active') "
            "AND expires_at <= ?), "
            "(SELECT count(*) FROM leases WHERE cleanup = 'pending' "
            "AND status IN ('revoked', 'expired'))",
            (now,),
        )
        assert row is not None
        return int(row[0]), int(row[1])

    # -- long-running tasks: token renewal, idleness (own table, created on first use) ----
    _TASK_RUNTIME_DDL = (
        "CREATE TABLE IF NOT EXISTS task_runtime (task_id TEXT PRIMARY KEY, "
        "resources_json TEXT NOT NULL DEFAULT '[]', last_call_at REAL)"
    )

    def _task_runtime(self) -> None:
        if not getattr(self, "_task_runtime_ready", False):
            self._run(self._TASK_RUNTIME_DDL)
            self._task_runtime_ready = True

    def set_task_token(self, task_id: str, token_id: str) -> bool:
        cur = self._run(
            "UPDATE tasks SET token_id = ? WHERE task_id = ? AND status = 'open'",
            (token_id, task_id),
        )
        return cur.rowcount == 1

    def put_task_resources(self, task_id: str, resources_json: str) -> None:
        self._task_runtime()
        self._run(
            "INSERT INTO task_runtime (task_id, resources_json) VALUES (?, ?) "
            "ON CONFLICT (task_id) DO UPDATE SET resources_json = excluded.resources_json",
            (task_id, resources_json),
        )

    def get_task_resources(self, task_id: str) -> str | None:
        self._task_runtime()
        row = self._one("SELECT resources_json FROM task_runtime WHERE task_id = ?", (task_id,))
        return None if row is None else str(row[0])

    def touch_task(self, task_id: str, at: float) -> None:
        self._task_runtime()
        self._run(
            "INSERT INTO task_runtime (task_id, last_call_at) VALUES (?, ?) "
            "ON CONFLICT (task_id) DO UPDATE SET last_call_at = "
            "max(coalesce(last_call_at, 0), excluded.last_call_at)",
            (task_id, at),
        )

    def task_last_activity(self, task_id: str) -> float | None:
        self._task_runtime()
        row = self._one("SELECT last_call_at FROM task_runtime WHERE task_id = ?", (task_id,))
        return None if row is None or row[0] is None else float(row[0])

    # -- console queries -----------------------------------------------------------------
    # Filters run in SQLite over the canonical receipt body with json_extract/json_each
    # (PostgreSQL: the same expressions over the body cast to jsonb); pages are keysets.
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
        sql = "SELECT * FROM audit_records WHERE 1=1"
        params: list[Any] = []
        if before_seq is not None:
            sql += " AND seq < ?"
            params.append(before_seq)
        for path, value in (
            ("$.kind", kind),
            ("$.chain[0]", agent),
            ("$.tool", tool),
            ("$.effect", effect),
            ("$.task_id", task_id),
        ):
            if value is not None:
                sql += f" AND json_extract(body, '{path}') = ?"
                params.append(value)
        if rule is not None:
            sql += (
                " AND (EXISTS (SELECT 1 FROM json_each(body, '$.reasons') AS r"
                " WHERE json_extract(r.value, '$.code') = ?)"
                " OR EXISTS (SELECT 1 FROM json_each(body, '$.policies') AS p WHERE p.value = ?))"
            )
            params.extend([rule, rule])
        if risk_tag is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM json_each(body, '$.risk_tags') AS t WHERE t.value = ?)"
            )
            params.append(risk_tag)
        if since is not None:
            sql += " AND created_at >= ?"
            params.append(since)
        if until is not None:
            sql += " AND created_at < ?"
            params.append(until)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        return [RecordRow(*r) for r in self._all(sql, tuple(params))]

    def record_tag_counts(self, since: float, until: float) -> list[tuple[str, str, int]]:
        # Grouped by the whole tag array first (receipts share a few dozen tag sets), then
        # spread over the tags here: one pass over the rows, no per-tag row explosion.
        rows = self._all(
            "SELECT json_extract(body, '$.risk_tags'), "
            "coalesce(json_extract(body, '$.effect'), ''), count(*) FROM audit_records "
            "WHERE created_at >= ? AND created_at < ? GROUP BY 1, 2",
            (since, until),
        )
        counts: dict[tuple[str, str], int] = {}
        for tags, effect, count in rows:
            for tag in json.loads(tags) if tags else ():
                key = (str(tag), str(effect))
                counts[key] = counts.get(key, 0) + int(count)
        return [(tag, effect, n) for (tag, effect), n in sorted(counts.items())]

    def record_effect_counts(self, since: float, until: float) -> dict[str, int]:
        rows = self._all(
            "SELECT coalesce(json_extract(body, '$.effect'), ''), count(*) FROM audit_records "
            "WHERE created_at >= ? AND created_at < ? "
            "AND json_array_length(json_extract(body, '$.risk_tags')) > 0 GROUP BY 1",
            (since, until),
        )
        return {str(effect): int(count) for effect, count in rows}

    def identity_summaries(
        self,
        *,
        after: str | None = None,
        limit: int = 50,
        now: float = 0.0,
        owner: str | None = None,
    ) -> list[IdentitySummaryRow]:
        self._task_runtime()
        rows = self._all(
            "SELECT i.*, "
            "(SELECT count(*) FROM tasks t WHERE t.agent_id = i.spiffe_id AND t.status = 'open'), "
            "max((SELECT max(t.opened_at) FROM tasks t WHERE t.agent_id = i.spiffe_id), "
            "  coalesce((SELECT max(r.last_call_at) FROM task_runtime r JOIN tasks t "
            "   ON t.task_id = r.task_id WHERE t.agent_id = i.spiffe_id), 0)), "
            "(SELECT max(s.expires_at) FROM svids s WHERE s.spiffe_id = i.spiffe_id), "
            "(SELECT count(*) FROM tasks t WHERE t.agent_id = i.spiffe_id AND t.status = 'open' "
            "  AND t.expires_at - t.opened_at > 86400), "
            "(SELECT count(*) FROM leases l JOIN tasks t ON t.task_id = l.task_id "
            "  WHERE l.agent_id = i.spiffe_id AND l.status IN ('pending', 'active') "
            "  AND (t.status != 'open' OR l.expires_at > t.expires_at OR t.expires_at <= ?)) "
            "FROM identities i WHERE i.spiffe_id > ? AND (? IS NULL OR i.owner = ?) "
            "ORDER BY i.spiffe_id LIMIT ?",
            (now, after or "", owner, owner, limit),
        )
        width = len(IdentityRow.__struct_fields__)
        return [
            IdentitySummaryRow(
                identity=IdentityRow(*r[:width]),
                open_tasks=int(r[width]),
                last_activity=float(r[width + 1]) if r[width + 1] else None,
                svid_expires_at=None if r[width + 2] is None else float(r[width + 2]),
                long_tasks=int(r[width + 3]),
                orphan_leases=int(r[width + 4]),
            )
            for r in rows
        ]

    def tasks_page(
        self,
        *,
        status: str | None = None,
        owner: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[TaskRow]:
        sql = "SELECT t.* FROM tasks t WHERE 1=1"
        params: list[Any] = []
        if status is not None:
            sql += " AND t.status = ?"
            params.append(status)
        if owner is not None:
            sql += " AND t.agent_id IN (SELECT spiffe_id FROM identities WHERE owner = ?)"
            params.append(owner)
        if before is not None:
            sql += " AND (t.opened_at < ? OR (t.opened_at = ? AND t.task_id < ?))"
            params.extend([before[0], before[0], before[1]])
        sql += " ORDER BY t.opened_at DESC, t.task_id DESC LIMIT ?"
        params.append(limit)
        return [TaskRow(*r) for r in self._all(sql, tuple(params))]

    def task_effect_counts(self, task_ids: list[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {t: {} for t in task_ids}
        if not task_ids:
            return counts
        rows = self._all(
            "SELECT json_extract(body, '$.task_id'), json_extract(body, '$.effect'), count(*) "
            "FROM audit_records WHERE json_extract(body, '$.task_id') IN "
            "(SELECT value FROM json_each(?)) "
            "AND json_extract(body, '$.kind') = 'decision' GROUP BY 1, 2",
            (json.dumps(task_ids),),
        )
        for task_id, effect, count in rows:
            counts.setdefault(str(task_id), {})[str(effect)] = int(count)
        return counts

    # -- authenticated rows ----------------------------------------------------------------
    def put_row_tag(self, kind: str, key: str, tag: str) -> None:
        self._run(
            "INSERT INTO row_tags (kind, key, tag) VALUES (?, ?, ?) "
            "ON CONFLICT (kind, key) DO UPDATE SET tag = excluded.tag",
            (kind, key, tag),
        )

    def get_row_tag(self, kind: str, key: str) -> str | None:
        row = self._one("SELECT tag FROM row_tags WHERE kind = ? AND key = ?", (kind, key))
        return None if row is None else str(row[0])

    def row_tags(self, kind: str) -> dict[str, str]:
        return {
            str(key): str(tag)
            for key, tag in self._all("SELECT key, tag FROM row_tags WHERE kind = ?", (kind,))
        }

    def add_accepted_risk(self, row: AcceptedRiskRow) -> None:
        self._run(
            "INSERT INTO accepted_risks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.risk_id,
                row.title,
                row.risk_tag,
                row.scope,
                row.justification,
                row.recorded_by,
                row.approver,
                row.status,
                row.created_at,
                row.expires_at,
                row.decided_by,
                row.decided_at,
            ),
        )

    def list_accepted_risks(self) -> list[AcceptedRiskRow]:
        rows = self._all("SELECT * FROM accepted_risks ORDER BY created_at DESC, risk_id")
        return [AcceptedRiskRow(*r) for r in rows]

    def decide_accepted_risk(self, risk_id: str, status: str, by: str, at: float) -> bool:
        if status == "withdrawn":
            cur = self._run(
                "UPDATE accepted_risks SET status = 'withdrawn' "
                "WHERE risk_id = ? AND status IN ('pending', 'accepted')",
                (risk_id,),
            )
        else:
            cur = self._run(
                "UPDATE accepted_risks SET status = ?, decided_by = ?, decided_at = ? "
                "WHERE risk_id = ? AND status = 'pending'",
                (status, by, at, risk_id),
            )
        return cur.rowcount == 1
