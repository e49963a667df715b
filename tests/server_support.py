"""A real ``tether serve`` process on loopback, for end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

#: The PostgreSQL database the suite's "postgresql" runs use (a throwaway schema each).
POSTGRES_URL = os.environ.get(
    "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


class Backend:
    """The store the running tests use: "sqlite", or "postgresql" (set by tests/conftest.py)."""

    kind = "sqlite"
    #: Tether homes made outside a test (module-scoped fixtures) and their schemas' URLs.
    homes: dict[Path, str] = {}  # noqa: RUF012 - process-wide on purpose
    schemas: list[str] = []  # noqa: RUF012


def new_schema_url(prefix: str = "t") -> str:
    """A fresh, migrated schema in the test database (dropped when the backend ends)."""
    import secrets

    from tether.store import migrate, url_with_schema

    schema = f"{prefix}_{secrets.token_hex(6)}"
    url = url_with_schema(POSTGRES_URL, schema)
    Backend.schemas.append(schema)  # dropped even if the migration fails half way
    migrate(url)
    return url


def home_database(home: Path) -> str | None:
    """The database URL a Tether home uses in this run (None: its SQLite file).

    A home made inside a test shares the test's schema ($TETHER_DATABASE_URL); one made by
    a module-scoped fixture gets a schema of its own, remembered for the module's tests."""
    if Backend.kind != "postgresql":
        return None
    key = home.resolve()
    if key not in Backend.homes:
        Backend.homes[key] = os.environ.get("TETHER_DATABASE_URL") or new_schema_url("home")
    return Backend.homes[key]


def home_env(home: Path) -> dict[str, str]:
    """The environment of a process serving ``home``."""
    url = home_database(home)
    return {**os.environ, "TETHER_DATABASE_URL": url} if url else {**os.environ}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(
        self, home: Path, *, trust_domain: str = "acme.example", init: bool = True
    ) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = ""
        self.process: subprocess.Popen[bytes] | None = None
        if init:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tether",
                    "--home",
                    str(home),
                    "init",
                    "--trust-domain",
                    trust_domain,
                    "--admin",
                    "root@acme.example",
                    "--json",
                ],
                check=True,
                capture_output=True,
                text=True,
                env=home_env(home),
            )
            self.admin = json.loads(out.stdout)["admin_credential"]

    def start(self) -> Server:
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tether",
                "--home",
                str(self.home),
                "serve",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
            env=home_env(self.home),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
            if self.process.poll() is not None:
                break
        raise RuntimeError("server did not start: " + (self.home / "server.log").read_text())

    def stop(self, sig: int | None = None) -> None:
        if self.process is None:
            return
        if sig is None:
            self.process.terminate()
        else:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.process = None


class CLI:
    """The real ``tether`` CLI, one process per verb, talking to ``server`` with its admin
    credential (``$TETHER_SERVER``, ``$TETHER_TOKEN``); ``home`` keeps the task keys."""

    def __init__(self, home: Path, server: Server | None = None, token: str | None = None) -> None:
        self.home = home
        self.env = {**home_env(home), "TETHER_HOME": str(home)}
        for name in ("TETHER_KEK", "TETHER_SERVER", "TETHER_TOKEN", "TETHER_TOKEN_FILE"):
            self.env.pop(name, None)
        self.env.pop("TETHER_BREAK_GLASS", None)
        if server is not None:
            self.env["TETHER_SERVER"] = server.url
            self.env["TETHER_TOKEN"] = token if token is not None else server.admin

    def as_(self, token: str) -> CLI:
        """The same CLI presenting another credential."""
        other = CLI(self.home)
        other.env = {**self.env, "TETHER_TOKEN": token}
        return other

    def run(
        self, *args: str, ok: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
            [sys.executable, "-m", "tether", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=60,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1, result.stdout
        return json.loads(lines[0])
