"""Storage: one interface, the embedded SQLite implementation."""

from tether.store._interface import (
    ApprovalRow,
    CheckpointRow,
    CredentialRow,
    IdentityRow,
    KeyRow,
    LeaseRow,
    PolicyRow,
    RecordRow,
    SecretRow,
    SecretVersionRow,
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
    "LeaseRow",
    "PolicyRow",
    "RecordRow",
    "SQLiteStore",
    "SecretRow",
    "SecretVersionRow",
    "Store",
    "TaskRow",
]
