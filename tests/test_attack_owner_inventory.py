"""An owner reads only the identities they own, through every identity endpoint.

Attacker: a compromised agent's owner credential (or a curious owner) calling the API
directly. The console filtered the inventory by owner; the API listed and showed every
owner's identities, and told an owner whether another owner's identity exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from litestar.testing import TestClient

from tether import Tether
from tether.server import create_app

from .conftest import quiet

ALICE_BOT = "spiffe://acme.example/agent/alice-bot"
BOB_BOT = "spiffe://acme.example/agent/bob-bot"


@pytest.fixture
def api() -> Iterator[tuple[TestClient, dict[str, str]]]:  # type: ignore[type-arg]
    t = Tether.ephemeral("acme.example")
    t.register_identity(ALICE_BOT, kind="agent", owner="alice@acme.example")
    t.register_identity(BOB_BOT, kind="agent", owner="bob@acme.example")
    quiet(t)
    headers = {}
    for role, owner in (("owner", "alice@acme.example"), ("auditor", "eve@acme.example")):
        _row, secret = t.credentials.create(role, owner)
        headers[role] = f"Bearer {secret}"
    with TestClient(create_app(t)) as client:
        yield client, headers
    t.close()


def test_owner_lists_only_their_identities(api: tuple[TestClient, dict[str, str]]) -> None:  # type: ignore[type-arg]
    """An owner's list holds their identities; an auditor's holds all (control)."""
    client, headers = api
    mine = client.get("/v1/identities", headers={"Authorization": headers["owner"]})
    assert mine.status_code == 200
    assert [i["spiffe_id"] for i in mine.json()["identities"]] == [ALICE_BOT]
    every = client.get("/v1/identities", headers={"Authorization": headers["auditor"]})
    assert sorted(i["spiffe_id"] for i in every.json()["identities"]) == [ALICE_BOT, BOB_BOT]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/v1/identity?spiffe_id={BOB_BOT}", None),
        ("POST", "/v1/identities/disable", {"spiffe_id": BOB_BOT}),
        ("POST", "/v1/identities/join-token", {"spiffe_id": BOB_BOT}),
    ],
    ids=["show", "disable", "join-token"],
)
def test_another_owners_identity_is_not_found(
    api: tuple[TestClient, dict[str, str]],  # type: ignore[type-arg]
    method: str,
    path: str,
    body: dict[str, str] | None,
) -> None:
    """Another owner's identity answers exactly as one that does not exist."""
    client, headers = api
    auth = {"Authorization": headers["owner"]}
    theirs = client.request(method, path, json=body, headers=auth)
    absent = client.request(
        method,
        path.replace(BOB_BOT, "spiffe://acme.example/agent/nobody"),
        json={k: v.replace(BOB_BOT, "spiffe://acme.example/agent/nobody") for k, v in body.items()}
        if body
        else None,
        headers=auth,
    )
    assert theirs.status_code == absent.status_code == 404
    assert theirs.json()["error"] == absent.json()["error"]
    own = client.get(f"/v1/identity?spiffe_id={ALICE_BOT}", headers=auth)
    assert own.status_code == 200 and own.json()["owner"] == "alice@acme.example"
