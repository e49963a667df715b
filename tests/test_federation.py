"""Federated SPIFFE trust: a second Tether trust domain, ``partner.example``, serves its
bundle over a real HTTP server (``tether serve`` on a local port); this trust domain,
``acme.example``, consumes it and attests its own registered identities with the
partner's JWT-SVIDs, only as linked, only while the bundle is configured and fresh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtBundle, JwtSvid, TrustDomain

from tether import FrozenClock, ProofKey, Tether
from tether._errors import AttestationRejected, NotFound, UsageError
from tether.audit._rows import RowTampered
from tether.core._verify import jwk_thumbprint, verify_jwt_svid
from tether.identity._federation import parse_bundle
from tether.tokens import JWT_USE
from tether.tokens._keys import public_jwk

from .conftest import AGENT, OWNER
from .server_support import Backend, Server, home_database, new_schema_url

PARTNER = "partner.example"
PARTNER_BOT = f"spiffe://{PARTNER}/agent/bot"
ACME_AUDIENCE = "spiffe://acme.example"
ATTEST_URL = "https://tether.acme.example/v1/attest/federated"


class Partner:
    """The foreign trust domain: a real server serving its bundle, and the same home
    opened in this process to issue its SVIDs."""

    def __init__(self, home: Path) -> None:
        if Backend.kind == "postgresql":  # a deployment of its own: a schema of its own
            Backend.homes[home.resolve()] = new_schema_url("partner")
        self.server = Server(home, trust_domain=PARTNER).start()
        self.tether = Tether.open(home, database_url=home_database(home))
        self.url = f"{self.server.url}/.well-known/spiffe-bundle"

    def svid(self, spiffe_id: str = PARTNER_BOT, *, audience: str = ACME_AUDIENCE) -> str:
        """A JWT-SVID of ``spiffe_id`` issued by the partner's own attestation."""
        if self.tether.identities.lookup(spiffe_id) is None:
            self.tether.register_identity(spiffe_id, kind="agent", owner="ops@partner.example")
        token = self.tether.create_join_token(spiffe_id)
        key = ec.generate_private_key(ec.SECP256R1())
        return self.tether.attest(token, key.public_key(), audience=[audience]).jwt_svid

    def x509(self, key: ProofKey, spiffe_id: str = PARTNER_BOT) -> str:
        """An X.509-SVID (leaf, then the partner's CA) of ``spiffe_id`` for ``key``."""
        if self.tether.identities.lookup(spiffe_id) is None:
            self.tether.register_identity(spiffe_id, kind="agent", owner="ops@partner.example")
        token = self.tether.create_join_token(spiffe_id)
        return self.tether.attest(token, key.public_key).x509_svid_pem

    def signed(self, claims: dict[str, Any], **headers: Any) -> str:
        """A JWT signed with the partner's active JWT-SVID key (any claims, any header)."""
        row, key = self.tether.keys.active(JWT_USE)
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": row.kid, **headers})

    def close(self) -> None:
        self.server.stop()
        self.tether.close()


@pytest.fixture
def partner(tmp_path: Path) -> Iterator[Partner]:
    p = Partner(tmp_path / "partner")
    yield p
    p.close()


def _key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def _records(t: Tether) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in t.store.iter_records()]


def _federate(t: Tether, partner: Partner, **options: Any) -> None:
    t.attestation.federation.add(PARTNER, endpoint_url=partner.url, **options)
    t.attestation.federation.link(AGENT, PARTNER_BOT)


def _refused(t: Tether, svid: str, code: str, proof: str | None = "jwt") -> None:
    """``svid`` is refused with ``code``: exactly one deny receipt, nothing issued (an
    X.509-SVID when ``proof`` is not ``"jwt"``)."""
    before = _records(t)
    with pytest.raises(AttestationRejected) as info:
        if proof == "jwt":
            t.attestation.attest_federated(svid, _key())
        else:
            t.attestation.attest_federated_x509(svid, proof, htm="POST", htu=ATTEST_URL)
    assert info.value.code == code, info.value.message
    after = _records(t)
    assert len(after) == len(before) + 1
    receipt = after[-1]
    assert receipt["kind"] == "attestation.attest"
    assert receipt["effect"] == "deny"
    assert receipt["reasons"][0]["code"] == code


