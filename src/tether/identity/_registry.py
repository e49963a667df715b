"""The identity registry: agents, tools, services and humans, each with an owner."""

from __future__ import annotations

import re
from enum import StrEnum

from tether._errors import Conflict, IdentityRejected, NotFound
from tether.audit import Auditor
from tether.audit._rows import IDENTITY, identity_fields
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.core._spiffe_id import parse_spiffe_id
from tether.store import IdentityRow, Store

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
MAX_DESCRIPTION = 1000


class IdentityKind(StrEnum):
    AGENT = "agent"
    TOOL = "tool"
    SERVICE = "service"
    HUMAN = "human"


class IdentityRegistry:
    def __init__(self, store: Store, auditor: Auditor, clock: Clock, trust_domain: str) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock
        self.trust_domain = trust_domain

    def register(
        self, spiffe_id: str, *, kind: str, owner: str, description: str = ""
    ) -> IdentityRow:
        try:
            return self._register(spiffe_id, kind=kind, owner=owner, description=description)
        except (IdentityRejected, Conflict) as exc:
            self._auditor.append(
                "identity.register",
                chain=[str(spiffe_id)[:256]],
                effect="deny",
                reasons=[{"code": exc.code, "message": exc.message}],
                risk_tags=list(risk_tags(Control.WORKLOAD_IDENTITY, Control.AUDIT)),
            )
            raise

    def _register(self, spiffe_id: str, *, kind: str, owner: str, description: str) -> IdentityRow:
        parsed = parse_spiffe_id(spiffe_id)
        if parsed.trust_domain != self.trust_domain:
            raise IdentityRejected(
                f"{spiffe_id} is not in trust domain {self.trust_domain}",
                code="identity.trust_domain",
            )
        try:
            kind = IdentityKind(kind)
        except ValueError:
            raise IdentityRejected(
                f"kind must be one of {[k.value for k in IdentityKind]}", code="identity.kind"
            ) from None
        if not _EMAIL.match(owner):
            raise IdentityRejected("owner must be an email address", code="identity.owner")
        if len(description) > MAX_DESCRIPTION:
            raise IdentityRejected("description is too long", code="identity.description")
        row = IdentityRow(
            spiffe_id=str(parsed),
            kind=kind,
            owner=owner,
            description=description,
            status="active",
            created_at=self._clock.now(),
        )
        with self._store.transaction():
            if self._store.get_identity(row.spiffe_id) is not None:
                raise Conflict(f"identity {row.spiffe_id} is already registered")
            self._store.add_identity(row)
            self._auditor.rows.tag(IDENTITY, row.spiffe_id, identity_fields(row))
            self._auditor.append(
                "identity.register",
                chain=[row.spiffe_id],
                effect="allow",
                detail={"kind": row.kind, "owner": owner},
                risk_tags=list(risk_tags(Control.WORKLOAD_IDENTITY, Control.AUDIT)),
            )
        return row

    def lookup(self, spiffe_id: str) -> IdentityRow | None:
        """The registered identity, or ``None``: unknown, or its row was written without
        the KEK (an identity a store writer added, re-owned or re-activated is none)."""
        return self._auditor.rows.identity(spiffe_id)

    def get(self, spiffe_id: str) -> IdentityRow:
        row = self.lookup(spiffe_id)
        if row is None:
            raise NotFound(f"identity {spiffe_id} is not registered")
        return row

    def list(self) -> list[IdentityRow]:
        return self._store.list_identities()

    def mark_disabled(self, spiffe_id: str) -> IdentityRow:
        """Flip the identity to disabled (callers revoke what it holds in the same transaction)."""
        row = self.get(spiffe_id)
        if not self._store.disable_identity(spiffe_id, self._clock.now()):
            raise Conflict(f"identity {spiffe_id} is already disabled")
        disabled = self._store.get_identity(row.spiffe_id)
        assert disabled is not None
        self._auditor.rows.tag(IDENTITY, disabled.spiffe_id, identity_fields(disabled))
        return disabled
