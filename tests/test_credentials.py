"""Admin credentials have a lifecycle: they expire, and they are listed, shown, disabled
and rotated through the library, the HTTP API and the CLI, each change receipted and
attributed to who made it; the first one can be written to a 0600 file, never a log."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from tether import FrozenClock, Tether
from tether._errors import Conflict, IdentityRejected, UsageError
from tether.identity._credentials import DEFAULT_TTL
from tether.server import ServerSettings, create_app

from .console_support import console_client, sign_in
from .server_support import CLI, Server


def _receipt(t: Tether, kind: str) -> dict[str, object]:
    found = [r for r in t.audit.tail(50) if r["kind"] == kind]
    assert found, kind
    return found[-1]


def test_a_credential_expires_by_default(tether: Tether, clock: FrozenClock) -> None:
    row, secret = tether.credentials.create("approver", "bob@acme.example")
    assert row.expires_at == pytest.approx(clock.now() + DEFAULT_TTL)
    assert tether.credentials.verify(secret).role == "approver"
    clock.advance(DEFAULT_TTL + 1)
    with pytest.raises(IdentityRejected):
        tether.credentials.verify(secret)


def test_a_ttl_out_of_range_is_refused(tether: Tether) -> None:
    for ttl in (0.0, -5.0, 400 * 86400.0):
        with pytest.raises(UsageError):
            tether.credentials.create("admin", "bob@acme.example", ttl=ttl)


def test_disable_and_rotate_are_receipted_and_take_effect(tether: Tether) -> None:
    row, secret = tether.credentials.create("auditor", "carol@acme.example", ttl=3600)
    new, new_secret = tether.credentials.rotate(row.credential_id, by="root@acme.example")
    assert (new.role, new.owner) == ("auditor", "carol@acme.example")
    with pytest.raises(IdentityRejected):
        tether.credentials.verify(secret)  # the old one is disabled with the rotation
    assert tether.credentials.verify(new_secret).credential_id == new.credential_id
    rotated = _receipt(tether, "credential.rotate")
    assert rotated["chain"] == ["root@acme.example"]
    assert rotated["detail"]["replaces"] == row.credential_id  # type: ignore[index]
    with pytest.raises(Conflict):
        tether.credentials.rotate(row.credential_id, by="root@acme.example")
    tether.credentials.disable(new.credential_id, by="root@acme.example", reason="left")
    with pytest.raises(IdentityRejected):
        tether.credentials.verify(new_secret)
    disabled = _receipt(tether, "credential.disable")
    assert disabled["detail"]["reason"] == "left"  # type: ignore[index]
    with pytest.raises(Conflict):
        tether.credentials.disable(new.credential_id, by="root@acme.example")


def test_a_disabled_credential_ends_its_console_session_at_once(tether: Tether) -> None:
    row, secret = tether.credentials.create("admin", "eve@acme.example")
    with console_client(tether) as client:
        sign_in(client, secret)
        assert client.get("/console/identities", follow_redirects=False).status_code == 200
        tether.credentials.disable(row.credential_id, by="root@acme.example")
        assert client.get("/console/identities", follow_redirects=False).status_code == 303


@pytest.fixture
def api(tether: Tether) -> Iterator[tuple[TestClient, dict[str, str]]]:  # type: ignore[type-arg]
    _row, admin = tether.credentials.create("admin", "root@acme.example")
    with TestClient(create_app(tether, ServerSettings())) as client:
        yield client, {"Authorization": f"Bearer {admin}"}


def test_the_api_lists_creates_rotates_and_disables(
    tether: Tether,
    api: tuple[TestClient, dict[str, str]],  # type: ignore[type-arg]
) -> None:
    client, admin = api
    made = client.post(
        "/v1/credentials",
        json={"role": "owner", "owner": "dan@acme.example", "ttl_seconds": 600},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    issued = made.json()
    assert issued["info"]["status"] == "enabled"
    assert _receipt(tether, "credential.create")["chain"] == ["root@acme.example"]
    dan = {"Authorization": f"Bearer {issued['credential']}"}
    dan_id = issued["info"]["credential_id"]
    listed = client.get("/v1/credentials", headers=admin)
    assert listed.status_code == 200
    assert dan_id in {c["credential_id"] for c in listed.json()}
    assert "secret_hash" not in listed.text and issued["credential"] not in listed.text
    # An owner may not list, create or disable others' credentials...
    assert client.get("/v1/credentials", headers=dan).status_code == 403
    assert (
        client.post(
            "/v1/credentials", json={"role": "admin", "owner": "dan@acme.example"}, headers=dan
        ).status_code
        == 403
    )
    root_id = listed.json()[0]["credential_id"]
    assert client.post(f"/v1/credentials/{root_id}/disable", json={}, headers=dan).status_code == (
        403
    )
    # ...but may rotate their own.
    rotated = client.post(f"/v1/credentials/{dan_id}/rotate", json={}, headers=dan)
    assert rotated.status_code == 201, rotated.text
    assert client.get(f"/v1/credentials/{dan_id}", headers=dan).status_code == 401
    dan = {"Authorization": f"Bearer {rotated.json()['credential']}"}
    new_id = rotated.json()["info"]["credential_id"]
    assert client.get(f"/v1/credentials/{new_id}", headers=dan).json()["status"] == "enabled"
    off = client.post(f"/v1/credentials/{new_id}/disable", json={"reason": "x"}, headers=admin)
    assert off.status_code == 200 and off.json()["status"] == "disabled"
    assert client.get(f"/v1/credentials/{new_id}", headers=dan).status_code == 401


def test_the_cli_writes_credentials_to_0600_files_never_to_the_terminal(tmp_path: Path) -> None:
    """The first admin credential goes to a 0600 file; the CLI then reads it from there
    (--token-file) to talk to the server."""
    first = tmp_path / "admin-credential"
    result = CLI(tmp_path / "home").run(
        "init", "--trust-domain", "acme.example", "--admin", "root@acme.example",
        "--credential-file", str(first),
    )  # fmt: skip
    secret = first.read_text().strip()
    assert secret.startswith("tadm_") and secret not in result.stdout + result.stderr
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o600
    server = Server(tmp_path / "home", init=False).start()
    try:
        _credentials_through_the_server(tmp_path, server, first)
    finally:
        server.stop()


def _credentials_through_the_server(tmp_path: Path, server: Server, first: Path) -> None:
    cli = CLI(tmp_path / "home")
    cli.env.update({"TETHER_SERVER": server.url, "TETHER_TOKEN_FILE": str(first)})
    made = cli.json(
        "admin",
        "create",
        "--role",
        "approver",
        "--owner",
        "bob@acme.example",
        "--ttl",
        "3600",
        "--output",
        str(tmp_path / "bob"),
        "--by",
        "root@acme.example",
    )
    assert "credential" not in made and made["credential_file"] == str(tmp_path / "bob")
    assert stat.S_IMODE(os.stat(tmp_path / "bob").st_mode) == 0o600
    # A credential file is never overwritten.
    again = cli.run(
        "admin",
        "create",
        "--role",
        "approver",
        "--owner",
        "bob@acme.example",
        "--output",
        str(tmp_path / "bob"),
        ok=False,
    )
    assert again.returncode != 0
    listed = cli.json("admin", "list")["credentials"]
    assert {c["role"] for c in listed} == {"admin", "approver"}
    assert all(c["status"] == "enabled" and c["expires_at"] for c in listed)
    bob = made["credential_id"]
    rotated = cli.json("admin", "rotate", bob, "--by", "root@acme.example")
    assert rotated["credential"].startswith("tadm_")
    assert cli.json("admin", "show", bob)["status"] == "disabled"
    cli.json("admin", "disable", rotated["credential_id"], "--reason", "gone")
    shown = cli.json("admin", "show", rotated["credential_id"])
    assert shown["status"] == "disabled"
    assert json.dumps(shown).find("secret_hash") == -1


def test_the_console_lists_rotates_and_disables(tether: Tether) -> None:
    _row, admin = tether.credentials.create("admin", "root@acme.example")
    other, other_secret = tether.credentials.create("approver", "bob@acme.example")
    with console_client(tether) as client:
        token = sign_in(client, admin)
        page = client.get("/console/credentials")
        assert page.status_code == 200 and other.credential_id in page.text
        assert other_secret.split(".")[1] not in page.text
        rotated = client.post(
            f"/console/credentials/{other.credential_id}",
            data={"csrf": token, "action": "rotate"},
        )
        assert rotated.status_code == 200
        assert rotated.headers["cache-control"] == "no-store"
        new_secret = rotated.text.split("<pre><code>")[1].split("</code>")[0]
        assert tether.credentials.verify(new_secret).owner == "bob@acme.example"
        with pytest.raises(IdentityRejected):
            tether.credentials.verify(other_secret)
        assert _receipt(tether, "credential.rotate")["chain"] == ["root@acme.example"]
        new_id = tether.credentials.verify(new_secret).credential_id
        off = client.post(
            f"/console/credentials/{new_id}",
            data={"csrf": token, "action": "disable"},
            follow_redirects=False,
        )
        assert off.status_code == 303
        with pytest.raises(IdentityRejected):
            tether.credentials.verify(new_secret)
    # An approver has no credentials page.
    with console_client(tether) as client:
        _row, approver = tether.credentials.create("approver", "eve@acme.example")
        sign_in(client, approver)
        assert client.get("/console/credentials").status_code == 403
