"""Storage: one interface, the embedded SQLite implementation."""

from tether.store._interface import (
    ApprovalRow,
    CheckpointRow,
    CredentialRow,
    IdentityRow,
    KeyRow,
    PolicyRow,
    RecordRow,
    Store,
    TaskRow,
)
from tether.store._sqlite import SQLiteStore

__all__ = [
    "ApprovalRow",
    "CheckpointRow",
    "CredentialRow",
    "IdentityRow",
    "KeyRow",
    "PolicyRow",
    "RecordRow",
    "SQLiteStore",
    "Store",
    "TaskRow",
]
