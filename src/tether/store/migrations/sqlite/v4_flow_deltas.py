"""Version 4: a task's flow state grows by appended deltas (``task_flow_deltas``);
states written whole before it still load."""

from __future__ import annotations

VERSION = "4"

STATEMENTS = (
    "CREATE TABLE IF NOT EXISTS task_flow_deltas (task_id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "delta BLOB NOT NULL, at REAL NOT NULL, PRIMARY KEY (task_id, seq))",
)
