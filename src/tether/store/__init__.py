"""Storage: one interface; the embedded SQLite and the shared PostgreSQL implementations.

``TETHER_DATABASE_URL`` (``postgresql://...``) chooses PostgreSQL for
:meth:`tether.Tether.init` and :meth:`tether.Tether.open`; without it a Tether
home holds its SQLite file. :data:`ephemeral_store_factory`, when set, makes every
:meth:`tether.Tether.ephemeral` instance on the store it returns (the test suite
points it at throwaway PostgreSQL schemas).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tether._errors import UsageError
from tether.store._interface import (
    ApprovalRow,
    CheckpointRow,
    ConsoleSessionRow,
    CredentialRow,
    HeadRow,
    IdentityRow,
    KeyRow,
    LeaseRow,
    PolicyRow,
    RecordRow,
    SecretRow,
    SecretVersionRow,
    Store,
    TaskRow,
)
from tether.store._migrate import current_revision, head_revision, migrate
from tether.store._postgres import PostgresStore, is_postgres_url, url_with_schema
from tether.store._sqlite import SQLiteStore

#: The environment variable naming the PostgreSQL database (``postgresql://...``).
DATABASE_URL_ENV = "TETHER_DATABASE_URL"
#: The environment variable sizing each process's connection pool.
POOL_SIZE_ENV = "TETHER_DATABASE_POOL_SIZE"

#: When set, :meth:`tether.Tether.ephemeral` opens its store with this instead of
#: SQLite ``:memory:`` (a callable returning a fresh, empty, migrated store).
ephemeral_store_factory: Callable[[], Store] | None = None


def database_url(explicit: str | None = None) -> str | None:
    """The database URL in force: ``explicit``, else ``$TETHER_DATABASE_URL``, else None."""
    url = explicit if explicit is not None else os.environ.get(DATABASE_URL_ENV) or None
    return url or None


def open_store(url: str | Path, *, migrate_schema: bool = False) -> Store:
    """A store for ``url``: PostgreSQL for a ``postgresql://`` URL (migrated first when
    ``migrate_schema``), else a SQLite file path (or ``:memory:``)."""
    text = str(url)
    if is_postgres_url(text):
        return PostgresStore.create(text, migrate=migrate_schema, max_size=pool_size())
    return SQLiteStore(text)


def pool_size() -> int:
    """Connections a PostgreSQL store may hold: ``$TETHER_DATABASE_POOL_SIZE``, else 10."""
    raw = os.environ.get(POOL_SIZE_ENV, "").strip()
    if not raw:
        return 10
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"{POOL_SIZE_ENV} must be a positive integer")
    return int(raw)


def new_ephemeral_store() -> Store:
    """The store of a new ephemeral instance (see :data:`ephemeral_store_factory`)."""
    factory = ephemeral_store_factory
    return SQLiteStore(":memory:") if factory is None else factory()


__all__ = [
    "DATABASE_URL_ENV",
    "POOL_SIZE_ENV",
    "ApprovalRow",
    "ConsoleSessionRow",
    "CheckpointRow",
    "CredentialRow",
    "HeadRow",
    "IdentityRow",
    "KeyRow",
    "LeaseRow",
    "PolicyRow",
    "PostgresStore",
    "RecordRow",
    "SQLiteStore",
    "SecretRow",
    "SecretVersionRow",
    "Store",
    "TaskRow",
    "current_revision",
    "database_url",
    "ephemeral_store_factory",
    "head_revision",
    "is_postgres_url",
    "migrate",
    "new_ephemeral_store",
    "open_store",
    "pool_size",
    "url_with_schema",
]
