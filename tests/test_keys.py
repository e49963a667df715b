"""Trust-domain keys: sealed at rest, rotated with an overlap, published as bundles."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tether import Effect, FrozenClock, InfrastructureError, Tether, UsageError
from tether.core._canonical import b64url

from .conftest import open_simple_task


def test_init_creates_a_0600_kek_and_seals_private_keys(tmp_path: Path) -> None:
    t = Tether.init(tmp_path / "home", "acme.example")
    kek = tmp_path / "home" / "kek.key"
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    _, private = t.keys.active("jwt-svid")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    db = tmp_path / "home" / "tether.db"
    if db.exists():
        raw = db.read_bytes()
    else:  # PostgreSQL: every stored byte of the keys table
        rows = t.store.execute_fetch("SELECT sealed, public_jwk, cert_pem FROM signing_keys")
        raw = b"".join(
            bytes(v) if isinstance(v, bytes) else str(v).encode() for r in rows for v in r
        )
        assert raw
    assert b"PRIVATE KEY" not in raw
    assert pem.splitlines()[1] not in raw
    t.close()


def test_wrong_kek_cannot_unseal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Tether.init(tmp_path / "home", "acme.example").close()
    monkeypatch.setenv("TETHER_KEK", b64url(os.urandom(32)))
    t = Tether.open(tmp_path / "home")
    with pytest.raises(InfrastructureError, match="unseal"):
        t.keys.active("jwt-svid")


def test_kek_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_KEK", b64url(os.urandom(32)))
    t = Tether.init(tmp_path / "home", "acme.example")
    assert not (tmp_path / "home" / "kek.key").exists()
    t.close()
    reopened = Tether.open(tmp_path / "home")
    reopened.keys.active("jwt-svid")
    monkeypatch.setenv("TETHER_KEK", "not-base64!")
    with pytest.raises(UsageError):
        Tether.open(tmp_path / "home")


def test_group_readable_kek_is_refused(tmp_path: Path) -> None:
    Tether.init(tmp_path / "home", "acme.example").close()
    (tmp_path / "home" / "kek.key").chmod(0o644)
    with pytest.raises(UsageError, match="readable"):
        Tether.open(tmp_path / "home")


def test_rotation_old_key_verifies_until_overlap_ends(
    permissive: Tether, clock: FrozenClock
) -> None:
    key, _, old_token = open_simple_task(permissive, max_calls=10)
    old_kid = permissive.jwks()["keys"][0]["kid"]
    new_kid = permissive.rotate_keys()
    assert new_kid != old_kid
    kids = {k["kid"] for k in permissive.jwks()["keys"]}
    assert kids == {old_kid, new_kid}
    # New tokens are signed by the new key.
    _key2, _, new_token = open_simple_task(permissive, max_calls=10)
    import jwt

    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    # The old token still verifies.
    proof = key.prove(old_token, "fs.read", {}, now=clock.now())
    assert (
        permissive.authorize(token=old_token, proof=proof, tool="fs.read", args={}).effect
        is Effect.ALLOW
    )
    # After the overlap the old key leaves the bundle.
    clock.advance(24 * 3600 + 1)
    assert {k["kid"] for k in permissive.jwks()["keys"]} == {new_kid}


def test_spiffe_bundle_shape(tether: Tether) -> None:
    bundle = tether.spiffe_bundle()
    uses = sorted(k["use"] for k in bundle["keys"])
    assert uses == ["jwt-svid", "x509-svid"]
    for k in bundle["keys"]:
        if k["use"] == "x509-svid":
            assert "kid" not in k and len(k["x5c"]) == 1
        else:
            assert k["kid"]
    assert isinstance(bundle["spiffe_sequence"], int)
    before = bundle["spiffe_sequence"]
    tether.rotate_keys()
    assert tether.spiffe_bundle()["spiffe_sequence"] > before
    assert bundle["spiffe_refresh_hint"] > 0


def test_private_keys_never_appear_in_repr_or_bundles(tether: Tether) -> None:
    text = repr(tether.keys) + repr(tether) + str(tether.spiffe_bundle()) + str(tether.jwks())
    assert "PRIVATE" not in text and '"d"' not in text and "'d'" not in text
