"""Receipts: a hash-chained, checkpointed audit log.

Each record's hash is ``SHA-256(prev_hash || canonical body)``; the body
carries its own sequence number, so a record cannot be moved, dropped, swapped
or edited without breaking the chain at that position. Every
``checkpoint_every`` records the head (sequence, hash) is signed with the trust
domain's key; a checkpoint whose record is gone reveals truncation.

Guarantee and its limit: with the signing key out of reach, any edit, deletion,
insertion or reordering of records up to the last checkpoint is detected and
located; records after the last checkpoint are protected by the chain alone
(edits and reordering detected, loss of the newest records not). Exporting
checkpoints to an external append-only sink closes that gap.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tether.core._canonical import canonical_json
from tether.core._clock import Clock
from tether.store import CheckpointRow, RecordRow, Store
from tether.tokens._keys import JWT_USE, KeyRing

GENESIS = "0" * 64
CHECKPOINT_TYP = "tether-checkpoint+jwt"


class VerifyReport(msgspec.Struct, frozen=True):
    ok: bool
    records: int
    checkpoints: int
    first_bad: int | None = None
    problem: str | None = None


def record_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + body.encode()).hexdigest()


class Auditor:
    """Appends receipts and verifies the chain."""

    def __init__(
        self, store: Store, keyring: KeyRing, clock: Clock, *, checkpoint_every: int = 64
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._clock = clock
        self.checkpoint_every = checkpoint_every

    def append(self, kind: str, **fields: Any) -> RecordRow:
        """Append one receipt; call inside the transaction of the change it records."""
        with self._store.transaction():
            last = self._store.last_record()
            seq = 1 if last is None else last.seq + 1
            prev = GENESIS if last is None else last.hash
            now = self._clock.now()
            body = {"seq": seq, "at": round(now, 6), "kind": kind}
            body.update({k: v for k, v in fields.items() if v is not None})
            text = canonical_json(body).decode()
            row = RecordRow(
                seq=seq, prev_hash=prev, hash=record_hash(prev, text), body=text, created_at=now
            )
            self._store.insert_record(row)
            if seq % self.checkpoint_every == 0:
                self._checkpoint(row)
            return row

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

    def verify(self) -> VerifyReport:
        """Walk the whole chain and every checkpoint; name the first bad position."""
        prev, expected, count = GENESIS, 1, 0
        hashes: dict[int, str] = {}
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
            hashes[row.seq] = row.hash
        checkpoints = self._store.list_checkpoints()
        keys = {r.kid: r for r in self._store.list_keys() if r.use == JWT_USE}
        for cp in checkpoints:
            problem = self._check_checkpoint(cp, keys)
            if problem:
                return self._bad(count, cp.seq, problem, len(checkpoints))
            if cp.seq not in hashes:
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
        return VerifyReport(ok=True, records=count, checkpoints=len(checkpoints))

    def _check_checkpoint(self, cp: CheckpointRow, keys: dict[str, Any]) -> str | None:
        try:
            header = jwt.get_unverified_header(cp.signature)
            row = keys.get(str(header.get("kid")))
            if row is None or header.get("typ") != CHECKPOINT_TYP:
                return f"checkpoint {cp.seq} is signed by an unknown key"
            public = ECAlgorithm.from_jwk(row.public_jwk)
            if not isinstance(public, ec.EllipticCurvePublicKey):
                return f"checkpoint {cp.seq} names a key that is not a public key"
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

    def tail(self, limit: int = 20) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        for row in self._store.tail_records(limit):
            body: dict[str, Any] = json.loads(row.body)
            body["hash"] = row.hash
            result.append(body)
        return result
