"""Receipts: a verifiable log (a Merkle tree with signed tree heads) over a hash chain.

Each record's hash is ``SHA-256(prev_hash || canonical body)``; the body carries its
own sequence number, so a record cannot be moved, dropped, swapped or edited without
breaking the chain at that position. That chain has no key, so on its own it only
catches clumsy edits; what makes the log tamper-evident against someone who can write
the store but does not hold the KEK is three things more:

* every receipt carries an authentication tag, an HMAC of its body under a key
  derived from the KEK: an edit with the chain re-hashed still fails at that
  receipt (checked by ``audit verify`` in a node, and before any head signs it);
* receipts are the leaves of an RFC 9162 Merkle tree (:mod:`tether.audit._merkle`);
  a signed tree head (STH: size, root, time, the previous head's size; an ES256 JWS
  by the trust domain's signing key) is made by the committing node at least every
  ``head_every`` receipts and every ``head_interval`` seconds (at the next append or
  reaper run), on clean shutdown and on ``audit verify``. A head signs the receipts
  its node wrote as it wrote them (kept in memory until covered), and another writer's
  only once their tags check. Verifying needs only public keys
  (:mod:`tether.audit._verifier`, also offline over an exported bundle);
* every head is published outside the store, appended to the witness file
  (``TETHER_WITNESS``): a whole store rolled back to an older copy disagrees with the
  last published head.

The older signed checkpoints of the chain head (every ``checkpoint_every`` records)
are still made and checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tether._errors import InfrastructureError
from tether.audit._merkle import Frontier, Tree, leaf_hash
from tether.audit._rows import RowTags
from tether.audit._verifier import (
    BUNDLE_FORMAT,
    HEAD_TYP,
    Head,
    Rejected,
    check_heads,
    check_witness,
    read_head,
)
from tether.core._canonical import canonical_json
from tether.core._clock import Clock
from tether.store import CheckpointRow, HeadRow, RecordRow, Store
from tether.tokens._keys import JWT_USE, KeyRing
from tether.tokens._seal import Sealer

GENESIS = "0" * 64
CHECKPOINT_TYP = "tether-checkpoint+jwt"
#: The purpose of the KEK-derived key that tags receipts.
RECEIPT_MAC = "audit receipt v1"
#: Meta key: receipts up to this position were written before receipts were tagged.
UNTAGGED_META = "audit_untagged_upto"
WITNESS_ENV = "TETHER_WITNESS"
HEAD_EVERY_ENV = "TETHER_HEAD_EVERY"
HEAD_INTERVAL_ENV = "TETHER_HEAD_INTERVAL"

log = logging.getLogger("tether.audit")


class LogTampered(InfrastructureError):
    """The store's log is not what this trust domain wrote: nothing is signed over it."""

    def __init__(self, position: int, problem: str) -> None:
        super().__init__(f"audit log position {position}: {problem}")
        self.position = position
        self.problem = problem


class VerifyReport(msgspec.Struct, frozen=True):
    ok: bool
    records: int
    checkpoints: int
    first_bad: int | None = None
    problem: str | None = None
    heads: int = 0
    witnessed: int = 0
    #: The signed tree head the verification ended on (its size and root).
    size: int = 0
    root: str | None = None


def record_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + body.encode()).hexdigest()


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InfrastructureError(f"{name} must be a number") from None
    if value <= 0:
        raise InfrastructureError(f"{name} must be positive")
    return value


