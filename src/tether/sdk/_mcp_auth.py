"""Client-side authentication to an MCP server that fronts Tether (the MCP gateway).

Every HTTP request gets ``Authorization: DPoP <task token>`` and a fresh
``DPoP`` proof for its method and URL (RFC 9449). When the JSON-RPC body is a
``tools/call``, the proof also carries the ``call`` claim, the digest of the
tool name and its arguments, so the gateway can bind the proof to that call.

The MCP SDK (2.x) sends its HTTP requests with ``httpx2``; hand an
``httpx2.AsyncClient(auth=TetherMCPAuth(token, key))`` to
``mcp.client.streamable_http.streamable_http_client(url, http_client=...)`` and
the result to ``mcp.Client``::

    auth = TetherMCPAuth(task.token, key)
    async with httpx2.AsyncClient(auth=auth) as http:
        transport = streamable_http_client(GATEWAY_URL, http_client=http)
        async with Client(transport) as client:
            await client.call_tool("git.git_status", {"repo_path": "/srv/repo"})

:class:`TetherHttpxAuth` is the same for plain ``httpx`` clients.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from typing import Any

import httpx
import httpx2

from tether.tokens import ProofKey


def _htu(scheme: str, netloc: bytes, path: str) -> str:
    """``htu``: scheme, authority and path, without query or fragment (RFC 9449 §4.2)."""
    return f"{scheme}://{netloc.decode('ascii')}{path}"


def _tool_call(body: bytes) -> tuple[str, dict[str, Any]] | None:
    if not body or b"tools/call" not in body:
        return None
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    args = params.get("arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return params["name"], args


class _Signer:
    def __init__(self, token: str, key: ProofKey, clock: Callable[[], float] | None = None) -> None:
        if not token:
            raise ValueError("a task token is required")
        self.token = token
        self.key = key
        self.clock = clock or time.time

    def headers(self, method: str, htu: str, body: bytes) -> dict[str, str]:
        now = self.clock()
        call = _tool_call(body) if method == "POST" else None
        if call is not None:
            proof = self.key.prove(self.token, call[0], call[1], now=now, htm=method, htu=htu)
        else:
            proof = self.key.prove_request(self.token, htm=method, htu=htu, now=now)
        return {"Authorization": f"DPoP {self.token}", "DPoP": proof}


class TetherMCPAuth(httpx2.Auth):
    """``httpx2`` auth (what the MCP SDK uses): task token + a DPoP proof per request."""

    requires_request_body = True

    def __init__(
        self, token: str, key: ProofKey, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._signer = _Signer(token, key, clock)

    def __repr__(self) -> str:
        return f"TetherMCPAuth(key={self._signer.key!r})"

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        url = request.url
        request.headers.update(
            self._signer.headers(
                request.method, _htu(url.scheme, url.netloc, url.path), request.content
            )
        )
        yield request


class TetherHttpxAuth(httpx.Auth):
    """The same for ``httpx`` clients."""

    requires_request_body = True

    def __init__(
        self, token: str, key: ProofKey, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._signer = _Signer(token, key, clock)

    def __repr__(self) -> str:
        return f"TetherHttpxAuth(key={self._signer.key!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        url = request.url
        request.headers.update(
            self._signer.headers(
                request.method, _htu(url.scheme, url.netloc, url.path), request.content
            )
        )
        yield request
