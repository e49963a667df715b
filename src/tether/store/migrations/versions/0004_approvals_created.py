"""Console: an index to page approvals newest first (keyset on created_at, approval_id).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute('CREATE INDEX approvals_created ON approvals (created_at, approval_id COLLATE "C")')


def downgrade() -> None:
    op.execute("DROP INDEX approvals_created")
