"""Unauthenticated traffic costs the attacker, not the store.

Attacker: an unauthenticated network caller. It reaches ``tether serve`` and holds
no credential. It used to make the store append (and fsync) one receipt per
request to ``POST /v1/decisions`` (no token, or a garbage one), dodge the rate
limit (keyed on token bytes it chose, skipped without a token), create a
Prometheus series per tool name it made up on a public ``/metrics``, and read
parser exception text in the reasons it was sent back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar.testing import TestClient

from tether import ProofKey, Tether, parse_intent
from tether.core import Sensitivity, SideEffect, ToolProfile
from tether.enforcement._unauthenticated import DESCRIPTIONS, UnauthenticatedTraffic
from tether.server import ServerSettings, create_app, create_metrics_app

from .conftest import AGENT, PERMIT_ALL

URL = "http://testserver.local/v1/decisions"
METRICS_TOKEN = "m" * 43


@dataclass
class Api:
    tether: Tether
    client: TestClient  # type: ignore[type-arg]
    key: ProofKey
    token: str
    admin: dict[str, str]

    def head(self) -> int:
        last = self.tether.store.last_record()
        return last.seq if last else 0

    def decide(self, token: str | None, tool: str = "fs.read") -> Any:
        headers = {}
        if token is not None:
            proof = self.key.prove(token, tool, {}, now=self.tether.clock.now(), htu=URL)
            headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        return self.client.post("/v1/decisions", json={"tool": tool, "args": {}}, headers=headers)


def _api(settings: ServerSettings) -> Iterator[Api]:
    t = Tether.ephemeral("acme.example")
    t.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    t.policies.load({"p.cedar": PERMIT_ALL})
    read = ToolProfile(side_effect=SideEffect.READ, sensitivity=Sensitivity.INTERNAL, trusted=True)
    t.catalogue.load({"fs.read": read, "fs.*": read}, origin="tests")
    _row, admin = t.credentials.create("admin", "root@acme.example")
    key = ProofKey()
    intent = parse_intent(
        {"purpose": "p", "capabilities": [{"tool": "fs.*"}], "budget": {"max_calls": 500}}
    )
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    with TestClient(create_app(t, settings)) as client:
        yield Api(t, client, key, task.token, {"Authorization": f"Bearer {admin}"})
    t.close()


@pytest.fixture
def api() -> Iterator[Api]:
    yield from _api(
        ServerSettings(
            unauthenticated_rate=0.001, unauthenticated_burst=10, metrics_token=METRICS_TOKEN
        )
    )


def _forged(token: str, i: int) -> str:
    """A task token with a signature the attacker chose (a fresh tail each time)."""
    return f"{token[:-20]}{i:08d}{token[-12:]}"


def test_anonymous_decision_requests_write_one_receipt_not_one_each(api: Api) -> None:
    """Unauthenticated network caller: 40 decision requests without a token and 40
    with garbage tokens append one receipt for the source address (saying how many
    it stands for), not 80; each is counted; past the address's burst, 429."""
    before = api.head()
    statuses = [api.decide(None).status_code for _ in range(40)]
    statuses += [api.decide(_forged(api.token, i)).status_code for i in range(40)]
    assert set(statuses) <= {401, 429}
    assert statuses[:10] == [401] * 10
    assert statuses[-1] == 429  # garbage tokens with fresh tails share the address's limit
    assert api.head() == before + 1
    (record,) = api.tether.audit.tail(1)
    assert record["kind"] == "request.unauthenticated"
    assert record["effect"] == "deny"
    assert record["detail"]["refused"] == 1
    assert record["reasons"][0]["code"] == "token.missing"
    text = api.client.get("/metrics", headers=api.admin).text
    # Each counted: as what it was until the address's burst, then as shed unseen.
    counts = {
        line.split('code="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tether_unauthenticated_requests_total{")
    }
    assert counts["token.missing"] >= 10 and counts["rate_limited"] >= 40
    assert sum(counts.values()) == 80


def test_the_next_interval_gets_one_receipt_with_the_count(api: Api) -> None:
    """Unauthenticated network caller: the refusals counted between two receipts are
    in the next one (nothing is lost, only not written one by one)."""
    traffic = UnauthenticatedTraffic(rate=0, interval=60.0)
    first = traffic.refuse("198.51.100.7", "token.missing")
    assert first.receipt_for == 1 and not first.limited
    assert [traffic.refuse("198.51.100.7", "token.signature").receipt_for for _ in range(9)] == [
        0
    ] * 9
    traffic.interval = 0.0  # the interval has passed
    assert traffic.refuse("198.51.100.7", "token.missing").receipt_for == 10


def test_rotating_addresses_buys_a_bounded_number_of_receipts() -> None:
    """Unauthenticated network caller with many addresses: at most ``max_receipts``
    receipts an interval in all; every refusal is still counted per address."""
    traffic = UnauthenticatedTraffic(rate=0, interval=60.0, max_receipts=5)
    due = [traffic.refuse(f"2001:db8::{i:x}", "token.missing").receipt_for for i in range(500)]
    assert sum(1 for d in due if d) == 5


def test_wrong_join_tokens_write_one_receipt_not_one_each(api: Api) -> None:
    """Unauthenticated network caller: guessing join tokens at ``/v1/attest`` is
    refused (403, the reason code) with one receipt for the address, not one each."""
    before = api.head()
    jwk = ProofKey().jwk
    for i in range(8):
        response = api.client.post("/v1/attest", json={"join_token": f"tjoin_{i:043d}", "jwk": jwk})
        assert response.status_code == 403
        assert response.json()["error"] == "attestation.join_token"
    assert api.head() == before + 1
    assert api.tether.audit.tail(1)[0]["kind"] == "request.unauthenticated"


def test_reasons_carry_codes_not_exception_text(api: Api) -> None:
    """Unauthenticated network caller: a token whose header the JWT parser chokes on is
    answered with the reason code and its fixed description, not the parser's words."""
    for token, code in (
        ("e30!.e30.AAAA", "token.malformed"),
        (_forged(api.token, 1), "token.signature"),
    ):
        response = api.decide(token)
        assert response.status_code == 401
        body = response.json()
        assert body["error"] == code
        assert body["error_description"] == DESCRIPTIONS[code]
        assert "Invalid" not in response.text and "padding" not in response.text
        assert response.headers["www-authenticate"].startswith("DPoP")


def test_rate_limit_of_a_live_token_is_per_task() -> None:
    """Compromised agent: a live token is limited per task, not per token bytes: the
    token's signature cannot be varied (it would no longer verify)."""
    apps = _api(ServerSettings(rate=0.001, burst=3))
    limited = next(apps)
    try:
        effects = [limited.decide(limited.token).status_code for _ in range(5)]
        assert effects[:3] == [200, 200, 200]
        assert effects[3:] == [429, 429]
    finally:
        next(apps, None)


def test_an_authenticated_refusal_keeps_its_receipt(api: Api) -> None:
    """Control: a verified token's call that is refused (a tool outside the intent)
    is a 200 deny with a receipt of its own, every time."""
    before = api.head()
    for _ in range(3):
        response = api.decide(api.token, tool="shell.exec")
        assert response.status_code == 200 and response.json()["effect"] == "deny"
    assert api.head() == before + 3


def test_metrics_are_not_public(api: Api) -> None:
    """Unauthenticated network caller: ``/metrics`` needs the metrics token or an
    admin or auditor credential."""
    assert api.client.get("/metrics").status_code == 401
    bad = {"Authorization": "Bearer " + "x" * 43}
    assert api.client.get("/metrics", headers=bad).status_code == 401
    token = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert api.client.get("/metrics", headers=token).status_code == 200
    assert api.client.get("/metrics", headers=api.admin).status_code == 200


def test_metric_labels_are_bounded_to_known_tools_and_routes(api: Api) -> None:
    """Compromised agent and unauthenticated network caller: made-up tool names and
    paths create no series of their own (a tool counts under ``other``)."""
    for i in range(30):
        api.decide(api.token, tool=f"fs.made_up_{i}")
    api.decide(api.token, tool="fs.read")
    for i in range(30):
        api.client.get(f"/no/such/path/{i}")
    text = api.client.get("/metrics", headers=api.admin).text
    assert "made_up" not in text and "/no/such/path" not in text
    assert 'tool="other"' in text and 'tool="fs.read"' in text


def test_metrics_on_a_listener_of_their_own() -> None:
    """``tether serve --metrics-listen``: ``/metrics`` alone, the API's metrics; the
    metrics token is required there when one is set."""
    for settings, needs_token in (
        (ServerSettings(), False),
        (ServerSettings(metrics_token=METRICS_TOKEN), True),
    ):
        t = Tether.ephemeral("acme.example")
        app = create_app(t, settings)
        with TestClient(create_metrics_app(app)) as client:
            bare = client.get("/metrics")
            assert bare.status_code == (401 if needs_token else 200)
            auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
            assert "tether_decisions" in client.get("/metrics", headers=auth).text
            assert client.get("/v1/identities").status_code == 404
        t.close()


def test_pre_authentication_failures_are_charged_and_shed_before_any_work(api: Api) -> None:
    """Unauthenticated network caller: floods a door that needs no credential (the
    attestation endpoint) with malformed bodies and keys, and unknown routes. Each
    refusal is charged to its address: past the burst it is answered 429 before any
    work, even for a well-formed request, and the store gets a bounded number of
    receipts, not one per request."""
    before = api.head()
    statuses = []
    for i in range(30):
        if i % 3 == 0:
            response = api.client.post("/v1/attest", content=b"{not json")
        elif i % 3 == 1:
            response = api.client.post(
                "/v1/attest", json={"join_token": "x", "jwk": {"kty": "EC", "crv": "bogus"}}
            )
        else:
            response = api.client.get(f"/v1/no-such-route-{i}")
        statuses.append(response.status_code)
    assert statuses[0] in (400, 401, 404, 422)
    attests = [s for i, s in enumerate(statuses) if i % 3 != 2]
    assert attests[-1] == 429  # burst 10, rate ~0: the address is shed
    # Shed before any work: even a well-formed decision call is not looked at...
    assert api.decide(api.token).status_code == 429
    # ...but an operator's admin credential from the same address still gets through.
    assert api.client.get("/v1/node", headers=api.admin).status_code == 200
    assert api.head() - before <= 2  # a sampled receipt or so, not thirty
