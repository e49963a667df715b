"""Loading Cedar policies from a directory into the live snapshot.

A load is all-or-nothing: an invalid policy is refused with file, line and
reason and the previous snapshot stays live. Both outcomes leave a receipt.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from tether._errors import InvalidPolicy, UsageError
from tether.audit import Auditor, RowTampered
from tether.audit._rows import POLICY, policy_fields
from tether.core._clock import Clock
from tether.core._policy import PolicySnapshot, build_snapshot
from tether.core._risk import Control, risk_tags
from tether.policy._replay import ReplayReport, replay
from tether.policy._shadow import ShadowReport, shadow_report
from tether.store import PolicyRow, Store

SCHEMA_FILE = "schema.cedarschema"
SHADOW_BODY = "policy.shadow"
SHADOW_DIGEST = "policy.shadow.digest"
SHADOW_RECHECK_SECONDS = 1.0
MAX_FILES = 10_000


def default_schema() -> str:
    return resources.files("tether").joinpath("_data", SCHEMA_FILE).read_text()


class PolicyService:
    def __init__(self, store: Store, auditor: Auditor, clock: Clock) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock
        self._snapshot: PolicySnapshot | None = None
        self._snapshot_id: int | None = None
        #: The newest policy set this process has loaded or seen: sets only get newer.
        self._highest_id = 0
        #: Re-check the store's active snapshot on every call (a lone process); a node
        #: told of new snapshots by events (:mod:`tether.cluster`) turns this off.
        self.check_every_call = True
        self._stale = True
        self._shadow: PolicySnapshot | None = None
        self._shadow_digest: str | None = None
        self._shadow_stale = True
        self._shadow_read = 0.0

    def load_dir(self, directory: str | Path) -> PolicySnapshot:
        path = Path(directory)
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory")
        files = sorted(path.glob("*.cedar"))
        if len(files) > MAX_FILES:
            raise UsageError(f"more than {MAX_FILES} policy files in {path}")
        sources = {f.name: f.read_text() for f in files}
        schema_path = path / SCHEMA_FILE
        schema = schema_path.read_text() if schema_path.exists() else default_schema()
        return self.load(sources, schema, origin=str(path))

    def load(
        self,
        sources: dict[str, str],
        schema: str | None = None,
        *,
        origin: str = "api",
        shadow: bool = False,
        by: str | None = None,
    ) -> PolicySnapshot:
        """Validate ``sources`` and make them the live set, or, with ``shadow``, the
        candidate set evaluated beside the live one on every call and recorded on its
        receipt (``detail.shadow``) without being enforced. ``by`` names who loaded it
        (the authenticated principal), first in the receipt's chain."""
        schema = schema if schema is not None else default_schema()
        kind = "policy.shadow" if shadow else "policy.load"
        try:
            snapshot = build_snapshot(sources, schema)
        except InvalidPolicy as exc:
            self._auditor.append(
                kind,
                chain=[by] if by else None,
                effect="deny",
                reasons=[{"code": exc.code, "message": exc.message}],
                detail={"origin": origin, "files": sorted(sources), "by": by},
                risk_tags=list(risk_tags(Control.PER_CALL_POLICY, Control.AUDIT)),
            )
            raise
        detail: dict[str, Any] = {
            "origin": origin,
            "digest": snapshot.digest,
            "count": len(snapshot.policies),
            **({"by": by} if by else {}),
        }
        with self._store.transaction():
            if shadow:
                body = json.dumps({"sources": sources, "schema": schema}, sort_keys=True)
                self._auditor.rows.set_setting(SHADOW_BODY, body)
                self._auditor.rows.set_setting(SHADOW_DIGEST, snapshot.digest)
                detail["enforced"] = False
            else:
                sources_json = json.dumps(sources, sort_keys=True)
                snapshot_id = self._store.add_policy(
                    snapshot.digest, sources_json, schema, self._clock.now()
                )
                self._auditor.rows.tag(
                    POLICY,
                    str(snapshot_id),
                    policy_fields(
                        PolicyRow(snapshot_id, snapshot.digest, sources_json, schema, 0.0)
                    ),
                )
                detail["snapshot_id"] = snapshot_id
            self._auditor.append(
                kind,
                chain=[by] if by else None,
                effect="allow",
                policies=list(snapshot.policy_ids)[:1000],
                detail=detail,
                risk_tags=list(risk_tags(Control.PER_CALL_POLICY, Control.AUDIT)),
            )
        if shadow:
            self._shadow, self._shadow_digest = snapshot, snapshot.digest
        else:
            self._snapshot, self._snapshot_id = snapshot, detail["snapshot_id"]
            self._highest_id = max(self._highest_id, detail["snapshot_id"])
        return snapshot

    def clear_shadow(self, *, origin: str = "api", by: str | None = None) -> str | None:
        """Stop evaluating the shadow set (a receipt); its digest, or None if none was on."""
        with self._store.transaction():
            current = self._store.get_meta(SHADOW_DIGEST)
            if not current:
                return None
            self._auditor.rows.set_setting(SHADOW_DIGEST, "")
            self._auditor.rows.set_setting(SHADOW_BODY, "")
            self._auditor.append(
                "policy.shadow",
                chain=[by] if by else None,
                effect="allow",
                reasons=[{"code": "policy.shadow_off", "message": "shadow set removed"}],
                detail={
                    "origin": origin,
                    "digest": current,
                    "enforced": False,
                    "off": True,
                    **({"by": by} if by else {}),
                },
                risk_tags=list(risk_tags(Control.PER_CALL_POLICY, Control.AUDIT)),
            )
        self._shadow, self._shadow_digest = None, None
        return current

    def replay(
        self,
        sources: dict[str, str],
        schema: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        by: str | None = None,
    ) -> ReplayReport:
        """Re-decide the recorded calls of a window under a candidate set, without
        loading it (:mod:`tether.policy._replay`); a receipt names who replayed what."""
        candidate = build_snapshot(sources, schema if schema is not None else default_schema())
        live = self.snapshot()
        report = replay(
            self._store, self._auditor.rows, live, candidate, since=since, until=until, limit=limit
        )
        self._auditor.append(
            "policy.replay",
            chain=[by] if by else None,
            effect="allow",
            detail={
                "candidate": candidate.digest,
                "live": live.digest,
                "from": since,
                "to": until,
                "replayed": report.replayed,
                "would_change": sum(report.changes.values()),
                **({"by": by} if by else {}),
            },
            risk_tags=list(risk_tags(Control.PER_CALL_POLICY, Control.AUDIT)),
        )
        return report

    def shadow_digest(self) -> str | None:
        """The digest of the shadow set in the store now (None: shadow mode is off)."""
        try:
            return self._auditor.rows.setting(SHADOW_DIGEST) or None
        except RowTampered:
            return None  # a shadow set written without the KEK is none

    def shadow_report(self, *, limit: int = 50) -> ShadowReport:
        """What the current shadow set would have changed, from the receipts."""
        return shadow_report(self._store, self.shadow_digest(), limit=limit)

    def shadow(self) -> PolicySnapshot | None:
        """The candidate set in shadow mode, if any (re-read when the live set is; a
        shadow set that no longer builds is dropped: it is never enforced anyway)."""
        # Never enforced, so a lone process looks again at most once a second, not on
        # every call; a node re-reads it when told the policies changed.
        fresh = time.monotonic() - self._shadow_read < SHADOW_RECHECK_SECONDS
        if not self._shadow_stale and (fresh or not self.check_every_call):
            return self._shadow
        self._shadow_stale = False
        self._shadow_read = time.monotonic()
        current = self.shadow_digest()
        if current != self._shadow_digest:
            self._shadow, self._shadow_digest = None, current
            try:
                body = self._auditor.rows.setting(SHADOW_BODY) if current else None
            except RowTampered:
                body = None
            if body:
                try:
                    data = json.loads(body)
                    self._shadow = build_snapshot(data["sources"], data["schema"])
                except Exception:  # a shadow set never decides anything
                    self._shadow = None
        return self._shadow

    def invalidate(self) -> None:
        """Look at the store's active snapshot again on the next call."""
        self._stale = True
        self._shadow_stale = True

    def snapshot(self) -> PolicySnapshot:
        """The live snapshot (rebuilt from the store if another process loaded a new one)."""
        if not self.check_every_call and not self._stale and self._snapshot is not None:
            return self._snapshot
        self._stale = False
        active_id = self._store.active_policy_id()
        if active_id is None:
            if self._snapshot is None or self._snapshot_id is not None:
                self._snapshot, self._snapshot_id = build_snapshot({}, default_schema()), None
            return self._snapshot
        if active_id < self._highest_id:
            # Policy sets only ever get newer: an older one active again means the newer
            # rows were deleted by a store writer. Refused (fail closed), on every call.
            self._stale = True
            raise RowTampered(POLICY, str(active_id))
        if self._snapshot is None or self._snapshot_id != active_id:
            row = self._store.active_policy()
            assert row is not None
            # A policy set a store writer put in without the KEK is refused, and with it
            # every decision (fail closed), until an operator loads a set again.
            try:
                self._auditor.rows.require(POLICY, str(row.id), policy_fields(row))
            except RowTampered:
                self._stale = True  # refused again on every call, not only the first
                raise
            self._snapshot = build_snapshot(json.loads(row.sources_json), row.schema)
            self._snapshot_id = row.id
            self._highest_id = max(self._highest_id, row.id)
        return self._snapshot
