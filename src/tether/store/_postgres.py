"""The shared store: PostgreSQL, for several Tether nodes on one database.

Same interface and semantics as :class:`tether.store.SQLiteStore`; what differs is
how concurrency is made safe when several threads and several processes share
the database:

* Transactions are per thread. The outermost :meth:`PostgresStore.transaction`
  checks a connection out of the pool for the calling thread; nested calls reuse
  it; a method called outside a transaction runs alone on a pooled connection
  (autocommit), like SQLite's.
* Every conditional change (:meth:`spend_call`, approvals, join tokens, proofs,
  leases) is one atomic ``UPDATE ... WHERE`` or ``INSERT ... ON CONFLICT``, so a
  budget is never exceeded and a one-time thing is never used twice, across nodes.
* :meth:`lock_task` takes the row locks of the task and its ancestors, root first
  (``SELECT ... FOR UPDATE``), until the transaction ends: a decision reads, decides
  on and writes the task's flow state and budgets while no other node can.
  Operations over several task trees (the kill switch, offboarding) lock every tree
  they will touch before their first receipt, so nobody waits for a row while
  holding the audit chain's lock.
* The audit chain is one chain for every node. :meth:`last_record`, inside a
  transaction, first takes the transaction-scoped advisory lock
  ``pg_advisory_xact_lock(CHAIN_LOCK_CLASS, hashtext(current_schema()))`` (one lock
  per schema, so Tether instances in different schemas do not contend), held until
  commit or rollback: two nodes never both append the same position. The primary
  key on ``audit_records.seq`` is the backstop. The lock is taken when the receipt
  is appended, at the end of a transaction's work, so it is held briefly.
* Group commit (:meth:`PostgresStore.grouped`, :mod:`tether.store._group`): the
  decisions of a node's threads share one transaction, each in a savepoint; their
  receipts are appended after every decision of the group (the log's lock taken once,
  after the group's row locks) and the group commits once. A decision that would wait
  for a row while its group already holds the log's lock yields (``NOWAIT``) and runs
  first in the next group.

Errors: a duplicate key (any integrity violation) is :class:`tether.Conflict`;
every other database or pool failure is :class:`tether.InfrastructureError`, so a
decision path fails closed.

The schema is managed by alembic migrations shipped in the package
(:func:`tether.store.migrate`, ``tether migrate``); a store refuses to open a
schema that is not at the newest revision.
"""

# Queries are built from this module's column lists and fixed fragments only; every value
# is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql as psql
from psycopg_pool import ConnectionPool

from tether._errors import Conflict, InfrastructureError, UsageError
from tether.store._group import GroupCommit, GroupYield, group_limit_from_env
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

T = TypeVar("T")

#: First key of the audit chain's advisory lock (the second is the schema's hash).
CHAIN_LOCK_CLASS = 0x54455448  # "TETH"

_KEY_COLS = (
    "kid, use, sealed, public_jwk, cert_pem, created_at, retired_at, verify_until, revoked_at, mac"
)
_HEAD_COLS = "size, root, at, prev, kid, signature, frontier, created_at"
_IDENTITY_COLS = "spiffe_id, kind, owner, description, status, created_at, disabled_at"
_TASK_COLS = (
    "task_id, agent_id, parent_task_id, template, intent_json, intent_digest, jkt, token_id, "
    "status, calls_used, opened_at, expires_at, ended_at, end_reason, chain_json"
)
_CREDENTIAL_COLS = "credential_id, secret_hash, role, owner, created_at, disabled_at, expires_at"
_APPROVAL_COLS = (
    "approval_id, task_id, agent_id, tool, args_digest, args_json, policy_digest, "
    "reasons_json, status, created_at, expires_at, decided_by, decided_at"
)
_RECORD_COLS = "seq, prev_hash, hash, body, created_at"
_CHECKPOINT_COLS = "seq, hash, signature, created_at"
_POLICY_COLS = "id, digest, sources_json, schema, loaded_at"
_VAULT_COLS = "name, kind, description, meta_json, created_at, created_by, disabled_at"
_VAULT_VERSION_COLS = (
    "name, version, sealed, wrapped_key, kms_key_id, created_at, created_by, retired_at, "
    "usable_until"
)
_LEASE_COLS = (
    "lease_id, task_id, agent_id, kind, secret_name, secret_version, tool, status, cleanup, "
    "created_at, expires_at, revoked_at, revoke_reason, detail_json"
)

_CONSOLE_SESSION_COLS = (
    "session_hash, credential_id, role, owner, created_at, seen_at, expires_at, flash"
)
_RISK_COLS = (
    "risk_id, title, risk_tag, scope, justification, recorded_by, approver, status, "
    "created_at, expires_at, decided_by, decided_at"
)

_LIVE: weakref.WeakSet[PostgresStore] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


#: Bounds on every pooled session, so one stuck statement, lock wait or half-finished
#: transaction (a node paused mid-decision holding the chain lock, say) fails closed
#: within seconds instead of stalling every node: the waiter gets an error (a deny or a
#: 503), the stuck transaction is rolled back by the server.
SESSION_SETTINGS = (
    ("statement_timeout", "1min"),
    ("lock_timeout", "10s"),
    ("idle_in_transaction_session_timeout", "30s"),
)


def _configure_session(conn: psycopg.Connection[Any]) -> None:
    for name, value in SESSION_SETTINGS:
        conn.execute(f"SET {name} = '{value}'")


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def url_with_schema(url: str, schema: str) -> str:
    """``url`` with its connections' ``search_path`` set to ``schema`` (libpq ``options``)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise UsageError(f"invalid schema name {schema!r}: lowercase letters, digits, '_'")
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def schema_of(url: str) -> str | None:
    """The schema ``url`` selects with ``options=-csearch_path=...``, if any."""
    for key, value in parse_qsl(urlsplit(url).query):
        if key == "options":
            match = re.search(r"-c\s*search_path\s*=\s*([A-Za-z0-9_]+)", value)
            if match:
                return match.group(1)
    return None


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _qmarks(text: str) -> str:
    """SQLite-style ``?`` placeholders to psycopg's ``%s`` (outside quoted strings)."""
    out, quoted = [], False
    for ch in text:
        if ch == "'":
            quoted = not quoted
        if ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


