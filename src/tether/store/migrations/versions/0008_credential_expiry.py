"""Admin credentials expire.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE credentials ADD COLUMN expires_at DOUBLE PRECISION")


def downgrade() -> None:
    op.execute("ALTER TABLE credentials DROP COLUMN expires_at")
