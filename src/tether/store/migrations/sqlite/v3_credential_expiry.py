"""Version 3: admin credentials expire (``credentials.expires_at``); the table of row
authentication tags (``row_tags``) is created by the store's DDL."""

from __future__ import annotations

VERSION = "3"

STATEMENTS = ("ALTER TABLE credentials ADD COLUMN expires_at REAL",)