class Witness:
    """An append-only JSONL file of published signed tree heads (one per line), kept
    on another volume than the store; each line is fsynced before the next head."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def publish(self, head: HeadRow, trust_domain: str) -> None:
        line = canonical_json(
            {"td": trust_domain, "size": head.size, "root": head.root, "sth": head.signature}
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def last(self) -> dict[str, Any] | None:
        """The newest published head (its line, parsed; unverified), read from the end."""
        try:
            with self.path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 65536))
                tail = handle.read().splitlines()
        except FileNotFoundError:
            return None
        for raw in reversed(tail):
            if raw.strip():
                try:
                    entry = json.loads(raw)
                except ValueError:
                    return None
                return entry if isinstance(entry, dict) else None
        return None


class _Endings:
    """What the log says was ended for good: tasks ended or revoked, identities
    disabled, signing keys revoked, approvals decided. A row put back to an earlier state
    it really had (its tag from then still checks) contradicts these receipts, which the
    signed heads and the witness keep from being deleted in turn."""

    def __init__(self) -> None:
        self.tasks: dict[str, int] = {}
        self.identities: dict[str, int] = {}
        self.keys: dict[str, int] = {}
        self.approvals: dict[str, int] = {}
        #: The newest policy set loaded: (receipt, snapshot id, digest).
        self.policy: tuple[int, int, str] | None = None
        #: The newest federation change: (receipt, setting version, setting digest).
        self.federation: tuple[int, int, str] | None = None

    def note(self, seq: int, body: dict[str, Any]) -> None:
        kind = body.get("kind")
        detail = body.get("detail")
        detail = detail if isinstance(detail, dict) else {}
        if kind in ("task.end", "task.revoked", "task.expired"):
            if isinstance(body.get("task_id"), str):
                self.tasks[body["task_id"]] = seq
        elif kind == "identity.disable":
            chain = body.get("chain")
            if isinstance(chain, list) and chain and isinstance(chain[0], str):
                self.identities[chain[0]] = seq
        elif kind == "keys.revoke":
            if isinstance(detail.get("kid"), str):
                self.keys[detail["kid"]] = seq
        elif (
            kind == "approval.decide"
            and not detail.get("refused")
            and isinstance(detail.get("approval_id"), str)
        ):
            self.approvals[detail["approval_id"]] = seq
        elif (
            kind == "policy.load"
            and body.get("effect") == "allow"
            and isinstance(detail.get("snapshot_id"), int)
            and isinstance(detail.get("digest"), str)
        ):
            self.policy = (seq, detail["snapshot_id"], detail["digest"])
        elif (
            isinstance(kind, str)
            and kind.startswith("federation.")
            and isinstance(detail.get("setting_version"), int)
            and isinstance(detail.get("setting_digest"), str)
        ):
            self.federation = (seq, detail["setting_version"], detail["setting_digest"])

    def rolled_back(self, store: Store) -> tuple[int, str] | None:
        """The first receipt whose ending the store's rows no longer show, and why."""
        found: list[tuple[int, str]] = []
        for task_id, seq in self.tasks.items():
            task = store.get_task(task_id)
            if task is not None and task.status == "open":
                found.append((seq, f"task {task_id} ended at receipt {seq} is open again"))
        for spiffe_id, seq in self.identities.items():
            identity = store.get_identity(spiffe_id)
            if identity is not None and identity.status == "active":
                found.append(
                    (seq, f"identity {spiffe_id} disabled at receipt {seq} is active again")
                )
        if self.keys:
            revoked = {k.kid: k.revoked_at for k in store.list_keys()}
            for kid, seq in self.keys.items():
                if kid in revoked and revoked[kid] is None:
                    found.append((seq, f"key {kid} revoked at receipt {seq} is trusted again"))
        for approval_id, seq in self.approvals.items():
            approval = store.get_approval(approval_id)
            if approval is not None and approval.status == "pending":
                found.append(
                    (seq, f"approval {approval_id} decided at receipt {seq} is pending again")
                )
        if self.policy is not None:
            seq, snapshot_id, digest = self.policy
            active = store.active_policy()
            if active is None or active.id != snapshot_id or active.digest != digest:
                found.append(
                    (
                        seq,
                        f"policy set {snapshot_id} loaded at receipt {seq} is not the "
                        f"active one (the store's is {active.id if active else 'none'})",
                    )
                )
        if self.federation is not None:
            seq, version, digest = self.federation
            value = store.get_meta("federation")
            held = hashlib.sha256(value.encode()).hexdigest() if value is not None else None
            if held != digest:
                found.append(
                    (
                        seq,
                        f"the federation setting of version {version} written at receipt "
                        f"{seq} is not the store's",
                    )
                )
        return min(found) if found else None


