"""Attacks on the receipt chain: each is detected and located."""

from __future__ import annotations

import pytest

from tether import Tether

from .conftest import open_simple_task


@pytest.fixture
def chain(permissive: Tether) -> Tether:
    key, _task_id, token = open_simple_task(permissive, max_calls=50)
    for i in range(20):
        args = {"path": f"/f{i}"}
        permissive.authorize(
            token=token,
            proof=key.prove(token, "fs.read", args, now=permissive.clock.now()),
            tool="fs.read",
            args=args,
        )
    report = permissive.verify_audit()
    assert report.ok and report.records >= 20 and report.checkpoints >= 2
    return permissive


def _body(t: Tether, seq: int) -> str:
    row = t.store.execute_fetch("SELECT body FROM audit_records WHERE seq = ?", (seq,))
    return str(row[0][0])


def test_untouched_chain_verifies(chain: Tether) -> None:
    report = chain.verify_audit()
    assert report.ok
    assert report.first_bad is None


def test_one_edited_byte_is_found(chain: Tether) -> None:
    body = _body(chain, 7)
    edited = body.replace('"allow"', '"alloW"', 1) if '"allow"' in body else body[:-2] + "0}"
    assert edited != body
    chain.store.execute_unsafe("UPDATE audit_records SET body = ? WHERE seq = 7", (edited,))
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == 7
    assert "altered" in (report.problem or "")


def test_edit_with_recomputed_hash_breaks_the_next_link(chain: Tether) -> None:
    from tether.audit import record_hash

    body = _body(chain, 5).replace('"allow"', '"deny"', 1)
    prev = chain.store.execute_fetch("SELECT prev_hash FROM audit_records WHERE seq = 5")[0][0]
    chain.store.execute_unsafe(
        "UPDATE audit_records SET body = ?, hash = ? WHERE seq = 5",
        (body, record_hash(str(prev), body)),
    )
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == 6


def test_deleted_record_is_found(chain: Tether) -> None:
    chain.store.execute_unsafe("DELETE FROM audit_records WHERE seq = 9")
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == 9
    assert "missing" in (report.problem or "")


def test_swapped_records_are_found(chain: Tether) -> None:
    rows = chain.store.execute_fetch(
        "SELECT seq, prev_hash, hash, body FROM audit_records WHERE seq IN (11, 12) ORDER BY seq"
    )
    (s1, p1, h1, b1), (s2, p2, h2, b2) = rows
    chain.store.execute_unsafe(
        "UPDATE audit_records SET prev_hash = ?, hash = ?, body = ? WHERE seq = ?", (p2, h2, b2, s1)
    )
    chain.store.execute_unsafe(
        "UPDATE audit_records SET prev_hash = ?, hash = ?, body = ? WHERE seq = ?", (p1, h1, b1, s2)
    )
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == 11


def test_inserted_record_is_found(chain: Tether) -> None:
    last = chain.store.last_record()
    assert last is not None
    # Shift the tail up by one and insert a forged record in the gap.
    chain.store.execute_unsafe("UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 10")
    chain.store.execute_unsafe("UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1010")
    chain.store.execute_unsafe(
        "INSERT INTO audit_records VALUES (10, ?, ?, ?, 0)",
        ("0" * 64, "f" * 64, '{"kind":"decision","effect":"allow","seq":10}'),
    )
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == 10


def test_truncated_tail_after_a_checkpoint_is_found(chain: Tether) -> None:
    checkpoints = chain.store.list_checkpoints()
    assert checkpoints
    last_cp = checkpoints[-1].seq
    chain.store.execute_unsafe("DELETE FROM audit_records WHERE seq >= ?", (last_cp - 3,))
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == last_cp - 3
    assert "truncated" in (report.problem or "")


def test_forged_checkpoint_is_found(chain: Tether) -> None:
    cp = chain.store.list_checkpoints()[0]
    chain.store.execute_unsafe(
        "UPDATE audit_checkpoints SET hash = ? WHERE seq = ?", ("e" * 64, cp.seq)
    )
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == cp.seq


def test_cli_names_the_position(tmp_path: object) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    home = Path(str(tmp_path)) / "home"
    run = [sys.executable, "-m", "tether", "--home", str(home), "--break-glass"]
    subprocess.run(
        [*run, "init", "--trust-domain", "acme.example"], check=True, capture_output=True
    )
    subprocess.run(
        [
            *run,
            "identity",
            "register",
            "spiffe://acme.example/agent/a",
            "--kind",
            "agent",
            "--owner",
            "a@acme.example",
        ],
        check=True,
        capture_output=True,
    )
    t = Tether.open(home)
    t.store.execute_unsafe("UPDATE audit_records SET body = body || ' ' WHERE seq = 2")
    t.close()
    result = subprocess.run(
        [*run, "audit", "verify", "--json"], check=False, capture_output=True, text=True
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["first_bad"] == 2
