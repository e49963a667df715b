"""Running the gateway for real: a Tether home, upstream servers, uvicorn, MCP clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tether import ProofKey, Tether, parse_intent
from tether.gateway import Gateway, GatewayConfig, ToolPins, create_gateway_app, parse_config
from tether.sdk._mcp_auth import TetherMCPAuth
from tether.tasks import OpenedTask

from ..server_support import home_database

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]
EXAMPLES = ROOT / "examples" / "gateway"
TOOL_SERVER = SUPPORT / "tool_server.py"
GARBAGE_SERVER = SUPPORT / "garbage_server.py"

TRUST_DOMAIN = "acme.example"
AGENT = "spiffe://acme.example/agent/coder"
OWNER = "alice@acme.example"
GIT_IDENTITY = "spiffe://acme.example/tool/git"
TOOLS_IDENTITY = "spiffe://acme.example/tool/test-tools"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@acme.example",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@acme.example",
}

POLICIES = {
    "gateway.cedar": """
@id("agents-open-tasks")
permit (principal, action == Action::"open_task", resource);

@id("agents-may-declare-tool-patterns")
permit (principal, action == Action::"open_task_with_patterns", resource);

@id("tools-by-intent")
permit (principal, action == Action::"call_tool", resource);

@id("commits-need-a-human")
@approval("required")
forbid (principal, action == Action::"call_tool", resource == Tool::"git.git_commit");

@id("no-resets")
forbid (principal, action == Action::"call_tool", resource == Tool::"git.git_reset");
"""
}

# The bundled tool server's catalogue (undescribed is left out on purpose).
TOOL_CATALOGUE: dict[str, dict[str, Any]] = {
    "echo": {"side_effect": "read", "sensitivity": "public", "trusted": True, "sinks": []},
    "read_config": {"side_effect": "read", "sensitivity": "confidential", "trusted": True},
    "get_credentials": {"side_effect": "read", "sensitivity": "confidential", "trusted": True},
    "fetch_page": {"side_effect": "egress", "sensitivity": "public", "sinks": ["url"]},
    "send_email": {"side_effect": "egress", "sensitivity": "internal", "trusted": True},
    "whoami": {"side_effect": "read", "sensitivity": "internal", "trusted": True, "sinks": []},
    "crash": {"side_effect": "write", "sensitivity": "public", "trusted": True, "sinks": []},
    "sleep": {"side_effect": "read", "sensitivity": "public", "trusted": True, "sinks": []},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def make_git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    env = {**os.environ, **GIT_ENV}

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, env=env)

    git("init", "-q", "-b", "main")
    (path / "README.md").write_text("# demo\n")
    git("add", "README.md")
    git("commit", "-q", "-m", "initial commit")
    return path


def init_home(home: Path, identities: dict[str, str]) -> Tether:
    """A trust domain with the agent, the tool identities and the gateway policies."""
    tether = Tether.init(home, TRUST_DOMAIN, database_url=home_database(home))
    tether.register_identity(AGENT, kind="agent", owner=OWNER)
    for spiffe_id in identities.values():
        tether.register_identity(spiffe_id, kind="tool", owner=OWNER)
    tether.policies.load(POLICIES)
    return tether


def git_upstream(repo: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "git",
        "identity": GIT_IDENTITY,
        "catalogue": str(EXAMPLES / "git.catalogue.toml"),
        "stdio": {
            "command": sys.executable,
            "args": ["-m", "mcp_server_git", "--repository", str(repo)],
            "env": GIT_ENV,
        },
        **extra,
    }


def tools_upstream(name: str, identity: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "identity": identity,
        "stdio": {"command": sys.executable, "args": [str(TOOL_SERVER)]},
        "tools": TOOL_CATALOGUE,
        **extra,
    }


class HttpUpstream:
    """The bundled tool server over streamable HTTP, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process = subprocess.Popen(
            [sys.executable, str(TOOL_SERVER), "--http", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class GatewayServer:
    """The gateway app under uvicorn on a loopback port, in a thread of this process.

    The gateway opens the Tether home itself, like a separate deployment would.
    """

    def __init__(self, home: Path, config: GatewayConfig, port: int) -> None:
        self.tether = Tether.open(home, database_url=home_database(home))
        self.config = config
        self.port = port
        self.url = config.resource
        app = create_gateway_app(self.tether, config)
        self.gateway: Gateway = app.state.gateway
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)
        return self

    def pin_all(self, *, by: str = "ops@acme.example") -> GatewayServer:
        """Pin every upstream definition the gateway has read, as an operator who reviewed
        them would (``tether gateway pin``): their descriptions are then not untrusted
        content for the tasks they are listed to."""
        pins = ToolPins(self.tether)
        for upstream in self.gateway.upstreams.values():
            if upstream.tools:
                pins.pin(upstream.name, upstream.tools.values(), by=by)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.tether.close()


def build_config(
    port: int, base: Path, upstreams: list[dict[str, Any]], **extra: Any
) -> GatewayConfig:
    data = {
        "resource": f"http://127.0.0.1:{port}/mcp",
        "authorization_servers": ["https://tether.acme.example"],
        "host": "127.0.0.1",
        "port": port,
        "upstreams": upstreams,
        **extra,
    }
    return parse_config(data, base=base)


def open_task(
    tether: Tether,
    tools: list[str],
    *,
    resource: str,
    key: ProofKey | None = None,
    data_ceiling: str = "confidential",
    max_calls: int = 50,
    ttl_seconds: int = 600,
) -> tuple[ProofKey, OpenedTask]:
    key = key or ProofKey()
    intent = parse_intent(
        {
            "purpose": "maintain the demo repository",
            "capabilities": [{"tool": t} for t in tools],
            "data_ceiling": data_ceiling,
            "budget": {"max_calls": max_calls},
            "ttl_seconds": ttl_seconds,
        }
    )
    task = tether.open_task(AGENT, proof_jwk=key.jwk, intent=intent, resources=(resource,))
    return key, task


@asynccontextmanager
async def mcp_client(
    url: str, token: str, key: ProofKey, mode: str = "auto"
) -> AsyncIterator[Client]:
    """The official MCP client, signing every request with the task's key."""
    async with httpx2.AsyncClient(auth=TetherMCPAuth(token, key), timeout=60) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode) as client:
            yield client


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def receipts(tether: Tether, kind: str | None = None, n: int = 50) -> list[dict[str, Any]]:
    tail = tether.audit.tail(n)
    return [r for r in tail if kind is None or r["kind"] == kind]


def raw_call(
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
) -> httpx.Response:
    """One JSON-RPC POST without an MCP client (for the adversarial cases)."""
    return httpx.post(
        url,
        content=json.dumps(body),
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            **headers,
        },
        timeout=30,
    )


def sse_result(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a response, whether JSON or one SSE event."""
    if response.headers.get("content-type", "").startswith("application/json"):
        message: dict[str, Any] = response.json()
        return message
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message = json.loads(line[5:])
            return message
    raise AssertionError(f"no JSON-RPC message in {response.text[:200]!r}")
