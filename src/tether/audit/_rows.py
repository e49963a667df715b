"""Authenticated rows: the store's authority-granting rows carry a tag under the KEK.

Someone who can write the store but does not hold the KEK can add, edit or re-point
rows. For the rows that grant authority (an admin credential and its role, a console
session, a join token, an identity's owner and status, a task's agent, parent, intent,
key binding and end, an approval and its status, a policy set, a brokered secret's
metadata (which tools it may be leased for), a tagged setting such as the tool
catalogue or the pinned tool definitions), Tether keeps an HMAC of the row's fields
under a key derived from the KEK, one key per kind (``row_tags``). A row whose tag is
missing or wrong is treated as absent: an unknown credential, an unknown identity, a
task that cannot be decided (denied with ``store.row_tampered``), an approval that
grants nothing. Every such finding is logged as an error.

What a tag cannot show is *age*: a row put back, with its tag, to an earlier state it
really had (an approval back to ``approved`` after its use, a disabled identity back to
``active``) passes. Those transitions also leave a receipt in the verifiable log, whose
signed heads and witness show any deletion, so ``tether audit verify`` compares the
ending receipts with the rows and names the first one a row contradicts; and a node
keeps what it saw revoked in memory. See ``docs/security.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from tether._errors import InfrastructureError, TetherError
from tether.core._canonical import canonical_json
from tether.core._flow import start as start_flow
from tether.core._intent import decode_intent
from tether.store import (
    ApprovalRow,
    ConsoleSessionRow,
    CredentialRow,
    IdentityRow,
    PolicyRow,
    SecretRow,
    Store,
    TaskRow,
)
from tether.tokens._seal import Sealer

log = logging.getLogger("tether.audit")

T = TypeVar("T")

#: Meta key: set (and tagged) once every row of the store carries its tag.
ROWS_TAGGED_META = "rows_tagged"

#: The kinds of authenticated rows.
CREDENTIAL = "credential"
CONSOLE_SESSION = "console_session"
JOIN_TOKEN = "join_token"  # noqa: S105 (a kind of row, not a secret)
IDENTITY = "identity"
TASK = "task"
APPROVAL = "approval"
POLICY = "policy"
SETTING = "setting"
SECRET = "secret"  # noqa: S105 (a kind of row, not a secret)
FLOW = "flow"
TEMPLATE = "template"


KINDS = (
    CREDENTIAL,
    CONSOLE_SESSION,
    JOIN_TOKEN,
    IDENTITY,
    TASK,
    APPROVAL,
    POLICY,
    SETTING,
    SECRET,
    FLOW,
    TEMPLATE,
)

#: The settings (meta keys) kept tagged: the tool catalogue, the pinned tool definitions,
#: the shadow policy set and the trusted user-token issuers.
TAGGED_SETTINGS = (
    "catalogue",
    "catalogue.digest",
    "gateway.tool_pins",
    "policy.shadow",
    "policy.shadow.digest",
    "user_issuers",
)


class RowTampered(InfrastructureError):
    """A row that grants authority fails its authentication: it was written without the
    KEK. Whatever depended on it is refused."""

    code = "store.row_tampered"

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(
            f"the {kind.replace('_', ' ')} row {key!r} fails its authentication "
            "(written without the KEK?)"
        )
        self.kind = kind
        self.key = key


class RowTags:
    """Tags and checks authority-granting rows (see the module's text)."""

    def __init__(self, store: Store, sealer: Sealer) -> None:
        self._store = store
        self._sealer = sealer
        #: (kind, key) -> the last tag checked good with the fields it covered: a node
        #: reading the same row again skips the HMAC (the tag itself is still read).
        self._good: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._reported: set[tuple[str, str]] = set()
        #: task id -> the flow state and tag last written or checked here, and the state
        #: decoded (once asked for): read back unchanged (a byte comparison), it needs no
        #: HMAC of the whole state again, nor decoding.
        self._flows: dict[str, tuple[bytes, str, Any]] = {}

    def _material(self, kind: str, key: str, fields: Mapping[str, Any]) -> bytes:
        return canonical_json({"kind": kind, "key": key, "fields": dict(fields)})

    def tag_of(self, kind: str, key: str, fields: Mapping[str, Any]) -> str:
        return self._sealer.mac(f"row {kind} v1", self._material(kind, key, fields))

    def tag(self, kind: str, key: str, fields: Mapping[str, Any]) -> None:
        """Write the tag of the row ``key`` of ``kind`` as it is now (inside the
        transaction that writes the row)."""
        self._store.put_row_tag(kind, key, self.tag_of(kind, key, fields))

    def authentic(self, kind: str, key: str, fields: Mapping[str, Any]) -> bool:
        """Whether the row's stored tag matches its fields. A failure is logged once per
        row."""
        tag = self._store.get_row_tag(kind, key)
        if tag is None:
            self._report(kind, key, "it has no tag")
            return False
        material = self._material(kind, key, fields)
        seen = self._good.get((kind, key))
        if seen is not None and seen == (tag, material):
            return True
        if self._sealer.mac_ok(f"row {kind} v1", material, tag):
            if len(self._good) > 65536:
                self._good.clear()
            self._good[(kind, key)] = (tag, material)
            return True
        self._report(kind, key, "its tag is wrong")
        return False

    def require(self, kind: str, key: str, fields: Mapping[str, Any]) -> None:
        """Raise :class:`RowTampered` unless the row is authentic."""
        if not self.authentic(kind, key, fields):
            raise RowTampered(kind, key)

    def _report(self, kind: str, key: str, why: str) -> None:
        if (kind, key) not in self._reported:
            if len(self._reported) > 65536:
                self._reported.clear()
            self._reported.add((kind, key))
            log.error("%s row %r ignored: %s (written without the KEK?)", kind, key, why)

    # -- identities ----------------------------------------------------------------------
    def identity(self, spiffe_id: str) -> IdentityRow | None:
        """The registered identity, or ``None``: unknown, or its row was written without
        the KEK (an identity a store writer added, re-owned or re-activated is none)."""
        row = self._store.get_identity(spiffe_id)
        if row is None or not self.authentic(IDENTITY, row.spiffe_id, identity_fields(row)):
            return None
        return row

    # -- intent templates ----------------------------------------------------------------
    def put_template(self, name: str, body: str, at: float) -> None:
        self._store.put_template(name, body, at)
        self.tag(TEMPLATE, name, {"body": body})

    def template(self, name: str) -> str | None:
        """A template's body, its tag checked (:class:`RowTampered`: a template a store
        writer added or widened, with more tools or a larger budget, opens nothing)."""
        body = self._store.get_template(name)
        if body is None:
            return None
        self.require(TEMPLATE, name, {"body": body})
        return body

    # -- flow states ---------------------------------------------------------------------
    def _flow_material(self, task_id: str, state: bytes) -> bytes:
        return b"flow\n" + task_id.encode() + b"\n" + state

    def put_flow(self, task_id: str, state: bytes, at: float, decoded: Any = None) -> None:
        """Store a task's encoded flow state with its tag (one per state: what the task
        has read is as authority-bearing as what it may do). ``decoded``: the value
        ``state`` encodes, kept for :meth:`flow_state`."""
        self._store.put_task_flow(task_id, state, at)
        tag = self._sealer.mac(f"row {FLOW} v1", self._flow_material(task_id, state))
        self._store.put_row_tag(FLOW, task_id, tag)
        self._remember_flow(task_id, state, tag, decoded)

    def _remember_flow(self, task_id: str, state: bytes, tag: str, decoded: Any = None) -> None:
        if len(self._flows) > 4096:
            self._flows.clear()
        self._flows[task_id] = (state, tag, decoded)

    def flow_state(self, task_id: str, decode: Callable[[bytes], T]) -> T:
        """A task's flow state checked as :meth:`flow` checks it, then decoded by
        ``decode``: the very bytes this process wrote or decoded last are not decoded
        again (a task's state grows with what it read; its calls should not)."""
        raw = self.flow(task_id)
        held = self._flows.get(task_id)
        if held is not None and held[2] is not None and held[0] == raw:
            value: T = held[2]
            return value
        value = decode(raw)
        if held is not None and held[0] == raw:
            self._flows[task_id] = (raw, held[1], value)
        return value

    def flow(self, task_id: str) -> bytes:
        """A task's encoded flow state, its tag checked. Every task has one from its
        opening, so a missing state was deleted: :class:`RowTampered`, like a wrong tag
        (a task that forgot what it read would let an injected call through)."""
        raw = self._store.get_task_flow(task_id)
        tag = self._store.get_row_tag(FLOW, task_id)
        held = self._flows.get(task_id)
        if raw is not None and tag is not None and held is not None and held[:2] == (raw, tag):
            return raw  # the very state and tag this process wrote or checked last
        if raw is None or not self._sealer.mac_ok(
            f"row {FLOW} v1", self._flow_material(task_id, raw), tag
        ):
            self._report(FLOW, task_id, "it is missing" if raw is None else "its tag is wrong")
            raise RowTampered(FLOW, task_id)
        assert tag is not None  # mac_ok refuses a missing tag
        self._remember_flow(task_id, raw, tag)
        return raw

    # -- tagged settings ---------------------------------------------------------------
    def set_setting(self, key: str, value: str) -> None:
        """A setting kept in the store's meta table, with its tag."""
        self._store.set_meta(key, value)
        self.tag(SETTING, key, {"value": value})

    def setting(self, key: str) -> str | None:
        """A tagged setting, or ``None`` when it is absent; :class:`RowTampered` when it is
        there but was not written with the KEK."""
        value = self._store.get_meta(key)
        if value is None:
            return None
        self.require(SETTING, key, {"value": value})
        return value

    # -- upgrade -------------------------------------------------------------------------
    def marked(self) -> bool:
        value = self._store.get_meta(ROWS_TAGGED_META)
        return value is not None and self.authentic(SETTING, ROWS_TAGGED_META, {"value": value})

    def mark(self) -> None:
        self.set_setting(ROWS_TAGGED_META, "1")

    def adopt(self) -> int | None:
        """Tag the rows of a store made before rows carried tags, once, at its first open
        by this version; the number of rows tagged, or ``None`` when the store is not one
        to adopt. Only a store with no authentication of any kind yet (no receipt tag, no
        signed head, no row tag) is adopted: one that has some and lacks the mark was
        written without the KEK, and adopting it would bless that writer's rows; its
        untagged rows stay refused (logged)."""
        if self.marked():
            return 0
        store = self._store
        with store.transaction():
            store.last_record()  # PostgreSQL: behind the log's lock, one node adopts
            if self.marked():
                return 0
            tagged_before = (
                next(iter(store.iter_record_macs()), None) is not None
                or store.last_head() is not None
                or any(store.row_tags(kind) for kind in KINDS)
            )
            if tagged_before:
                log.error(
                    "this store's rows are not marked as tagged, yet it holds authentication "
                    "tags: it was written without the KEK; its untagged rows are refused"
                )
                return None
            count = 0
            for credential in store.list_credentials():
                self.tag(CREDENTIAL, credential.credential_id, credential_fields(credential))
                count += 1
            for identity in store.list_identities():
                self.tag(IDENTITY, identity.spiffe_id, identity_fields(identity))
                count += 1
            for task in store.list_tasks():
                self.tag(TASK, task.task_id, task_fields(task))
                raw = store.get_task_flow(task.task_id)
                if raw is None:  # a task with no state yet gets a fresh task's
                    raw = initial_flow(task.intent_json)
                self.put_flow(task.task_id, raw, task.opened_at)
                count += 1
            for approval in store.list_approvals():
                self.tag(APPROVAL, approval.approval_id, approval_fields(approval))
                count += 1
            for secret in store.list_secrets():
                self.tag(SECRET, secret.name, secret_fields(secret))
                count += 1
            for name, body in store.list_templates():
                self.tag(TEMPLATE, name, {"body": body})
                count += 1
            policy = store.active_policy()
            if policy is not None:
                self.tag(POLICY, str(policy.id), policy_fields(policy))
                count += 1
            for key in TAGGED_SETTINGS:
                value = store.get_meta(key)
                if value is not None:
                    self.tag(SETTING, key, {"value": value})
                    count += 1
            self.mark()
        log.warning("authenticated %d rows of a store made before rows were tagged", count)
        return count


# -- the fields each kind's tag covers ------------------------------------------------------
# What grants authority, and what a legitimate change rewrites with a new tag. Counters and
# activity times that move on every call (a task's calls used, a session's last activity)
# are left out: forging them grants nothing a policy relies on.


def initial_flow(intent_json: str) -> bytes:
    """The encoded flow state a task starts with (its user request grounded)."""
    try:
        request = decode_intent(intent_json).request or ""
    except TetherError:
        request = ""
    return msgspec.json.encode(start_flow(request))


def credential_fields(row: CredentialRow) -> dict[str, Any]:
    return {
        "secret_hash": row.secret_hash,
        "role": row.role,
        "owner": row.owner,
        "created_at": row.created_at,
        "disabled_at": row.disabled_at,
        "expires_at": row.expires_at,
    }


def session_fields(row: ConsoleSessionRow) -> dict[str, Any]:
    return {
        "credential_id": row.credential_id,
        "role": row.role,
        "owner": row.owner,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
    }


def identity_fields(row: IdentityRow) -> dict[str, Any]:
    return {
        "kind": row.kind,
        "owner": row.owner,
        "status": row.status,
        "created_at": row.created_at,
        "disabled_at": row.disabled_at,
    }


def task_fields(row: TaskRow) -> dict[str, Any]:
    return {
        "agent_id": row.agent_id,
        "parent_task_id": row.parent_task_id,
        "template": row.template,
        "intent_digest": row.intent_digest,
        "jkt": row.jkt,
        "opened_at": row.opened_at,
        "expires_at": row.expires_at,
        "chain": row.chain_json,
        "status": row.status,
        "ended_at": row.ended_at,
    }


def approval_fields(row: ApprovalRow) -> dict[str, Any]:
    return {
        "task_id": row.task_id,
        "agent_id": row.agent_id,
        "tool": row.tool,
        "args_digest": row.args_digest,
        "args": row.args_json,
        "policy_digest": row.policy_digest,
        "status": row.status,
        "expires_at": row.expires_at,
        "decided_by": row.decided_by,
    }


def policy_fields(row: PolicyRow) -> dict[str, Any]:
    return {"digest": row.digest, "sources": row.sources_json, "schema": row.schema}


def secret_fields(row: SecretRow) -> dict[str, Any]:
    """What a brokered secret is and which tools it may be leased for (``meta_json``)."""
    return {
        "kind": row.kind,
        "meta": row.meta_json,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "disabled_at": row.disabled_at,
    }
