"""The offline verifier of an audit bundle: one file, no database, no Tether server.

It imports only the standard library and ``cryptography``, so it can be copied
beside a bundle and run on its own::

    python _verifier.py bundle.json [--trust keys.json] [--witness heads.jsonl]

What it checks (RFC 9162 hashing: leaf ``SHA-256(0x00 || receipt)``, node
``SHA-256(0x01 || left || right)``):

* every signed tree head (STH) is an ES256 JWS of the trust domain, by a key of the
  bundle (and of ``--trust`` when given: a JWKS or SPIFFE bundle the auditor already
  holds), signed before that key was revoked;
* the heads form one append-only history: sizes grow, each names the one before it,
  and each is consistent (a consistency proof) with the newest head (their times are
  the signing nodes' clocks, not an order: nodes' clocks differ a little);
* every exported receipt sits at its position under the newest head (an inclusion
  proof), carries that position in its body, and the positions are contiguous;
* every head of the witness (the append-only file of published heads) is signed, and
  is the bundle's head of that size: a store rolled back behind what was published
  fails here.

The first failure is reported with the first bad position (a receipt's sequence
number, counted from 1).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

HEAD_TYP = "tether-sth+jwt"
BUNDLE_FORMAT = "tether-audit-bundle/1"
_JWK_MEMBERS = ("kty", "crv", "x", "y")


# -- RFC 9162 hashing and proof verification ---------------------------------------------
def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: is ``leaf`` (a leaf hash) at ``index`` (from 0) of the tree of
    ``size`` leaves whose root is ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of ``second`` leaves an extension of the tree of
    ``first`` leaves?"""
    if first < 1 or first > second:
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


# -- signed tree heads ---------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    """A signed tree head: ``size`` receipts, their Merkle ``root``, signed at ``at``."""

    size: int
    root: bytes
    at: float
    prev: int
    kid: str
    signature: str  # the compact JWS


@dataclass(frozen=True)
class Report:
    ok: bool
    records: int
    heads: int
    first_bad: int | None = None
    problem: str | None = None
    size: int = 0
    root: str | None = None


class Rejected(Exception):
    def __init__(self, position: int, problem: str) -> None:
        super().__init__(problem)
        self.position = position
        self.problem = problem


