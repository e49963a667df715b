"""A task's flow state grows by appended deltas.

``task_flow_deltas`` holds, per task, the values each call added to its flow state
(numbered from 1); the task's row in ``task_flow`` keeps the rest of the state with the
count of its deltas and the digest chaining them, under its tag
(:class:`tether.audit.RowTags`). States written whole before this revision still load.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE task_flow_deltas (task_id TEXT NOT NULL, seq BIGINT NOT NULL, "
        "delta BYTEA NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (task_id, seq))"
    )


def downgrade() -> None:
    op.execute("DROP TABLE task_flow_deltas")
