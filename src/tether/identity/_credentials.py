"""Admin credentials for humans: shown once, stored hashed, each with one role.

Roles:

- ``admin``: everything;
- ``owner``: the identities whose owner is the credential's email (register,
  join tokens, disable, their tasks);
- ``approver``: list, approve and deny approvals;
- ``auditor``: read the inventory, tasks and the receipt chain.

A credential is ``tadm_<id>.<secret>``; the secret has 256 bits of entropy, so
a single SHA-256 is enough to store it (there is nothing to brute-force).

Every credential expires (30 days unless asked otherwise, at most a year;
``$TETHER_CREDENTIAL_TTL`` sets the default in seconds); it can be listed, shown,
disabled and rotated (a new secret with the same role and owner, the old one disabled
in the same transaction), each change attributed to who made it, in a receipt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from enum import StrEnum
from typing import Any

from tether._errors import Conflict, IdentityRejected, NotFound, UsageError
from tether.audit import Auditor
from tether.audit._rows import CREDENTIAL, credential_fields
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.store import CredentialRow, Store

PREFIX = "tadm_"
DEFAULT_TTL = 30 * 86400.0
MAX_TTL = 366 * 86400.0
TTL_ENV = "TETHER_CREDENTIAL_TTL"
_FORMAT = re.compile(r"tadm_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")


class Role(StrEnum):
    ADMIN = "admin"
    OWNER = "owner"
    APPROVER = "approver"
    AUDITOR = "auditor"


def default_ttl() -> float:
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{TTL_ENV} must be a number of seconds") from None
    if not 0 < value <= MAX_TTL:
        raise UsageError(f"{TTL_ENV} must be between 1 second and {int(MAX_TTL)} seconds")
    return value


def credential_status(row: CredentialRow, now: float) -> str:
    """enabled | disabled | expired."""
    if row.disabled_at is not None:
        return "disabled"
    if row.expires_at is not None and now >= row.expires_at:
        return "expired"
    return "enabled"


def credential_dict(row: CredentialRow, now: float) -> dict[str, Any]:
    """What may be shown of a credential (never its hash)."""
    return {
        "credential_id": row.credential_id,
        "role": row.role,
        "owner": row.owner,
        "status": credential_status(row, now),
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "disabled_at": row.disabled_at,
    }


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Credentials:
    def __init__(self, store: Store, auditor: Auditor, clock: Clock) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock

    def create(
        self, role: str, owner: str, *, ttl: float | None = None, by: str | None = None
    ) -> tuple[CredentialRow, str]:
        """A new credential that lives ``ttl`` seconds (:func:`default_ttl` unless given);
        the returned string is the only copy of the secret."""
        try:
            role = Role(role)
        except ValueError:
            raise UsageError(f"role must be one of {[r.value for r in Role]}") from None
        if "@" not in owner or len(owner) > 320:
            raise UsageError("owner must be an email address")
        ttl = default_ttl() if ttl is None else ttl
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"a credential lives between 1 second and {int(MAX_TTL)} seconds")
        with self._store.transaction():
            row, secret = self._add(role, owner, ttl)
            self._auditor.append(
                "credential.create",
                chain=[by or owner],
                effect="allow",
                detail={
                    "credential_id": row.credential_id,
                    "role": role,
                    "owner": owner,
                    "expires_at": row.expires_at,
                },
                risk_tags=list(risk_tags(Control.AUDIT)),
            )
        return row, secret

    def _add(self, role: str, owner: str, ttl: float) -> tuple[CredentialRow, str]:
        credential_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = self._clock.now()
        row = CredentialRow(
            credential_id=credential_id,
            secret_hash=_hash(secret),
            role=role,
            owner=owner,
            created_at=now,
            expires_at=now + ttl,
        )
        self._store.add_credential(row)
        self._auditor.rows.tag(CREDENTIAL, credential_id, credential_fields(row))
        return row, f"{PREFIX}{credential_id}.{secret}"

    def show(self, credential_id: str) -> CredentialRow:
        row = self._store.get_credential(credential_id)
        if row is None:
            raise NotFound(f"credential {credential_id} does not exist")
        return row

    def disable(self, credential_id: str, *, by: str, reason: str = "") -> CredentialRow:
        """Disable a credential now (every node refuses it from its next request; its
        console sessions end with it)."""
        with self._store.transaction():
            row = self.show(credential_id)
            if not self._store.disable_credential(credential_id, self._clock.now()):
                raise Conflict(f"credential {credential_id} is disabled already")
            disabled = self._retag(credential_id, authentic=self._authentic(row))
            self._auditor.append(
                "credential.disable",
                chain=[by],
                effect="allow",
                detail={
                    "credential_id": credential_id,
                    "role": row.role,
                    "owner": row.owner,
                    **({"reason": reason[:500]} if reason else {}),
                },
                risk_tags=list(risk_tags(Control.AUDIT)),
            )
        return disabled

    def rotate(
        self, credential_id: str, *, by: str, ttl: float | None = None
    ) -> tuple[CredentialRow, str]:
        """A new secret for the same role and owner; the old credential is disabled in
        the same transaction. Only an authentic, enabled credential is rotated."""
        ttl = default_ttl() if ttl is None else ttl
        if not 0 < ttl <= MAX_TTL:
            raise UsageError(f"a credential lives between 1 second and {int(MAX_TTL)} seconds")
        with self._store.transaction():
            old = self.show(credential_id)
            if not self._authentic(old):
                raise NotFound(f"credential {credential_id} does not exist")
            if not self._store.disable_credential(credential_id, self._clock.now()):
                raise Conflict(f"credential {credential_id} is disabled already")
            self._retag(credential_id, authentic=True)
            row, secret = self._add(old.role, old.owner, ttl)
            self._auditor.append(
                "credential.rotate",
                chain=[by],
                effect="allow",
                detail={
                    "credential_id": row.credential_id,
                    "replaces": credential_id,
                    "role": row.role,
                    "owner": row.owner,
                    "expires_at": row.expires_at,
                },
                risk_tags=list(risk_tags(Control.AUDIT)),
            )
        return row, secret

    def _authentic(self, row: CredentialRow) -> bool:
        return self._auditor.rows.authentic(CREDENTIAL, row.credential_id, credential_fields(row))

    def _retag(self, credential_id: str, *, authentic: bool) -> CredentialRow:
        row = self.show(credential_id)
        if authentic:  # a forged row stays untagged, disabled or not
            self._auditor.rows.tag(CREDENTIAL, credential_id, credential_fields(row))
        return row

    def verify(self, presented: str) -> CredentialRow:
        match = _FORMAT.fullmatch(presented)
        if match is None:
            raise IdentityRejected("malformed admin credential", code="credential.malformed")
        return self.verify_pair(match.group(1), match.group(2))

    def verify_pair(self, credential_id: str, secret: str) -> CredentialRow:
        row = self._store.get_credential(credential_id)
        if (
            row is None
            or row.disabled_at is not None
            or (row.expires_at is not None and self._clock.now() >= row.expires_at)
            or not hmac.compare_digest(row.secret_hash, _hash(secret))
            # A credential row written without the KEK (a store writer's own admin) is
            # no credential at all.
            or not self._auditor.rows.authentic(CREDENTIAL, credential_id, credential_fields(row))
        ):
            raise IdentityRejected("unknown or wrong admin credential", code="credential.invalid")
        return row

    def list(self) -> list[CredentialRow]:
        return self._store.list_credentials()
