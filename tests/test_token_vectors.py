"""Adversarial token vectors: every forged, replayed or malformed input is denied.

Each vector is one named test and checks four things:

1. the decision effect is ``deny``;
2. the reason code is the specific one for the vector;
3. exactly one receipt was appended to the audit chain, of kind ``decision``
   and effect ``deny``, carrying that reason code;
4. no state changed: the task row (``calls_used``, ``status``, ...) is what it
   was before the call, and the proof's ``jti`` was not consumed.

A positive control shows that a well-formed call is allowed, so the suite can fail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether import (
    Effect,
    FrozenClock,
    IdentityRejected,
    OpenedTask,
    ProofKey,
    Receipt,
    Tether,
    TokenRejected,
    parse_intent,
    parse_spiffe_id,
)
from tether.core._verify import low_s, verify_jwt_svid
from tether.identity._svid import issue_jwt_svid
from tether.store import TaskRow

from .conftest import quiet

TRUST_DOMAIN = "acme.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/bot"
TOOL = "fs.read"
ARGS: dict[str, Any] = {"path": "/a"}
JWT_USE = "jwt-svid"

MALFORMED_SPIFFE_IDS = [
    "http://td/x",
    "spiffe:///x",
    "spiffe://user@td/x",
    "spiffe://td:443/x",
    "spiffe://TD/x",
    "spiffe://td/x?q",
    "spiffe://td/x#f",
    "spiffe://td//x",
    "spiffe://td/./x",
    "spiffe://td/x/",
    "spiffe://td/%41",
    "spiffe://td/a b",
    "spiffe://[::1]/x",
    "spiffe://td/" + "a" * (2049 - len("spiffe://td/")),  # 2049 bytes: one over the limit
]


def _spiffe_id_name(value: str) -> str:
    return f"{len(value)}-byte-id" if len(value) > 80 else value


# -- fixtures and helpers ---------------------------------------------------------------------


@dataclass
class World:
    """One ephemeral trust domain with one agent and one open task."""

    tether: Tether
    clock: FrozenClock
    key: ProofKey
    task: OpenedTask

    @property
    def token(self) -> str:
        return self.task.token

    def task_row(self) -> TaskRow:
        row = self.tether.store.get_task(self.task.task_id)
        assert row is not None
        return row

    def prove(
        self,
        token: str | None = None,
        args: dict[str, Any] | None = None,
        *,
        key: ProofKey | None = None,
        now: float | None = None,
    ) -> str:
        return (key or self.key).prove(
            token if token is not None else self.token,
            TOOL,
            ARGS if args is None else args,
            now=self.clock.now() if now is None else now,
        )

    def authorize(
        self, token: str | None, proof: str | None, args: dict[str, Any] | None = None
    ) -> Receipt:
        return self.tether.authorize(
            token=token, proof=proof, tool=TOOL, args=ARGS if args is None else args
        )


@dataclass(frozen=True)
class Before:
    """What must not change when a call is denied."""

    records: int
    last_seq: int
    task: TaskRow


@pytest.fixture
def world() -> Iterator[World]:
    clock = FrozenClock(time.time())
    t = Tether.ephemeral(TRUST_DOMAIN, clock=clock)
    t.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    t.policies.load({"p.cedar": "permit(principal, action, resource);"})
    quiet(t)
    intent = parse_intent(
        {"purpose": "read things", "capabilities": [{"tool": TOOL}], "budget": {"max_calls": 5}}
    )
    key = ProofKey()
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    yield World(tether=t, clock=clock, key=key, task=task)
    t.close()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def resign(
    token: str,
    key: Any,
    kid: str | None,
    header_updates: dict[str, Any] | None = None,
    claim_updates: dict[str, Any] | None = None,
) -> str:
    """Decode ``token`` without verifying it, change it, and sign it again with ``key``.

    ``kid`` replaces the header's key id (``None`` keeps it); ``header_updates``
    may also set ``alg``.
    """
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    if kid is not None:
        header["kid"] = kid
    header.update(header_updates or {})
    claims.update(claim_updates or {})
    alg = header.pop("alg")
    signed = jwt.encode(claims, key, algorithm=alg, headers=header)
    # Signed as the trust domain signs (low s), so each vector fails for its own reason.
    return low_s(signed) if alg == "ES256" else signed


def signing_key(t: Tether) -> tuple[str, ec.EllipticCurvePrivateKey]:
    row, private_key = t.keys.active(JWT_USE)
    return row.kid, private_key


def proof_jti(proof: str) -> str:
    jti = jwt.decode(proof, options={"verify_signature": False})["jti"]
    assert isinstance(jti, str)
    return jti


def record_count(t: Tether) -> int:
    return sum(1 for _ in t.store.iter_records())


def before(w: World) -> Before:
    last = w.tether.store.last_record()
    assert last is not None
    return Before(records=record_count(w.tether), last_seq=last.seq, task=w.task_row())


def assert_denied(
    w: World, receipt: Receipt, code: str, was: Before, *, jti: str | None = None
) -> None:
    """The four properties every vector must show (see the module docstring)."""
    t = w.tether
    # 1. deny
    assert receipt.decision.effect is Effect.DENY
    assert str(receipt.decision.effect) == "deny"
    # 2. the specific reason
    codes = [r.code for r in receipt.decision.reasons]
    assert codes == [code], receipt.decision.reasons
    # 3. exactly one receipt, the deny, at the head of the chain
    assert record_count(t) == was.records + 1
    last = t.store.last_record()
    assert last is not None
    assert last.seq == was.last_seq + 1 == receipt.seq
    assert last.hash == receipt.hash
    (record,) = t.audit.tail(1)
    assert record["kind"] == "decision"
    assert record["effect"] == "deny"
    assert [r["code"] for r in record["reasons"]] == [code]
    assert t.verify_audit().ok
    # 4. no state changed
    row = w.task_row()
    assert row.calls_used == was.task.calls_used
    assert row.status == was.task.status
    assert row == was.task
    if jti is not None:
        assert not t.store.proof_seen(jti)


# -- positive control -------------------------------------------------------------------------


def test_well_formed_call_is_allowed(world: World) -> None:
    was = before(world)
    proof = world.prove()
    receipt = world.authorize(world.token, proof)
    assert receipt.decision.effect is Effect.ALLOW
    assert [r.code for r in receipt.decision.reasons] == ["allow"]
    assert record_count(world.tether) == was.records + 1
    (record,) = world.tether.audit.tail(1)
    assert record["kind"] == "decision"
    assert record["effect"] == "allow"
    assert world.task_row().calls_used == was.task.calls_used + 1
    assert world.tether.store.proof_seen(proof_jti(proof))


# -- the token's algorithm and key ------------------------------------------------------------


def test_alg_none_is_denied(world: World) -> None:
    header = jwt.get_unverified_header(world.token) | {"alg": "none"}
    claims = jwt.decode(world.token, options={"verify_signature": False})
    token = f"{b64json(header)}.{b64json(claims)}."
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.alg", was, jti=proof_jti(proof))


def test_hs256_with_public_key_as_secret_is_denied(world: World) -> None:
    _, private_key = signing_key(world.tether)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = jwt.get_unverified_header(world.token) | {"alg": "HS256"}
    claims = jwt.decode(world.token, options={"verify_signature": False})
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.alg", was, jti=proof_jti(proof))


def test_unknown_kid_is_denied(world: World) -> None:
    token = resign(world.token, ec.generate_private_key(ec.SECP256R1()), "made-up-kid")
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.unknown_kid", was, jti=proof_jti(proof))


def test_attacker_key_claiming_real_kid_is_denied(world: World) -> None:
    kid, _ = signing_key(world.tether)
    assert jwt.get_unverified_header(world.token)["kid"] == kid
    token = resign(world.token, ec.generate_private_key(ec.SECP256R1()), kid)
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.signature", was, jti=proof_jti(proof))


def test_tampered_payload_is_denied(world: World) -> None:
    header_b64, _, signature_b64 = world.token.split(".")
    claims = jwt.decode(world.token, options={"verify_signature": False})
    claims["scope"] = "admin"
    claims["tctx"]["max_calls"] = 10_000
    token = f"{header_b64}.{b64json(claims)}.{signature_b64}"
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.signature", was, jti=proof_jti(proof))


# -- the token's times, audience and trust domain -------------------------------------------


def test_expired_token_is_denied(world: World) -> None:
    exp = jwt.decode(world.token, options={"verify_signature": False})["exp"]
    world.clock.advance(exp - world.clock.now() + 60)  # past exp and its leeway
    proof = world.prove()
    was = before(world)
    receipt = world.authorize(world.token, proof)
    assert_denied(world, receipt, "token.expired", was, jti=proof_jti(proof))


def test_not_yet_valid_token_is_denied(world: World) -> None:
    kid, private_key = signing_key(world.tether)
    future = int(world.clock.now()) + 3600
    token = resign(world.token, private_key, kid, claim_updates={"nbf": future, "iat": future})
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.not_yet_valid", was, jti=proof_jti(proof))


def test_wrong_audience_is_denied(world: World) -> None:
    kid, private_key = signing_key(world.tether)
    token = resign(world.token, private_key, kid, claim_updates={"aud": "other.example"})
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.audience", was, jti=proof_jti(proof))


def test_foreign_issuer_is_denied(world: World) -> None:
    kid, private_key = signing_key(world.tether)
    token = resign(world.token, private_key, kid, claim_updates={"iss": "spiffe://evil.example"})
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.trust_domain", was, jti=proof_jti(proof))


def test_foreign_subject_is_denied(world: World) -> None:
    kid, private_key = signing_key(world.tether)
    token = resign(
        world.token, private_key, kid, claim_updates={"sub": "spiffe://evil.example/agent/bot"}
    )
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.trust_domain", was, jti=proof_jti(proof))


@pytest.mark.parametrize("bad_id", MALFORMED_SPIFFE_IDS, ids=_spiffe_id_name)
def test_malformed_subject_is_denied(world: World, bad_id: str) -> None:
    kid, private_key = signing_key(world.tether)
    token = resign(world.token, private_key, kid, claim_updates={"sub": bad_id})
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)
    assert_denied(world, receipt, "token.subject", was, jti=proof_jti(proof))


# -- the task and the agent -------------------------------------------------------------------


def test_token_of_ended_task_is_denied(world: World) -> None:
    world.tether.end_task(world.task.task_id)
    proof = world.prove()
    was = before(world)
    assert was.task.status == "ended"
    receipt = world.authorize(world.token, proof)
    assert_denied(world, receipt, "task.ended", was, jti=proof_jti(proof))


def test_token_of_disabled_agent_is_denied(world: World) -> None:
    world.tether.disable_identity(AGENT)
    proof = world.prove()
    was = before(world)
    assert was.task.status == "revoked"  # offboarding revoked the task too
    receipt = world.authorize(world.token, proof)
    assert_denied(world, receipt, "identity.disabled", was, jti=proof_jti(proof))


# -- the proof of possession ------------------------------------------------------------------


def test_missing_proof_is_denied(world: World) -> None:
    was = before(world)
    receipt = world.authorize(world.token, None)
    assert_denied(world, receipt, "proof.missing", was)


def test_proof_by_another_key_is_denied(world: World) -> None:
    proof = world.prove(key=ProofKey())
    was = before(world)
    receipt = world.authorize(world.token, proof)
    assert_denied(world, receipt, "proof.key_mismatch", was, jti=proof_jti(proof))


def test_replayed_proof_is_denied(world: World) -> None:
    proof = world.prove()
    first = world.authorize(world.token, proof)
    assert first.decision.effect is Effect.ALLOW
    was = before(world)
    assert was.task.calls_used == 1
    receipt = world.authorize(world.token, proof)
    assert_denied(world, receipt, "proof.replayed", was)
    assert world.tether.store.proof_seen(proof_jti(proof))  # consumed once, by the first call


def test_proof_for_another_call_is_denied(world: World) -> None:
    proof = world.prove(args={"path": "/a"})
    was = before(world)
    receipt = world.authorize(world.token, proof, args={"path": "/etc/shadow"})
    assert_denied(world, receipt, "proof.call", was, jti=proof_jti(proof))


def test_stale_proof_is_denied(world: World) -> None:
    proof = world.prove(now=world.clock.now() - 3600)
    was = before(world)
    receipt = world.authorize(world.token, proof)
    assert_denied(world, receipt, "proof.stale", was, jti=proof_jti(proof))


def test_proof_with_nan_iat_is_denied(world: World) -> None:
    claims = jwt.decode(world.prove(), options={"verify_signature": False})
    claims["iat"] = float("nan")
    proof = jwt.encode(
        claims,
        world.key.private_key,
        algorithm="ES256",
        headers={"typ": "dpop+jwt", "jwk": world.key.jwk},
    )
    world.clock.advance(600 - 60)  # far outside the 60 s window, the task still open
    was = before(world)
    receipt = world.authorize(world.token, proof)
    code = receipt.decision.reasons[0].code
    assert code in {"proof.claims", "proof.stale"}, receipt.decision.reasons
    assert_denied(world, receipt, code, was, jti=proof_jti(proof))


# -- malformed SPIFFE IDs ---------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", MALFORMED_SPIFFE_IDS, ids=_spiffe_id_name)
def test_malformed_spiffe_id_is_rejected_by_parser(bad_id: str) -> None:
    with pytest.raises(IdentityRejected) as caught:
        parse_spiffe_id(bad_id)
    assert caught.value.code == "spiffe_id.malformed"


@pytest.mark.parametrize("bad_id", MALFORMED_SPIFFE_IDS, ids=_spiffe_id_name)
def test_malformed_spiffe_id_is_not_registered(world: World, bad_id: str) -> None:
    t = world.tether
    identities = t.store.list_identities()
    records = record_count(t)
    with pytest.raises(IdentityRejected) as caught:
        t.register_identity(bad_id, kind="agent", owner="mallory@acme.example")
    assert caught.value.code == "spiffe_id.malformed"
    assert t.store.list_identities() == identities
    # A refusal leaves exactly one deny receipt.
    assert record_count(t) == records + 1
    added = t.audit.tail(1)
    for record in added:
        assert record["kind"] == "identity.register"
        assert record["effect"] == "deny"
        assert [r["code"] for r in record["reasons"]] == ["spiffe_id.malformed"]


def test_spiffe_id_at_length_limit_is_accepted() -> None:
    """Boundary control for the 2049-byte vector: 2048 bytes is still valid."""
    value = "spiffe://td/" + "a" * (2048 - len("spiffe://td/"))
    assert len(value.encode()) == 2048
    assert str(parse_spiffe_id(value)) == value


@pytest.mark.parametrize("bad_id", [AGENT + "\n", "spiffe://td/x\n"])
def test_spiffe_id_with_trailing_newline_is_rejected(bad_id: str) -> None:
    try:
        parsed = parse_spiffe_id(bad_id)
    except IdentityRejected as exc:
        assert exc.code == "spiffe_id.malformed"
    else:
        raise AssertionError(f"accepted {bad_id!r} as {parsed!r}")


def test_lookalike_identity_with_trailing_newline_is_not_registered(world: World) -> None:
    t = world.tether
    identities = t.store.list_identities()
    try:
        row = t.register_identity(AGENT + "\n", kind="agent", owner="mallory@acme.example")
    except IdentityRejected as exc:
        assert exc.code == "spiffe_id.malformed"
    else:
        raise AssertionError(f"registered the lookalike {row.spiffe_id!r} next to {AGENT!r}")
    assert t.store.list_identities() == identities


# -- garbage tokens and oversized calls -------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("", "token.missing"),
        ("abc", "token.malformed"),
        ("a.b.c", "token.malformed"),
        ("a" * 10_000 + "." + "b" * 10_000 + "." + "c" * 480, "token.malformed"),  # 20 KB
    ],
    ids=["empty", "abc", "a.b.c", "20kb"],
)
def test_garbage_token_is_denied(world: World, token: str, code: str) -> None:
    proof = world.prove(token)
    was = before(world)
    receipt = world.authorize(token, proof)  # no exception may escape
    assert_denied(world, receipt, code, was, jti=proof_jti(proof))


def test_oversized_args_are_denied(world: World) -> None:
    args = {"path": "x" * 100 * 1024}
    proof = world.prove(args=args)
    was = before(world)
    receipt = world.authorize(world.token, proof, args=args)
    assert_denied(world, receipt, "call.oversized", was, jti=proof_jti(proof))


# -- signature malleability -------------------------------------------------------------------

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def high_s_twin(token: str) -> str:
    """The other valid ECDSA encoding of ``token``'s signature: (r, n - s)."""
    head, _, segment = token.rpartition(".")
    raw = base64.urlsafe_b64decode(segment + "==")
    s = int.from_bytes(raw[32:], "big")
    return f"{head}.{b64url(raw[:32] + (P256_N - s).to_bytes(32, 'big'))}"


