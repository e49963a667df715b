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

import hashlib
import logging
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any

import msgspec

from tether._errors import InfrastructureError, TetherError
from tether.core._canonical import canonical_json
from tether.core._flow import FlowState
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
        #: task id -> its flow state's row and tag last written or checked here, with the
        #: state they name (see :meth:`flow_state`).
        self._flows: dict[str, _Held] = {}

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
    # A task's flow state is kept in two parts (see :class:`FlowHead`): its tagged row
    # holds everything but the values it has read, with the count of its deltas and the
    # digest chaining them; each call that adds values appends one delta. A store writer
    # who deletes, edits, reorders or re-points a delta breaks the chain the tagged row
    # names: the state is refused (:class:`RowTampered`). A process keeps the state it
    # checked last and reads only the deltas it lacks.
    def _flow_material(self, task_id: str, state: bytes) -> bytes:
        return b"flow\n" + task_id.encode() + b"\n" + state

    def put_flow(self, task_id: str, state: bytes, at: float, decoded: Any = None) -> None:
        """Store a task's encoded flow state (``decoded``: the value it encodes, when at
        hand); see :meth:`put_flow_state`."""
        value = decoded if isinstance(decoded, FlowState) else None
        if value is None:
            value = msgspec.json.decode(state, type=FlowState)
        self.put_flow_state(task_id, value, at)

    def put_flow_state(self, task_id: str, state: FlowState, at: float) -> None:
        """Store a task's flow state with its tag (what the task has read is as
        authority-bearing as what it may do). When the stored state is the one this
        process checked or wrote last and ``state`` only adds values to it, one delta is
        appended and the small row rewritten; otherwise the state is written whole again
        (its values in a first delta)."""
        store = self._store
        held = self._flows.get(task_id)
        if held is not None and (
            held.legacy
            or store.get_task_flow(task_id) != held.raw
            or store.get_row_tag(FLOW, task_id) != held.tag
        ):
            held = None
        delta = _delta(held.state, state) if held is not None else None
        if held is not None and delta is not None:
            deltas, chain = held.deltas, held.chain
            if not delta.empty:
                encoded = msgspec.json.encode(delta)
                deltas, chain = deltas + 1, _link(chain, encoded)
                store.put_task_flow_delta(task_id, deltas, encoded, at)
        else:
            store.drop_task_flow_deltas(task_id)
            deltas, chain = 0, _seed(task_id)
            whole = _values(state)
            if not whole.empty:
                encoded = msgspec.json.encode(whole)
                deltas, chain = 1, _link(chain, encoded)
                store.put_task_flow_delta(task_id, 1, encoded, at)
        raw = msgspec.json.encode(_head(state, deltas, chain))
        store.put_task_flow(task_id, raw, at)
        tag = self._sealer.mac(f"row {FLOW} v1", self._flow_material(task_id, raw))
        store.put_row_tag(FLOW, task_id, tag)
        self._remember_flow(task_id, _Held(raw, tag, deltas, chain, state))

    def _remember_flow(self, task_id: str, held: _Held) -> None:
        if len(self._flows) > 4096:
            self._flows.clear()
        self._flows[task_id] = held

    def flow_state(self, task_id: str) -> FlowState:
        """A task's flow state, checked. Every task has one from its opening, so a missing
        state was deleted: :class:`RowTampered`, like a wrong tag or a broken chain of
        deltas (a task that forgot what it read would let an injected call through). The
        row this process wrote or checked last, read back unchanged (a byte comparison),
        needs no HMAC nor decoding again; a row another process moved on is checked and
        only the deltas added since are read."""
        store = self._store
        raw = store.get_task_flow(task_id)
        tag = store.get_row_tag(FLOW, task_id)
        held = self._flows.get(task_id)
        if raw is not None and held is not None and (held.raw, held.tag) == (raw, tag):
            return held.state
        if raw is None or not self._sealer.mac_ok(
            f"row {FLOW} v1", self._flow_material(task_id, raw), tag
        ):
            self._report(FLOW, task_id, "it is missing" if raw is None else "its tag is wrong")
            raise RowTampered(FLOW, task_id)
        assert tag is not None  # mac_ok refuses a missing tag
        head = msgspec.json.decode(raw, type=FlowHead)
        if held is not None and head.calls_made < held.state.calls_made:
            # A task's calls only ever add up: a head that counts fewer than this process
            # saw was put back, with its tag, to an earlier state it really had.
            self._report(FLOW, task_id, "it counts fewer calls than this node saw")
            raise RowTampered(FLOW, task_id)
        if not head.chain:  # written whole, before deltas: all of it is in its row
            whole = _plain(head, None)
            self._remember_flow(task_id, _Held(raw, tag, 0, "", whole, legacy=True))
            return whole
        state: FlowState | None = None
        if held is not None and not held.legacy and held.deltas <= head.deltas:
            state = self._extend(task_id, head, held.deltas, held.chain, held.state)
        if state is None:
            state = self._extend(task_id, head, 0, _seed(task_id), None)
        if state is None:
            self._report(FLOW, task_id, "its deltas do not chain to it")
            raise RowTampered(FLOW, task_id)
        self._remember_flow(task_id, _Held(raw, tag, head.deltas, head.chain, state))
        return state

    def _extend(
        self, task_id: str, head: FlowHead, after: int, chain: str, base: FlowState | None
    ) -> FlowState | None:
        """The state ``head`` names from ``base`` (the state after delta ``after``, whose
        chain is ``chain``) and the deltas after it; ``None`` unless they chain to it."""
        # One row past the head's count is asked for too: a delta beyond the head means
        # the head was put back to an earlier state than its deltas show.
        rows = self._store.task_flow_deltas(task_id, after, head.deltas + 1)
        if [seq for seq, _ in rows] != list(range(after + 1, head.deltas + 1)):
            return None
        for _, encoded in rows:
            chain = _link(chain, encoded)
        if chain != head.chain:
            return None
        return _plain(head, base, [msgspec.json.decode(d, type=FlowDelta) for _, d in rows])

    def flow(self, task_id: str) -> bytes:
        """A task's flow state, checked as :meth:`flow_state` checks it, encoded whole."""
        return msgspec.json.encode(self.flow_state(task_id))

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


