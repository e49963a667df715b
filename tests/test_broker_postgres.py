"""Dynamic PostgreSQL roles against the real server (127.0.0.1:5432, database ``test``).

A task's role runs its allowed query, is refused elsewhere, and cannot connect once the
task ends; the same after the TTL when the task was never ended, including after the
Tether process was killed with SIGKILL and started again. Each test uses its own
schema, table and role prefix, and removes them.

Table and schema names in SQL are generated here (``tb_<hex>``), never input: S608 is
silenced for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tether import FrozenClock, ProofKey, Tether, parse_intent
from tether.core import Sensitivity, SideEffect, ToolProfile
from tether.secrets import PostgresRoles, PostgresTemplate, SecretValue
from tether.secrets._postgres import Grant, role_name
from tether.store import LeaseRow

from .conftest import AGENT, OWNER, PERMIT_ALL, require_service
from .server_support import Server

psycopg = pytest.importorskip("psycopg")

HOST, PORT = "127.0.0.1", 5432
ADMIN_DSN = f"postgresql://postgres@{HOST}:{PORT}/test"
#: The reporting tool reads rows of internal data from the database.
CATALOGUE = {
    "db.query": ToolProfile(
        side_effect=SideEffect.READ, sensitivity=Sensitivity.INTERNAL, trusted=True
    )
}


@dataclass
class Database:
    schema: str
    other: str
    prefix: str

    def admin(self) -> Any:
        return psycopg.connect(ADMIN_DSN, autocommit=True)

    def roles(self) -> list[tuple[str, Any]]:
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT rolname, rolvaliduntil FROM pg_roles WHERE rolname LIKE %s",
                (self.prefix + "%",),
            ).fetchall()
        return [(str(r[0]), r[1]) for r in rows]

    def meta(self) -> dict[str, Any]:
        return {
            "postgres": {
                "grants": [{"schema": self.schema, "privileges": ["SELECT"], "tables": ["*"]}],
                "role_prefix": self.prefix,
            }
        }


@pytest.fixture
def db() -> Iterator[Database]:
    require_service("postgresql", HOST, PORT)
    tag = uuid.uuid4().hex[:8]
    database = Database(schema=f"tb_{tag}", other=f"tb_{tag}_other", prefix=f"tt{tag}_")
    with database.admin() as conn:
        conn.execute(f"CREATE SCHEMA {database.schema}")
        conn.execute(f"CREATE TABLE {database.schema}.invoices (id int, amount int)")
        conn.execute(f"INSERT INTO {database.schema}.invoices VALUES (1, 120), (2, 80)")  # noqa: S608
        conn.execute(f"CREATE SCHEMA {database.other}")
        conn.execute(f"CREATE TABLE {database.other}.salaries (id int, amount int)")
        conn.execute(f"INSERT INTO {database.other}.salaries VALUES (1, 9000)")  # noqa: S608
    yield database
    with database.admin() as conn:
        for role, _ in database.roles():
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
        conn.execute(f"DROP SCHEMA IF EXISTS {database.schema} CASCADE")
        conn.execute(f"DROP SCHEMA IF EXISTS {database.other} CASCADE")


def _can_connect(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def _open_and_lease(tether: Tether, *, ttl: int = 600) -> tuple[str, str, str]:
    """Open a task allowed ``db.query``, decide one call, lease the role: (task, lease, dsn)."""
    key = ProofKey()
    intent = parse_intent(
        {"purpose": "monthly report", "capabilities": [{"tool": "db.query"}], "ttl_seconds": ttl}
    )
    task = tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    args = {"sql": "SELECT sum(amount) FROM invoices"}
    proof = key.prove(task.token, "db.query", args, now=tether.clock.now())
    receipt = tether.authorize(token=task.token, proof=proof, tool="db.query", args=args)
    assert receipt.effect == "allow", receipt.decision.reasons
    lease = tether.lease(task.task_id, "reports-db", tool="db.query", receipt=receipt)
    return task.task_id, lease.lease_id, lease.value.reveal()


def test_task_role_is_scoped_and_gone_when_the_task_ends(permissive: Tether, db: Database) -> None:
    t = permissive
    t.catalogue.load(CATALOGUE, origin="tests")
    t.put_secret("reports-db", ADMIN_DSN, kind="postgres", meta=db.meta())
    task_id, lease_id, dsn = _open_and_lease(t)
    ((role, valid_until),) = db.roles()
    assert role == db.prefix + lease_id.removeprefix("lease_")
    assert abs(valid_until.timestamp() - t.tasks.get(task_id).expires_at) < 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute(f"SELECT sum(amount) FROM {db.schema}.invoices").fetchone()[0] == 200  # noqa: S608
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"SELECT * FROM {db.other}.salaries")  # noqa: S608
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"INSERT INTO {db.schema}.invoices VALUES (3, 1)")  # noqa: S608
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"CREATE TABLE {db.schema}.mine (x int)")
    held = psycopg.connect(dsn)  # a session still open when the task ends is terminated
    t.end_task(task_id)
    assert db.roles() == []
    assert not _can_connect(dsn)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    row = t.broker.get(lease_id)
    assert (row.status, row.cleanup) == ("revoked", "done")
    cleanup = [r for r in t.audit.tail(10) if r["kind"] == "lease.cleanup"]
    assert cleanup and cleanup[-1]["detail"]["role"] == role and cleanup[-1]["chain"] == [AGENT]
    assert "sql" not in json.dumps(cleanup) and dsn not in json.dumps(t.audit.tail(50))


def test_a_failed_drop_is_retried_by_the_reaper(permissive: Tether, db: Database) -> None:
    t = permissive
    t.catalogue.load(CATALOGUE, origin="tests")
    t.put_secret("reports-db", ADMIN_DSN, kind="postgres", meta=db.meta())
    task_id, lease_id, dsn = _open_and_lease(t)
    real_drop = t.broker.postgres.drop

    def unreachable(admin: SecretValue, role: str) -> bool:
        raise OSError("database unreachable")

    t.broker.postgres.drop = unreachable  # type: ignore[method-assign]
    t.end_task(task_id)  # the task ends all the same; the revocation is durable
    row = t.broker.get(lease_id)
    assert (row.status, row.cleanup) == ("revoked", "pending")
    assert t.broker.needs_reaping()
    t.broker.postgres.drop = real_drop  # type: ignore[method-assign]
    report = t.reap()
    assert report.cleaned == (lease_id,)
    assert db.roles() == [] and not _can_connect(dsn)


def test_a_lease_left_half_made_by_a_crash_is_reaped(db: Database) -> None:
    require_service("postgresql", HOST, PORT)
    clock = FrozenClock(time.time())
    t = Tether.ephemeral("acme.example", clock=clock)
    t.register_identity(AGENT, kind="agent", owner=OWNER)
    t.policies.load({"all.cedar": PERMIT_ALL})
    t.put_secret("reports-db", ADMIN_DSN, kind="postgres", meta=db.meta())
    key = ProofKey()
    task = t.open_task(
        AGENT,
        proof_jwk=key.jwk,
        intent=parse_intent({"purpose": "p", "capabilities": [{"tool": "db.query"}]}),
    )
    # The intent was recorded and the role made, then the process died before activation.
    lease_id = "lease_" + uuid.uuid4().hex
    template = PostgresTemplate(grants=(Grant(schema=db.schema),), role_prefix=db.prefix)
    role = role_name(template, lease_id)
    t.store.add_lease(
        LeaseRow(
            lease_id=lease_id,
            task_id=task.task_id,
            agent_id=AGENT,
            kind="postgres_role",
            secret_name="reports-db",
            secret_version=1,
            tool="db.query",
            status="pending",
            cleanup="pending",
            created_at=clock.now(),
            expires_at=clock.now() + 600,
            detail_json=json.dumps({"role": role}),
        )
    )
    PostgresRoles().create(
        SecretValue(ADMIN_DSN),
        template,
        role,
        SecretValue("pw-" + uuid.uuid4().hex),
        clock.now() + 600,
    )
    assert [r for r, _ in db.roles()] == [role]
    assert t.reap().revoked == ()  # still within the grace period: it may be in the making
    clock.advance(61)
    report = t.reap()
    assert report.revoked == (lease_id,) and report.cleaned == (lease_id,)
    assert db.roles() == []
    t.close()


_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from tether import ProofKey, Tether, parse_intent

    t = Tether.open(sys.argv[1])
    key = ProofKey()
    intent = parse_intent(
        {"purpose": "report", "capabilities": [{"tool": "db.query"}],
         "ttl_seconds": int(sys.argv[2])}
    )
    task = t.open_task("__AGENT__", proof_jwk=key.jwk, intent=intent)
    proof = key.prove(task.token, "db.query", {}, now=t.clock.now())
    receipt = t.authorize(token=task.token, proof=proof, tool="db.query", args={})
    lease = t.lease(task.task_id, "reports-db", tool="db.query", receipt=receipt)
    print(json.dumps({"dsn": lease.value.reveal(), "lease_id": lease.lease_id,
                      "task_id": task.task_id, "expires_at": lease.expires_at}), flush=True)
    if sys.argv[3] == "hold":
        time.sleep(3600)
    """
).replace("__AGENT__", AGENT)


