"""Authenticated rows.

``row_tags`` holds, for every row that grants authority (admin credentials, console
sessions, join tokens, identities, tasks, approvals, policy sets, tagged settings), an
HMAC of its fields under a key derived from the KEK (:class:`tether.audit.RowTags`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE row_tags (kind TEXT NOT NULL, key TEXT NOT NULL, tag TEXT NOT NULL, "
        "PRIMARY KEY (kind, key))"
    )


def downgrade() -> None:
    op.execute("DROP TABLE row_tags")
