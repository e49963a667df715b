"""The verifiable log and the authenticated key set, attacked by a store writer without
the KEK: every attack is detected and its first bad position named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tether import FrozenClock, Tether, UsageError
from tether.audit import LogTampered, record_hash, verify_bundle
from tether.core._verify import jwk_thumbprint
from tether.tokens import new_ec_key, public_jwk

from .conftest import PERMIT_ALL, open_simple_task, quiet

AGENT = "spiffe://acme.example/agent/bot"


def _decide(t: Tether, n: int) -> None:
    key, _task_id, token = open_simple_task(t, max_calls=n + 1)
    for i in range(n):
        args = {"path": f"/f{i}"}
        t.authorize(
            token=token,
            proof=key.prove(token, "fs.read", args, now=t.clock.now()),
            tool="fs.read",
            args=args,
        )


@pytest.fixture
def log(tmp_path: Path, clock: FrozenClock) -> Tether:
    t = Tether.ephemeral(
        "acme.example",
        clock=clock,
        checkpoint_every=8,
        head_every=8,
        witness=tmp_path / "witness.jsonl",
    )
    t.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    quiet(t)
    t.policies.load({"all.cedar": PERMIT_ALL})
    _decide(t, 30)
    report = t.verify_audit()
    assert report.ok, report
    assert report.heads >= 4 and report.witnessed >= 4
    return t


def _count(t: Tether) -> int:
    last = t.store.last_record()
    assert last is not None
    return last.seq


def _rechain(t: Tether, start: int, bodies: dict[int, str]) -> None:
    """The attacker's edit: new bodies, and every chain hash from ``start`` recomputed."""
    rows = t.store.execute_fetch(
        "SELECT seq, prev_hash, body FROM audit_records WHERE seq >= ? ORDER BY seq", (start,)
    )
    prev = str(rows[0][1])
    for seq, _, body in rows:
        text = bodies.get(int(seq), str(body))
        digest = record_hash(prev, text)
        t.store.execute_unsafe(
            "UPDATE audit_records SET prev_hash = ?, hash = ?, body = ? WHERE seq = ?",
            (prev, digest, text, seq),
        )
        prev = digest


def _body(t: Tether, seq: int) -> str:
    return str(t.store.execute_fetch("SELECT body FROM audit_records WHERE seq = ?", (seq,))[0][0])


def test_tail_edit_with_rehash_is_found(log: Tether) -> None:
    """Store writer without the KEK: edits receipts no signed head covers yet and
    re-hashes the chain; the receipt's tag fails, and no head is signed over it."""
    covered = _count(log)
    _decide(log, 3)
    last = _count(log)
    assert last > covered
    edited = _body(log, last).replace('"allow"', '"deny"')
    assert edited != _body(log, last)
    _rechain(log, last, {last: edited})
    report = log.verify_audit()
    assert not report.ok
    assert report.first_bad == last
    assert "authentication" in (report.problem or "")
    head = log.store.last_head()
    assert head is not None and head.size < last  # nothing signed over the forgery


def test_covered_edit_with_whole_chain_rehashed_is_found(log: Tether) -> None:
    """Store writer without the KEK: edits an old receipt and re-hashes every link after
    it (the chain alone passes); its tag and its signed head both disagree."""
    edited = _body(log, 12).replace('"allow"', '"deny"')
    _rechain(log, 12, {12: edited})
    report = log.verify_audit()
    assert not report.ok and report.first_bad == 12


def test_deleted_heads_are_found(log: Tether) -> None:
    """Store writer without the KEK: deletes every signed tree head (and checkpoint)."""
    log.store.execute_unsafe("DELETE FROM audit_heads")
    log.store.execute_unsafe("DELETE FROM audit_checkpoints")
    report = log.verify_audit()
    assert not report.ok and report.first_bad == 1
    assert "deleted" in (report.problem or "")
    log.audit.witness = None  # even without the witness: receipts no head covers
    report = log.verify_audit(sign=False)
    assert not report.ok and report.first_bad == 1
    assert "no signed head" in (report.problem or "")


def test_one_deleted_head_is_found(log: Tether) -> None:
    """Store writer without the KEK: deletes one head in the middle."""
    heads = log.store.list_heads()
    gone = heads[2]
    log.store.execute_unsafe("DELETE FROM audit_heads WHERE size = ?", (gone.size,))
    report = log.verify_audit(sign=False)
    assert not report.ok
    assert report.first_bad == heads[1].size + 1
    assert "missing" in (report.problem or "")