class PendingReceipt:
    """A receipt appended at the end of its commit group (:meth:`Auditor.append_later`):
    its position and hash are known once the group has appended it, before the group
    commits, so before whoever waits on the group is answered."""

    __slots__ = ("row",)

    def __init__(self) -> None:
        self.row: RecordRow | None = None

    def _written(self) -> RecordRow:
        if self.row is None:
            raise InfrastructureError("the receipt has not been appended")
        return self.row

    @property
    def seq(self) -> int:
        return self._written().seq

    @property
    def hash(self) -> str:
        return self._written().hash


class Auditor:
    """Appends receipts, signs and publishes tree heads, verifies the log, exports it."""

    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        clock: Clock,
        *,
        checkpoint_every: int = 64,
        sealer: Sealer | None = None,
        head_every: int | None = None,
        head_interval: float | None = None,
        witness: str | Path | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self._sealer = sealer
        self.checkpoint_every = checkpoint_every
        self.head_every = int(head_every or _env_number(HEAD_EVERY_ENV, 64))
        self.head_interval = float(head_interval or _env_number(HEAD_INTERVAL_ENV, 5.0))
        where = witness if witness is not None else os.environ.get(WITNESS_ENV) or None
        self.witness = Witness(where) if where else None
        # The newest head this process made or saw (a cache: the store decides).
        self._head_size = 0
        self._head_at = 0.0
        #: Leaf hashes of the receipts this process committed that no head covers yet: a
        #: head signs what this node wrote, not what the store holds by then.
        self._written: dict[int, bytes] = {}
        #: The newest position this process committed: never appended over again.
        self._max_written = 0
        #: The newest head this process signed or checked, and its frontier.
        self._known_head: tuple[str, Frontier] | None = None
        self._rows = RowTags(store, sealer) if sealer is not None else None

    @property
    def rows(self) -> RowTags:
        """The authenticated rows of this store (:mod:`tether.audit._rows`)."""
        if self._rows is None:
            raise InfrastructureError("no key-encryption key: rows cannot be authenticated")
        return self._rows

    def _remember(self, seq: int, leaf: bytes) -> None:
        """A receipt this process committed (its leaf kept until a head covers it)."""
        self._written[seq] = leaf
        self._max_written = max(self._max_written, seq)

    def _tag(self, body: str) -> str | None:
        return None if self._sealer is None else self._sealer.mac(RECEIPT_MAC, body.encode())

    def append(self, kind: str, **fields: Any) -> RecordRow:
        """Append one receipt; call inside the transaction of the change it records."""
        with self._store.transaction():
            last = self._store.last_record()
            seq = 1 if last is None else last.seq + 1
            if seq <= self._max_written:
                # This node committed that position and no head covers it yet: the tail
                # was deleted under it. Appending would overwrite its receipt unseen.
                raise LogTampered(seq, f"receipt {seq} this node wrote is missing")
            prev = GENESIS if last is None else last.hash
            now = self._clock.now()
            body = {"seq": seq, "at": round(now, 6), "kind": kind}
            body.update({k: v for k, v in fields.items() if v is not None})
            text = canonical_json(body).decode()
            row = RecordRow(
                seq=seq, prev_hash=prev, hash=record_hash(prev, text), body=text, created_at=now
            )
            self._store.insert_record(row, self._tag(text))
            leaf = leaf_hash(text.encode())
            self._store.after_commit(lambda: self._remember(seq, leaf))
            if seq % self.checkpoint_every == 0:
                self._checkpoint(row)
            # A head this process signed past ``seq`` was rolled back with its transaction
            # (or savepoint): read the store's newest head again.
            due = seq - self._head_size >= self.head_every or self._head_size >= seq
            if due or now - self._head_at >= self.head_interval:
                self._sign_head(seq, now, current=(seq, leaf))
            return row

    def append_later(self, kind: str, **fields: Any) -> RecordRow | PendingReceipt:
        """Append one receipt at the end of the current commit group (a decision run by
        :meth:`tether.store.Store.grouped`), after every decision of the group: the log's
        lock is taken then, once, after the group's row locks, and held only to its
        commit. Dropped with the decision if it is rolled back. Outside a group it is
        :meth:`append`."""
        pending = PendingReceipt()

        def write() -> None:
            pending.row = self.append(kind, **fields)

        if self._store.defer(write):
            return pending
        return self.append(kind, **fields)

    # -- signed tree heads ----------------------------------------------------------------
    def _head_keys(self) -> tuple[dict[str, ec.EllipticCurvePublicKey], dict[str, float | None]]:
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        revoked: dict[str, float | None] = {}
        for row in self._keyring.history(JWT_USE):
            public = ECAlgorithm.from_jwk(row.public_jwk)
            if isinstance(public, ec.EllipticCurvePublicKey):
                keys[row.kid] = public
                revoked[row.kid] = row.revoked_at
        return keys, revoked

    def _untagged_upto(self) -> int:
        raw = self._store.get_meta(UNTAGGED_META)
        if not raw or self._sealer is None:
            return 0
        value, _, tag = raw.partition(":")
        if not value.isdigit() or not self._sealer.mac_ok(UNTAGGED_META, value.encode(), tag):
            return 0
        return int(value)

    def _frontier_of(self, head: HeadRow | None) -> Frontier:
        """The frontier the newest stored head extends from, checked against its signature."""
        if head is None:
            return Frontier()
        known = self._known_head
        if known is not None and known[0] == head.signature:
            return known[1].copy()
        keys, _ = self._head_keys()
        try:
            signed, _ = read_head(head.signature, keys, self._keyring.trust_domain)
            frontier = Frontier.from_hex(head.size, json.loads(head.frontier))
        except (ValueError, TypeError) as exc:
            raise LogTampered(
                head.size, f"the stored signed head of size {head.size}: {exc}"
            ) from None
        if signed.size != head.size or frontier.root() != signed.root:
            raise LogTampered(head.size, f"the stored head of size {head.size} was altered")
        self._known_head = (head.signature, frontier.copy())
        return frontier

    def _sign_head(
        self,
        upto: int,
        now: float,
        *,
        force: bool = False,
        current: tuple[int, bytes] | None = None,
    ) -> HeadRow | None:
        """Sign a head over the first ``upto`` receipts (inside the append's transaction,
        behind the log's lock); ``None`` if one covers them already or none is due yet
        (unless ``force``). ``current`` is the receipt being appended (seq, leaf hash).

        The leaves are the ones this process wrote, from memory; the others (another
        node's, another process's) are read back and their tags checked first."""
        last = self._store.last_head()
        if last is not None:
            self._head_size, self._head_at = last.size, max(self._head_at, last.at)
            self._forget_written(last.size)
            if last.size >= upto or (
                not force
                and upto - last.size < self.head_every
                and now - last.at < self.head_interval
            ):
                return None
        frontier = self._frontier_of(last)
        prev = frontier.size
        known = dict(self._written)
        if current is not None:
            known[current[0]] = current[1]
        missing = [seq for seq in range(prev + 1, upto + 1) if seq not in known]
        if missing:
            known.update(self._read_leaves(missing[0] - 1, missing[-1], set(missing)))
        for seq in range(prev + 1, upto + 1):
            leaf = known.get(seq)
            if leaf is None:
                raise LogTampered(seq, f"receipt {seq} is missing")
            frontier.append(leaf)
        root = frontier.root().hex()
        key_row, key = self._keyring.active(JWT_USE)
        at = now
        claims = {
            "td": self._keyring.trust_domain,
            "size": upto,
            "root": root,
            "at": at,
            "prev": prev,
        }
        signature = jwt.encode(
            claims, key, algorithm="ES256", headers={"kid": key_row.kid, "typ": HEAD_TYP}
        )
        head = HeadRow(
            size=upto,
            root=root,
            at=at,
            prev=prev,
            kid=key_row.kid,
            signature=signature,
            frontier=json.dumps(frontier.to_hex()),
            created_at=now,
        )
        self._store.add_head(head)
        self._head_size, self._head_at = upto, at
        self._known_head = (signature, frontier.copy())
        self._forget_written(upto)
        if self.witness is not None:
            self._store.after_commit(lambda: self._publish(head))
        return head

    def _forget_written(self, upto: int) -> None:
        """Drop the leaves a head (this node's or another's) covers now."""
        for seq in [s for s in list(self._written) if s <= upto]:
            self._written.pop(seq, None)

    def _read_leaves(self, after: int, upto: int, wanted: set[int]) -> dict[int, bytes]:
        """Leaf hashes of the stored receipts ``wanted``, each tag checked."""
        untagged = self._untagged_upto()
        leaves: dict[int, bytes] = {}
        for row, tag in self._store.records_between(after, upto):
            if row.seq not in wanted:
                continue
            if self._sealer is not None and not (
                (tag is None and row.seq <= untagged)
                or self._sealer.mac_ok(RECEIPT_MAC, row.body.encode(), tag)
            ):
                raise LogTampered(row.seq, f"receipt {row.seq} fails its authentication")
            leaves[row.seq] = leaf_hash(row.body.encode())
        return leaves

    def _publish(self, head: HeadRow) -> None:
        assert self.witness is not None
        try:
            self.witness.publish(head, self._keyring.trust_domain)
        except OSError as exc:
            log.error("signed head %s not published to the witness: %s", head.size, exc)

    def sign_head(self, *, force: bool = True) -> HeadRow | None:
        """Cover every receipt with a signed head now (``force``), or only if one is due
        (``head_interval`` passed since the last head)."""
        with self._store.transaction():
            last = self._store.last_record()  # takes the log's lock (PostgreSQL)
            if last is None:
                return None
            return self._sign_head(last.seq, self._clock.now(), force=force)

    def tick(self) -> HeadRow | None:
        """The periodic run (the server's reaper): a head if receipts wait uncovered
        longer than ``head_interval``."""
        if self._clock.now() - self._head_at < self.head_interval:
            return None
        last = self._store.last_record()
        if last is None or last.seq <= self._head_size:
            return None
        return self.sign_head(force=False)

    def check_witness_tail(self) -> str | None:
        """A quick look at start: is the store behind the newest head the witness
        published (a rollback)? Logged at error level; ``audit verify`` says where."""
        if self.witness is None:
            return None
        entry = self.witness.last()
        if entry is None:
            return None
        head = self._store.last_head()
        size, root = entry.get("size"), entry.get("root")
        if not isinstance(size, int):
            return None
        problem = None
        if head is None or head.size < size:
            problem = (
                f"the witness {self.witness.path} published a head of {size} receipts; "
                f"the store's newest head covers {0 if head is None else head.size}: "
                "the store was rolled back"
            )
        elif head.size == size and head.root != root:
            problem = f"the store's head of size {size} differs from the published one"
        if problem:
            log.error("%s (run 'tether audit verify')", problem)
        return problem

    def mark_untagged(self) -> int:
        """Once, after upgrading a store whose receipts predate tags: the receipts so far
        are accepted without a tag (they are signed by the next head). Returns how many."""
        if self._sealer is None:
            raise InfrastructureError("no key-encryption key to tag with")
        with self._store.transaction():
            last = self._store.last_record()
            upto = 0 if last is None else last.seq
            tag = self._sealer.mac(UNTAGGED_META, str(upto).encode())
            self._store.set_meta(UNTAGGED_META, f"{upto}:{tag}")
        return upto

    def checkpoint(self) -> CheckpointRow | None:
        """Sign the current head now (also done every ``checkpoint_every`` records)."""
        with self._store.transaction():
            last = self._store.last_record()
            if last is None:
                return None
            if any(cp.seq == last.seq for cp in self._store.list_checkpoints()):
                return None
            return self._checkpoint(last)

    def _checkpoint(self, row: RecordRow) -> CheckpointRow:
        key_row, key = self._keyring.active(JWT_USE)
        claims = {"seq": row.seq, "hash": row.hash, "td": self._keyring.trust_domain}
        signature = jwt.encode(
            claims, key, algorithm="ES256", headers={"kid": key_row.kid, "typ": CHECKPOINT_TYP}
        )
        cp = CheckpointRow(
            seq=row.seq, hash=row.hash, signature=signature, created_at=self._clock.now()
        )
        self._store.add_checkpoint(cp)
        return cp

    # -- verification ---------------------------------------------------------------------
    def verify(self, *, sign: bool = True) -> VerifyReport:
        """Walk the whole log: the chain, the receipts' tags, every checkpoint, every signed
        tree head and every head published to the witness; name the first bad position.
        When all is well and ``sign``, a head is signed over the receipts not yet covered."""
        report = self._verify()
        if report.ok and sign:
            try:
                head = self.sign_head()
            except LogTampered as exc:  # changed while it was verified
                return self._bad(report.records, exc.position, exc.problem)
            if head is not None:
                report = msgspec.structs.replace(
                    report, heads=report.heads + 1, size=head.size, root=head.root
                )
        return report

    def _verify(self) -> VerifyReport:
        checkpoints = self._store.list_checkpoints()
        head_rows = self._store.list_heads()
        keys, revoked = self._head_keys()
        td = self._keyring.trust_domain
        wanted = {h.size for h in head_rows}
        prev, expected, count = GENESIS, 1, 0
        hashes: dict[int, str] = {}
        cp_seqs = {cp.seq for cp in checkpoints}
        frontier = Frontier()
        roots: dict[int, bytes] = {}
        tags = self._store.iter_record_macs()
        tag: tuple[int, str] | None = next(tags, None)
        untagged = self._untagged_upto()
        bad_tag: tuple[int, str] | None = None
        endings = _Endings()
        for row in self._store.iter_records():
            if row.seq != expected:
                return self._bad(count, expected, f"record {expected} is missing")
            try:
                body = json.loads(row.body)
            except ValueError:
                return self._bad(count, row.seq, f"record {row.seq} is not valid JSON")
            if not isinstance(body, dict) or body.get("seq") != row.seq:
                return self._bad(count, row.seq, f"record {row.seq} carries another position")
            if row.prev_hash != prev:
                return self._bad(
                    count, row.seq, f"record {row.seq} does not follow record {row.seq - 1}"
                )
            if record_hash(prev, row.body) != row.hash:
                return self._bad(count, row.seq, f"record {row.seq} was altered")
            prev, expected, count = row.hash, expected + 1, count + 1
            if row.seq in cp_seqs:
                hashes[row.seq] = row.hash
            tag, bad_tag = self._check_tag(row, tags, tag, untagged, bad_tag)
            endings.note(row.seq, body)
            frontier.append(leaf_hash(row.body.encode()))
            if frontier.size in wanted:
                roots[frontier.size] = frontier.root()
        if bad_tag is not None:
            return self._bad(count, bad_tag[0], bad_tag[1], len(checkpoints))
        for cp in checkpoints:
            problem = self._check_checkpoint(cp, keys)
            if problem:
                return self._bad(count, cp.seq, problem, len(checkpoints))
            if cp.seq > count:
                return self._bad(
                    count,
                    expected,
                    f"chain truncated: checkpoint {cp.seq} signs a record that is gone "
                    f"(the chain ends at {expected - 1})",
                    len(checkpoints),
                )
            if hashes[cp.seq] != cp.hash:
                return self._bad(
                    count, cp.seq, f"record {cp.seq} differs from its checkpoint", len(checkpoints)
                )
        try:
            heads = check_heads([h.signature for h in head_rows], keys, revoked, td)
            self._check_heads_against_log(heads, head_rows, roots, count)
            witnessed = 0
            if self.witness is not None:
                witnessed = check_witness(self.witness.lines(), heads, keys, td, count)
        except Rejected as bad:
            return self._bad(count, bad.position, bad.problem, len(checkpoints))
        rolled_back = endings.rolled_back(self._store)
        if rolled_back is not None:
            return self._bad(count, rolled_back[0], rolled_back[1], len(checkpoints))
        newest = heads[-1].size if heads else 0
        if count - newest >= max(self.head_every, 1) and count > untagged:
            return self._bad(
                count,
                newest + 1,
                f"receipts {newest + 1}..{count} are covered by no signed head "
                f"(at most {self.head_every - 1} may wait for one): heads were deleted",
                len(checkpoints),
            )
        return VerifyReport(
            ok=True,
            records=count,
            checkpoints=len(checkpoints),
            heads=len(heads),
            witnessed=witnessed,
            size=newest,
            root=heads[-1].root.hex() if heads else None,
        )

    def _check_tag(
        self,
        row: RecordRow,
        tags: Iterator[tuple[int, str]],
        tag: tuple[int, str] | None,
        untagged: int,
        bad: tuple[int, str] | None,
    ) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
        while tag is not None and tag[0] < row.seq:
            tag = next(tags, None)
        if bad is not None or self._sealer is None:
            return tag, bad
        if tag is None or tag[0] != row.seq:
            if row.seq > untagged:
                bad = (row.seq, f"receipt {row.seq} has lost its authentication tag")
        elif not self._sealer.mac_ok(RECEIPT_MAC, row.body.encode(), tag[1]):
            bad = (
                row.seq,
                f"receipt {row.seq} fails its authentication: edited (its chain re-hashed?)",
            )
        return tag, bad

    @staticmethod
    def _check_heads_against_log(
        heads: list[Head], rows: list[HeadRow], roots: dict[int, bytes], count: int
    ) -> None:
        for head, row in zip(heads, rows, strict=True):
            if head.size != row.size or head.root.hex() != row.root:
                raise Rejected(head.prev + 1, f"the stored head of size {row.size} was altered")
            if head.size > count:
                raise Rejected(
                    count + 1,
                    f"log truncated: the signed head of size {head.size} covers receipts "
                    f"{count + 1}..{head.size} that are gone",
                )
            if roots.get(head.size) != head.root:
                raise Rejected(
                    head.prev + 1,
                    f"receipts {head.prev + 1}..{head.size} differ from their signed head",
                )

    def _check_checkpoint(self, cp: CheckpointRow, keys: dict[str, Any]) -> str | None:
        try:
            header = jwt.get_unverified_header(cp.signature)
            public = keys.get(str(header.get("kid")))
            if public is None or header.get("typ") != CHECKPOINT_TYP:
                return f"checkpoint {cp.seq} is signed by an unknown key"
            claims = jwt.decode(cp.signature, key=public, algorithms=["ES256"])
        except jwt.PyJWTError:
            return f"checkpoint {cp.seq} signature does not verify"
        if claims.get("seq") != cp.seq or claims.get("hash") != cp.hash:
            return f"checkpoint {cp.seq} does not match its signature"
        return None

    @staticmethod
    def _bad(count: int, position: int, problem: str, checkpoints: int = 0) -> VerifyReport:
        return VerifyReport(
            ok=False, records=count, checkpoints=checkpoints, first_bad=position, problem=problem
        )

    # -- export ---------------------------------------------------------------------------
    def export(self, first: int = 1, last: int | None = None) -> dict[str, Any]:
        """A bundle of receipts ``first..last`` (to the newest without ``last``) with their
        inclusion proofs under a signed head covering them, every head before it with its
        consistency proof, and the public keys: :func:`tether.audit.verify_bundle` checks
        it with no database. Signs a head first if the newest receipts have none."""
        self.sign_head()
        final = self._store.last_head()
        if final is None:
            raise InfrastructureError("the log is empty: nothing to export")
        end = final.size if last is None else last
        if not 1 <= first <= end <= final.size:
            raise InfrastructureError(f"no receipts {first}..{end} under a signed head")
        rows = self._store.records_between(0, final.size)
        tree = Tree([leaf_hash(r.body.encode()) for r, _ in rows])
        if tree.size != final.size or tree.root().hex() != final.root:
            raise LogTampered(1, "the receipts differ from the newest signed head")
        receipts = [
            {
                "seq": r.seq,
                "body": r.body,
                "proof": [p.hex() for p in tree.inclusion(r.seq - 1, final.size)],
            }
            for r, _ in rows[first - 1 : end]
        ]
        heads = [
            {
                "sth": h.signature,
                "consistency": []
                if h.size == final.size
                else [p.hex() for p in tree.consistency(h.size, final.size)],
            }
            for h in self._store.list_heads(upto=final.size)
        ]
        keys = [
            {
                "kid": k.kid,
                "use": k.use,
                "jwk": json.loads(k.public_jwk),
                "created_at": k.created_at,
                "retired_at": k.retired_at,
                "verify_until": k.verify_until,
                "revoked_at": k.revoked_at,
            }
            for k in self._keyring.history(JWT_USE)
        ]
        return {
            "format": BUNDLE_FORMAT,
            "trust_domain": self._keyring.trust_domain,
            "from": first,
            "to": end,
            "heads": heads,
            "receipts": receipts,
            "keys": keys,
        }

    def tail(self, limit: int = 20) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        for row in self._store.tail_records(limit):
            body: dict[str, Any] = json.loads(row.body)
            body["hash"] = row.hash
            result.append(body)
        return result
