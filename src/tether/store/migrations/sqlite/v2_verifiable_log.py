"""Version 2: the verifiable log and the authenticated key set.

Receipts' authentication tags (``audit_macs``) and signed tree heads (``audit_heads``)
are new tables, created by the store's DDL; the signing keys gain their revocation time
and their authentication tag.
"""

from __future__ import annotations

VERSION = "2"

STATEMENTS = (
    "ALTER TABLE signing_keys ADD COLUMN revoked_at REAL",
    "ALTER TABLE signing_keys ADD COLUMN mac TEXT",
)
