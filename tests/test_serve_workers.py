"""``tether serve --workers N``: several processes behind one listener over one
PostgreSQL store, one audit chain; refused over SQLite.

A real ``python -m tether serve --workers 2`` over a throwaway PostgreSQL schema. Each
HTTP connection is accepted by one worker, so a fresh connection asks ``/v1/node``
which worker it reached (a node's name carries its pid) and then asks for a decision on
that same connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tether import Client, ProofKey, Tether
from tether.store import url_with_schema

from .conftest import require_service
from .server_support import POSTGRES_URL

pytestmark = pytest.mark.store_independent

TRUST_DOMAIN = "acme.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/workers"
TOOL = "load.read"
ARGS: dict[str, Any] = {"key": "k-1"}
PERMIT_ALL = "permit (principal, action, resource);"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tether_cli(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", "--home", str(home), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def pg_env() -> Iterator[dict[str, str]]:
    """An environment whose TETHER_DATABASE_URL is a fresh schema, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"tether_workers_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    env = {**os.environ, "TETHER_DATABASE_URL": url_with_schema(POSTGRES_URL, schema)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    yield env
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def serving(home: Path, env: dict[str, str], port: int, workers: int) -> Iterator[str]:
    """``tether serve --workers`` on ``port``, stopped with SIGTERM at the end."""
    log = (home.parent / "serve.log").open("ab")
    argv = [sys.executable, "-m", "tether", "--home", str(home), "serve"]
    argv += ["--port", str(port), "--rate", "100000", "--workers", str(workers)]
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((home.parent / "serve.log").read_text()[-3000:])
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (home.parent / "serve.log").read_text()[-3000:]


def test_two_workers_decide_over_one_postgres_chain(tmp_path: Path, pg_env: dict[str, str]) -> None:
    """Both worker processes answer decisions; every receipt lands in one chain that
    verifies while serving and again after both workers stopped (each signing a head)."""
    home = tmp_path / "home"
    assert tether_cli(home, pg_env, "migrate").returncode == 0
    init = tether_cli(
        home,
        pg_env,
        "init",
        "--trust-domain",
        TRUST_DOMAIN,
        "--admin",
        "root@acme.example",
        "--json",
    )
    assert init.returncode == 0, init.stderr
    admin_secret = json.loads(init.stdout)["admin_credential"]

    with serving(home, pg_env, free_port(), workers=2) as base:
        with Client(base, admin=admin_secret) as admin:
            admin.load_policies({"permit.cedar": PERMIT_ALL})
            catalogue = {"read": {"side_effect": "read", "sensitivity": "internal", "sinks": []}}
            admin.post("/v1/catalogue", {"tools": catalogue, "prefix": "load"})
            admin.register_identity(AGENT, kind="agent", owner="load@acme.example")
            join = admin.join_token(AGENT)
        key = ProofKey()
        intent = {
            "purpose": "workers",
            "capabilities": [{"tool": TOOL}],
            "budget": {"max_calls": 1000},
            "ttl_seconds": 600,
        }
        with Client(base, key=key) as agent:
            agent.attest(join)
            token = agent.open_task(intent=intent).token

        by_worker: dict[str, list[tuple[int, str]]] = {}
        url = f"{base}/v1/decisions"
        for _ in range(200):
            # A fresh connection each time: whichever worker accepts it answers both.
            with httpx.Client(timeout=30) as http:
                node = http.get(
                    f"{base}/v1/node", headers={"Authorization": f"Bearer {admin_secret}"}
                ).json()
                assert node["clustered"] is True
                proof = key.prove(token, TOOL, ARGS, now=time.time(), htm="POST", htu=url)
                answer = http.post(
                    url,
                    json={"tool": TOOL, "args": ARGS},
                    headers={"Authorization": f"DPoP {token}", "DPoP": proof},
                )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["effect"] == "allow", body
            by_worker.setdefault(node["name"], []).append(
                (body["receipt"]["seq"], body["receipt"]["hash"])
            )
            if len(by_worker) >= 2 and all(len(v) >= 5 for v in by_worker.values()):
                break
        assert len(by_worker) == 2, by_worker.keys()
        assert all(len(v) >= 5 for v in by_worker.values())
        pids = {name.rsplit(":", 1)[1] for name in by_worker}
        assert len(pids) == 2
        receipts = [r for rs in by_worker.values() for r in rs]
        assert len({seq for seq, _ in receipts}) == len(receipts)  # one chain, no seq twice

        with Client(base, admin=admin_secret) as admin:
            report = admin.verify_audit()
        assert report["ok"] is True, report
        assert report["records"] >= len(receipts)

    # Both workers stopped cleanly; the chain, its Merkle log and signed heads verify.
    tether = Tether.open(home, database_url=pg_env["TETHER_DATABASE_URL"])
    try:
        report_after = tether.verify_audit()
        assert report_after.ok, report_after
        for seq, digest in receipts:
            record = tether.store.get_record(seq)
            assert record is not None and record.hash == digest
    finally:
        tether.close()


def test_workers_refused_over_sqlite(tmp_path: Path) -> None:
    """An operator asking for two workers over a SQLite home gets a clear refusal, and no
    server starts."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "TETHER_DATABASE_URL"}
    init = tether_cli(home, env, "init", "--trust-domain", TRUST_DOMAIN, "--admin", "root@x")
    assert init.returncode == 0, init.stderr
    out = tether_cli(home, env, "serve", "--port", str(free_port()), "--workers", "2")
    assert out.returncode == 2
    assert "needs a PostgreSQL store" in out.stderr