def test_truncated_tail_is_found(log: Tether) -> None:
    """Store writer without the KEK: deletes the newest receipts (tags and checkpoints
    too); the newest signed head covers them."""
    count = _count(log)
    for table in ("audit_records", "audit_macs", "audit_checkpoints"):
        log.store.execute_unsafe(f"DELETE FROM {table} WHERE seq > ?", (count - 5,))  # noqa: S608
    report = log.verify_audit()
    assert not report.ok
    assert report.first_bad == count - 4
    assert "truncated" in (report.problem or "")


def test_reordered_receipts_are_found(log: Tether) -> None:
    """Store writer without the KEK: swaps two receipts, rewrites the positions inside
    their bodies and re-hashes the chain."""
    a, b = _body(log, 14), _body(log, 15)
    moved_a = a.replace('"seq":14', '"seq":15')
    moved_b = b.replace('"seq":15', '"seq":14')
    assert moved_a != a and moved_b != b
    _rechain(log, 14, {14: moved_b, 15: moved_a})
    report = log.verify_audit()
    assert not report.ok and report.first_bad == 14


def test_head_resigned_by_an_injected_key_is_refused(log: Tether) -> None:
    """Store writer without the KEK: adds a key row of their own and re-signs a head."""
    key = new_ec_key()
    jwk = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    log.store.execute_unsafe(
        "INSERT INTO signing_keys (kid, use, sealed, public_jwk, cert_pem, created_at) "
        "VALUES (?, 'jwt-svid', ?, ?, NULL, ?)",
        (kid, b"tk1" + b"\0" * 40, json.dumps(jwk), log.clock.now() + 1),
    )
    head = log.store.list_heads()[1]
    claims = jwt.decode(head.signature, options={"verify_signature": False})
    forged = jwt.encode(
        claims, key, algorithm="ES256", headers={"kid": kid, "typ": "tether-sth+jwt"}
    )
    log.store.execute_unsafe(
        "UPDATE audit_heads SET signature = ?, kid = ? WHERE size = ?", (forged, kid, head.size)
    )
    report = log.verify_audit(sign=False)
    assert not report.ok
    assert report.first_bad == log.store.list_heads()[0].size + 1
    assert "unknown key" in (report.problem or "")


def test_injected_key_row_cannot_mint_tokens(log: Tether) -> None:
    """Store writer without the KEK: adds a signing key row and mints a task token with
    it; the row is ignored, reported, and the token refused."""
    key = new_ec_key()
    jwk = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    log.store.execute_unsafe(
        "INSERT INTO signing_keys (kid, use, sealed, public_jwk, cert_pem, created_at) "
        "VALUES (?, 'jwt-svid', ?, ?, NULL, ?)",
        (kid, b"tk1" + b"\0" * 40, json.dumps(jwk), log.clock.now() + 1),
    )
    proof_key, _task_id, token = open_simple_task(log, max_calls=5)
    header = jwt.get_unverified_header(token)
    assert header["kid"] != kid  # the injected row never signs
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["jti"] = claims.get("jti", "x") + "-forged"
    forged = jwt.encode(claims, key, algorithm="ES256", headers={**header, "kid": kid})
    args = {"path": "/etc/shadow"}
    receipt = log.authorize(
        token=forged,
        proof=proof_key.prove(forged, "fs.read", args, now=log.clock.now()),
        tool="fs.read",
        args=args,
    )
    assert receipt.decision.effect.value == "deny"
    statuses = {row.kid: ok for row, ok in log.keys.all_keys()}
    assert statuses[kid] is False
    assert kid in log.keys.rejected
    assert kid not in {k["kid"] for k in log.jwks()["keys"]}


def test_edited_key_metadata_is_ignored(log: Tether) -> None:
    """Store writer without the KEK: un-retires a retired key by editing its row."""
    old = log.jwks()["keys"][0]["kid"]
    log.rotate_keys()
    log.store.execute_unsafe(
        "UPDATE signing_keys SET retired_at = NULL, verify_until = NULL WHERE kid = ?", (old,)
    )
    assert dict((r.kid, ok) for r, ok in log.keys.all_keys())[old] is False
    assert old not in {k["kid"] for k in log.jwks()["keys"]}


