"""``Node``: one Tether process among several sharing a PostgreSQL store.

A node listens on the trust domain's channel (``LISTEN tether_events``) on a
connection of its own and applies each event to its :class:`NodeMemory` and its
policy snapshot. A second thread resyncs every ``resync_interval`` seconds, and at
once after every (re)connection of the listener, so a notification lost while the
connection was down or the process was paused is made good within one interval.

Freshness bounds (see :mod:`tether.cluster._memory`): revocations are enforced by
the store on every allowed call whatever the node knows; identities and the policy
snapshot are at most ``resync_interval`` (+ the time of one resync) stale when a
notification is lost, and normally a few milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import psycopg

from tether._errors import UsageError
from tether.cluster._events import CHANNEL, Event, decode_event
from tether.cluster._memory import NodeMemory
from tether.core._intent import MAX_TTL_SECONDS
from tether.store import is_postgres_url

if TYPE_CHECKING:
    from tether._tether import Tether

log = logging.getLogger("tether.cluster")

#: Revocations re-read on each resync reach back this far before the last one: covers
#: a transaction that took its timestamp before the previous resync but committed after.
RESYNC_OVERLAP = 60.0
#: Every this many resyncs, the whole revocation set is rebuilt (dropping tokens that
#: expired long ago).
FULL_RESYNC_EVERY = 300


class Node:
    def __init__(
        self,
        tether: Tether,
        dsn: str,
        *,
        schema: str,
        resync_interval: float = 2.0,
        name: str = "",
    ) -> None:
        self.tether = tether
        self.dsn = dsn
        self.schema = schema
        self.name = name
        self.resync_interval = resync_interval
        self.memory = NodeMemory(stale_after=max(resync_interval * 2.5, 1.0))
        self.events = 0
        self.resyncs = 0
        self.reconnects = 0
        #: Seconds from a change's commit-time clock to this node applying it (recent).
        self.lags: deque[float] = deque(maxlen=4096)
        self._stop = threading.Event()
        self._resync_lock = threading.Lock()
        self._wake = threading.Event()
        self._watermark = 0.0
        self._threads: list[threading.Thread] = []
        self._conn: psycopg.Connection[Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Node:
        self.schema = self._current_schema()
        self.tether.enforcement.attach_memory(self.memory)
        self.tether.keys.cached = True
        self.tether.keys.fresh = self.memory.in_sync
        self.tether.vault.follow_events = True
        self.resync()
        for target, label in ((self._listen, "listen"), (self._resync_loop, "resync")):
            thread = threading.Thread(target=target, name=f"tether-node-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _current_schema(self) -> str:
        """The schema this store's tables live in, as the triggers will name it."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT current_schema()").fetchone()
        return str(row[0]) if row and row[0] else self.schema

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):  # best effort at shutdown
                conn.cancel_safe(timeout=1.0)
        for thread in self._threads:
            thread.join(timeout=5.0)
        self.memory.connected = False

    # -- resync ---------------------------------------------------------------------------
    def resync(self) -> None:
        """Re-read what memory holds from the store (revocations incrementally; all of
        the last token lifetime every ``FULL_RESYNC_EVERY`` resyncs, dropping the rest),
        and send the heartbeat this node must hear back to count as listening."""
        with self._resync_lock:
            self._resync()

    def _resync(self) -> None:
        started = time.monotonic()
        now = self.tether.clock.now()
        full = self.resyncs % FULL_RESYNC_EVERY == 0
        since = now - MAX_TTL_SECONDS - RESYNC_OVERLAP if full else self._watermark
        rows = self.tether.store.revocations_since(since)
        self.memory.add_revoked(token for token, _ in rows)
        if full:
            # Everything revoked within a token lifetime was just re-learned; what was
            # learned before this resync and not re-read is long expired.
            self.memory.prune_revoked(started)
        self.memory.forget_identity()
        self.tether.policies.invalidate()
        self.tether.keys.invalidate()
        self.tether.vault.invalidate()
        self._watermark = now - RESYNC_OVERLAP
        self.resyncs += 1
        self.memory.last_sync = time.monotonic()
        self._heartbeat()

    def _heartbeat(self) -> None:
        payload = json.dumps(
            {"kind": "heartbeat", "id": self.name, "schema": self.schema, "at": time.time()}
        )
        self.tether.store.notify(CHANNEL, payload)

    def _resync_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.resync_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.resync()
            except Exception as exc:  # the store is down: memory goes stale
                log.warning("node resync failed: %s: %s", type(exc).__name__, exc)

    # -- events ---------------------------------------------------------------------------
    def apply(self, event: Event) -> None:
        if event.schema and event.schema != self.schema:
            return
        if event.kind == "heartbeat":
            if event.id == self.name:
                self.memory.last_heartbeat = time.monotonic()
            return
        self.events += 1
        if event.at:
            self.lags.append(max(0.0, time.time() - event.at))
        if event.kind == "revoke":
            self.memory.add_revoked([event.id])
        elif event.kind == "task":
            if event.status is not None and event.status != "open" and event.token:
                self.memory.add_revoked([event.token])
        elif event.kind == "identity":
            self.memory.forget_identity(event.id)
        elif event.kind == "policy":
            self.tether.policies.invalidate()
        elif event.kind == "keys":
            self.tether.keys.invalidate()
        elif event.kind == "secrets":
            self.tether.vault.invalidate()

    def _listen(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    application_name=f"tether-node {self.schema} {self.name}"[:63],
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Trusted again only once what was missed is re-read and the
                    # heartbeat comes back through this very connection.
                    self.resync()
                    self.memory.connected = True
                    backoff = 0.05
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._dispatch(note.payload)
            except Exception as exc:  # reconnect; memory is not trusted meanwhile
                self.memory.connected = False
                if self._stop.is_set():
                    return
                self.reconnects += 1
                log.warning("node listener lost: %s: %s", type(exc).__name__, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self._conn = None
                self.memory.connected = False

    def _dispatch(self, payload: str) -> None:
        """Apply one notification; a failure here is this node's, not the connection's."""
        event = decode_event(payload)
        if event is None:
            return
        try:
            self.apply(event)
        except Exception as exc:  # never drop the listener for one event
            log.error("node event %s not applied: %s: %s", event.kind, type(exc).__name__, exc)
            self._wake.set()  # resync: whatever it should have changed is re-read

    # -- reporting ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        lags = sorted(self.lags)

        def pct(q: float) -> float | None:
            return round(lags[min(len(lags) - 1, int(q * len(lags)))] * 1000, 3) if lags else None

        return {
            "name": self.name,
            "connected": self.memory.connected,
            "in_sync": self.memory.in_sync(),
            "events": self.events,
            "resyncs": self.resyncs,
            "reconnects": self.reconnects,
            "revoked_known": self.memory.revoked_count,
            "event_lag_ms_p50": pct(0.5),
            "event_lag_ms_p99": pct(0.99),
        }


def join(tether: Tether, *, resync_interval: float = 2.0) -> Node | None:
    """Start this process as a node if ``tether``'s store is PostgreSQL (else ``None``).

    ``TETHER_RESYNC_INTERVAL`` (seconds) overrides ``resync_interval``."""
    store = tether.store
    dsn = getattr(store, "dsn", None)
    if not isinstance(dsn, str) or not is_postgres_url(dsn):
        return None
    interval = float(os.environ.get("TETHER_RESYNC_INTERVAL", resync_interval))
    if not 0.1 <= interval <= 60.0:
        raise UsageError(f"TETHER_RESYNC_INTERVAL must be between 0.1 and 60 s, not {interval}")
    node = Node(
        tether,
        dsn,
        schema=getattr(store, "schema", None) or "public",
        resync_interval=interval,
        name=f"{socket.gethostname()}:{os.getpid()}",
    )
    return node.start()