def _holder(home: Path, ttl: int, mode: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Another Tether process that opens a task and leases a role (then holds or exits)."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(home), str(ttl), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"holder failed: {process.stderr.read() if process.stderr else ''}")
    return process, json.loads(line)


@pytest.fixture
def home(tmp_path: Path, db: Database) -> Path:
    home = tmp_path / "home"
    t = Tether.init(home, "acme.example")
    t.register_identity(AGENT, kind="agent", owner=OWNER)
    t.policies.load({"all.cedar": PERMIT_ALL})
    t.catalogue.load(CATALOGUE, origin="tests")
    t.put_secret("reports-db", ADMIN_DSN, kind="postgres", meta=db.meta())
    t.close()
    return home


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_expired_role_is_dropped_after_sigkill_and_restart(home: Path, db: Database) -> None:
    process, held = _holder(home, ttl=3, mode="hold")
    dsn = held["dsn"]
    with psycopg.connect(dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {db.schema}.invoices").fetchone()[0] == 2  # noqa: S608
    ((_, valid_until),) = db.roles()
    assert abs(valid_until.timestamp() - held["expires_at"]) < 1
    process.send_signal(signal.SIGKILL)  # no task end, no cleanup, nothing
    process.wait(timeout=10)
    _wait(lambda: time.time() > held["expires_at"] + 0.5, 10, "the lease to expire")
    # Nothing ran since: the role is still there. (Under password authentication its
    # VALID UNTIL already refuses it; this server trusts local connections, so only the
    # reaper stands between an expired lease and a usable role.)
    assert len(db.roles()) == 1
    server = Server(home, init=False).start()  # the restart: the reaper runs at start
    try:
        _wait(lambda: db.roles() == [], 15, "the reaper to drop the role")
        assert not _can_connect(dsn)
        t = Tether.open(home)
        row = t.broker.get(held["lease_id"])
        assert (row.status, row.cleanup) == ("expired", "done")
        kinds = [r["kind"] for r in t.audit.tail(20)]
        assert "lease.cleanup" in kinds
        t.close()
    finally:
        server.stop()


def test_the_running_server_reaps_a_role_whose_task_was_never_ended(
    home: Path, db: Database
) -> None:
    server = Server(home, init=False).start()
    try:
        process, held = _holder(home, ttl=2, mode="exit")
        process.wait(timeout=30)
        assert _can_connect(held["dsn"])
        _wait(lambda: db.roles() == [], 20, "the periodic reaper to drop the role")
        assert not _can_connect(held["dsn"])
    finally:
        server.stop()