def test_served_bundle_is_a_spiffe_bundle(tether: Tether, partner: Partner) -> None:
    """The https_web document this trust domain serves parses with the ``spiffe`` package
    and verifies this trust domain's JWT-SVIDs."""
    import httpx

    doc = httpx.get(partner.url, timeout=10).json()
    assert isinstance(doc["spiffe_sequence"], int)
    assert doc["spiffe_refresh_hint"] > 0
    uses = {k["use"] for k in doc["keys"]}
    assert uses == {"x509-svid", "jwt-svid"}
    assert all(
        "kid" not in k and len(k["x5c"]) == 1 for k in doc["keys"] if k["use"] == "x509-svid"
    )
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    bundle = JwtBundle.parse(TrustDomain(PARTNER), json.dumps({"keys": jwt_keys}).encode())
    svid = JwtSvid.parse_and_validate(partner.svid(), bundle, {ACME_AUDIENCE})
    assert str(svid.spiffe_id) == PARTNER_BOT
    parsed = parse_bundle(PARTNER, json.dumps(doc).encode(), fetched_at=0.0)
    assert len(parsed.x509.x509_authorities) == 1


def test_linked_foreign_svid_attests_the_registered_identity(
    tether: Tether, partner: Partner
) -> None:
    """A partner workload's JWT-SVID gets this trust domain's SVIDs of the identity it is
    linked to; the identity keeps its owner and its registration here."""
    _federate(tether, partner)
    svids = tether.attestation.attest_federated(partner.svid(), _key())
    assert svids.spiffe_id == AGENT
    now = tether.clock.now()
    claims = verify_jwt_svid(
        svids.jwt_svid, tether.keys.verification_keys(now), audience=ACME_AUDIENCE, now=now
    )
    assert claims.spiffe_id == AGENT
    identity = tether.identities.get(AGENT)
    assert identity.owner == OWNER
    last = _records(tether)[-1]
    assert last["effect"] == "allow"
    assert last["detail"]["method"] == "federated_jwt_svid"
    assert last["detail"]["attested_by"] == PARTNER_BOT


def test_removed_trust_domain_attests_nothing(tether: Tether, partner: Partner) -> None:
    """Attacker: a compromised agent of the partner trust domain after the operator ended
    the federation; its SVID (still unexpired, still validly signed) is refused
    at once, with a receipt."""
    _federate(tether, partner)
    svid = partner.svid()
    tether.attestation.federation.remove(PARTNER)
    _refused(tether, svid, "federation.unknown_trust_domain")
    # Another node sharing the store sees the removal too: its configuration is read
    # from the store on every attestation.
    assert tether.attestation.federation.status() == []


def test_never_for_an_identity_not_linked_here(tether: Tether, partner: Partner) -> None:
    """Attacker: a compromised agent of the federated partner asking to be an identity it
    was never linked to: a partner ID with no link, and an SVID the partner signed
    naming this trust domain's identity directly."""
    _federate(tether, partner)
    _refused(tether, partner.svid(f"spiffe://{PARTNER}/agent/other"), "federation.not_linked")
    now = time.time()
    naming_ours = partner.signed(
        {"sub": AGENT, "aud": [ACME_AUDIENCE], "exp": int(now + 600), "iat": int(now)},
        typ="JWT",
    )
    # Only the bundle of the subject's own trust domain verifies it: acme.example's own
    # trust domain is not federated, so the partner's key proves nothing about it.
    _refused(tether, naming_ours, "federation.unknown_trust_domain")
    with pytest.raises(NotFound):
        tether.attestation.federation.link("spiffe://acme.example/agent/ghost", PARTNER_BOT)
    # A linked identity offboarded here attests nothing, whatever the partner signs.
    tether.disable_identity(AGENT)
    _refused(tether, partner.svid(), "identity.disabled")


def test_hostile_foreign_svids(tether: Tether, partner: Partner) -> None:
    """Attacker: an unauthenticated network caller (and a compromised partner agent)
    presenting forged, expired, misaddressed, re-headed or replayed JWT-SVIDs: each refused with its
    reason, one receipt each, nothing issued."""
    _federate(tether, partner)
    now = time.time()
    good = {"sub": PARTNER_BOT, "aud": [ACME_AUDIENCE], "exp": int(now + 600), "iat": int(now)}
    row, _ = partner.tether.keys.active(JWT_USE)
    forged = jwt.encode(
        good, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": row.kid}
    )
    _refused(tether, forged, "svid.signature")
    _refused(tether, partner.svid(audience="spiffe://elsewhere.example"), "svid.audience")
    expired = partner.signed({**good, "exp": int(now - 3600)})
    _refused(tether, expired, "svid.expired")
    _refused(tether, partner.signed(good, jku="https://attacker.example/jwks"), "svid.header")
    hs = jwt.encode(good, "secret-secret-secret-secret-secret", algorithm="HS256")
    _refused(tether, hs, "svid.alg")  # HS256 is never a JWT-SVID algorithm
    hs_kid = jwt.encode(
        good, "secret-secret-secret-secret-secret", algorithm="HS256", headers={"kid": row.kid}
    )
    _refused(tether, hs_kid, "svid.alg")
    head, payload, sig = partner.signed(good).split(".")
    _refused(tether, "not.a.jwt", "svid.malformed")
    _refused(tether, f"{head}.{payload}.{sig[:-4]}AAAA", "svid.signature")
    other_kid = jwt.encode(
        good,
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": "not-in-the-bundle"},
    )
    _refused(tether, other_kid, "svid.unknown_kid")
    svid = partner.svid()
    tether.attestation.attest_federated(svid, _key())
    _refused(tether, svid, "federation.replayed")