def test_revoked_key_verifies_nothing(log: Tether) -> None:
    """Store writer without the KEK cannot undo it; an emergency revocation is at once."""
    proof_key, _task_id, token = open_simple_task(log, max_calls=5)
    kid = jwt.get_unverified_header(token)["kid"]
    result = log.revoke_key(kid)
    assert result["successor"] and result["successor"] != kid
    args = {"path": "/a"}
    receipt = log.authorize(
        token=token,
        proof=proof_key.prove(token, "fs.read", args, now=log.clock.now()),
        tool="fs.read",
        args=args,
    )
    assert receipt.decision.effect.value == "deny"
    # Heads it signed before the revocation still verify.
    assert log.verify_audit().ok
    # Clearing the revocation in the row makes the row unauthentic: still not trusted.
    log.store.execute_unsafe("UPDATE signing_keys SET revoked_at = NULL WHERE kid = ?", (kid,))
    assert kid not in {k["kid"] for k in log.jwks()["keys"]}
    assert not log.verify_audit(sign=False).ok


def test_rollback_of_the_whole_store_is_found_against_the_witness(log: Tether) -> None:
    """Store writer without the KEK: puts the store back to an older, self-consistent
    state (every table as it was at an earlier signed head)."""
    heads = log.store.list_heads()
    back = heads[2].size
    for table in ("audit_records", "audit_macs", "audit_checkpoints"):
        log.store.execute_unsafe(f"DELETE FROM {table} WHERE seq > ?", (back,))  # noqa: S608
    log.store.execute_unsafe("DELETE FROM audit_heads WHERE size > ?", (back,))
    witness = log.audit.witness
    log.audit.witness = None
    assert log.verify_audit(sign=False).ok  # indistinguishable inside the store
    log.audit.witness = witness
    report = log.verify_audit()
    assert not report.ok
    assert report.first_bad == back + 1
    assert "rolled back" in (report.problem or "")


