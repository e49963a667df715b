"""Group commit: concurrent decisions of a node share one transaction and one commit.

Each decision runs in its own savepoint inside the group (one that fails is rolled back
alone); nobody is answered before the commit that holds their receipt; the receipts of
concurrent writers, on one node or two sharing a store, form one log that verifies.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tether import FrozenClock, Tether
from tether.store import PostgresStore, RecordRow

from .conftest import AGENT, OWNER, PERMIT_ALL, open_simple_task, quiet

#: How long a test waits for another thread to reach a point (a hang guard, no bound).
PATIENCE = 30.0


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, "the other thread never got there"
        time.sleep(0.001)


@pytest.fixture
def nodes(tmp_path: Path, clock: FrozenClock) -> Iterator[tuple[Tether, Tether]]:
    """Two nodes of one trust domain on one store: one SQLite file, or one PostgreSQL
    schema (``$TETHER_DATABASE_URL``, set for ``tmp_path`` tests of a PostgreSQL run)."""
    home = tmp_path / "home"
    first = Tether.init(home, "acme.example", clock=clock)
    first.register_identity(AGENT, kind="agent", owner=OWNER)
    quiet(first)
    first.policies.load({"all.cedar": PERMIT_ALL})
    second = Tether.open(home, clock=clock)
    quiet(second)
    yield first, second
    second.close()
    first.close()


def _committed(t: Tether) -> set[int]:
    """The receipt positions another connection sees: what is committed."""
    store = t.store
    if isinstance(store, PostgresStore):
        with psycopg.connect(store.dsn) as conn:
            rows = conn.execute("SELECT seq FROM audit_records").fetchall()
    else:
        conn = sqlite3.connect(getattr(store, "path"))  # noqa: B009 - SQLiteStore.path
        try:
            rows = conn.execute("SELECT seq FROM audit_records").fetchall()
        finally:
            conn.close()
    return {int(r[0]) for r in rows}


class _Writer(threading.Thread):
    """Runs one unit of work through ``store.grouped`` and keeps what it returned."""

    def __init__(self, t: Tether, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.t, self.work = t, work
        self.result: Any = None
        self.error: BaseException | None = None
        self.answered = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.t.store.grouped(self.work)
        except BaseException as exc:  # handed to the test
            self.error = exc
        self.answered.set()


def _receipt(t: Tether, name: str, *, later: bool = False) -> Callable[[], Any]:
    """A unit: one change and one receipt (appended at once, or at the group's end)."""

    def work() -> Any:
        t.store.set_meta(f"unit.{name}", "written")
        append = t.audit.append_later if later else t.audit.append
        return append("decision", effect="allow", tool="fs.read", detail={"unit": name})

    return work


class _Group:
    """Writers for ``works`` that all run in one group: the first unit holds its group
    open until every other is queued behind it; the last one, once its work is done,
    waits for :attr:`release` (set at once unless ``hold``)."""

    def __init__(self, t: Tether, works: list[Callable[[], Any]], *, hold: bool = False) -> None:
        self.t = t
        self.first_running = threading.Event()
        self.everyone_queued = threading.Event()
        self.last_done = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        first_work, last_work = works[0], works[-1]

        def first() -> Any:
            self.first_running.set()
            result = first_work()
            self.everyone_queued.wait(PATIENCE)
            return result

        def last() -> Any:
            result = last_work()
            self.last_done.set()
            self.release.wait(PATIENCE)
            return result

        self.writers = [_Writer(t, first)] + [_Writer(t, w) for w in works[1:-1]]
        self.writers.append(_Writer(t, last))

    def start(self) -> list[_Writer]:
        committer = self.t.store.committer  # type: ignore[attr-defined]
        self.writers[0].start()
        assert self.first_running.wait(PATIENCE)
        for writer in self.writers[1:]:
            writer.start()
        _wait_for(lambda: committer.pending == len(self.writers) - 1)
        self.everyone_queued.set()
        return self.writers

    def join(self) -> None:
        for writer in self.writers:
            writer.join(PATIENCE)
            assert not writer.is_alive()


def _in_one_group(t: Tether, works: list[Callable[[], Any]]) -> list[_Writer]:
    """Run ``works`` in one group; check it was one group."""
    committer = t.store.committer  # type: ignore[attr-defined]
    groups = committer.groups
    group = _Group(t, works)
    writers = group.start()
    group.join()
    assert committer.groups == groups + 1
    return writers


@pytest.mark.parametrize("later", [False, True], ids=["receipt-at-once", "receipt-at-group-end"])
def test_a_failing_decision_rolls_back_alone(nodes: tuple[Tether, Tether], later: bool) -> None:
    """Three decisions in one group, the middle one fails after writing its changes and its
    receipt: its neighbours' changes and receipts commit, its own are gone, and the log
    has no hole."""
    t, _ = nodes
    before = t.store.last_record()
    start = 0 if before is None else before.seq

    def failing() -> None:
        _receipt(t, "b", later=later)()
        raise ValueError("the decision broke after its receipt")

    works = [_receipt(t, "a", later=later), failing, _receipt(t, "c", later=later)]
    a, b, c = _in_one_group(t, works)
    assert a.error is None and c.error is None
    assert isinstance(b.error, ValueError)
    assert (a.result.seq, c.result.seq) == (start + 1, start + 2)
    assert t.store.get_meta("unit.a") == t.store.get_meta("unit.c") == "written"
    assert t.store.get_meta("unit.b") is None
    bodies = [r.body for r in t.store.iter_records()][start:]
    assert ['"unit":"b"' in body for body in bodies] == [False, False]
    assert t.verify_audit().ok


def test_nothing_is_answered_before_its_commit(nodes: tuple[Tether, Tether]) -> None:
    """A decision whose work is done waits, unanswered and unseen by other connections,
    until the group holding its receipt has committed; then it is answered and seen."""
    t, _ = nodes
    works = [_receipt(t, "a"), _receipt(t, "b", later=True), _receipt(t, "c")]
    group = _Group(t, works, hold=True)
    a, b, c = group.start()
    assert group.last_done.wait(PATIENCE)  # c's work is done, so a's and b's are
    assert not b.answered.wait(0.3)
    assert not a.answered.is_set()
    seen = _committed(t)
    group.release.set()
    group.join()
    for writer in (a, b, c):
        assert writer.error is None
    answered = {a.result.seq, b.result.seq, c.result.seq}
    assert not answered & seen
    assert answered <= _committed(t)
    assert t.verify_audit().ok


def _decide_many(t: Tether, writers: int, calls: int) -> list[tuple[int, str]]:
    """``writers`` threads each deciding ``calls`` calls of its own task on ``t``."""
    receipts: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    tasks = [open_simple_task(t, max_calls=calls + 1) for _ in range(writers)]

    def decide(index: int) -> None:
        key, _task_id, token = tasks[index]
        try:
            for i in range(calls):
                args = {"path": f"/w{index}/{i}"}
                receipt = t.authorize(
                    token=token,
                    proof=key.prove(token, "fs.read", args, now=t.clock.now()),
                    tool="fs.read",
                    args=args,
                )
                assert receipt.decision.effect == "allow", receipt.decision.reasons
                with lock:
                    receipts.append((receipt.seq, receipt.hash))
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE * 4)
    assert not errors, errors
    return receipts


