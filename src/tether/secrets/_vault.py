"""The sealed secret store: write-only values, versions, rotation with an overlap window.

Values go in (:meth:`Vault.put`, :meth:`Vault.rotate`) and never come out through
this service's public surface: listing shows names, kinds and versions, receipts
name the secret and version, errors never quote what was given. Only the broker
(:mod:`tether.secrets._broker`) unseals a value, to hand it to an enforcement point
under a lease.

Rotation adds a version; the versions before it stay usable for the secret's
``overlap_seconds`` (leases on them keep working, new leases take the new one), then
the reaper revokes what still uses them. A secret may name a rotation hook: a
command run with ``{"action": "rotate", "name", "kind", "version", "value"}`` (the
current value) on its standard input, whose standard output is the new value (for
legacy service accounts: the hook asks the provider for a new key). Its output and
error text are never logged or recorded, only its exit status.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from typing import Any

import msgspec

from tether._errors import Conflict, InfrastructureError, NotFound, UsageError
from tether.audit import Auditor
from tether.audit._rows import SECRET, secret_fields
from tether.core._clock import Clock
from tether.core._credentials import Known
from tether.core._risk import Control, risk_tags
from tether.secrets._kms import KMS, open_value, seal_value
from tether.secrets._postgres import PostgresTemplate, template_problems
from tether.secrets._value import SecretValue
from tether.store import SecretRow, SecretVersionRow, Store

SECRET_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
KINDS = ("api_key", "password", "oauth_refresh_token", "service_account", "postgres", "generic")
MAX_VALUE_BYTES = 64 * 1024
DEFAULT_OVERLAP = 3600.0
MAX_OVERLAP = 30 * 24 * 3600.0
HOOK_TIMEOUT = 60.0
GENERATION = "secrets_generation"


class SecretMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What is said about a secret besides its value (none of it is secret)."""

    tools: tuple[str, ...] = ()  # tool-name globs that may use it; empty: any allowed tool
    overlap_seconds: float = DEFAULT_OVERLAP
    rotate_command: tuple[str, ...] = ()
    postgres: PostgresTemplate | None = None


class VersionInfo(msgspec.Struct, frozen=True):
    version: int
    state: str  # current | overlap | retired
    created_at: float
    created_by: str
    retired_at: float | None = None
    usable_until: float | None = None


