"""Alembic environment: runs on the connection :func:`tether.store.migrate` hands over."""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only run through tether.store.migrate
    raise RuntimeError("run the migrations with 'tether migrate'")
context.configure(
    connection=connection,
    version_table_schema=config.attributes.get("schema"),
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
