"""``NodeMemory``: what a node's decision hot path reads from memory, not the store.

Three things, each with its freshness bound:

revocations
    the token ids revoked anywhere in the trust domain. Filled at start and by every
    resync from the store, and by ``revoke`` events as they arrive. A decision asks
    memory first; while the node is in sync (listener connected, last resync within
    ``stale_after``) memory's "not revoked" is the answer, otherwise the store is
    asked. It is never the only guard: every revocation path also closes the task or
    replaces its token in the task row, which the decision's spend step checks inside
    its transaction. A lost notification therefore cannot keep a revoked token usable
    at all; memory only saves a round trip.
identities
    the decision's view of an agent (owner, kind, active). Dropped by ``identity``
    events and by every resync, so a lost event is stale for at most one resync
    interval; disabling an identity also revokes its tasks in the same transaction,
    which the store-side check refuses at once.
policy snapshot
    kept by :class:`tether.policy.PolicyService`; in a node it is not re-checked on
    every call but refreshed by ``policy`` events and by every resync (stale for at
    most one resync interval when an event is lost).
"""

from __future__ import annotations

import threading
import time

from tether.store import IdentityRow


class NodeMemory:
    def __init__(self, *, stale_after: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._revoked: set[str] = set()
        self._identities: dict[str, IdentityRow] = {}
        self.stale_after = stale_after
        self.connected = False
        self.last_sync = 0.0  # time.monotonic() of the last complete resync

    # -- state ----------------------------------------------------------------------------
    def in_sync(self) -> bool:
        """Listening, and resynced recently: memory's answers may stand alone."""
        return (
            self.connected
            and self.last_sync > 0
            and time.monotonic() - self.last_sync <= self.stale_after
        )

    # -- revocations ----------------------------------------------------------------------
    def revoked(self, token_id: str) -> bool | None:
        """True if known revoked; False if surely not (in sync); None: ask the store."""
        if token_id in self._revoked:
            return True
        return False if self.in_sync() else None

    def add_revoked(self, token_ids: list[str] | set[str]) -> None:
        with self._lock:
            self._revoked.update(token_ids)

    def replace_revoked(self, token_ids: set[str]) -> None:
        with self._lock:
            self._revoked = token_ids

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)

    # -- identities -----------------------------------------------------------------------
    def identity(self, spiffe_id: str) -> IdentityRow | None:
        return self._identities.get(spiffe_id) if self.in_sync() else None

    def put_identity(self, row: IdentityRow) -> None:
        with self._lock:
            if len(self._identities) >= 100_000:
                self._identities.clear()
            self._identities[row.spiffe_id] = row

    def forget_identity(self, spiffe_id: str | None = None) -> None:
        with self._lock:
            if spiffe_id is None:
                self._identities.clear()
            else:
                self._identities.pop(spiffe_id, None)
