"""Admin credentials for humans: shown once, stored hashed, each with one role.

Roles:

- ``admin``: everything;
- ``owner``: the identities whose owner is the credential's email (register,
  join tokens, disable, their tasks);
- ``approver``: list, approve and deny approvals;
- ``auditor``: read the inventory, tasks and the receipt chain.

A credential is ``tadm_<id>.<secret>``; the secret has 256 bits of entropy, so
a single SHA-256 is enough to store it (there is nothing to brute-force).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from enum import StrEnum

from tether._errors import IdentityRejected, UsageError
from tether.audit import Auditor
from tether.audit._rows import CREDENTIAL, credential_fields
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.store import CredentialRow, Store

PREFIX = "tadm_"
_FORMAT = re.compile(r"tadm_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")


class Role(StrEnum):
    ADMIN = "admin"
    OWNER = "owner"
    APPROVER = "approver"
    AUDITOR = "auditor"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Credentials:
    def __init__(self, store: Store, auditor: Auditor, clock: Clock) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock

    def create(self, role: str, owner: str) -> tuple[CredentialRow, str]:
        """A new credential; the returned string is the only copy of the secret."""
        try:
            role = Role(role)
        except ValueError:
            raise UsageError(f"role must be one of {[r.value for r in Role]}") from None
        if "@" not in owner or len(owner) > 320:
            raise UsageError("owner must be an email address")
        credential_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        row = CredentialRow(
            credential_id=credential_id,
            secret_hash=_hash(secret),
            role=role,
            owner=owner,
            created_at=self._clock.now(),
        )
        with self._store.transaction():
            self._store.add_credential(row)
            self._auditor.rows.tag(CREDENTIAL, credential_id, credential_fields(row))
            self._auditor.append(
                "credential.create",
                chain=[owner],
                effect="allow",
                detail={"credential_id": credential_id, "role": role},
                risk_tags=list(risk_tags(Control.AUDIT)),
            )
        return row, f"{PREFIX}{credential_id}.{secret}"

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
            or not hmac.compare_digest(row.secret_hash, _hash(secret))
            # A credential row written without the KEK (a store writer's own admin) is
            # no credential at all.
            or not self._auditor.rows.authentic(CREDENTIAL, credential_id, credential_fields(row))
        ):
            raise IdentityRejected("unknown or wrong admin credential", code="credential.invalid")
        return row

    def list(self) -> list[CredentialRow]:
        return self._store.list_credentials()
