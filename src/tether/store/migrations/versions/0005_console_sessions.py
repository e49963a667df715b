"""Console: sessions in the store, so any node serves any signed-in operator.

The session id is kept only as its SHA-256 hash.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """CREATE TABLE console_sessions (
  session_hash TEXT PRIMARY KEY, credential_id TEXT NOT NULL, role TEXT NOT NULL,
  owner TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  seen_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
  flash TEXT NOT NULL DEFAULT '')"""
    )


def downgrade() -> None:
    op.execute("DROP TABLE console_sessions")
