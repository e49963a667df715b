"""Schema migrations of the PostgreSQL store (alembic, shipped in the package).

No ``alembic.ini`` is needed: the configuration is built here, the scripts live
in ``tether/store/migrations``. The schema a URL selects
(``?options=-csearch_path%3Dname``) is created when missing and holds alembic's
version table too, so several Tether instances can share one database.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as psql

from tether._errors import InfrastructureError, UsageError
from tether.store._postgres import is_postgres_url, redact, schema_of

#: Serializes concurrent ``tether migrate`` runs on one database.
MIGRATE_LOCK = 0x54455449


def sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` as SQLAlchemy names it with the psycopg driver."""
    if not is_postgres_url(url):
        raise UsageError("TETHER_DATABASE_URL must be a postgresql:// URL")
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def alembic_config(url: str | None = None) -> Any:
    """The alembic :class:`~alembic.config.Config` for ``url`` (no file on disk)."""
    from alembic.config import Config  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", "tether.store:migrations")
    if url is not None:
        # configparser interpolates '%': the URL's escapes must be doubled.
        config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
        config.attributes["schema"] = schema_of(url)
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision the shipped scripts define (a store refuses any other).

    Read from the scripts' ``revision``/``down_revision`` lines, without importing alembic
    (opening a store stays cheap); :func:`script_head` is alembic's own answer."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (Path(__file__).parent / "migrations" / "versions").glob("*.py"):
        text = script.read_text()
        revision = re.search(r"^revision = [\"']([^\"']+)[\"']", text, re.M)
        if revision:
            revisions.add(revision.group(1))
            parent = re.search(r"^down_revision = [\"']([^\"']+)[\"']", text, re.M)
            if parent:
                parents.add(parent.group(1))
    heads = revisions - parents
    if len(heads) != 1:
        raise InfrastructureError(f"the shipped migrations have no single head: {sorted(heads)}")
    return heads.pop()


def script_head() -> str | None:
    """The head according to the migration scripts themselves (checked against the constant)."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    head: str | None = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return head


def current_revision(url: str) -> str | None:
    """The revision the schema of ``url`` is at (None: never migrated)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()
            if not row or not row[0]:
                return None
            version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            return None if version is None else str(version[0])
    except psycopg.Error as exc:
        raise InfrastructureError(f"cannot reach {redact(url)}: {exc}") from None


def migrate(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply the migrations up to ``revision`` on ``url``; return (before, after)."""
    from alembic import command  # noqa: PLC0415
    from sqlalchemy import create_engine, text  # noqa: PLC0415
    from sqlalchemy.pool import NullPool  # noqa: PLC0415

    schema = schema_of(url)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            if schema is not None:
                conn.execute(
                    psql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(psql.Identifier(schema))
                )
    except psycopg.Error as exc:
        raise InfrastructureError(f"cannot reach {redact(url)}: {exc}") from None
    before = current_revision(url)
    config = alembic_config(url)
    engine = create_engine(sqlalchemy_url(url), poolclass=NullPool)
    try:
        with engine.begin() as connection:
            # One migration at a time per database, whichever node runs it.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except Exception as exc:
        raise InfrastructureError(f"migration of {redact(url)} failed: {exc}") from None
    finally:
        engine.dispose()
    return before, current_revision(url)