def _b64d(text: str) -> bytes:
    if "=" in text:
        raise ValueError("padded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads(text: str | bytes) -> Any:
    """JSON with duplicate keys refused."""
    return json.loads(text, object_pairs_hook=_strict)


def public_key(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise ValueError("not a P-256 key")
    x = int.from_bytes(_b64d(str(jwk["x"])), "big")
    y = int.from_bytes(_b64d(str(jwk["y"])), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def read_head(
    jws: str, keys: dict[str, ec.EllipticCurvePublicKey], trust_domain: str
) -> tuple[Head, dict[str, Any]]:
    """The head a JWS signs, if its signature verifies with the key it names (raises
    ``ValueError`` otherwise)."""
    try:
        h64, p64, s64 = jws.split(".")
        header = loads(_b64d(h64))
        claims = loads(_b64d(p64))
        sig = _b64d(s64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed head: {exc}") from None
    if not isinstance(header, dict) or header.get("alg") != "ES256":
        raise ValueError("head is not ES256")
    if header.get("typ") != HEAD_TYP:
        raise ValueError("not a signed tree head")
    kid = str(header.get("kid"))
    key = keys.get(kid)
    if key is None:
        raise ValueError(f"head signed by an unknown key {kid}")
    if len(sig) != 64:
        raise ValueError("bad signature length")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, f"{h64}.{p64}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("head signature does not verify") from None
    if not isinstance(claims, dict) or claims.get("td") != trust_domain:
        raise ValueError("head of another trust domain")
    size, root, at, prev = (claims.get(k) for k in ("size", "root", "at", "prev"))
    if not (isinstance(size, int) and isinstance(prev, int) and isinstance(root, str)):
        raise ValueError("head claims are malformed")
    if not isinstance(at, int | float) or size < 1 or not 0 <= prev < size:
        raise ValueError("head claims are malformed")
    return Head(size, bytes.fromhex(root), float(at), prev, kid, jws), claims


def _key_table(
    bundle_keys: list[dict[str, Any]], trust: dict[str, Any] | None
) -> tuple[dict[str, ec.EllipticCurvePublicKey], dict[str, float | None]]:
    pinned: dict[str, dict[str, Any]] | None = None
    if trust is not None:
        pinned = {}
        for k in trust.get("keys", []):
            if isinstance(k, dict) and k.get("kid"):
                pinned[str(k["kid"])] = {c: k.get(c) for c in _JWK_MEMBERS}
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    revoked: dict[str, float | None] = {}
    for entry in bundle_keys:
        kid, jwk = str(entry.get("kid")), entry.get("jwk")
        if entry.get("use") != "jwt-svid" or not isinstance(jwk, dict):
            continue
        if pinned is not None and pinned.get(kid) != {c: jwk.get(c) for c in _JWK_MEMBERS}:
            continue  # not the key the auditor trusts under this kid
        try:
            keys[kid] = public_key(jwk)
        except (ValueError, KeyError, TypeError):
            continue
        at = entry.get("revoked_at")
        revoked[kid] = float(at) if isinstance(at, int | float) else None
    return keys, revoked


def check_heads(
    jws_list: Sequence[str],
    keys: dict[str, ec.EllipticCurvePublicKey],
    revoked: dict[str, float | None],
    trust_domain: str,
) -> list[Head]:
    """Every head verified, in size order, chained by ``prev`` from the first; raises
    :class:`Rejected` at the first that is not."""
    heads: list[Head] = []
    for jws in jws_list:
        try:
            head, _ = read_head(jws, keys, trust_domain)
        except ValueError as exc:
            position = heads[-1].size + 1 if heads else 1
            raise Rejected(position, f"signed head after {position - 1}: {exc}") from None
        until = revoked.get(head.kid)
        if until is not None and head.at > until:
            raise Rejected(
                head.prev + 1, f"head of size {head.size} signed by revoked key {head.kid}"
            )
        expected_prev = heads[-1].size if heads else 0
        if head.prev != expected_prev:
            if head.prev > expected_prev:
                problem = (
                    f"the signed head of size {head.prev} is missing (deleted): the head of "
                    f"size {head.size} follows it"
                )
            else:
                problem = f"head of size {head.size} does not follow head {expected_prev}"
            raise Rejected(expected_prev + 1, problem)
        heads.append(head)
    return heads


def check_witness(
    lines: Sequence[str],
    heads: Sequence[Head],
    keys: dict[str, ec.EllipticCurvePublicKey],
    trust_domain: str,
    records: int | None = None,
) -> int:
    """Every published head must be one of ``heads`` (same size, same root); returns how
    many were checked; raises :class:`Rejected` (the position after the last head both
    agree on) otherwise. ``records``: how many receipts the log holds, when known."""
    by_size = {h.size: h for h in heads}
    newest = heads[-1].size if heads else 0
    checked = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = loads(line)
            published, _ = read_head(str(entry["sth"]), keys, trust_domain)
        except (ValueError, KeyError, TypeError) as exc:
            raise Rejected(1, f"witness line {number} is not a signed head: {exc}") from None
        agreed = max((h.size for h in heads if h.size < published.size), default=0)
        if published.size > newest and records is not None and published.size <= records:
            raise Rejected(
                agreed + 1,
                f"the signed head of size {published.size} the witness published is gone "
                "from the log (deleted)",
            )
        if published.size > newest:
            raise Rejected(
                newest + 1,
                f"rolled back: the witness published a head of {published.size} receipts, "
                f"the log has a signed head of only {newest}",
            )
        ours = by_size.get(published.size)
        if ours is None:
            raise Rejected(
                agreed + 1, f"the published head of size {published.size} is not in the log"
            )
        if ours.root != published.root:
            raise Rejected(
                agreed + 1,
                f"the log differs from the head published at size {published.size}: "
                f"receipts after {agreed} were rewritten",
            )
        checked += 1
    return checked


def verify_bundle(
    bundle: dict[str, Any],
    *,
    trust: dict[str, Any] | None = None,
    witness: Sequence[str] | None = None,
) -> Report:
    """Check an exported bundle (see the module docstring); never raises on bad input."""
    records = 0
    heads: list[Head] = []
    try:
        if bundle.get("format") != BUNDLE_FORMAT:
            raise Rejected(1, "not a Tether audit bundle")
        td = str(bundle["trust_domain"])
        keys, revoked = _key_table(list(bundle.get("keys", [])), trust)
        heads = check_heads([str(h["sth"]) for h in bundle["heads"]], keys, revoked, td)
        if not heads:
            raise Rejected(1, "the bundle holds no signed head")
        final = heads[-1]
        for head, entry in zip(heads[:-1], bundle["heads"][:-1], strict=True):
            proof = [bytes.fromhex(p) for p in entry.get("consistency", [])]
            if not verify_consistency(head.size, final.size, head.root, final.root, proof):
                raise Rejected(
                    head.prev + 1,
                    f"head of size {head.size} is not a prefix of head {final.size}: "
                    "the log was rewritten",
                )
        first, last = int(bundle["from"]), int(bundle["to"])
        if not 1 <= first <= last <= final.size:
            raise Rejected(max(first, 1), f"range {first}..{last} not covered by the head")
        expected = first
        for entry in bundle["receipts"]:
            seq, body = int(entry["seq"]), str(entry["body"])
            if seq != expected:
                problem = "missing" if seq > expected else "out of order"
                raise Rejected(expected, f"receipt {expected} is {problem}")
            try:
                parsed = loads(body)
            except ValueError:
                raise Rejected(seq, f"receipt {seq} is not valid JSON") from None
            if not isinstance(parsed, dict) or parsed.get("seq") != seq:
                raise Rejected(seq, f"receipt {seq} carries another position")
            proof = [bytes.fromhex(p) for p in entry["proof"]]
            if not verify_inclusion(
                seq - 1, final.size, leaf_hash(body.encode()), proof, final.root
            ):
                raise Rejected(seq, f"receipt {seq} is not the one the signed head covers")
            expected += 1
            records += 1
        if expected != last + 1:
            raise Rejected(expected, f"receipt {expected} is missing (truncated)")
        if witness is not None:
            check_witness(witness, heads, keys, td)
    except Rejected as bad:
        return Report(False, records, len(heads), bad.position, bad.problem)
    except (KeyError, TypeError, ValueError) as exc:
        return Report(False, records, len(heads), 1, f"malformed bundle: {exc}")
    return Report(True, records, len(heads), size=final.size, root=final.root.hex())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Verify a Tether audit bundle offline.")
    parser.add_argument("bundle")
    parser.add_argument("--trust", help="JWKS or SPIFFE bundle of the keys to trust")
    parser.add_argument("--witness", help="the witness file of published heads (JSONL)")
    args = parser.parse_args(argv)
    with open(args.bundle, "rb") as handle:
        bundle = loads(handle.read())
    trust = None
    if args.trust:
        with open(args.trust, "rb") as handle:
            trust = loads(handle.read())
    witness = None
    if args.witness:
        with open(args.witness, encoding="utf-8") as handle:
            witness = handle.read().splitlines()
    report = verify_bundle(bundle, trust=trust, witness=witness)
    sys.stdout.write(json.dumps(report.__dict__, sort_keys=True) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