class SecretInfo(msgspec.Struct, frozen=True):
    """A secret as anyone may see it: everything but the value."""

    name: str
    kind: str
    description: str
    created_at: float
    created_by: str
    tools: tuple[str, ...]
    overlap_seconds: float
    rotation_hook: bool
    versions: tuple[VersionInfo, ...]
    postgres: dict[str, Any] | None = None

    @property
    def current_version(self) -> int:
        return max((v.version for v in self.versions), default=0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        out["current_version"] = self.current_version
        return out


def _context(name: str, version: int) -> str:
    return f"secret:{name}:{version}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise UsageError(f"a secret name must match {SECRET_NAME.pattern}", code="secret.name")
    return name


def _check_value(value: SecretValue) -> None:
    if len(value) == 0:
        raise UsageError("the secret value is empty", code="secret.value")
    if len(value) > MAX_VALUE_BYTES:
        raise UsageError(f"a secret value is at most {MAX_VALUE_BYTES} bytes", code="secret.value")
    try:
        value.reveal()
    except UnicodeDecodeError:
        raise UsageError("a secret value must be UTF-8 text", code="secret.value") from None


def parse_meta(raw: Any, kind: str) -> SecretMeta:
    """Validate a secret's metadata (``None``: the defaults)."""
    try:
        meta = SecretMeta() if raw is None else msgspec.convert(raw, SecretMeta)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid secret metadata: {exc}", code="secret.meta") from None
    problems: list[str] = []
    if len(meta.tools) > 64 or any(not t or len(t) > 256 for t in meta.tools):
        problems.append("tools: at most 64 patterns of 1-256 characters")
    if not 0 <= meta.overlap_seconds <= MAX_OVERLAP:
        problems.append(f"overlap_seconds: between 0 and {MAX_OVERLAP:g}")
    if any(not part for part in meta.rotate_command):
        problems.append("rotate_command: no empty arguments")
    if kind == "postgres":
        if meta.postgres is None:
            problems.append("a postgres secret needs a [postgres] template with its grants")
        else:
            problems.extend(template_problems(meta.postgres))
    elif meta.postgres is not None:
        problems.append("only a secret of kind postgres takes a postgres template")
    if problems:
        raise UsageError("invalid secret metadata: " + "; ".join(problems), code="secret.meta")
    return meta


def as_value(value: SecretValue | bytes | str) -> SecretValue:
    return value if isinstance(value, SecretValue) else SecretValue(value)


class Vault:
    """Sealed secrets over the store; see the module docstring."""

    def __init__(self, store: Store, kms: KMS, auditor: Auditor, clock: Clock) -> None:
        self._store = store
        self._kms = kms
        self._auditor = auditor
        self._clock = clock
        self._cache_generation: str | None = None
        self._cache_until = 0.0
        self._known: list[Known] = []
        #: Trust the cache without reading the generation on every call: a node told of
        #: secret changes by events (:mod:`tether.cluster`).
        self.follow_events = False
        self._changed = True

    def __repr__(self) -> str:
        return f"Vault(kms={self._kms!r})"

    # -- writing ---------------------------------------------------------------------------
    def put(
        self,
        name: str,
        value: SecretValue | bytes | str,
        *,
        kind: str,
        by: str,
        description: str = "",
        meta: SecretMeta | dict[str, Any] | None = None,
    ) -> SecretInfo:
        """Register a new secret (version 1). Refused if the name exists: rotate it."""
        check_name(name)
        if kind not in KINDS:
            raise UsageError(f"kind must be one of {list(KINDS)}", code="secret.kind")
        if len(description) > 512:
            raise UsageError("description: at most 512 characters", code="secret.description")
        raw = msgspec.to_builtins(meta) if isinstance(meta, SecretMeta) else meta
        parsed = parse_meta(raw, kind)
        secret = as_value(value)
        _check_value(secret)
        now = self._clock.now()
        with self._store.transaction():
            if self._store.get_secret(name) is not None:
                raise Conflict(f"secret {name} exists: rotate it instead", code="secret.exists")
            secret_row = SecretRow(
                name=name,
                kind=kind,
                description=description,
                meta_json=msgspec.json.encode(parsed).decode(),
                created_at=now,
                created_by=by,
            )
            self._store.add_secret(secret_row)
            self._auditor.rows.tag(SECRET, name, secret_fields(secret_row))
            self._add_version(name, 1, secret, by, now)
            self._auditor.append(
                "secret.put",
                chain=[by],
                effect="allow",
                detail={"secret": name, "kind": kind, "version": 1},
                risk_tags=list(risk_tags(Control.SECRET_BROKERING, Control.AUDIT)),
            )
        return self.info(name)

    def _add_version(
        self, name: str, version: int, value: SecretValue, by: str, now: float
    ) -> None:
        sealed, wrapped = seal_value(
            self._kms, value.reveal_bytes(), context=_context(name, version)
        )
        self._store.add_secret_version(
            SecretVersionRow(
                name=name,
                version=version,
                sealed=sealed,
                wrapped_key=wrapped,
                kms_key_id=self._kms.key_id,
                created_at=now,
                created_by=by,
            )
        )
        generation = int(self._store.get_meta(GENERATION) or "0") + 1
        self._store.set_meta(GENERATION, str(generation))
        self._changed = True

    def rotate(
        self,
        name: str,
        value: SecretValue | bytes | str | None = None,
        *,
        by: str,
        overlap: float | None = None,
    ) -> SecretInfo:
        """Add a new version (``value``, else the rotation hook's answer); earlier versions
        stay usable for the overlap window."""
        row = self._get(name)
        meta = self.meta(row)
        window = meta.overlap_seconds if overlap is None else overlap
        if not 0 <= window <= MAX_OVERLAP:
            raise UsageError(f"overlap: between 0 and {MAX_OVERLAP:g} s", code="secret.overlap")
        versions = self._store.list_secret_versions(name)
        current = max(v.version for v in versions)
        hooked = value is None
        if value is None:
            if not meta.rotate_command:
                raise UsageError(
                    f"secret {name} has no rotation hook: give the new value",
                    code="secret.value",
                )
            value = self._run_hook(row, meta, current)
        secret = as_value(value)
        _check_value(secret)
        now = self._clock.now()
        with self._store.transaction():
            self._store.retire_secret_versions(name, now, now + window)
            self._add_version(name, current + 1, secret, by, now)
            self._auditor.append(
                "secret.rotate",
                chain=[by],
                effect="allow",
                detail={
                    "secret": name,
                    "kind": row.kind,
                    "version": current + 1,
                    "previous_usable_until": now + window,
                    "by_hook": hooked,
                },
                risk_tags=list(risk_tags(Control.SECRET_BROKERING, Control.AUDIT)),
            )
        return self.info(name)

    def _run_hook(self, row: SecretRow, meta: SecretMeta, current: int) -> SecretValue:
        value = self.version_value(row.name, current)
        request = json.dumps(
            {
                "action": "rotate",
                "name": row.name,
                "kind": row.kind,
                "version": current,
                "value": value.reveal(),
            }
        )
        try:
            done = subprocess.run(  # an admin-configured argv, no shell
                list(meta.rotate_command),
                input=request.encode(),
                capture_output=True,
                timeout=HOOK_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise InfrastructureError(
                f"rotation hook of {row.name} could not run ({type(exc).__name__})",
                code="secret.hook",
            ) from None
        if done.returncode != 0:
            raise InfrastructureError(
                f"rotation hook of {row.name} exited with status {done.returncode}",
                code="secret.hook",
            )
        new = done.stdout.strip()
        if not new:
            raise InfrastructureError(
                f"rotation hook of {row.name} printed no value", code="secret.hook"
            )
        return SecretValue(new)

    # -- reading (no values) -----------------------------------------------------------------
    def _get(self, name: str) -> SecretRow:
        row = self._store.get_secret(check_name(name))
        if row is None or row.disabled_at is not None:
            raise NotFound(f"no secret named {name}", code="secret.unknown")
        # Which tools a secret may be leased for is in its row: one a store writer put in
        # or widened without the KEK is refused.
        self._auditor.rows.require(SECRET, row.name, secret_fields(row))
        return row

    @staticmethod
    def meta(row: SecretRow) -> SecretMeta:
        return msgspec.json.decode(row.meta_json, type=SecretMeta)

    def info(self, name: str) -> SecretInfo:
        return self._info(self._get(name), self._store.list_secret_versions(name))

    def _info(self, row: SecretRow, versions: list[SecretVersionRow]) -> SecretInfo:
        now = self._clock.now()
        meta = self.meta(row)
        infos = tuple(
            VersionInfo(
                version=v.version,
                state="current"
                if v.retired_at is None
                else "overlap"
                if (v.usable_until or 0) > now
                else "retired",
                created_at=v.created_at,
                created_by=v.created_by,
                retired_at=v.retired_at,
                usable_until=v.usable_until,
            )
            for v in versions
        )
        return SecretInfo(
            name=row.name,
            kind=row.kind,
            description=row.description,
            created_at=row.created_at,
            created_by=row.created_by,
            tools=meta.tools,
            overlap_seconds=meta.overlap_seconds,
            rotation_hook=bool(meta.rotate_command),
            versions=infos,
            postgres=msgspec.to_builtins(meta.postgres) if meta.postgres else None,
        )

    def row(self, name: str) -> SecretRow:
        return self._get(name)

    def tool_allowed(self, row: SecretRow, tool: str | None) -> bool:
        patterns = self.meta(row).tools
        if not patterns:
            return True
        return tool is not None and any(fnmatch.fnmatchcase(tool, p) for p in patterns)

    # -- unsealing (the broker's side) ---------------------------------------------------------
    def current(self, name: str) -> tuple[SecretVersionRow, SecretValue]:
        """The newest version and its value."""
        self._get(name)
        versions = self._store.list_secret_versions(name)
        if not versions:
            raise NotFound(f"secret {name} has no version", code="secret.unknown")
        newest = versions[-1]
        return newest, self._open(newest)

    def version_value(self, name: str, version: int) -> SecretValue:
        for row in self._store.list_secret_versions(name):
            if row.version == version:
                return self._open(row)
        raise NotFound(f"secret {name} has no version {version}", code="secret.unknown")

    def version_row(self, name: str, version: int) -> SecretVersionRow | None:
        for row in self._store.list_secret_versions(name):
            if row.version == version:
                return row
        return None

    def _open(self, row: SecretVersionRow) -> SecretValue:
        return SecretValue(
            open_value(
                self._kms, row.sealed, row.wrapped_key, context=_context(row.name, row.version)
            )
        )

    def invalidate(self) -> None:
        """A secret changed somewhere: read the generation again on the next call."""
        self._changed = True

    def usable_values(self) -> list[Known]:
        """Every value still usable (current or in overlap), for spotting them on the call
        path. Cached until a secret changes (in any process) or a version's overlap ends."""
        now = self._clock.now()
        if self.follow_events and not self._changed and now < self._cache_until:
            return self._known
        self._changed = False
        generation = self._store.get_meta(GENERATION) or "0"
        if generation == self._cache_generation and now < self._cache_until:
            return self._known
        known: list[Known] = []
        until = now + 300.0
        for row in self._store.list_secret_versions():
            if row.retired_at is not None and (row.usable_until or 0) <= now:
                continue
            if row.usable_until is not None:
                until = min(until, row.usable_until)
            value = self._open(row).reveal()
            label = row.name
            known.append(Known(label, value))
            secret = self._store.get_secret(row.name)
            if secret is not None and secret.kind == "postgres":
                known.extend(_dsn_parts(label, value))
        self._known, self._cache_generation, self._cache_until = known, generation, until
        return known

    def list(self) -> list[SecretInfo]:
        versions: dict[str, list[SecretVersionRow]] = {}
        for v in self._store.list_secret_versions():
            versions.setdefault(v.name, []).append(v)
        return [
            self._info(row, versions.get(row.name, []))
            for row in self._store.list_secrets()
            if row.disabled_at is None
        ]


def _dsn_parts(label: str, dsn: str) -> list[Known]:
    """The password inside a connection string, as a value of its own."""
    try:
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

        password = conninfo_to_dict(dsn).get("password")
    except Exception:
        return []
    return [Known(label, str(password))] if password else []