def test_foreign_x509_svid_attests_with_proof_of_its_key(tether: Tether, partner: Partner) -> None:
    """A partner workload's X.509-SVID, with a proof signed by its key, gets this trust
    domain's SVIDs of the linked identity, bound to that same key."""
    _federate(tether, partner)
    key = ProofKey()
    chain = partner.x509(key)
    proof = key.prove_request(chain, htm="POST", htu=ATTEST_URL, now=tether.clock.now())
    svids = tether.attestation.attest_federated_x509(chain, proof, htm="POST", htu=ATTEST_URL)
    assert svids.spiffe_id == AGENT
    now = tether.clock.now()
    claims = verify_jwt_svid(
        svids.jwt_svid, tether.keys.verification_keys(now), audience=ACME_AUDIENCE, now=now
    )
    assert claims.jkt == jwk_thumbprint(key.jwk)
    assert _records(tether)[-1]["detail"]["method"] == "federated_x509_svid"


def test_hostile_foreign_x509_svids(tether: Tether, partner: Partner) -> None:
    """Attacker: an unauthenticated network caller holding a partner workload's public
    certificate but not its key, or a chain of its own making: no proof, a proof by
    another key, a replayed proof, a proof for another chain, a certificate from a CA
    outside the partner's bundle, a CA certificate as the leaf; each refused with its
    reason and one receipt."""
    _federate(tether, partner)
    key = ProofKey()
    chain = partner.x509(key)
    now = tether.clock.now()
    _refused(tether, chain, "proof.missing", proof=None)
    thief = ProofKey()
    stolen = thief.prove_request(chain, htm="POST", htu=ATTEST_URL, now=now)
    _refused(tether, chain, "proof.key_mismatch", proof=stolen)
    other_chain = partner.x509(key, f"spiffe://{PARTNER}/agent/other")
    for_other = key.prove_request(other_chain, htm="POST", htu=ATTEST_URL, now=now)
    _refused(tether, chain, "proof.ath", proof=for_other)
    good = key.prove_request(chain, htm="POST", htu=ATTEST_URL, now=now)
    tether.attestation.attest_federated_x509(chain, good, htm="POST", htu=ATTEST_URL)
    _refused(tether, chain, "proof.replayed", proof=good)
    # A chain of the attacker's own: its CA is not in the partner's bundle.
    rogue = Tether.ephemeral(PARTNER)
    try:
        rogue.register_identity(PARTNER_BOT, kind="agent", owner="x@partner.example")
        own = rogue.attest(rogue.create_join_token(PARTNER_BOT), key.public_key).x509_svid_pem
    finally:
        rogue.close()
    proof = key.prove_request(own, htm="POST", htu=ATTEST_URL, now=now)
    _refused(tether, own, "svid.chain", proof=proof)
    ca_only = chain[chain.index("-----BEGIN CERTIFICATE-----", 10) :]
    proof = key.prove_request(ca_only, htm="POST", htu=ATTEST_URL, now=now)
    _refused(tether, ca_only, "svid.x509", proof=proof)
    tether.attestation.federation.remove(PARTNER)
    fresh = key.prove_request(chain, htm="POST", htu=ATTEST_URL, now=now)
    _refused(tether, chain, "federation.unknown_trust_domain", proof=fresh)