# -- a task's flow state, kept as a tagged head and appended deltas -----------------------


class FlowHead(FlowState, frozen=True, omit_defaults=True):
    """A task's flow state as its tagged row holds it: all but the values it has read
    (``trusted_values``, ``untrusted_values``, ``fingerprints``, ``sent``), which are in
    its ``deltas`` numbered from 1, and ``chain``, the digest chaining them
    (:func:`_link` from :func:`_seed`). A row written before deltas has no ``chain`` and
    holds the whole state."""

    deltas: int = 0
    chain: str = ""


class FlowDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    """The values one call added to a task's flow state."""

    trusted: frozenset[str] = frozenset()
    untrusted: dict[str, str] = {}
    fingerprints: dict[int, str] = {}
    sent: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.trusted or self.untrusted or self.fingerprints or self.sent)


class _Held(msgspec.Struct):
    """A flow state's row and tag as written or checked here, and the state they name."""

    raw: bytes
    tag: str
    deltas: int
    chain: str
    state: FlowState
    legacy: bool = False  # a row written whole, before deltas


_VALUES = frozenset(("trusted_values", "untrusted_values", "fingerprints", "sent"))
_KEPT = tuple(f for f in FlowState.__struct_fields__ if f not in _VALUES)


def _seed(task_id: str) -> str:
    return hashlib.sha256(b"tether flow deltas v1\n" + task_id.encode()).hexdigest()


def _link(chain: str, delta: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(chain) + delta).hexdigest()


def _head(state: FlowState, deltas: int, chain: str) -> FlowHead:
    return FlowHead(**{f: getattr(state, f) for f in _KEPT}, deltas=deltas, chain=chain)


def _values(state: FlowState) -> FlowDelta:
    return FlowDelta(
        trusted=state.trusted_values,
        untrusted=state.untrusted_values,
        fingerprints=state.fingerprints,
        sent=state.sent,
    )


def _plain(head: FlowHead, base: FlowState | None, deltas: Sequence[FlowDelta] = ()) -> FlowState:
    """The state ``head`` names: its own values (a row written whole) or ``base``'s, with
    ``deltas`` added in order."""
    source: FlowState = base if base is not None else head
    trusted, untrusted = source.trusted_values, source.untrusted_values
    prints, sent = source.fingerprints, source.sent
    for delta in deltas:
        if delta.trusted:
            trusted = trusted | delta.trusted
        if delta.untrusted:
            untrusted = {**untrusted, **delta.untrusted}
        if delta.fingerprints:
            prints = {**prints, **delta.fingerprints}
        if delta.sent:
            sent = sent | delta.sent
    return FlowState(
        **{f: getattr(head, f) for f in _KEPT},
        trusted_values=trusted,
        untrusted_values=untrusted,
        fingerprints=prints,
        sent=sent,
    )


def _added(before: dict[Any, str], after: dict[Any, str]) -> dict[Any, str] | None:
    """The entries ``after`` adds to ``before`` (appended after them), or ``None`` when it
    does not only add."""
    if after is before:
        return {}
    if len(after) < len(before) or not before.items() <= after.items():
        return None
    tail = dict(islice(after.items(), len(before), None))
    if len(tail) + len(before) != len(after) or any(k in before for k in tail):
        return None
    return tail


def _delta(before: FlowState, after: FlowState) -> FlowDelta | None:
    """What ``after`` adds to ``before``'s values, or ``None`` when it does not only add
    (then the state is written whole)."""
    trusted: frozenset[str] = frozenset()
    if after.trusted_values is not before.trusted_values:
        if not before.trusted_values <= after.trusted_values:
            return None
        trusted = after.trusted_values - before.trusted_values
    sent: frozenset[int] = frozenset()
    if after.sent is not before.sent:
        if not before.sent <= after.sent:
            return None
        sent = after.sent - before.sent
    untrusted = _added(before.untrusted_values, after.untrusted_values)
    prints = _added(before.fingerprints, after.fingerprints)
    if untrusted is None or prints is None:
        return None
    return FlowDelta(trusted=trusted, untrusted=untrusted, fingerprints=prints, sent=sent)
