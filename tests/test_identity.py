"""Identities, attestation with join tokens, and SVIDs the spiffe library accepts."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle, X509Svid

from tether import (
    AttestationRejected,
    Conflict,
    Effect,
    FrozenClock,
    IdentityRejected,
    ProofKey,
    Tether,
)

from .conftest import AGENT, open_simple_task


def _attest(t: Tether, spiffe_id: str = AGENT) -> tuple[ProofKey, object]:
    key = ProofKey()
    join = t.create_join_token(spiffe_id, ttl=60)
    return key, t.attest(join, key.public_key, audience=["spiffe://acme.example/gateway"])


def test_register_requires_owner_kind_and_trust_domain(tether: Tether) -> None:
    with pytest.raises(IdentityRejected, match="owner"):
        tether.register_identity("spiffe://acme.example/tool/x", kind="tool", owner="nobody")
    with pytest.raises(IdentityRejected, match="kind"):
        tether.register_identity(
            "spiffe://acme.example/tool/x", kind="robot", owner="a@acme.example"
        )
    with pytest.raises(IdentityRejected, match="trust domain"):
        tether.register_identity(
            "spiffe://other.example/tool/x", kind="tool", owner="a@acme.example"
        )
    with pytest.raises(Conflict):
        tether.register_identity(AGENT, kind="agent", owner="a@acme.example")
    assert [r.spiffe_id for r in tether.identities.list()] == [AGENT]


def test_jwt_svid_validates_with_the_spiffe_library(tether: Tether) -> None:
    _, svids = _attest(tether)
    bundle = JwtBundle.parse(TrustDomain("acme.example"), json.dumps(tether.jwks()).encode())
    parsed = JwtSvid.parse_and_validate(
        svids.jwt_svid,
        bundle,  # type: ignore[attr-defined]
        {"spiffe://acme.example/gateway"},
    )
    assert str(parsed.spiffe_id) == AGENT
    assert parsed.expiry - tether.clock.now() <= 3600 + 1


def test_jwt_svid_validates_from_the_spiffe_bundle_too(tether: Tether) -> None:
    _, svids = _attest(tether)
    jwt_keys = {"keys": [k for k in tether.spiffe_bundle()["keys"] if k["use"] == "jwt-svid"]}
    bundle = JwtBundle.parse(TrustDomain("acme.example"), json.dumps(jwt_keys).encode())
    parsed = JwtSvid.parse_and_validate(
        svids.jwt_svid,
        bundle,  # type: ignore[attr-defined]
        {"spiffe://acme.example/gateway"},
    )
    assert str(parsed.spiffe_id) == AGENT


def test_jwt_svid_from_another_trust_domain_is_refused(tether: Tether) -> None:
    other = Tether.ephemeral("other.example")
    other.register_identity("spiffe://other.example/agent/x", kind="agent", owner="a@other.example")
    _, svids = _attest(other, "spiffe://other.example/agent/x")
    bundle = JwtBundle.parse(TrustDomain("acme.example"), json.dumps(tether.jwks()).encode())
    with pytest.raises(Exception):  # noqa: B017 - the spiffe library's own error family
        JwtSvid.parse_and_validate(
            svids.jwt_svid,
            bundle,  # type: ignore[attr-defined]
            {"spiffe://acme.example/gateway"},
        )


def test_x509_svid_is_parsed_by_the_spiffe_library_and_chains_to_the_bundle(
    tether: Tether,
) -> None:
    key, svids = _attest(tether)
    key_der = key.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain_pem = svids.x509_svid_pem.encode()  # type: ignore[attr-defined]
    certs = x509.load_pem_x509_certificates(chain_pem)
    leaf_der = certs[0].public_bytes(serialization.Encoding.DER)
    svid = X509Svid.parse_raw(leaf_der, key_der)
    assert str(svid.spiffe_id) == AGENT
    leaf = svid.leaf
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT]
    ca_pem = certs[1].public_bytes(serialization.Encoding.PEM)
    bundle = X509Bundle.parse(TrustDomain("acme.example"), ca_pem)
    (authority,) = bundle.x509_authorities
    leaf.verify_directly_issued_by(authority)
    assert leaf.not_valid_after_utc.timestamp() - tether.clock.now() <= 3600 + 1


def test_join_token_is_single_use(tether: Tether) -> None:
    key = ProofKey()
    join = tether.create_join_token(AGENT, ttl=60)
    tether.attest(join, key.public_key)
    with pytest.raises(AttestationRejected):
        tether.attest(join, key.public_key)
    last = tether.audit.tail(1)[0]
    assert last["kind"] == "attestation.attest" and last["effect"] == "deny"


def test_join_token_expires(tether: Tether, clock: FrozenClock) -> None:
    join = tether.create_join_token(AGENT, ttl=30)
    clock.advance(31)
    with pytest.raises(AttestationRejected):
        tether.attest(join, ProofKey().public_key)


def test_join_token_is_stored_only_as_a_hash(tether: Tether) -> None:
    join = tether.create_join_token(AGENT, ttl=60)
    dump = "\n".join(tether.store.execute_fetch("SELECT token_hash FROM join_tokens")[0])
    assert join not in dump


def test_disabling_an_agent_revokes_its_tasks_and_tokens(permissive: Tether) -> None:
    key, task_id, token = open_simple_task(permissive)
    _, revoked = permissive.disable_identity(AGENT)
    assert revoked == [task_id]
    row = permissive.store.get_task(task_id)
    assert row is not None and row.status == "revoked"
    assert permissive.store.token_revoked(row.token_id)
    proof = key.prove(token, "fs.read", {}, now=permissive.clock.now())
    receipt = permissive.authorize(token=token, proof=proof, tool="fs.read", args={})
    assert receipt.effect is Effect.DENY
    assert receipt.decision.reasons[0].code == "identity.disabled"
    with pytest.raises(IdentityRejected):
        open_simple_task(permissive)
    with pytest.raises(IdentityRejected):
        permissive.create_join_token(AGENT)
