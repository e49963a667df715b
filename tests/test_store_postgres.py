"""The PostgreSQL store against a real server: the same semantics as SQLite, concurrency
across threads and processes, migrations.

These tests pick their stores themselves (both, or PostgreSQL only), so they run once.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tether import Tether
from tether._errors import Conflict, InfrastructureError, UsageError
from tether.store import (
    IdentityRow,
    PostgresStore,
    SQLiteStore,
    Store,
    TaskRow,
    current_revision,
    head_revision,
    migrate,
    url_with_schema,
)
from tether.store._migrate import script_head
from tether.store._postgres import schema_of

from .conftest import quiet, require_service
from .server_support import POSTGRES_URL, Backend, new_schema_url

pytestmark = pytest.mark.store_independent

ROOT = Path(__file__).resolve().parents[1]
AGENT = "spiffe://acme.example/agent/bot"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, migrated schema, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    before = len(Backend.schemas)
    url = new_schema_url("st")
    yield url
    for store in PostgresStore.live():
        if store.dsn == url:
            store.close()
    names = Backend.schemas[before:]
    del Backend.schemas[before:]
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def empty_schema() -> Iterator[str]:
    """A schema with nothing in it, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"st_empty_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield schema
    for store in PostgresStore.live():
        if store.schema == schema:
            store.close()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        lite = SQLiteStore(tmp_path / "t.db")
        yield lite
        lite.close()
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    pg: Store = PostgresStore.throwaway(POSTGRES_URL)
    yield pg
    pg.close()


def _task(task_id: str, *, parent: str | None = None, expires_at: float = 1e12) -> TaskRow:
    return TaskRow(
        task_id=task_id,
        agent_id="spiffe://acme.example/agent/a",
        parent_task_id=parent,
        template="t",
        intent_json="{}",
        intent_digest="d",
        jkt="k",
        token_id="tok",
        status="open",
        calls_used=0,
        opened_at=1.0,
        expires_at=expires_at,
    )


def _identity(spiffe_id: str) -> IdentityRow:
    return IdentityRow(spiffe_id, "agent", "a@acme.example", "", "active", 1.0)


# -- the same semantics on both stores ---------------------------------------------------
def test_duplicate_keys_are_conflicts(store: Store) -> None:
    store.add_identity(_identity("spiffe://acme.example/agent/a"))
    with pytest.raises(Conflict):
        store.add_identity(_identity("spiffe://acme.example/agent/a"))
    store.add_task(_task("t1"))
    with pytest.raises(Conflict):
        store.add_task(_task("t1"))
    assert store.get_identity("spiffe://acme.example/agent/a") is not None


def test_nested_transactions_commit_or_roll_back_as_one(store: Store) -> None:
    ran: list[str] = []
    with store.transaction():
        store.set_meta("a", "1")
        with store.transaction():
            store.set_meta("b", "2")
            store.after_commit(lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]
    assert (store.get_meta("a"), store.get_meta("b")) == ("1", "2")
    with pytest.raises(RuntimeError), store.transaction():
        store.set_meta("a", "changed")
        with store.transaction():
            store.set_meta("c", "3")
            store.after_commit(lambda: ran.append("never"))
        raise RuntimeError("abort")
    assert store.get_meta("a") == "1" and store.get_meta("c") is None
    assert ran == ["committed"]
    store.after_commit(lambda: ran.append("at once"))
    assert ran == ["committed", "at once"]


def test_conditional_updates_and_orders_match(store: Store) -> None:
    store.add_task(_task("t1"))
    assert [store.spend_call("t1", 2) for _ in range(3)] == [True, True, False]
    assert not store.spend_call("t1", 9, token_id="other")
    assert not store.spend_call("t1", 9, now=2e12)
    assert store.record_proof("j1", 5.0) and not store.record_proof("j1", 5.0)
    for name in ("b", "B", "a", "_x"):
        store.put_template(name, "{}", 1.0)
    assert [n for n, _ in store.list_templates()] == sorted(["b", "B", "a", "_x"])
    for i in range(4):  # one timestamp
        store.add_task(_task(f"z{i}"))
    assert [t.task_id for t in store.list_tasks()][1:] == ["z0", "z1", "z2", "z3"]
    store.touch_task("t1", 10.0)
    store.touch_task("t1", 5.0)
    assert store.task_last_activity("t1") == 10.0
    assert store.execute_fetch("SELECT task_id FROM tasks WHERE task_id = ?", ("t1",)) == [("t1",)]
    store.put_task_flow("t1", b"\x00\xffstate", 1.0)
    assert store.get_task_flow("t1") == b"\x00\xffstate"
    assert store.add_policy("d", "{}", "s", 1.0) < store.add_policy("e", "{}", "s", 2.0)
    active = store.active_policy()
    assert active is not None and active.digest == "e"