def test_stale_bundle_fails_closed(tether: Tether, partner: Partner, clock: FrozenClock) -> None:
    """Attacker: an unauthenticated network caller who cuts the path to the partner's
    bundle endpoint so that a key the partner has since removed stays trusted: the last
    bundle is used until its max age, then nothing from that trust domain is accepted
    (until a refresh, not tried more often than every 30 s, succeeds)."""
    _federate(tether, partner, refresh_interval=60, max_age=600)
    first, second = partner.svid(), partner.svid()
    partner.server.stop()
    clock.advance(120)  # refresh due, the endpoint is gone: the held bundle still serves
    assert tether.attestation.attest_federated(first, _key()).spiffe_id == AGENT
    status = tether.attestation.federation.status()[0]
    assert status["last_error"]
    clock.advance(600)
    _refused(tether, second, "federation.stale")
    partner.server.start()
    clock.advance(1)  # the failed refresh is not tried again for min(refresh interval, 30 s)
    _refused(tether, second, "federation.stale")
    clock.advance(30)
    assert tether.attestation.attest_federated(second, _key()).spiffe_id == AGENT


def test_key_rotation_is_picked_up_at_refresh(
    tether: Tether, partner: Partner, clock: FrozenClock
) -> None:
    """Attacker: a compromised agent holding the partner's revoked JWT-SVID key, minting
    SVIDs after the partner revoked it: refused from the first refresh after the
    revocation; SVIDs of the new key are accepted from that refresh on."""
    _federate(tether, partner, refresh_interval=60, max_age=600)
    sequence = tether.attestation.federation.status()[0]["bundle"]["sequence"]
    old_svid = partner.svid()
    old_kid, _ = partner.tether.keys.active(JWT_USE)
    partner.tether.revoke_key(old_kid.kid)
    new_svid, later_old = partner.svid(), old_svid
    # Before the refresh this node knows only the old key.
    _refused(tether, new_svid, "svid.unknown_kid")
    clock.advance(61)
    assert tether.attestation.attest_federated(new_svid, _key()).spiffe_id == AGENT
    held = tether.attestation.federation.status()[0]["bundle"]
    assert old_kid.kid not in held["jwt_kids"]
    assert held["sequence"] > sequence  # the revocation changed the bundle (§4.1.1)
    _refused(tether, later_old, "svid.unknown_kid")


def test_static_bundle_from_an_existing_spire(tether: Tether) -> None:
    """A SPIRE deployment's bundle, given as a file (``spire-server bundle show -format
    spiffe``), attests linked identities; an empty bundle (every key revoked) attests
    nothing, as the bundle spec demands."""
    spire = "spire.acme.internal"
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**public_jwk(key.public_key()), "kid": "spire-k1", "use": "jwt-svid"}
    doc = {"keys": [jwk], "spiffe_sequence": 7}
    federation = tether.attestation.federation
    federation.add(spire, bundle=json.dumps(doc).encode())
    workload = f"spiffe://{spire}/ns/prod/sa/bot"
    federation.link(AGENT, workload)
    now = time.time()
    claims = {"sub": workload, "aud": ACME_AUDIENCE, "exp": int(now + 300)}
    svid = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "spire-k1", "typ": "JWT"})
    assert tether.attestation.attest_federated(svid, _key()).spiffe_id == AGENT
    federation.add(spire, bundle=b'{"keys": []}', replace=True)
    assert federation.status()[0]["links"] == {workload: AGENT}
    again = jwt.encode({**claims, "jti": "2"}, key, algorithm="ES256", headers={"kid": "spire-k1"})
    _refused(tether, again, "federation.no_keys")


def test_bad_configuration_changes_nothing(tether: Tether, partner: Partner) -> None:
    """Operator mistakes are refused with a clear error and change nothing: an endpoint
    that is plain http to another host, a bundle with duplicate members, an unreachable
    endpoint, a link to a trust domain not federated."""
    federation = tether.attestation.federation
    before = len(_records(tether))
    with pytest.raises(UsageError):
        federation.add(PARTNER, endpoint_url="http://partner.example/.well-known/spiffe-bundle")
    with pytest.raises(UsageError):
        federation.add(PARTNER, bundle=b'{"keys": [], "keys": []}')
    with pytest.raises(UsageError):
        federation.add(PARTNER, endpoint_url="http://127.0.0.1:9/.well-known/spiffe-bundle")
    with pytest.raises(NotFound):
        federation.link(AGENT, PARTNER_BOT)
    assert federation.status() == []
    assert len(_records(tether)) == before


