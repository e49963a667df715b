"""Shared fixtures.

``TETHER_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns "service not
reachable" skips into failures, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from tether import FrozenClock, ProofKey, Tether, parse_intent

AGENT = "spiffe://acme.example/agent/bot"
OWNER = "alice@acme.example"
PERMIT_ALL = "permit (principal, action, resource);"


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI) when ``name`` is not listening on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} not reachable at {host}:{port}: {exc}"
    if os.environ.get("TETHER_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(time.time())


@pytest.fixture
def tether(clock: FrozenClock) -> Iterator[Tether]:
    instance = Tether.ephemeral("acme.example", clock=clock, checkpoint_every=8)
    instance.register_identity(AGENT, kind="agent", owner=OWNER)
    yield instance
    instance.close()


@pytest.fixture
def permissive(tether: Tether) -> Tether:
    tether.policies.load({"all.cedar": PERMIT_ALL})
    return tether


def open_simple_task(
    tether: Tether, *, tools: tuple[str, ...] = ("fs.read",), max_calls: int = 5
) -> tuple[ProofKey, str, str]:
    """Open a task allowing ``tools``; return (proof key, task id, token)."""
    key = ProofKey()
    intent = parse_intent(
        {
            "purpose": "test",
            "capabilities": [{"tool": t} for t in tools],
            "budget": {"max_calls": max_calls},
        }
    )
    task = tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    return key, task.task_id, task.token