@pytest.mark.sqlite_only("copies the SQLite file")
def test_rollback_of_the_database_file_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store writer without the KEK: restores an older copy of the whole database file."""
    monkeypatch.setenv("TETHER_WITNESS", str(tmp_path / "witness.jsonl"))
    home = tmp_path / "home"
    t = Tether.init(home, "acme.example")
    t.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    t.close()
    shutil.copy(home / "tether.db", tmp_path / "old.db")
    t = Tether.open(home)
    before = _count(t)
    t.register_identity("spiffe://acme.example/agent/two", kind="agent", owner="a@acme.example")
    t.close()
    shutil.copy(tmp_path / "old.db", home / "tether.db")
    for suffix in ("-wal", "-shm"):
        (home / f"tether.db{suffix}").unlink(missing_ok=True)
    t = Tether.open(home)
    assert "rolled back" in (t.audit.check_witness_tail() or "")  # alarmed at start
    report = t.verify_audit()
    t.store.close()
    assert not report.ok
    assert report.first_bad == before + 1
    assert "rolled back" in (report.problem or "")


# -- offline bundles -----------------------------------------------------------------------
def test_bundle_verifies_offline_and_names_tampering(log: Tether) -> None:
    """Store writer without the KEK (or whoever holds the bundle): edits, drops or
    reorders receipts in an exported bundle."""
    bundle = log.export_audit(5, 20)
    report = verify_bundle(bundle, trust=log.jwks())
    assert report.ok, report
    assert report.records == 16
    edited = json.loads(json.dumps(bundle))
    edited["receipts"][3]["body"] = edited["receipts"][3]["body"].replace('"allow"', '"deny"')
    assert verify_bundle(edited).first_bad == 8
    dropped = json.loads(json.dumps(bundle))
    del dropped["receipts"][4]
    assert verify_bundle(dropped).first_bad == 9
    swapped = json.loads(json.dumps(bundle))
    swapped["receipts"][0], swapped["receipts"][1] = swapped["receipts"][1], swapped["receipts"][0]
    assert verify_bundle(swapped).first_bad == 5
    truncated = json.loads(json.dumps(bundle))
    del truncated["receipts"][-1]
    assert verify_bundle(truncated).first_bad == 20


def test_bundle_keys_must_be_the_trusted_ones(log: Tether) -> None:
    """Store writer without the KEK: ships a bundle whose heads are signed by a key of
    their own, listed in the bundle."""
    bundle = log.export_audit()
    key = new_ec_key()
    jwk = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    for head in bundle["heads"]:
        claims = jwt.decode(head["sth"], options={"verify_signature": False})
        head["sth"] = jwt.encode(
            claims, key, algorithm="ES256", headers={"kid": kid, "typ": "tether-sth+jwt"}
        )
    bundle["keys"] = [{"kid": kid, "use": "jwt-svid", "jwk": jwk}]
    assert verify_bundle(bundle).ok  # self-consistent on its own keys...
    report = verify_bundle(bundle, trust=log.jwks())  # ...but not the trust domain's
    assert not report.ok and report.first_bad == 1


def test_standalone_verifier_needs_no_tether(log: Tether, tmp_path: Path) -> None:
    """The verifier file alone, in a process that imports nothing of Tether."""
    import tether.audit._verifier as verifier

    (tmp_path / "bundle.json").write_text(json.dumps(log.export_audit()))
    (tmp_path / "trust.json").write_text(json.dumps(log.jwks()))
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(verifier.__file__, lone / "tverify.py")
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import tverify; "
        "rc = tverify.main(sys.argv[2:]); "
        "assert not [m for m in sys.modules if m.startswith('tether')]; sys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            code,
            str(lone),
            str(tmp_path / "bundle.json"),
            "--trust",
            str(tmp_path / "trust.json"),
            "--witness",
            str(tmp_path / "witness.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_cli_export_verify_and_keys(tmp_path: Path) -> None:
    """Store writer without the KEK: an injected key row shows in 'keys list'; the
    exported bundle verifies with no database."""
    home = tmp_path / "home"
    # Keys and exports are the store's own: the operator at its host, break-glass.
    run = [sys.executable, "-m", "tether", "--home", str(home), "--break-glass"]
    env = {**os.environ, "TETHER_WITNESS": str(tmp_path / "w.jsonl")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run, *args], capture_output=True, text=True, env=env, check=False)

    assert cli("init", "--trust-domain", "acme.example").returncode == 0
    assert cli("audit", "export", str(tmp_path / "b.json"), "--from", "1").returncode == 0
    offline = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "audit",
            "verify",
            "--bundle",
            str(tmp_path / "b.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**env, "TETHER_DATABASE_URL": ""},
        cwd=tmp_path,
        check=False,
    )
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["ok"] is True
    t = Tether.open(home)
    key = new_ec_key()
    jwk = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    t.store.execute_unsafe(
        "INSERT INTO signing_keys (kid, use, sealed, public_jwk, cert_pem, created_at) "
        "VALUES (?, 'jwt-svid', ?, ?, NULL, ?)",
        (kid, b"x", json.dumps(jwk), t.clock.now()),
    )
    real = t.jwks()["keys"][0]["kid"]
    t.store.close()
    listed = cli("keys", "list", "--json")
    assert listed.returncode == 1
    rows = {k["kid"]: k for k in json.loads(listed.stdout)["keys"]}
    assert rows[kid]["authentic"] is False and rows[real]["status"] == "active"
    revoked = cli("keys", "revoke", real, "--now", "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["successor"]
    verified = cli("audit", "verify", "--json")
    assert json.loads(verified.stdout)["ok"] is True, verified.stdout


def test_revocation_reaches_a_node_that_caches_the_key_set(log: Tether) -> None:
    """An emergency revocation made by another node (a stolen signing key): a node whose
    event listener is not in sync reads the key rows again at its next call."""
    from tether.tokens import KeyRing

    in_sync = [True]
    log.keys.cached = True
    log.keys.fresh = lambda: in_sync[0]
    kid = log.jwks()["keys"][0]["kid"]  # now cached
    other = KeyRing(log.store, log.keys._sealer, log.trust_domain)  # another node
    other.revoke(kid, log.clock.now())
    assert kid in {k["kid"] for k in log.jwks()["keys"]}  # the event has not arrived yet
    in_sync[0] = False  # listener not in sync: the store is read on every call
    assert kid not in {k["kid"] for k in log.jwks()["keys"]}
    in_sync[0] = True
    log.keys.invalidate()  # what the ``keys`` event does on every node
    assert kid not in {k["kid"] for k in log.jwks()["keys"]}


@pytest.mark.sqlite_only("rebuilds a store of the previous SQLite schema")
def test_a_store_of_the_previous_schema_is_upgraded_and_adopted(tmp_path: Path) -> None:
    """Store writer without the KEK: until the operator adopts the upgraded store, its
    untagged key rows sign and verify nothing; after, the log verifies and is covered."""
    import sqlite3

    home = tmp_path / "home"
    Tether.init(home, "acme.example").close()
    db = sqlite3.connect(home / "tether.db")
    for statement in (
        "DROP TABLE audit_heads",
        "DROP TABLE audit_macs",
        "ALTER TABLE signing_keys DROP COLUMN mac",
        "ALTER TABLE signing_keys DROP COLUMN revoked_at",
        "ALTER TABLE credentials DROP COLUMN expires_at",
        "DROP TABLE row_tags",
        "DROP TABLE task_flow_deltas",
        "DELETE FROM meta WHERE key = 'rows_tagged'",
        "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
    ):
        db.execute(statement)
    db.commit()
    db.close()
    t = Tether.open(home)
    assert t.store.get_meta("schema_version") == "4"
    assert all(not ok for _, ok in t.keys.all_keys())
    assert t.jwks()["keys"] == []
    assert not t.verify_audit(sign=False).ok
    kids = t.keys.adopt(t.clock.now())
    assert len(kids) == 2
    assert t.audit.mark_untagged() == 1
    report = t.verify_audit()
    assert report.ok, report
    assert report.size == _count(t)
    with pytest.raises(UsageError):
        t.keys.adopt(t.clock.now())
    t.close()


@pytest.mark.sqlite_only("the store writer edits the home's SQLite file")
def test_adopt_is_no_lure_on_a_store_already_authenticated(tmp_path: Path) -> None:
    """Store writer without the KEK: strips the tag of every key row (Tether then refuses
    to use them and names `tether keys adopt`) hoping the operator adopts its own rows.
    The receipts are tagged already, so this is no upgrade: adopt is refused."""
    import sqlite3

    home = tmp_path / "home"
    Tether.init(home, "acme.example").close()
    db = sqlite3.connect(home / "tether.db")
    db.execute("UPDATE signing_keys SET mac = NULL")
    db.commit()
    db.close()
    t = Tether.open(home)
    try:
        with pytest.raises(UsageError, match="written without the KEK"):
            t.keys.adopt(t.clock.now())
        assert all(not ok for _, ok in t.keys.all_keys())  # nothing was blessed
    finally:
        t.close()


def test_two_writers_share_one_tree(tmp_path: Path) -> None:
    """Store writer without the KEK, against two nodes (or processes) appending to one
    store: each signs heads over the other's receipts only after checking their tags."""
    home = tmp_path / "home"
    Tether.init(home, "acme.example").close()
    a = Tether.open(home)
    b = Tether.open(home)
    a.audit.head_every = b.audit.head_every = 4
    for i in range(20):
        (a if i % 3 else b).register_identity(
            f"spiffe://acme.example/agent/n{i}", kind="agent", owner="o@acme.example"
        )
    assert len(a.store.list_heads()) >= 5
    assert a.verify_audit(sign=False).ok
    # A receipt of b's, edited in the store before any head covers it: a refuses to sign.
    b.register_identity("spiffe://acme.example/agent/late", kind="agent", owner="o@acme.example")
    last = _count(b)
    _rechain(b, last, {last: _body(b, last).replace("late", "evil")})
    with pytest.raises(LogTampered, match="authentication"):
        a.audit.sign_head()
    report = a.verify_audit()
    assert not report.ok and report.first_bad == last
    a.close()
    b.close()


