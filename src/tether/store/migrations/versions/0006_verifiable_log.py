"""The verifiable log and the authenticated key set.

Receipts get an authentication tag (``audit_macs``: an HMAC under a key derived from
the KEK) and the log its signed tree heads (``audit_heads``: RFC 9162 Merkle roots,
signed, with the frontier the next head extends). Signing keys gain ``revoked_at``
and ``mac`` (their public half and metadata authenticated under the KEK).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

STATEMENTS = (
    "ALTER TABLE signing_keys ADD COLUMN revoked_at DOUBLE PRECISION",
    "ALTER TABLE signing_keys ADD COLUMN mac TEXT",
    "CREATE TABLE audit_macs (seq BIGINT PRIMARY KEY, mac TEXT NOT NULL)",
    """CREATE TABLE audit_heads (
  size BIGINT PRIMARY KEY, root TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
  prev BIGINT NOT NULL, kid TEXT NOT NULL, signature TEXT NOT NULL, frontier TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL)""",
)


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE audit_heads")
    op.execute("DROP TABLE audit_macs")
    op.execute("ALTER TABLE signing_keys DROP COLUMN mac")
    op.execute("ALTER TABLE signing_keys DROP COLUMN revoked_at")