# -- PostgreSQL: concurrency -------------------------------------------------------------
def test_spend_call_from_threads_never_exceeds_the_budget(pg_url: str) -> None:
    store = PostgresStore(pg_url, max_size=8)
    store.add_task(_task("t1"))
    wins: list[bool] = []
    lock = threading.Lock()

    def spend() -> None:
        for _ in range(25):
            with store.transaction():
                store.lock_task("t1")
                ok = store.spend_call("t1", 60)
            with lock:
                wins.append(ok)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 60 and len(wins) == 200
    row = store.get_task("t1")
    assert row is not None and row.calls_used == 60
    store.close()


SPENDER = textwrap.dedent(
    """
    import sys
    from tether.store import PostgresStore
    store = PostgresStore(sys.argv[1])
    wins = sum(store.spend_call("t1", int(sys.argv[2])) for _ in range(int(sys.argv[3])))
    store.close()
    print(wins)
    """
)


def test_spend_call_from_processes_never_exceeds_the_budget(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    store.add_task(_task("t1"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SPENDER, pg_url, "100", "40"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    wins = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(wins) == 100 and all(p.returncode == 0 for p in procs)
    row = store.get_task("t1")
    assert row is not None and row.calls_used == 100
    store.close()


APPENDER = textwrap.dedent(
    """
    import sys
    from tether import Tether
    t = Tether.open(sys.argv[1], database_url=sys.argv[2])
    for i in range(int(sys.argv[3])):
        t.audit.append("test.concurrent", effect="allow", detail={"n": i, "by": sys.argv[4]})
    t.close()
    """
)


def test_two_processes_append_one_valid_chain(pg_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    t = Tether.init(home, "acme.example", database_url=pg_url)
    start = t.verify_audit().records
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(home), pg_url, "60", name])
        for name in ("a", "b", "c")
    ]
    for name in range(40):  # and this process too
        t.audit.append("test.concurrent", effect="allow", detail={"n": name, "by": "main"})
    assert all(p.wait(timeout=120) == 0 for p in procs)
    report = t.verify_audit()
    assert report.ok, report.problem
    assert report.records == start + 3 * 60 + 40
    assert report.checkpoints >= 3  # every 64 records, signed by whichever node appended
    bodies = [json.loads(r.body) for r in t.store.iter_records()]
    assert [b["seq"] for b in bodies] == list(range(1, report.records + 1))
    t.close()


def test_lock_task_holds_the_task_and_its_ancestors(pg_url: str) -> None:
    store = PostgresStore(pg_url, max_size=4)
    store.add_task(_task("t0"))
    store.add_task(_task("t1", parent="t0"))
    events: list[str] = []
    locked = threading.Event()

    def holder() -> None:
        with store.transaction():
            store.lock_task("t1")  # and its parent, t0
            locked.set()
            time.sleep(0.3)
            events.append("holder done")

    thread = threading.Thread(target=holder)
    thread.start()
    locked.wait(5)
    with store.transaction():
        store.lock_task("t0")
        events.append("second locked")
    thread.join()
    assert events == ["holder done", "second locked"]
    store.close()


def test_notify_is_delivered_at_commit(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute("LISTEN tether_test")
        with store.transaction():
            store.notify("tether_test", "inside")
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert got == ["inside"]
        store.notify("tether_test", "outside")
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["outside"]
    store.close()


def test_a_failed_statement_fails_the_transaction(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    with pytest.raises(InfrastructureError), store.transaction():
        store.set_meta("x", "1")
        with pytest.raises(InfrastructureError):
            store.execute_unsafe("SELECT * FROM no_such_table")
        store.set_meta("y", "2")  # the transaction is aborted: refused, never committed
    assert store.get_meta("x") is None
    store.close()


def test_an_unreachable_database_is_an_infrastructure_error() -> None:
    with pytest.raises(InfrastructureError, match="cannot open store"):
        PostgresStore("postgresql://postgres@127.0.0.1:1/test?connect_timeout=1", timeout=2)


# -- migrations ------------------------------------------------------------------------
def test_head_constant_matches_the_scripts() -> None:
    assert script_head() == head_revision()


def test_migrate_then_open_and_unmigrated_is_refused(tmp_path: Path, empty_schema: str) -> None:
    schema = empty_schema
    url = url_with_schema(POSTGRES_URL, schema)
    assert schema_of(url) == schema
    with pytest.raises(UsageError, match="run 'tether migrate'"):
        PostgresStore(url)
    with pytest.raises(UsageError, match="tether migrate"):
        Tether.init(tmp_path / "home", "acme.example", database_url=url)
    env = {**os.environ, "TETHER_DATABASE_URL": url, "TETHER_HOME": str(tmp_path / "home")}
    run = [sys.executable, "-m", "tether"]
    out = subprocess.run(
        [*run, "migrate", "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["from_revision"], result["revision"]) == (None, head_revision())
    assert result["schema"] == schema
    assert current_revision(url) == head_revision()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:  # alembic's table: there
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = %s AND table_name = 'alembic_version'",
            (schema,),
        ).fetchone()
        assert row == (1,)
    again = subprocess.run(
        [*run, "migrate", "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert json.loads(again.stdout)["from_revision"] == head_revision()
    init = subprocess.run(
        [*run, "init", "--trust-domain", "acme.example", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    verify = subprocess.run(
        [*run, "--break-glass", "audit", "verify", "--json"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True
    assert not (tmp_path / "home" / "tether.db").exists()  # the home holds the KEK only
    again_init = subprocess.run(
        [*run, "init", "--trust-domain", "acme.example"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again_init.returncode != 0 and "already holds a trust domain" in again_init.stderr
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("UPDATE {}.alembic_version SET version_num = 'old'").format(
                psycopg.sql.Identifier(schema)
            )
        )
    with pytest.raises(UsageError, match=r"is at revision old, not .*tether migrate"):
        PostgresStore(url)
    no_url = {k: v for k, v in env.items() if k != "TETHER_DATABASE_URL"}
    out = subprocess.run([*run, "migrate"], env=no_url, capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "TETHER_DATABASE_URL" in out.stderr
    assert migrate  # the function the command runs, exported for operators' scripts


def test_an_exhausted_pool_is_an_infrastructure_error(pg_url: str) -> None:
    store = PostgresStore(pg_url, max_size=1, timeout=0.5)
    with store.transaction():
        store.set_meta("held", "1")
        failures: list[BaseException] = []

        def other() -> None:
            try:
                store.get_meta("held")
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(failures) == 1 and isinstance(failures[0], InfrastructureError)
    assert store.get_meta("held") == "1"  # the pool serves again once the connection is back
    store.close()


def test_pool_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.store import pool_size

    assert pool_size() == 10
    monkeypatch.setenv("TETHER_DATABASE_POOL_SIZE", "3")
    assert pool_size() == 3
    monkeypatch.setenv("TETHER_DATABASE_POOL_SIZE", "zero")
    with pytest.raises(UsageError, match="positive integer"):
        pool_size()


def _decision_world(url: str) -> tuple[Tether, Any, str]:
    from tether import ProofKey, parse_intent

    t = Tether.ephemeral("acme.example", database_url=url)
    t.register_identity(AGENT, kind="agent", owner="a@acme.example")
    t.policies.load({"all.cedar": "permit (principal, action, resource);"})
    quiet(t)
    key = ProofKey()
    intent = parse_intent({"purpose": "p", "capabilities": [{"tool": "fs.read"}]})
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    return t, key, task.token


def _never_allowed(t: Tether, key: Any, token: str) -> str:
    """The outcome of one call: "error" (InfrastructureError) or the decision's effect."""
    proof = key.prove(token, "fs.read", {}, now=t.clock.now())
    try:
        return str(t.authorize(token=token, proof=proof, tool="fs.read", args={}).effect)
    except InfrastructureError:
        return "error"


def test_a_database_failure_on_a_decision_is_never_an_allow() -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    t, key, token = _decision_world(POSTGRES_URL)
    records = t.verify_audit().records
    # Reading fails: the decision's inputs are unavailable, a deny with its receipt.
    t.store.execute_unsafe("ALTER TABLE proofs RENAME TO proofs_gone")
    assert _never_allowed(t, key, token) == "deny"
    tail = t.audit.tail(1)[0]
    assert tail["effect"] == "deny" and tail["reasons"][0]["code"] == "infrastructure.error"
    t.store.execute_unsafe("ALTER TABLE proofs_gone RENAME TO proofs")
    # Writing fails (the proof cannot be consumed): the whole decision rolls back, and the
    # deny that replaces it is recorded in a transaction of its own.
    t.store.execute_unsafe(
        "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; "
        "END $$ LANGUAGE plpgsql"
    )
    t.store.execute_unsafe(
        "CREATE TRIGGER refuse BEFORE INSERT ON proofs FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    assert _never_allowed(t, key, token) == "deny"
    assert t.verify_audit().records == records + 2  # the two denies, nothing applied
    assert t.audit.tail(1)[0]["reasons"][0]["code"] == "infrastructure.error"
    assert [r.calls_used for r in t.store.list_tasks()] == [0]
    t.store.execute_unsafe("DROP TRIGGER refuse ON proofs")
    assert _never_allowed(t, key, token) == "allow"
    t.close()


def test_lost_connections_fail_closed_then_the_pool_recovers() -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    t, key, token = _decision_world(POSTGRES_URL)
    pids = {r[0] for r in t.store.execute_fetch("SELECT pg_backend_pid()")}
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    outcomes = [_never_allowed(t, key, token) for _ in range(3)]
    assert outcomes[-1] == "allow" and set(outcomes) <= {"error", "deny", "allow"}
    t.close()


def test_the_kill_switch_and_concurrent_decisions_never_deadlock() -> None:
    from tether import ProofKey, parse_intent

    require_service("PostgreSQL", "127.0.0.1", 5432)
    t = Tether.ephemeral("acme.example", database_url=POSTGRES_URL)
    t.register_identity(AGENT, kind="agent", owner="a@acme.example")
    t.policies.load({"all.cedar": "permit (principal, action, resource);"})
    intent = parse_intent(
        {"purpose": "p", "capabilities": [{"tool": "fs.read"}], "budget": {"max_calls": 10_000}}
    )
    tasks = []
    for _ in range(6):
        key = ProofKey()
        tasks.append((key, t.open_task(AGENT, proof_jwk=key.jwk, intent=intent).token))
    errors: list[BaseException] = []
    allowed_after: list[int] = []
    killed = threading.Event()

    def caller(key: ProofKey, token: str) -> None:
        for _ in range(400):
            after = killed.is_set()
            proof = key.prove(token, "fs.read", {}, now=t.clock.now())
            try:
                receipt = t.authorize(token=token, proof=proof, tool="fs.read", args={})
            except BaseException as exc:
                errors.append(exc)
                return
            if receipt.effect == "allow" and after:
                allowed_after.append(receipt.seq)
            if receipt.effect != "allow":
                return

    threads = [threading.Thread(target=caller, args=task) for task in tasks]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    result = t.kill("incident", everything=True)
    killed.set()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [], errors  # a deadlock would surface here as an error
    assert len(result["tasks"]) == 6 and allowed_after == []
    assert t.verify_audit().ok
    t.close()


def test_two_nodes_initialising_one_database_at_once_make_one_trust_domain(
    pg_url: str, tmp_path: Path
) -> None:
    from tether.tokens._seal import KEK_FILE

    outcomes: list[str] = []

    def init(name: str) -> None:
        try:
            Tether.init(tmp_path / name, "acme.example", database_url=pg_url).close()
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=init, args=(f"node{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["created"]
    homes = [p for p in tmp_path.iterdir() if (p / KEK_FILE).exists()]
    assert len(homes) == 1  # a refused init leaves no key behind
    winner = homes[0]
    t = Tether.open(winner, database_url=pg_url)
    assert t.verify_audit().ok and t.verify_audit().records == 1
    t.close()


def test_every_pooled_session_bounds_statements_lock_waits_and_idle_transactions(
    pg_url: str,
) -> None:
    """A stuck statement, lock wait or half-done transaction fails within seconds."""
    from tether.store._postgres import SESSION_SETTINGS

    store = PostgresStore.create(pg_url)
    try:
        for name, value in SESSION_SETTINGS:
            assert store.execute_fetch(f"SHOW {name}") == [(value,)]
        with store.transaction():  # also inside a transaction
            assert store.execute_fetch("SHOW lock_timeout") == [("10s",)]
    finally:
        store.close()


def test_an_unreachable_server_is_named_as_such() -> None:
    """A refused connection is reported as what it is (with the password redacted), not
    as the connection pool's "initialization incomplete"."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(InfrastructureError) as caught:
        PostgresStore(f"postgresql://tether:hunter2@127.0.0.1:{port}/test")
    message = str(caught.value)
    assert "refused" in message.lower()
    assert "hunter2" not in message and "initialization" not in message