def test_configuration_written_without_the_kek_is_refused(tether: Tether, partner: Partner) -> None:
    """Attacker: someone who can write the store but lacks the KEK, adding their own
    trust domain and link to the federation setting: the setting fails its
    authentication, and no foreign SVID attests anything."""
    _federate(tether, partner)
    forged = json.loads(tether.store.get_meta("federation") or "{}")
    forged["trust_domains"][PARTNER]["links"]["spiffe://partner.example/agent/evil"] = AGENT
    tether.store.set_meta("federation", json.dumps(forged, sort_keys=True))
    with pytest.raises(RowTampered):
        tether.attestation.attest_federated(
            partner.svid("spiffe://partner.example/agent/evil"), _key()
        )


def test_http_routes(tether: Tether, partner: Partner) -> None:
    """The operator's routes and the workload's ``/v1/attest/federated`` over HTTP; a
    caller who proved nothing is refused 403 without a receipt of its own."""
    from .console_support import console_client

    _, admin = tether.credentials.create("admin", "root@acme.example")
    auth = {"authorization": f"Bearer {admin}"}
    with console_client(tether) as client:
        r = client.post(
            "/v1/federation",
            json={"trust_domain": PARTNER, "endpoint_url": partner.url, "max_age": 900},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        r = client.post(
            "/v1/federation/links",
            json={"spiffe_id": AGENT, "attested_by": PARTNER_BOT},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        listed = client.get("/v1/federation", headers=auth).json()
        assert listed[0]["links"] == {PARTNER_BOT: AGENT}
        jwk = public_jwk(_key())
        r = client.post("/v1/attest/federated", json={"jwt_svid": partner.svid(), "jwk": jwk})
        assert r.status_code == 200, r.text
        assert r.json()["spiffe_id"] == AGENT
        key = ProofKey()
        chain = partner.x509(key)
        url = "http://127.0.0.1:8000/v1/attest/federated"
        proof = key.prove_request(chain, htm="POST", htu=url, now=tether.clock.now())
        r = client.post("/v1/attest/federated", json={"x509_svid": chain}, headers={"dpop": proof})
        assert r.status_code == 200, r.text
        assert r.json()["spiffe_id"] == AGENT
        r = client.post("/v1/attest/federated", json={"x509_svid": chain}, headers={"dpop": proof})
        assert r.status_code == 403
        assert r.json()["error"] == "proof.replayed"
        r = client.post("/v1/attest/federated", json={"x509_svid": chain, "jwk": jwk})
        assert r.status_code == 400
        r = client.post("/v1/attest/federated", json={"jwt_svid": "x.y.z", "jwk": jwk})
        assert r.status_code == 403
        assert r.json()["error"] == "svid.malformed"
        r = client.post("/v1/federation", json={"trust_domain": PARTNER}, headers={})
        assert r.status_code == 401
        r = client.delete(f"/v1/federation/{PARTNER}", headers=auth)
        assert r.status_code == 200, r.text
        r = client.post("/v1/attest/federated", json={"jwt_svid": partner.svid(), "jwk": jwk})
        assert r.status_code == 403
        assert r.json()["error"] == "federation.unknown_trust_domain"


def test_cli_manages_federation_on_a_live_server(tmp_path: Path, partner: Partner) -> None:
    """The operator's ``tether federation add|link|list|remove`` against a real server;
    a partner workload attests over HTTP while federated, and not after the removal."""
    import httpx

    from .server_support import CLI

    acme = Server(tmp_path / "acme").start()
    try:
        cli = CLI(tmp_path / "acme", acme)
        cli.json("identity", "register", AGENT, "--kind", "agent", "--owner", OWNER)
        added = cli.json("federation", "add", PARTNER, "--endpoint", partner.url)
        assert added["profile"] == "https_web"
        cli.json("federation", "link", AGENT, "--attested-by", PARTNER_BOT)
        listed = cli.json("federation", "list")["trust_domains"]
        assert listed[0]["links"] == {PARTNER_BOT: AGENT}
        refreshed = cli.json("federation", "refresh", PARTNER)
        assert refreshed["bundle"]["jwt_kids"] and refreshed["last_error"] is None
        body = {"jwt_svid": partner.svid(), "jwk": public_jwk(_key())}
        r = httpx.post(f"{acme.url}/v1/attest/federated", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["spiffe_id"] == AGENT
        cli.json("federation", "remove", PARTNER)
        assert cli.json("federation", "list")["trust_domains"] == []
        body = {"jwt_svid": partner.svid(), "jwk": public_jwk(_key())}
        r = httpx.post(f"{acme.url}/v1/attest/federated", json=body, timeout=10)
        assert r.status_code == 403
        assert r.json()["error"] == "federation.unknown_trust_domain"
        bad = cli.run("federation", "add", PARTNER, ok=False)
        assert bad.returncode == 2
    finally:
        acme.stop()
