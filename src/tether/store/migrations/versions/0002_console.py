"""Console: accepted risks; indexes for paging tasks and finding a task's receipts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """CREATE TABLE accepted_risks (
  risk_id TEXT PRIMARY KEY, title TEXT NOT NULL, risk_tag TEXT NOT NULL, scope TEXT NOT NULL,
  justification TEXT NOT NULL, recorded_by TEXT NOT NULL, approver TEXT NOT NULL,
  status TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL, decided_by TEXT, decided_at DOUBLE PRECISION)"""
    )
    op.execute("CREATE INDEX tasks_opened ON tasks (opened_at, task_id)")
    op.execute("CREATE INDEX audit_records_task ON audit_records ((body::jsonb ->> 'task_id'))")
    op.execute("CREATE INDEX revocations_at ON revocations (revoked_at)")


def downgrade() -> None:
    op.execute("DROP INDEX revocations_at")
    op.execute("DROP INDEX audit_records_task")
    op.execute("DROP INDEX tasks_opened")
    op.execute("DROP TABLE accepted_risks")