def test_uncovered_tail_deleted_under_a_node_is_never_overwritten(
    tmp_path: Path, clock: FrozenClock
) -> None:
    """Store writer without the KEK: deletes the newest receipts before any head covers
    them. The node that wrote them refuses to reuse their positions (its next call is
    refused, the log is not extended), so the deletion cannot be papered over."""
    t = Tether.ephemeral("acme.example", clock=clock, head_every=1000)
    t.register_identity(AGENT, kind="agent", owner="alice@acme.example")
    quiet(t)
    t.policies.load({"all.cedar": PERMIT_ALL})
    key, _task_id, token = open_simple_task(t, max_calls=10)
    args = {"path": "/a"}
    first = t.authorize(
        token=token,
        proof=key.prove(token, "fs.read", args, now=clock.now()),
        tool="fs.read",
        args=args,
    )
    assert first.effect == "allow"
    count = _count(t)
    for table in ("audit_records", "audit_macs"):
        t.store.execute_unsafe(f"DELETE FROM {table} WHERE seq > ?", (count - 2,))  # noqa: S608
    args = {"path": "/b"}
    clock.advance(1)
    with pytest.raises(LogTampered) as caught:
        t.authorize(
            token=token,
            proof=key.prove(token, "fs.read", args, now=clock.now()),
            tool="fs.read",
            args=args,
        )
    assert caught.value.position == count - 1
    assert _count(t) == count - 2  # nothing was written in their place