def _check_answered(t: Tether, receipts: list[tuple[int, str]]) -> None:
    """Every answered receipt is in the log, as answered, and tagged."""
    stored = {r.seq: r.hash for r in t.store.iter_records()}
    assert len({seq for seq, _ in receipts}) == len(receipts)
    for seq, digest in receipts:
        assert stored.get(seq) == digest
    tagged = {seq for seq, _ in t.store.iter_record_macs()}
    assert set(stored) <= tagged


def test_concurrent_writers_receipts_all_verify(nodes: tuple[Tether, Tether]) -> None:
    """Eight threads deciding at once through the pipeline: every answered receipt is in
    the log, tagged, and the log (chain, tags, signed heads) verifies."""
    t, _ = nodes
    receipts = _decide_many(t, writers=8, calls=12)
    assert len(receipts) == 96
    _check_answered(t, receipts)
    report = t.verify_audit()
    assert report.ok, report
    assert report.records == len(list(t.store.iter_records()))


def test_two_nodes_appending_concurrently_make_one_valid_log(
    nodes: tuple[Tether, Tether],
) -> None:
    """Two nodes on one store, each with several writers grouping their decisions: one
    log, every receipt of both answered and in it, and it verifies on either node."""
    first, second = nodes
    if not isinstance(first.store, PostgresStore):
        pytest.skip("nodes share PostgreSQL; a SQLite store is one node's")
    results: list[list[tuple[int, str]]] = [[], []]
    errors: list[BaseException] = []

    def run(index: int, node: Tether) -> None:
        try:
            results[index] = _decide_many(node, writers=4, calls=10)
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PATIENCE * 8)
    assert not errors, errors
    assert len(results[0]) == len(results[1]) == 40
    _check_answered(first, results[0] + results[1])
    assert first.verify_audit().ok
    assert second.verify_audit().ok


