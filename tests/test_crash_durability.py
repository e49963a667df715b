"""A crash loses nothing that was answered: SIGKILL in a burst of concurrent decisions.

Decisions share commits (group commit): a call is answered only once the commit holding
its receipt is durable. Several agents' tasks decide concurrently over HTTP while the
server is killed (SIGKILL, no shutdown of any kind); after a restart every receipt an
answer named is in the log, with the hash the answer gave, and the log verifies.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tether import ProofKey
from tether.sdk import Client

from .server_support import Server
from .test_server_e2e import AGENT, PAYEE, _setup

THREADS = 6


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "home").start()
    yield srv
    srv.stop()


def test_every_answered_receipt_survives_a_kill(server: Server) -> None:
    admin, _agent = _setup(server)
    answered: list[tuple[int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    ready = threading.Barrier(THREADS + 1)

    def burst() -> None:
        agent = Client(server.url, key=ProofKey())
        agent.attest(admin.join_token(AGENT))
        task = agent.open_task(template="pay-bill", params={"payee": PAYEE})
        ready.wait()
        while not stop.is_set():
            try:
                verdict = task.authorize("bank.read_bills")
            except Exception:  # the server is gone: answers stop here
                return
            with lock:
                answered.append((int(verdict.receipt["seq"]), str(verdict.receipt["hash"])))

    workers = [threading.Thread(target=burst, daemon=True) for _ in range(THREADS)]
    for worker in workers:
        worker.start()
    ready.wait()
    deadline = time.monotonic() + 30
    while len(answered) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.stop(signal.SIGKILL)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    assert len(answered) >= 60, "the burst did not get going"

    server.start()
    report = admin.verify_audit()
    assert report["ok"] is True, report
    stored = httpx.get(
        f"{server.url}/v1/audit",
        params={"limit": 10_000},
        headers={"Authorization": f"Bearer {server.admin}"},
        timeout=30,
    )
    assert stored.status_code == 200, stored.text
    hashes = {r["seq"]: r["hash"] for r in stored.json()["records"]}
    missing = [(seq, h) for seq, h in answered if hashes.get(seq) != h]
    assert not missing, missing[:5]
