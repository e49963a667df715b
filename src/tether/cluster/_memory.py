"""``NodeMemory``: what a node's decision hot path reads from memory, not the store.

Three things, each with its freshness bound:

revocations
    the token ids revoked anywhere in the trust domain. Filled at start and by every
    resync from the store, and by ``revoke`` and ``task`` events as they arrive. A
    decision asks memory first; while the node is in sync (listener connected and heard
    its own heartbeat, last resync within ``stale_after``) memory's "not revoked" is the
    answer, otherwise the store is asked. It is never the only guard: every revocation
    path also closes the task or replaces its token in the task row, which the decision
    reads and its spend step re-checks inside its transaction. A lost notification
    therefore cannot keep a revoked token usable at all; memory only saves a round trip.
identities
    the decision's view of an agent (owner, kind, active). Dropped by ``identity``
    events and by every resync, so a lost event is stale for at most one resync
    interval; disabling an identity also revokes its tasks in the same transaction,
    which the store-side check refuses at once.
policy snapshot, signing keys, brokered values
    kept by :class:`tether.policy.PolicyService`, :class:`tether.tokens.KeyRing` and
    :class:`tether.secrets.Vault`; in a node they are not re-checked on every call but
    refreshed by ``policy``, ``keys`` and ``secrets`` events and by every resync (stale
    for at most one resync interval when an event is lost).

A reader that fills a cache from the store takes :attr:`generation` first and stores
its row only if no event arrived meanwhile (:meth:`put_identity`), so a row read just
before an invalidating event is never cached after it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from tether.store import IdentityRow


class NodeMemory:
    def __init__(self, *, stale_after: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._revoked: dict[str, float] = {}  # token id -> when learned (monotonic)
        self._identities: dict[str, IdentityRow] = {}
        self.stale_after = stale_after
        #: Bumped by every invalidating event and resync.
        self.generation = 0
        self.connected = False
        self.last_sync = 0.0  # time.monotonic() of the last complete resync
        self.last_heartbeat = 0.0  # time.monotonic() this node last heard itself

    # -- state ----------------------------------------------------------------------------
    def in_sync(self) -> bool:
        """Listening (its own heartbeat came back), and resynced recently: memory's
        answers may stand alone."""
        now = time.monotonic()
        return (
            self.connected
            and self.last_sync > 0
            and now - self.last_sync <= self.stale_after
            and now - self.last_heartbeat <= self.stale_after
        )

    # -- revocations ----------------------------------------------------------------------
    def revoked(self, token_id: str) -> bool | None:
        """True if known revoked; False if surely not (in sync); None: ask the store."""
        if token_id in self._revoked:
            return True
        return False if self.in_sync() else None

    def add_revoked(self, token_ids: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for token in token_ids:
                self._revoked[token] = now

    def prune_revoked(self, older_than: float) -> int:
        """Forget revocations learned before ``older_than`` (monotonic) and not seen since:
        their tokens expired long ago. Returns how many were dropped."""
        with self._lock:
            stale = [t for t, at in self._revoked.items() if at < older_than]
            for token in stale:
                del self._revoked[token]
        return len(stale)

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)

    # -- identities -----------------------------------------------------------------------
    def identity(self, spiffe_id: str) -> IdentityRow | None:
        return self._identities.get(spiffe_id) if self.in_sync() else None

    def put_identity(self, row: IdentityRow, generation: int) -> None:
        """Cache ``row``, read from the store when :attr:`generation` was ``generation``."""
        with self._lock:
            if generation != self.generation:
                return  # an event arrived while it was read: it may be stale already
            if len(self._identities) >= 100_000:
                self._identities.clear()
            self._identities[row.spiffe_id] = row

    def forget_identity(self, spiffe_id: str | None = None) -> None:
        with self._lock:
            self.generation += 1
            if spiffe_id is None:
                self._identities.clear()
            else:
                self._identities.pop(spiffe_id, None)