def s_value(token: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(token.rpartition(".")[2] + "==")[32:], "big")


def test_tokens_are_minted_low_s(world: World) -> None:
    """Every task token and JWT-SVID this trust domain signs has s <= n/2, so the
    verifier can refuse the high-s twin without refusing its own tokens."""

    t = world.tether
    intent = parse_intent({"purpose": "read things", "capabilities": [{"tool": TOOL}]})
    for _ in range(24):
        task = t.open_task(AGENT, proof_jwk=world.key.jwk, intent=intent)
        assert s_value(task.token) <= P256_N // 2
        svid, _jti, _exp = issue_jwt_svid(
            t.keys, parse_spiffe_id(AGENT), audience=["x"], now=world.clock.now()
        )
        assert s_value(svid) <= P256_N // 2


def test_high_s_twin_of_a_task_token_is_denied(world: World) -> None:
    """Compromised agent: it flips s to n - s in its own task token. The twin is a
    valid ECDSA signature over the same claims with another digest, so it would dodge
    anything keyed on the token's digest (the verified-claims cache, a revocation by
    digest, the receipts' token_digest). Only the low-s encoding is accepted."""
    twin = high_s_twin(world.token)
    assert twin != world.token
    # The twin really is a valid signature: the check is about encoding, not forgery.
    _kid, private_key = signing_key(world.tether)
    jwt.decode(twin, private_key.public_key(), algorithms=["ES256"], options={"verify_aud": False})
    proof = world.prove(twin)
    was = before(world)
    receipt = world.authorize(twin, proof)
    assert_denied(world, receipt, "token.signature", was, jti=proof_jti(proof))


def test_high_s_twin_of_a_jwt_svid_is_refused(world: World) -> None:
    """Compromised agent: the high-s twin of its JWT-SVID is refused as a signature
    fault; the original verifies (positive control)."""

    t = world.tether
    now = world.clock.now()
    svid, _jti, _exp = issue_jwt_svid(t.keys, parse_spiffe_id(AGENT), audience=["aud"], now=now)
    keys = t.keys.verification_keys(now)
    assert verify_jwt_svid(svid, keys, audience="aud", now=now).spiffe_id == AGENT
    with pytest.raises(TokenRejected) as caught:
        verify_jwt_svid(high_s_twin(svid), keys, audience="aud", now=now)
    assert caught.value.code == "svid.signature"
