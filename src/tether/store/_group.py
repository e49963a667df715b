"""Group commit: concurrent decisions of one node share one transaction and one commit.

A decision is a unit of work (a callable) handed to :meth:`GroupCommit.run`. The units
queued while no group is being filled are run back to back by one thread of the node
(the leader: the first caller to find no group being filled), inside one database
transaction, each in its own savepoint: a unit that raises is rolled back to its
savepoint alone, its neighbours are kept. The group commits when the previous group's
commit has returned (or when it holds ``limit`` units), so one fsync covers every unit
that arrived during the previous one; while a group commits, the next one fills (on
PostgreSQL on another connection; SQLite's single writer waits for the commit). Every
caller returns only once the commit that holds its work is durable, and runs its own
``after_commit`` callbacks then: a crash loses nothing that was answered.

A unit runs in the caller's :mod:`contextvars` context (its tracing span), on the
leader's thread. A unit that would wait for a row while its group holds the log's
lock (PostgreSQL: another node could hold that row and wait for the log) yields
instead (:class:`GroupYield`): rolled back to its savepoint and run first in the next
group, where it waits like any transaction.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from tether._errors import InfrastructureError

T = TypeVar("T")

#: ``TETHER_GROUP_COMMIT``: the most decisions one commit holds (default 64); ``0`` or
#: ``off``: every decision commits on its own.
GROUP_COMMIT_ENV = "TETHER_GROUP_COMMIT"
DEFAULT_GROUP_LIMIT = 64


def group_limit_from_env() -> int:
    """The group size bound ``TETHER_GROUP_COMMIT`` asks for (``0``: group commit off)."""
    raw = os.environ.get(GROUP_COMMIT_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_GROUP_LIMIT
    if raw in ("off", "no", "false"):
        return 0
    if raw in ("on", "yes", "true"):
        return DEFAULT_GROUP_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise InfrastructureError(f"{GROUP_COMMIT_ENV} must be a number or 'off'") from None
    if value < 0:
        raise InfrastructureError(f"{GROUP_COMMIT_ENV} must not be negative")
    return value


class GroupYield(InfrastructureError):
    """A unit would wait for a row while its group holds the log's lock: it is rolled
    back and run again, first in the next group."""


class GroupHost(Protocol):
    """What a store gives the committer: one transaction bound to the calling thread."""

    def _group_begin(self) -> None:
        """Open the group's transaction on the calling thread (store methods use it)."""
        ...

    def _group_savepoint(self, may_yield: bool) -> None:
        """Start one unit: a savepoint, the unit's own ``after_commit`` list."""
        ...

    def _group_release(
        self,
    ) -> tuple[str, list[Callable[[], object]], list[Callable[[], object]]]:
        """The unit returned: ``("kept", its after_commit callbacks, its deferred work)``;
        ``("yielded", [], [])`` when it yielded on the way (its work rolled back, to be
        run again); ``("failed", [], [])`` when the transaction failed under it (its work
        rolled back). Raises only when the group's transaction itself is lost."""
        ...

    def _group_rollback(self) -> bool:
        """The unit failed: roll back to its savepoint, drop its callbacks. True when
        it yielded (to be run again)."""
        ...

    def _group_callbacks(self) -> list[Callable[[], object]]:
        """The ``after_commit`` callbacks registered since the last unit (by deferred work)."""
        ...

    def _group_commit(self) -> None:
        """Commit and release the transaction; raises if it did not commit."""
        ...

    def _group_abort(self) -> None:
        """Roll the whole transaction back and release it."""
        ...


class _Unit(Generic[T]):
    __slots__ = (
        "callbacks",
        "context",
        "deferred",
        "done",
        "error",
        "result",
        "retried",
        "work",
    )

    def __init__(self, work: Callable[[], T]) -> None:
        self.work = work
        self.context = contextvars.copy_context()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.callbacks: list[Callable[[], object]] = []
        #: Work the unit handed to :meth:`Store.defer`: run after every unit of the group.
        self.deferred: list[Callable[[], object]] = []
        self.retried = False


