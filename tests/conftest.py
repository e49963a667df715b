"""Shared fixtures.

``TETHER_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns "service not
reachable" skips into failures, so CI can never pass by skipping.

Every test runs twice, once per store (``[sqlite]``, ``[postgresql]``). In a
PostgreSQL run every Tether a test makes lives in a throwaway schema of the
test database (``$TETHER_TEST_POSTGRES_URL``, default the local ``test``
database): each ephemeral instance its own, the homes of a test (``Tether.init``,
the CLI, server processes) the test's own through ``$TETHER_DATABASE_URL``.
Schemas are dropped afterwards. ``@pytest.mark.store_independent`` (no Tether at
all) runs once; ``@pytest.mark.sqlite_only(reason)`` only on SQLite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

import tether.store as tether_store
from tether import FrozenClock, ProofKey, Tether, parse_intent
from tether.core import Sensitivity, SideEffect, ToolProfile
from tether.store import PostgresStore

from .server_support import POSTGRES_URL, Backend, new_schema_url

AGENT = "spiffe://acme.example/agent/bot"
OWNER = "alice@acme.example"
PERMIT_ALL = "permit (principal, action, resource);"
#: A tool catalogue under which the flow rules stay quiet: every tool reads internal data
#: a platform vouches for. Tests about information flow or credentials load their own
#: (an undescribed tool is judged most restrictively at every door).
QUIET_CATALOGUE = {
    "*": ToolProfile(side_effect=SideEffect.READ, sensitivity=Sensitivity.INTERNAL, trusted=True)
}


def quiet(tether: Tether) -> Tether:
    """``tether`` with :data:`QUIET_CATALOGUE` loaded."""
    tether.catalogue.load(QUIET_CATALOGUE, origin="tests")
    return tether


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


STORES = ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "store_independent: no Tether involved; runs once")
    config.addinivalue_line("markers", "sqlite_only(reason): meaningful on SQLite only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("store_independent"):
        return
    kinds = ["sqlite"] if metafunc.definition.get_closest_marker("sqlite_only") else STORES
    metafunc.parametrize("store_backend", kinds, indirect=True, scope="session")


def _drop_schemas(names: list[str]) -> None:
    if not names:
        return
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        for name in names:
            # Still locked by a stray connection: left behind, harmless.
            with contextlib.suppress(psycopg.Error):
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )
    names.clear()


@pytest.fixture(scope="session", autouse=True)
def store_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store of this run of the suite (a session parameter: all of one, then the other)."""
    kind: str = getattr(request, "param", "sqlite")
    os.environ.pop("TETHER_DATABASE_URL", None)
    Backend.kind = kind
    yield kind
    Backend.kind = "sqlite"
    if kind == "postgresql":
        PostgresStore.close_all()
        Backend.homes.clear()
        _drop_schemas(Backend.schemas)


@pytest.fixture(autouse=True)
def _store_per_test(
    store_backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """PostgreSQL runs: throwaway schemas for the test's Tethers, dropped after it."""
    if store_backend != "postgresql":
        yield
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    before = set(PostgresStore.live())
    monkeypatch.setattr(
        tether_store, "ephemeral_store_factory", lambda: PostgresStore.throwaway(POSTGRES_URL)
    )
    schemas_before = len(Backend.schemas)
    if {"tmp_path", "tmp_path_factory"} & set(request.fixturenames):
        monkeypatch.setenv("TETHER_DATABASE_URL", new_schema_url())
    yield
    for store in set(PostgresStore.live()) - before:
        store.close()
    mine = Backend.schemas[schemas_before:]
    del Backend.schemas[schemas_before:]
    _drop_schemas(mine)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(time.time())


@pytest.fixture
def tether(clock: FrozenClock) -> Iterator[Tether]:
    instance = Tether.ephemeral("acme.example", clock=clock, checkpoint_every=8)
    instance.register_identity(AGENT, kind="agent", owner=OWNER)
    quiet(instance)
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