def test_group_commit_off_commits_each_decision_alone(nodes: tuple[Tether, Tether]) -> None:
    """With group commit off (``TETHER_GROUP_COMMIT=0``) a decision is a transaction of
    its own: the same receipts, no group."""
    t, _ = nodes
    t.store.group_commit = 0
    committer = t.store.committer  # type: ignore[attr-defined]
    groups = committer.groups
    receipts = _decide_many(t, writers=3, calls=5)
    assert committer.groups == groups
    _check_answered(t, receipts)
    assert t.verify_audit().ok


def test_a_decision_inside_a_transaction_joins_it(nodes: tuple[Tether, Tether]) -> None:
    """``grouped`` inside a transaction of the caller joins that transaction: rolled back
    with it, its after-commit callbacks dropped."""
    t, _ = nodes
    ran: list[str] = []

    def work() -> None:
        t.store.set_meta("inner", "x")
        t.store.after_commit(lambda: ran.append("inner"))

    with pytest.raises(RuntimeError), t.store.transaction():
        t.store.grouped(work)
        raise RuntimeError("the outer transaction fails")
    assert t.store.get_meta("inner") is None
    assert ran == []
    t.store.grouped(work)
    assert t.store.get_meta("inner") == "x"
    assert ran == ["inner"]


def test_a_decision_yields_a_row_another_node_holds(nodes: tuple[Tether, Tether]) -> None:
    """PostgreSQL: a group holds the log's lock after its first receipt; a later decision
    of the group that needs a task another node holds (that node about to append, so
    waiting for the log) yields, runs first in the next group, and both nodes' receipts
    are written: no deadlock, nobody denied."""
    first, second = nodes
    if not isinstance(first.store, PostgresStore):
        pytest.skip("SQLite has one writer at a time: no row is held by another node")
    _key, task_id, _token = open_simple_task(first)
    locked, appended, log_locked = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def other_node() -> None:
        try:
            with second.store.transaction():
                second.store.lock_task(task_id)
                locked.set()
                assert log_locked.wait(PATIENCE)
                second.audit.append("decision", effect="allow", tool="fs.read", task_id=task_id)
            appended.set()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    holder = threading.Thread(target=other_node, daemon=True)
    holder.start()
    assert locked.wait(PATIENCE)

    def needs_task() -> RecordRow:
        first.store.lock_task(task_id)
        return first.audit.append("decision", effect="allow", tool="fs.read", task_id=task_id)

    committer = first.store.committer  # type: ignore[attr-defined]
    groups = committer.groups

    def holds_log() -> RecordRow:
        record = _receipt(first, "a")()
        log_locked.set()  # the group holds the log's lock now
        return record

    group = _Group(first, [holds_log, needs_task])
    a, b = group.start()
    group.join()
    holder.join(PATIENCE)
    assert not errors, errors
    assert appended.is_set()
    assert a.error is None and b.error is None, (a.error, b.error)
    assert b.result.seq > a.result.seq
    assert committer.groups == groups + 2  # b ran again, in the next group
    assert first.verify_audit().ok