class GroupCommit:
    """The commit queue of one store (one node)."""

    def __init__(self, host: GroupHost, limit: int = DEFAULT_GROUP_LIMIT) -> None:
        self._host = host
        self.limit = max(1, limit)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # callers wait here for their commit
        self._wake = threading.Condition(lock)  # the filling leader waits here for work
        self._queue: list[_Unit[Any]] = []
        self._filling = False  # a leader is running units into an open group
        self._committing = False  # a group's commit is in flight
        #: Groups committed and units in them (for the bench and tests).
        self.groups = 0
        self.units = 0

    @property
    def pending(self) -> int:
        """Units queued, not yet run in a group."""
        with self._cond:
            return len(self._queue)

    def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` in the node's open group; return once its commit is durable."""
        unit: _Unit[T] = _Unit(work)
        lead = False
        with self._cond:
            self._queue.append(unit)
            self._wake.notify()
            while not unit.done:
                if not self._filling and self._queue:
                    self._filling = lead = True
                    break
                self._cond.wait()
        if lead:
            self._lead()
        if unit.error is not None:
            raise unit.error
        for callback in unit.callbacks:
            callback()
        result: T = unit.result
        return result

    def _finish(self, units: list[_Unit[Any]], error: BaseException | None = None) -> None:
        """Mark ``units`` answered (under the lock)."""
        for unit in units:
            if error is not None:
                unit.error, unit.callbacks = error, []
            unit.done = True
        self._cond.notify_all()

    def _lead(self) -> None:
        host = self._host
        try:
            host._group_begin()
        except BaseException as exc:
            with self._cond:
                units, self._queue = self._queue, []
                self._filling = False
                self._finish(units, exc)
            return
        ready: list[_Unit[Any]] = []
        yielded: list[_Unit[Any]] = []  # first in the next group
        broken: BaseException | None = None
        while True:
            with self._cond:
                batch: list[_Unit[Any]] = []
                if broken is None:
                    room = self.limit - len(ready)
                    batch, self._queue = self._queue[:room], self._queue[room:]
                if not batch:
                    if ready and broken is None and self._committing and len(ready) < self.limit:
                        # The previous commit is in flight: this group keeps filling.
                        self._wake.wait()
                        continue
                    while self._committing:
                        self._wake.wait()
                    self._committing = True
                    self._filling = False
                    self._queue[:0] = yielded
                    self._cond.notify_all()
                    break
            for index, unit in enumerate(batch):
                broken = self._run_unit(unit, ready, yielded)
                if broken is not None:
                    with self._cond:  # not run: the next group runs them first
                        self._queue[:0] = [u for u in batch[index:] if not u.done]
                    break
        error: BaseException | None = broken
        if broken is None and ready:
            try:
                # The units' deferred work (their receipts, appended to the log): the log's
                # lock is taken here, after every row lock of the group, until the commit.
                for unit in ready:
                    for deferred in unit.deferred:
                        unit.context.run(deferred)
                        unit.callbacks.extend(host._group_callbacks())
            except BaseException as exc:
                error = exc
        try:
            if error is None and ready:
                host._group_commit()
            else:
                host._group_abort()
        except BaseException as exc:
            error = error or exc
        with self._cond:
            self._committing = False
            self._wake.notify_all()
            if ready and error is None:
                self.groups += 1
                self.units += len(ready)
            self._finish(ready, error)

    def _run_unit(
        self, unit: _Unit[Any], ready: list[_Unit[Any]], yielded: list[_Unit[Any]]
    ) -> BaseException | None:
        """Run one unit in its savepoint; the error that broke the group's transaction, if
        one did (then the group is rolled back and its units answered with it)."""
        host = self._host
        try:
            host._group_savepoint(not unit.retried)
        except BaseException as exc:
            return exc
        try:
            unit.result = unit.context.run(unit.work)
        except BaseException as exc:
            try:
                gave_way = host._group_rollback()
            except BaseException as broke:
                with self._cond:
                    self._finish([unit], exc)
                return broke
            if gave_way and not unit.retried:
                unit.retried = True
                yielded.append(unit)
            else:
                with self._cond:
                    self._finish([unit], exc)
            return None
        try:
            status, callbacks, deferred = host._group_release()
        except BaseException as exc:
            with self._cond:
                self._finish([unit], exc)
            return exc
        if status == "kept":
            unit.callbacks, unit.deferred = callbacks, deferred
            ready.append(unit)
        elif status == "yielded" and not unit.retried:
            unit.retried = True
            yielded.append(unit)
        else:
            with self._cond:
                self._finish([unit], InfrastructureError("store error: the transaction failed"))
        return None