class _TxState(threading.local):
    conn: psycopg.Connection[tuple[Any, ...]] | None = None
    depth: int = 0
    callbacks: list[Callable[[], object]]
    #: This transaction holds the log's lock (taken once, kept to its end).
    chain_locked: bool = False
    #: The transaction is a commit group's (:meth:`PostgresStore.grouped`); its current
    #: unit may yield a row it would wait for, and did.
    group: bool = False
    may_yield: bool = False
    yielded: bool = False
    #: ``chain_locked`` when the current unit's savepoint was taken.
    unit_chain_locked: bool = False
    #: A unit is running, and the work it defers to the end of its group.
    in_unit: bool = False
    #: The unit's savepoint is taken before its first statement (a unit that runs none,
    #: deferring its receipt only, costs no round trip).
    need_savepoint: bool = False
    savepoint: bool = False
    #: The newest receipt this transaction appended, under the log's lock: the next
    #: append chains onto it without reading it back.
    tip: RecordRow | None = None
    unit_tip: RecordRow | None = None
    deferred: list[Callable[[], object]]

    def __init__(self) -> None:
        self.callbacks = []
        self.deferred = []


class PostgresStore:
    """The PostgreSQL implementation of :class:`tether.store.Store`.

    Open an existing, migrated database with ``PostgresStore(url)``; :meth:`create`
    migrates first; :meth:`throwaway` makes a fresh schema that :meth:`close` drops.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
        drop_schema_on_close: bool = False,
    ) -> None:
        if not is_postgres_url(url):
            raise UsageError("a PostgreSQL URL starts with postgresql://")
        self.dsn = url
        self.schema = schema_of(url)
        self._drop_schema = drop_schema_on_close
        self._tx = _TxState()
        self._closed = False
        # One direct connection first: an unreachable or refusing server is said at once
        # ("connection refused", "password authentication failed"), not after the pool's
        # wait as "pool initialization incomplete".
        try:
            psycopg.connect(url, connect_timeout=max(1, min(int(timeout), 5))).close()
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InfrastructureError(f"cannot open store {redact(url)}: {redact(first)}") from None
        #: The most decisions one commit holds (:meth:`grouped`); 0: group commit off.
        self.group_commit = group_limit_from_env()
        #: The commit queue :meth:`grouped` hands decisions to.
        self.committer = GroupCommit(self, self.group_commit or 1)
        try:
            self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                kwargs={"autocommit": True},
                configure=_configure_session,
                open=False,
                name="tether-store",
            )
            self._pool.open(wait=True, timeout=timeout)
        except Exception as exc:
            raise InfrastructureError(f"cannot open store {redact(url)}: {exc}") from None
        try:
            self._check_revision()
        except BaseException:
            self._pool.close()
            raise
        with _LIVE_LOCK:
            _LIVE.add(self)

    @classmethod
    def create(cls, url: str, *, migrate: bool = True, **kwargs: Any) -> PostgresStore:
        """Open ``url``, first applying every migration when ``migrate``."""
        if migrate:
            from tether.store._migrate import migrate as run_migrations  # noqa: PLC0415

            run_migrations(url)
        return cls(url, **kwargs)

    @classmethod
    def throwaway(cls, url: str, *, prefix: str = "tether_tmp") -> PostgresStore:
        """A fresh, migrated schema in the database at ``url``, dropped on :meth:`close`."""
        schema = f"{prefix}_{secrets.token_hex(6)}"
        try:
            return cls.create(url_with_schema(url, schema), drop_schema_on_close=True)
        except BaseException:
            with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as c:
                c.execute(
                    psql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psql.Identifier(schema))
                )
            raise

    @staticmethod
    def live() -> list[PostgresStore]:
        """The stores this process has open."""
        with _LIVE_LOCK:
            return list(_LIVE)

    @staticmethod
    def close_all() -> None:
        """Close every store this process still has open (test teardown, shutdown)."""
        for store in PostgresStore.live():
            store.close()

    def _check_revision(self) -> None:
        from tether.store._migrate import head_revision  # noqa: PLC0415

        head = head_revision()
        try:
            with self._pool.connection() as conn:
                exists = conn.execute(
                    "SELECT to_regclass('alembic_version') IS NOT NULL"
                ).fetchone()
                current = None
                if exists and exists[0]:
                    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                    current = None if row is None else str(row[0])
        except psycopg.Error as exc:
            raise InfrastructureError(f"cannot read the store's schema revision: {exc}") from None
        if current != head:
            where = f"schema {self.schema}" if self.schema else "the database"
            state = "has no Tether schema" if current is None else f"is at revision {current}"
            raise UsageError(
                f"{where} at {redact(self.dsn)} {state}, not {head}: run 'tether migrate'"
            )

    # -- plumbing -----------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        tx = self._tx
        if tx.conn is not None:  # nested: the thread's transaction goes on
            tx.depth += 1
            try:
                yield
            finally:
                tx.depth -= 1
            return
        conn = self._begin()
        tx.conn, tx.depth, tx.callbacks = conn, 1, []
        tx.chain_locked, tx.tip = False, None
        try:
            try:
                yield
            except BaseException:
                tx.callbacks = []
                with contextlib.suppress(psycopg.Error):  # broken: the pool discards it
                    conn.execute("ROLLBACK")
                raise
            callbacks, tx.callbacks = tx.callbacks, []
            try:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                    conn.execute("ROLLBACK")
                    raise InfrastructureError("store error: the transaction failed")
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                raise InfrastructureError(f"store error at commit: {exc}") from None
        finally:
            tx.conn, tx.depth = None, 0
            self._pool.putconn(conn)
        for callback in callbacks:
            callback()

    def _begin(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A pooled connection with a transaction begun on it."""
        try:
            conn = self._pool.getconn()
        except Exception as exc:
            raise InfrastructureError(f"store unavailable: {exc}") from None
        try:
            conn.execute("BEGIN")
        except Exception as exc:
            self._pool.putconn(conn)
            raise InfrastructureError(f"store error: {exc}") from None
        return conn

    def after_commit(self, callback: Callable[[], object]) -> None:
        tx = self._tx
        if tx.conn is not None:
            if callback not in tx.callbacks:  # once per commit is enough
                tx.callbacks.append(callback)
            return
        callback()

    # -- group commit (tether.store._group) --------------------------------------------
    def grouped(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a decision: its changes and its receipt) in this node's open
        commit group, isolated by a savepoint, and return once the commit holding it is
        durable; its ``after_commit`` callbacks run then, in this thread. The group takes
        the log's lock once for all its receipts. Inside a transaction of this thread, or
        with :attr:`group_commit` 0, it is simply ``with transaction(): work()``."""
        if self.group_commit <= 0 or self._tx.conn is not None:
            with self.transaction():
                return work()
        self.committer.limit = self.group_commit
        return self.committer.run(work)

    def defer(self, work: Callable[[], object]) -> bool:
        """Inside a decision of a commit group: run ``work`` in the group's transaction
        after every decision of the group, before its commit (dropped if the decision is
        rolled back). False, and ``work`` not taken, anywhere else."""
        tx = self._tx
        if not (tx.group and tx.in_unit):
            return False
        tx.deferred.append(work)
        return True

    def _group_begin(self) -> None:
        conn = self._begin()
        tx = self._tx
        tx.conn, tx.depth, tx.callbacks = conn, 1, []
        tx.chain_locked, tx.group, tx.tip = False, True, None

    def _group_conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = self._tx.conn
        if conn is None or not self._tx.group:
            raise InfrastructureError("store error: no commit group is open")
        return conn

    def _group_savepoint(self, may_yield: bool) -> None:
        tx = self._tx
        self._group_conn()  # a group is open on this thread
        tx.depth, tx.callbacks, tx.deferred = 1, [], []
        tx.may_yield, tx.yielded, tx.unit_chain_locked = may_yield, False, tx.chain_locked
        tx.unit_tip, tx.in_unit, tx.need_savepoint, tx.savepoint = tx.tip, True, True, False

    def _group_undo(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Roll the unit back to its savepoint (its locks too, the log's if it took it)."""
        tx = self._tx
        tx.need_savepoint = False
        if tx.savepoint:
            tx.savepoint = False
            try:
                conn.execute("ROLLBACK TO SAVEPOINT tether_unit")
                conn.execute("RELEASE SAVEPOINT tether_unit")
            except psycopg.Error as exc:
                raise InfrastructureError(f"store error: {exc}") from None
        tx.chain_locked, tx.tip = tx.unit_chain_locked, tx.unit_tip

    def _group_release(
        self,
    ) -> tuple[str, list[Callable[[], object]], list[Callable[[], object]]]:
        tx = self._tx
        conn = self._group_conn()
        callbacks, tx.callbacks = tx.callbacks, []
        deferred, tx.deferred = tx.deferred, []
        tx.depth, tx.may_yield, tx.in_unit = 1, False, False
        status = conn.info.transaction_status
        if tx.yielded or status == psycopg.pq.TransactionStatus.INERROR:
            self._group_undo(conn)
            return ("yielded" if tx.yielded else "failed"), [], []
        if status != psycopg.pq.TransactionStatus.INTRANS:
            raise InfrastructureError("store error: the group's transaction was lost")
        tx.need_savepoint = False
        if tx.savepoint:
            tx.savepoint = False
            try:
                conn.execute("RELEASE SAVEPOINT tether_unit")
            except psycopg.Error as exc:
                raise InfrastructureError(f"store error: {exc}") from None
        return "kept", callbacks, deferred

    def _group_callbacks(self) -> list[Callable[[], object]]:
        callbacks, self._tx.callbacks = self._tx.callbacks, []
        return callbacks

    def _group_rollback(self) -> bool:
        tx = self._tx
        conn = self._group_conn()
        tx.depth, tx.callbacks, tx.deferred = 1, [], []
        tx.may_yield = tx.in_unit = False
        self._group_undo(conn)
        return tx.yielded

    def _group_end(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        tx = self._tx
        tx.conn, tx.depth, tx.callbacks, tx.deferred = None, 0, [], []
        tx.chain_locked = tx.group = tx.may_yield = tx.yielded = tx.in_unit = False
        tx.need_savepoint = tx.savepoint = False
        tx.tip = tx.unit_tip = None
        self._pool.putconn(conn)

    def _group_commit(self) -> None:
        conn = self._group_conn()
        try:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                conn.execute("ROLLBACK")
                raise InfrastructureError("store error: the transaction failed")
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            raise InfrastructureError(f"store error at commit: {exc}") from None
        finally:
            self._group_end(conn)

    def _group_abort(self) -> None:
        conn = self._group_conn()
        try:
            with contextlib.suppress(psycopg.Error):  # broken: the pool discards it
                conn.execute("ROLLBACK")
        finally:
            self._group_end(conn)

    def lock_task(self, task_id: str) -> None:
        """Hold the row locks of the task and of its ancestors, the root first, until the
        current transaction ends (no-op outside one).

        Root first is the order a task's end takes them (a parent, then its children), and
        a delegated call spends every ancestor's budget: one order for both, no deadlock.
        """
        if self._tx.conn is not None:
            self._run(
                "WITH RECURSIVE path (task_id, parent_task_id, depth) AS ("
                " SELECT task_id, parent_task_id, 0 FROM tasks WHERE task_id = %s"
                " UNION ALL SELECT t.task_id, t.parent_task_id, p.depth + 1"
                " FROM tasks t JOIN path p ON t.task_id = p.parent_task_id WHERE p.depth < 32)"
                " SELECT t.task_id FROM tasks t JOIN path p ON p.task_id = t.task_id"
                " ORDER BY p.depth DESC FOR UPDATE OF t" + self._nowait(),
                (task_id,),
            )

    def _nowait(self) -> str:
        """``NOWAIT`` when this transaction is a commit group's that holds the log's lock:
        waiting for a row then could wait for a node that waits for the log; the unit
        yields instead, to run first in the next group (:class:`GroupYield`)."""
        tx = self._tx
        return " NOWAIT" if tx.group and tx.may_yield and tx.chain_locked else ""

    def lock_identity(self, spiffe_id: str) -> str | None:
        """The identity's status, its row share-locked until the transaction ends."""
        lock = " FOR SHARE" if self._tx.conn is not None else ""
        row = self._one(f"SELECT status FROM identities WHERE spiffe_id = %s{lock}", (spiffe_id,))
        return None if row is None else str(row[0])

    def notify(self, channel: str, payload: str) -> None:
        """``pg_notify``: delivered when the current transaction commits (at once outside one)."""
        self._run("SELECT pg_notify(%s, %s)", (channel, payload))

    def _exec(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        query: str,
        params: tuple[Any, ...] | None,
        fetch: str,
    ) -> Any:
        cur = conn.execute(query, params)
        if fetch == "one":
            return cur.fetchone()
        if fetch == "all":
            return cur.fetchall() if cur.description is not None else []
        return cur.rowcount

    def _do(self, query: str, params: tuple[Any, ...] | None, fetch: str) -> Any:
        try:
            conn = self._tx.conn
            if conn is not None:
                if self._tx.need_savepoint:  # a commit group's unit: its first statement
                    conn.execute("SAVEPOINT tether_unit")
                    self._tx.need_savepoint, self._tx.savepoint = False, True
                return self._exec(conn, query, params, fetch)
            with self._pool.connection() as pooled:
                return self._exec(pooled, query, params, fetch)
        except psycopg.IntegrityError as exc:
            raise Conflict(f"already exists: {exc}") from None
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            tx = self._tx
            if tx.group and tx.may_yield:
                tx.yielded = True
                raise GroupYield(f"store busy: {exc}") from None
            raise InfrastructureError(f"store error: {exc}") from None
        except psycopg.Error as exc:
            raise InfrastructureError(f"store error: {exc}") from None

    def _run(self, query: str, params: tuple[Any, ...] = ()) -> int:
        count: int = self._do(query, params or None, "count")
        return count

    def _one(self, query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._do(query, params or None, "one")
        return row

    def _all(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._do(query, params or None, "all")
        return rows

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _LIVE_LOCK:
            _LIVE.discard(self)
        try:
            if self._drop_schema and self.schema:
                with self._pool.connection() as conn:
                    conn.execute("SET lock_timeout = '10s'")
                    conn.execute(
                        psql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            psql.Identifier(self.schema)
                        )
                    )
        except Exception:  # noqa: S110 - best effort: the schema was throwaway
            pass
        finally:
            self._pool.close()

    def execute_unsafe(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._do(_qmarks(sql) if params else sql, params or None, "count")

    def execute_fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._do(
            _qmarks(sql) if params else sql, params or None, "all"
        )
        return [tuple(r) for r in rows]

    # -- meta -----------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = %s", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._run(
            "INSERT INTO meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- keys -----------------------------------------------------------------------
    def add_key(self, row: KeyRow) -> None:
        self._run(
            f"INSERT INTO signing_keys ({_KEY_COLS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
            for r in self._all(f"SELECT {_KEY_COLS} FROM signing_keys ORDER BY created_at, ord")
        ]

    def update_key(self, row: KeyRow) -> None:
        self._run(
            "UPDATE signing_keys SET retired_at = %s, verify_until = %s, revoked_at = %s, "
            "mac = %s WHERE kid = %s",
            (row.retired_at, row.verify_until, row.revoked_at, row.mac, row.kid),
        )

    # -- identities -------------------------------------------------------------------
    def add_identity(self, row: IdentityRow) -> None:
        self._run(
            f"INSERT INTO identities ({_IDENTITY_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(
            f"SELECT {_IDENTITY_COLS} FROM identities WHERE spiffe_id = %s", (spiffe_id,)
        )
        return None if row is None else IdentityRow(*row)

    def list_identities(self) -> list[IdentityRow]:
        return [
            IdentityRow(*r)
            for r in self._all(
                f'SELECT {_IDENTITY_COLS} FROM identities ORDER BY spiffe_id COLLATE "C"'
            )
        ]

    def disable_identity(self, spiffe_id: str, at: float) -> bool:
        count = self._run(
            "UPDATE identities SET status = 'disabled', disabled_at = %s "
            "WHERE spiffe_id = %s AND status = 'active'",
            (at, spiffe_id),
        )
        return count == 1

    def add_join_token(self, token_hash: str, spiffe_id: str, expires_at: float) -> None:
        self._run(
            "INSERT INTO join_tokens (token_hash, spiffe_id, expires_at, used_at) "
            "VALUES (%s, %s, %s, NULL)",
            (token_hash, spiffe_id, expires_at),
        )

    def consume_join_token(self, token_hash: str, now: float) -> str | None:
        row = self._one(
            "UPDATE join_tokens SET used_at = %s WHERE token_hash = %s AND used_at IS NULL "
            "AND expires_at > %s RETURNING spiffe_id",
            (now, token_hash, now),
        )
        return None if row is None else str(row[0])

    def record_svid(self, serial: str, spiffe_id: str, kind: str, expires_at: float) -> None:
        self._run(
            "INSERT INTO svids (serial, spiffe_id, kind, expires_at) VALUES (%s, %s, %s, %s)",
            (serial, spiffe_id, kind, expires_at),
        )

    # -- templates and policies ---------------------------------------------------------
    def put_template(self, name: str, body: str, at: float) -> None:
        self._run(
            "INSERT INTO templates (name, body, updated_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET body = excluded.body, "
            "updated_at = excluded.updated_at",
            (name, body, at),
        )

    def get_template(self, name: str) -> str | None:
        row = self._one("SELECT body FROM templates WHERE name = %s", (name,))
        return None if row is None else str(row[0])

    def list_templates(self) -> list[tuple[str, str]]:
        return [
            (str(a), str(b))
            for a, b in self._all('SELECT name, body FROM templates ORDER BY name COLLATE "C"')
        ]

    def add_policy(self, digest: str, sources_json: str, schema: str, at: float) -> int:
        row = self._one(
            "INSERT INTO policy_snapshots (digest, sources_json, schema, loaded_at) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (digest, sources_json, schema, at),
        )
        assert row is not None
        return int(row[0])

    def active_policy_id(self) -> int | None:
        row = self._one("SELECT max(id) FROM policy_snapshots")
        return None if row is None or row[0] is None else int(row[0])

    def active_policy(self) -> PolicyRow | None:
        row = self._one(f"SELECT {_POLICY_COLS} FROM policy_snapshots ORDER BY id DESC LIMIT 1")
        return None if row is None else PolicyRow(*row)

    # -- tasks ------------------------------------------------------------------------
    def add_task(self, row: TaskRow) -> None:
        self._run(
            f"INSERT INTO tasks ({_TASK_COLS}) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(f"SELECT {_TASK_COLS} FROM tasks WHERE task_id = %s", (task_id,))
        return None if row is None else TaskRow(*row)

    def list_tasks(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        parent_task_id: str | None = None,
    ) -> list[TaskRow]:
        query, params = f"SELECT {_TASK_COLS} FROM tasks WHERE true", []
        if parent_task_id is not None:
            query += " AND parent_task_id = %s"
            params.append(parent_task_id)
        if agent_id is not None:
            query += " AND agent_id = %s"
            params.append(agent_id)
        if status is not None:
            query += " AND status = %s"
            params.append(status)
        return [
            TaskRow(*r) for r in self._all(query + " ORDER BY opened_at, task_id", tuple(params))
        ]

    def close_task(self, task_id: str, status: str, reason: str, at: float) -> bool:
        count = self._run(
            "UPDATE tasks SET status = %s, end_reason = %s, ended_at = %s "
            "WHERE task_id = %s AND status = 'open'",
            (status, reason, at, task_id),
        )
        return count == 1

    def spend_call(
        self, task_id: str, max_calls: int, *, token_id: str | None = None, now: float | None = None
    ) -> bool:
        # One conditional UPDATE: PostgreSQL re-checks the condition on the row's newest
        # version after any concurrent writer commits, so nodes never overspend.
        query = (
            "UPDATE tasks SET calls_used = calls_used + 1 WHERE task_id = %s "
            "AND status = 'open' AND calls_used < %s"
        )
        params: list[Any] = [task_id, max_calls]
        if token_id is not None:
            query += " AND token_id = %s"
            params.append(token_id)
        if now is not None:
            query += " AND expires_at > %s"
            params.append(now)
        return self._run(query, tuple(params)) == 1

    # -- credentials and approvals -----------------------------------------------------
    def add_credential(self, row: CredentialRow) -> None:
        self._run(
            f"INSERT INTO credentials ({_CREDENTIAL_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
            f"SELECT {_CREDENTIAL_COLS} FROM credentials WHERE credential_id = %s",
            (credential_id,),
        )
        return None if row is None else CredentialRow(*row)

    def list_credentials(self) -> list[CredentialRow]:
        return [
            CredentialRow(*r)
            for r in self._all(
                f"SELECT {_CREDENTIAL_COLS} FROM credentials ORDER BY created_at, ord"
            )
        ]

    def disable_credential(self, credential_id: str, at: float) -> bool:
        return bool(
            self._do(
                "UPDATE credentials SET disabled_at = %s WHERE credential_id = %s "
                "AND disabled_at IS NULL",
                (at, credential_id),
                "count",
            )
        )

    def add_console_session(self, row: ConsoleSessionRow) -> None:
        self._run(
            f"INSERT INTO console_sessions ({_CONSOLE_SESSION_COLS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(
            f"SELECT {_CONSOLE_SESSION_COLS} FROM console_sessions WHERE session_hash = %s",
            (session_hash,),
        )
        return None if row is None else ConsoleSessionRow(*row)

    def touch_console_session(self, session_hash: str, seen_at: float) -> None:
        self._run(
            "UPDATE console_sessions SET seen_at = GREATEST(seen_at, %s) WHERE session_hash = %s",
            (seen_at, session_hash),
        )

    def flash_console_session(self, session_hash: str, flash: str) -> None:
        self._run(
            "UPDATE console_sessions SET flash = %s WHERE session_hash = %s", (flash, session_hash)
        )

    def delete_console_session(self, session_hash: str) -> None:
        self._run("DELETE FROM console_sessions WHERE session_hash = %s", (session_hash,))

    def purge_console_sessions(self, now: float, idle_before: float) -> int:
        return self._run(
            "DELETE FROM console_sessions WHERE expires_at <= %s OR seen_at <= %s",
            (now, idle_before),
        )

    def add_approval(self, row: ApprovalRow) -> None:
        self._run(
            f"INSERT INTO approvals ({_APPROVAL_COLS}) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(
            f"SELECT {_APPROVAL_COLS} FROM approvals WHERE approval_id = %s", (approval_id,)
        )
        return None if row is None else ApprovalRow(*row)

    def list_approvals(self, *, status: str | None = None) -> list[ApprovalRow]:
        if status is None:
            rows = self._all(f"SELECT {_APPROVAL_COLS} FROM approvals ORDER BY created_at, ord")
        else:
            rows = self._all(
                f"SELECT {_APPROVAL_COLS} FROM approvals WHERE status = %s "
                "ORDER BY created_at, ord",
                (status,),
            )
        return [ApprovalRow(*r) for r in rows]

    def approvals_page(
        self,
        *,
        status: str | None = None,
        before: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[ApprovalRow]:
        query = f"SELECT {_APPROVAL_COLS} FROM approvals WHERE true"
        params: list[Any] = []
        if status is not None:
            query += " AND status = %s"
            params.append(status)
        if before is not None:
            query += ' AND (created_at < %s OR (created_at = %s AND approval_id < %s COLLATE "C"))'
            params.extend([before[0], before[0], before[1]])
        query += ' ORDER BY created_at DESC, approval_id COLLATE "C" DESC LIMIT %s'
        params.append(limit)
        return [ApprovalRow(*r) for r in self._all(query, tuple(params))]

    def decide_approval(self, approval_id: str, status: str, by: str, at: float) -> bool:
        count = self._run(
            "UPDATE approvals SET status = %s, decided_by = %s, decided_at = %s "
            "WHERE approval_id = %s AND status = 'pending' AND expires_at > %s",
            (status, by, at, approval_id, at),
        )
        return count == 1

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
        query = (
            f"SELECT {_APPROVAL_COLS} FROM approvals WHERE task_id = %s AND tool = %s "
            "AND args_digest = %s AND status = %s"
        )
        params: list[Any] = [task_id, tool, args_digest, status]
        if unexpired_at is not None:
            query += " AND expires_at > %s"
            params.append(unexpired_at)
        if policy_digest is not None:
            query += " AND policy_digest = %s"
            params.append(policy_digest)
        row = self._one(query + " ORDER BY created_at, ord LIMIT 1", tuple(params))
        return None if row is None else ApprovalRow(*row)

    def use_approval(self, approval_id: str, at: float) -> bool:
        count = self._run(
            "UPDATE approvals SET status = 'used' WHERE approval_id = %s AND "
            "status = 'approved' AND expires_at > %s",
            (approval_id, at),
        )
        return count == 1

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
            "INSERT INTO task_labels (task_id, source, sensitivity, trusted, detail_json, at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (task_id, source, sensitivity, int(trusted), detail_json, at),
        )

    def list_task_labels(self, task_id: str) -> list[tuple[str, str, bool, str, float]]:
        rows = self._all(
            "SELECT task_id, source, sensitivity, trusted, detail_json, at "
            "FROM task_labels WHERE task_id = %s ORDER BY at, ord",
            (task_id,),
        )
        return [(str(r[1]), str(r[2]), bool(r[3]), str(r[4]), float(r[5])) for r in rows]

    # -- a task's information-flow state (tether.core.FlowState, encoded) -----------------
    def get_task_flow(self, task_id: str) -> bytes | None:
        row = self._one("SELECT state FROM task_flow WHERE task_id = %s", (task_id,))
        return None if row is None else bytes(row[0])

    def put_task_flow(self, task_id: str, state: bytes, at: float) -> None:
        self._run(
            "INSERT INTO task_flow (task_id, state, updated_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, "
            "updated_at = excluded.updated_at",
            (task_id, state, at),
        )

    def put_task_flow_delta(self, task_id: str, seq: int, delta: bytes, at: float) -> None:
        self._run(
            "INSERT INTO task_flow_deltas (task_id, seq, delta, at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (task_id, seq) DO UPDATE SET delta = excluded.delta, at = excluded.at",
            (task_id, seq, delta, at),
        )

    def task_flow_deltas(self, task_id: str, after: int, upto: int) -> list[tuple[int, bytes]]:
        rows = self._all(
            "SELECT seq, delta FROM task_flow_deltas WHERE task_id = %s AND seq > %s "
            "AND seq <= %s ORDER BY seq",
            (task_id, after, upto),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def drop_task_flow_deltas(self, task_id: str) -> None:
        self._run("DELETE FROM task_flow_deltas WHERE task_id = %s", (task_id,))

    # -- revocations and proofs ---------------------------------------------------------
    def revoke_token(self, token_id: str, task_id: str, reason: str, at: float) -> None:
        self._run(
            "INSERT INTO revocations (token_id, task_id, reason, revoked_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (token_id, task_id, reason, at),
        )

    def token_revoked(self, token_id: str) -> bool:
        return self._one("SELECT 1 FROM revocations WHERE token_id = %s", (token_id,)) is not None

    def revocations_since(self, at: float) -> list[tuple[str, float]]:
        rows = self._all(
            "SELECT token_id, revoked_at FROM revocations WHERE revoked_at >= %s", (at,)
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    def record_proof(self, jti: str, expires_at: float) -> bool:
        count = self._run(
            "INSERT INTO proofs (jti, expires_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (jti, expires_at),
        )
        return count == 1

    def proof_seen(self, jti: str) -> bool:
        return self._one("SELECT 1 FROM proofs WHERE jti = %s", (jti,)) is not None

    def purge_proofs(self, before: float) -> int:
        return self._run("DELETE FROM proofs WHERE expires_at < %s", (before,))

    # -- audit ------------------------------------------------------------------------
    def insert_record(self, row: RecordRow, mac: str | None = None) -> None:
        self._insert_record(row, mac)
        tx = self._tx
        if tx.conn is not None and tx.chain_locked:
            tx.tip = row

    def _insert_record(self, row: RecordRow, mac: str | None) -> None:
        if mac is None:
            self._run(
                f"INSERT INTO audit_records ({_RECORD_COLS}) VALUES (%s, %s, %s, %s, %s)",
                (row.seq, row.prev_hash, row.hash, row.body, row.created_at),
            )
            return
        # One round trip for the receipt and its tag (the chain's lock is held meanwhile).
        self._run(
            f"WITH r AS (INSERT INTO audit_records ({_RECORD_COLS}) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING seq) "
            "INSERT INTO audit_macs (seq, mac) SELECT seq, %s FROM r",
            (row.seq, row.prev_hash, row.hash, row.body, row.created_at, mac),
        )

    def records_between(
        self, after: int, upto: int | None = None
    ) -> list[tuple[RecordRow, str | None]]:
        rows = self._all(
            "SELECT r.seq, r.prev_hash, r.hash, r.body, r.created_at, m.mac "
            "FROM audit_records r LEFT JOIN audit_macs m ON m.seq = r.seq "
            "WHERE r.seq > %s AND r.seq <= %s ORDER BY r.seq",
            (after, upto if upto is not None else 2**62),
        )
        return [(RecordRow(*r[:5]), r[5]) for r in rows]

    def iter_record_macs(self) -> Iterator[tuple[int, str]]:
        for seq, mac in self._all("SELECT seq, mac FROM audit_macs ORDER BY seq"):
            yield int(seq), str(mac)

    def add_head(self, row: HeadRow) -> None:
        self._run(
            f"INSERT INTO audit_heads ({_HEAD_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
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
            f"SELECT {_HEAD_COLS} FROM audit_heads WHERE size <= %s ORDER BY size",
            (upto if upto is not None else 2**62,),
        )
        return [HeadRow(*r) for r in rows]

    def last_record(self) -> RecordRow | None:
        tx = self._tx
        if tx.conn is not None and tx.chain_locked and tx.tip is not None:
            return tx.tip  # appended by this transaction, under the lock it still holds
        if tx.conn is not None and not tx.chain_locked:
            # The chain's append lock, until this transaction ends (see the module doc):
            # taken once per transaction, so once per commit group.
            self._run(
                "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
                (CHAIN_LOCK_CLASS,),
            )
            tx.chain_locked = True
        row = self._one(f"SELECT {_RECORD_COLS} FROM audit_records ORDER BY seq DESC LIMIT 1")
        return None if row is None else RecordRow(*row)

    def get_record(self, seq: int) -> RecordRow | None:
        row = self._one(f"SELECT {_RECORD_COLS} FROM audit_records WHERE seq = %s", (seq,))
        return None if row is None else RecordRow(*row)

    def iter_records(self) -> Iterator[RecordRow]:
        rows = self._all(f"SELECT {_RECORD_COLS} FROM audit_records ORDER BY seq")
        for r in rows:
            yield RecordRow(*r)

    def tail_records(self, limit: int) -> list[RecordRow]:
        rows = self._all(
            f"SELECT {_RECORD_COLS} FROM audit_records ORDER BY seq DESC LIMIT %s", (limit,)
        )
        return [RecordRow(*r) for r in reversed(rows)]

    def add_checkpoint(self, row: CheckpointRow) -> None:
        self._run(
            f"INSERT INTO audit_checkpoints ({_CHECKPOINT_COLS}) VALUES (%s, %s, %s, %s)",
            (row.seq, row.hash, row.signature, row.created_at),
        )

    def list_checkpoints(self) -> list[CheckpointRow]:
        return [
            CheckpointRow(*r)
            for r in self._all(f"SELECT {_CHECKPOINT_COLS} FROM audit_checkpoints ORDER BY seq")
        ]

    # -- secrets ------------------------------------------------------------------------
    def add_secret(self, row: SecretRow) -> None:
        self._run(
            f"INSERT INTO secrets ({_VAULT_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(f"SELECT {_VAULT_COLS} FROM secrets WHERE name = %s", (name,))
        return None if row is None else SecretRow(*row)

    def list_secrets(self) -> list[SecretRow]:
        return [
            SecretRow(*r)
            for r in self._all(f'SELECT {_VAULT_COLS} FROM secrets ORDER BY name COLLATE "C"')
        ]

    def update_secret_meta(self, name: str, meta_json: str) -> None:
        self._run("UPDATE secrets SET meta_json = %s WHERE name = %s", (meta_json, name))

    def add_secret_version(self, row: SecretVersionRow) -> None:
        self._run(
            f"INSERT INTO secret_versions ({_VAULT_VERSION_COLS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
            rows = self._all(
                f"SELECT {_VAULT_VERSION_COLS} FROM secret_versions "
                'ORDER BY name COLLATE "C", version'
            )
        else:
            rows = self._all(
                f"SELECT {_VAULT_VERSION_COLS} FROM secret_versions WHERE name = %s "
                "ORDER BY version",
                (name,),
            )
        return [SecretVersionRow(*r) for r in rows]

    def retire_secret_versions(self, name: str, at: float, usable_until: float) -> int:
        return self._run(
            "UPDATE secret_versions SET retired_at = %s, usable_until = %s "
            "WHERE name = %s AND retired_at IS NULL",
            (at, usable_until, name),
        )

    # -- leases -------------------------------------------------------------------------
    def add_lease(self, row: LeaseRow) -> None:
        self._run(
            f"INSERT INTO leases ({_LEASE_COLS}) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        row = self._one(f"SELECT {_LEASE_COLS} FROM leases WHERE lease_id = %s", (lease_id,))
        return None if row is None else LeaseRow(*row)

    def list_leases(
        self,
        *,
        task_id: str | None = None,
        status: str | None = None,
        cleanup: str | None = None,
    ) -> list[LeaseRow]:
        query, params = f"SELECT {_LEASE_COLS} FROM leases WHERE true", []
        for column, value in (("task_id", task_id), ("status", status), ("cleanup", cleanup)):
            if value is not None:
                query += f" AND {column} = %s"
                params.append(value)
        return [LeaseRow(*r) for r in self._all(query + " ORDER BY created_at, ord", tuple(params))]

    def activate_lease(self, lease_id: str) -> bool:
        count = self._run(
            "UPDATE leases SET status = 'active' WHERE lease_id = %s AND status = 'pending'",
            (lease_id,),
        )
        return count == 1

    def renew_lease(self, lease_id: str, expires_at: float) -> bool:
        count = self._run(
            "UPDATE leases SET expires_at = %s WHERE lease_id = %s AND status = 'active'",
            (expires_at, lease_id),
        )
        return count == 1

    def revoke_leases(
        self,
        reason: str,
        at: float,
        *,
        task_id: str | None = None,
        lease_id: str | None = None,
        status: str = "revoked",
    ) -> list[str]:
        query = (
            "UPDATE leases SET status = %s, revoked_at = %s, revoke_reason = %s "
            "WHERE status IN ('pending', 'active')"
        )
        params: list[Any] = [status, at, reason]
        if task_id is not None:
            query += " AND task_id = %s"
            params.append(task_id)
        if lease_id is not None:
            query += " AND lease_id = %s"
            params.append(lease_id)
        return [str(r[0]) for r in self._all(query + " RETURNING lease_id", tuple(params))]

    def expire_leases(self, now: float) -> list[str]:
        rows = self._all(
            "UPDATE leases SET status = 'expired', revoked_at = %s, "
            "revoke_reason = 'ttl elapsed' "
            "WHERE status IN ('pending', 'active') AND expires_at <= %s RETURNING lease_id",
            (now, now),
        )
        return [str(r[0]) for r in rows]

    def finish_lease_cleanup(self, lease_id: str) -> bool:
        count = self._run(
            "UPDATE leases SET cleanup = 'done' WHERE lease_id = %s AND cleanup = 'pending' "
            "AND status IN ('revoked', 'expired')",
            (lease_id,),
        )
        return count == 1

    def lease_counts(self, now: float) -> tuple[int, int]:
        row = self._one(
            "SELECT "
            "(SELECT count(*) FROM leases WHERE status IN ('pending', 'active') "
            "AND expires_at <= %s), "
            "(SELECT count(*) FROM leases WHERE cleanup = 'pending' "
            "AND status IN ('revoked', 'expired'))",
            (now,),
        )
        assert row is not None
        return int(row[0]), int(row[1])

    # -- long-running tasks: token renewal, idleness ---------------------------------------
    def set_task_token(self, task_id: str, token_id: str) -> bool:
        count = self._run(
            "UPDATE tasks SET token_id = %s WHERE task_id = %s AND status = 'open'",
            (token_id, task_id),
        )
        return count == 1

    def put_task_resources(self, task_id: str, resources_json: str) -> None:
        self._run(
            "INSERT INTO task_runtime (task_id, resources_json) VALUES (%s, %s) "
            "ON CONFLICT (task_id) DO UPDATE SET resources_json = excluded.resources_json",
            (task_id, resources_json),
        )

    def get_task_resources(self, task_id: str) -> str | None:
        row = self._one("SELECT resources_json FROM task_runtime WHERE task_id = %s", (task_id,))
        return None if row is None else str(row[0])

    def touch_task(self, task_id: str, at: float) -> None:
        self._run(
            "INSERT INTO task_runtime (task_id, last_call_at) VALUES (%s, %s) "
            "ON CONFLICT (task_id) DO UPDATE SET last_call_at = "
            "greatest(coalesce(task_runtime.last_call_at, 0), excluded.last_call_at)",
            (task_id, at),
        )

    def task_last_activity(self, task_id: str) -> float | None:
        row = self._one("SELECT last_call_at FROM task_runtime WHERE task_id = %s", (task_id,))
        return None if row is None or row[0] is None else float(row[0])

    # -- console queries -----------------------------------------------------------------
    # The same filters as SQLite's json_extract/json_each, over the body cast to jsonb;
    # text compared and ordered bytewise (COLLATE "C"), as SQLite does.
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
        query = f"SELECT {_RECORD_COLS} FROM audit_records WHERE true"
        params: list[Any] = []
        if before_seq is not None:
            query += " AND seq < %s"
            params.append(before_seq)
        for path, value in (
            ("body::jsonb ->> 'kind'", kind),
            ("body::jsonb -> 'chain' ->> 0", agent),
            ("body::jsonb ->> 'tool'", tool),
            ("body::jsonb ->> 'effect'", effect),
            ("body::jsonb ->> 'task_id'", task_id),
        ):
            if value is not None:
                query += f" AND ({path}) = %s"
                params.append(value)
        if rule is not None:
            query += (
                " AND (EXISTS (SELECT 1 FROM jsonb_array_elements("
                "CASE WHEN jsonb_typeof(body::jsonb -> 'reasons') = 'array' "
                "THEN body::jsonb -> 'reasons' END) AS r WHERE r ->> 'code' = %s)"
                " OR EXISTS (SELECT 1 FROM jsonb_array_elements_text("
                "CASE WHEN jsonb_typeof(body::jsonb -> 'policies') = 'array' "
                "THEN body::jsonb -> 'policies' END) AS p WHERE p = %s))"
            )
            params.extend([rule, rule])
        if risk_tag is not None:
            query += (
                " AND EXISTS (SELECT 1 FROM jsonb_array_elements_text("
                "CASE WHEN jsonb_typeof(body::jsonb -> 'risk_tags') = 'array' "
                "THEN body::jsonb -> 'risk_tags' END) AS t WHERE t = %s)"
            )
            params.append(risk_tag)
        if since is not None:
            query += " AND created_at >= %s"
            params.append(since)
        if until is not None:
            query += " AND created_at < %s"
            params.append(until)
        query += " ORDER BY seq DESC LIMIT %s"
        params.append(limit)
        return [RecordRow(*r) for r in self._all(query, tuple(params))]

    def record_tag_counts(self, since: float, until: float) -> list[tuple[str, str, int]]:
        rows = self._all(
            "SELECT t.value, coalesce(a.body::jsonb ->> 'effect', ''), count(*) "
            "FROM audit_records AS a CROSS JOIN LATERAL jsonb_array_elements_text("
            "CASE WHEN jsonb_typeof(a.body::jsonb -> 'risk_tags') = 'array' "
            "THEN a.body::jsonb -> 'risk_tags' END) AS t(value) "
            "WHERE a.created_at >= %s AND a.created_at < %s GROUP BY 1, 2",
            (since, until),
        )
        return sorted((str(r[0]), str(r[1]), int(r[2])) for r in rows)

    def record_effect_counts(self, since: float, until: float) -> dict[str, int]:
        rows = self._all(
            "SELECT coalesce(body::jsonb ->> 'effect', ''), count(*) FROM audit_records "
            "WHERE created_at >= %s AND created_at < %s "
            "AND jsonb_typeof(body::jsonb -> 'risk_tags') = 'array' "
            "AND jsonb_array_length(body::jsonb -> 'risk_tags') > 0 GROUP BY 1",
            (since, until),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def identity_summaries(
        self,
        *,
        after: str | None = None,
        limit: int = 50,
        now: float = 0.0,
        owner: str | None = None,
    ) -> list[IdentitySummaryRow]:
        cols = ", ".join(f"i.{c.strip()}" for c in _IDENTITY_COLS.split(","))
        rows = self._all(
            f"SELECT {cols}, "
            "(SELECT count(*) FROM tasks t WHERE t.agent_id = i.spiffe_id AND t.status = 'open'), "
            "greatest((SELECT max(t.opened_at) FROM tasks t WHERE t.agent_id = i.spiffe_id), "
            "  coalesce((SELECT max(r.last_call_at) FROM task_runtime r JOIN tasks t "
            "   ON t.task_id = r.task_id WHERE t.agent_id = i.spiffe_id), 0)), "
            "(SELECT max(s.expires_at) FROM svids s WHERE s.spiffe_id = i.spiffe_id), "
            "(SELECT count(*) FROM tasks t WHERE t.agent_id = i.spiffe_id AND t.status = 'open' "
            "  AND t.expires_at - t.opened_at > 86400), "
            "(SELECT count(*) FROM leases l JOIN tasks t ON t.task_id = l.task_id "
            "  WHERE l.agent_id = i.spiffe_id AND l.status IN ('pending', 'active') "
            "  AND (t.status != 'open' OR l.expires_at > t.expires_at OR t.expires_at <= %s)) "
            'FROM identities i WHERE i.spiffe_id > %s COLLATE "C" '
            "AND (%s::text IS NULL OR i.owner = %s) "
            'ORDER BY i.spiffe_id COLLATE "C" LIMIT %s',
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
        query = f"SELECT {_TASK_COLS} FROM tasks t WHERE true"
        params: list[Any] = []
        if status is not None:
            query += " AND t.status = %s"
            params.append(status)
        if owner is not None:
            query += " AND t.agent_id IN (SELECT spiffe_id FROM identities WHERE owner = %s)"
            params.append(owner)
        if before is not None:
            query += ' AND (t.opened_at < %s OR (t.opened_at = %s AND t.task_id < %s COLLATE "C"))'
            params.extend([before[0], before[0], before[1]])
        query += ' ORDER BY t.opened_at DESC, t.task_id COLLATE "C" DESC LIMIT %s'
        params.append(limit)
        return [TaskRow(*r) for r in self._all(query, tuple(params))]

    def task_effect_counts(self, task_ids: list[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {t: {} for t in task_ids}
        if not task_ids:
            return counts
        rows = self._all(
            "SELECT body::jsonb ->> 'task_id', body::jsonb ->> 'effect', count(*) "
            "FROM audit_records WHERE (body::jsonb ->> 'task_id') = ANY(%s) "
            "AND (body::jsonb ->> 'kind') = 'decision' GROUP BY 1, 2",
            (list(task_ids),),
        )
        for tid, effect, count in rows:
            counts.setdefault(str(tid), {})[str(effect)] = int(count)
        return counts

    # -- authenticated rows ----------------------------------------------------------------
    def put_row_tag(self, kind: str, key: str, tag: str) -> None:
        self._run(
            "INSERT INTO row_tags (kind, key, tag) VALUES (%s, %s, %s) "
            "ON CONFLICT (kind, key) DO UPDATE SET tag = excluded.tag",
            (kind, key, tag),
        )

    def get_row_tag(self, kind: str, key: str) -> str | None:
        row = self._one("SELECT tag FROM row_tags WHERE kind = %s AND key = %s", (kind, key))
        return None if row is None else str(row[0])

    def row_tags(self, kind: str) -> dict[str, str]:
        return {
            str(key): str(tag)
            for key, tag in self._all("SELECT key, tag FROM row_tags WHERE kind = %s", (kind,))
        }

    def add_accepted_risk(self, row: AcceptedRiskRow) -> None:
        self._run(
            f"INSERT INTO accepted_risks ({_RISK_COLS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        rows = self._all(
            f'SELECT {_RISK_COLS} FROM accepted_risks ORDER BY created_at DESC, risk_id COLLATE "C"'
        )
        return [AcceptedRiskRow(*r) for r in rows]

    def decide_accepted_risk(self, risk_id: str, status: str, by: str, at: float) -> bool:
        if status == "withdrawn":
            count = self._run(
                "UPDATE accepted_risks SET status = 'withdrawn' "
                "WHERE risk_id = %s AND status IN ('pending', 'accepted')",
                (risk_id,),
            )
        else:
            count = self._run(
                "UPDATE accepted_risks SET status = %s, decided_by = %s, decided_at = %s "
                "WHERE risk_id = %s AND status = 'pending'",
                (status, by, at, risk_id),
            )
        return count == 1
