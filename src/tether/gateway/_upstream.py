"""Upstream MCP servers: one supervised client connection each.

Each upstream runs in its own supervisor task: it connects (launching the
process for stdio, opening the HTTP transport otherwise), negotiates the
protocol generation (``auto``: ``server/discover`` for 2026-07-28, falling back
to the 2025-11-25 ``initialize`` handshake), reads ``tools/list`` and then
serves calls until the connection breaks, after which it reconnects with a
growing back-off. ``tools/list`` is read again every ``REFRESH_SECONDS``; each read
is handed to the ``on_tools`` callback (the gateway compares every definition with
its pin, see :mod:`tether.gateway._pins`). A connection that does not come up
within the upstream's ``connect_timeout_seconds`` is abandoned and retried.

Calls are bounded by ``call_timeout_seconds``. A call to a streamable-HTTP upstream
that speaks the stateless generation (2026-07-28) is made by the gateway itself: one
POST of the JSON-RPC request over the connection's pooled HTTP client, the answer
(JSON or SSE) read within a size bound and checked as the SDK client checks it (the
JSON-RPC envelope, the result's shape, the tool's output schema). Everything else (stdio,
the 2025-11-25 session, ``tools/list``) goes through the MCP SDK's client. Every failure
(a timeout, a dead process, a malformed answer) becomes an :class:`UpstreamError` with a
code the agent can read; the gateway keeps serving the other upstreams.
The gateway's own credentials for an upstream come from the configuration
(``headers``/``env``) or from the secret broker (``[[upstreams.credentials]]``: then
each task gets its own connection, see :mod:`tether.gateway._app`); the agent's task
token is never passed on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx2
import jsonschema  # type: ignore[import-untyped]
import mcp_types as types
import msgspec
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    encode_header_value,
    mcp_param_headers,
    x_mcp_header_map,
)
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    CONNECTION_CLOSED,
    PROTOCOL_VERSION_META_KEY,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from tether.core._credentials import Known, redact_text
from tether.gateway._config import UpstreamConfig

log = logging.getLogger("tether.gateway")

CLIENT_INFO = types.Implementation(name="tether-gateway", version="0.1.0")
MAX_BACKOFF = 10.0
#: The MCP SDK's own message for a connection that closed under a call.
CLOSED_MESSAGE = "Connection closed"
REFRESH_SECONDS = 30.0
#: Room for the JSON-RPC envelope and JSON escapes around an answer of the configured
#: size: a direct call reads at most ``4 * max_result_bytes + ANSWER_SLACK`` bytes.
ANSWER_SLACK = 64 * 1024
_CLIENT_INFO = CLIENT_INFO.model_dump(mode="json", by_alias=True, exclude_none=True)


class UpstreamError(Exception):
    """A call to an upstream failed; ``code`` says how (for the agent and the receipt).

    ``quotes_upstream``: the message carries the upstream's own words (a JSON-RPC error's
    message), content nobody vouches for that the agent will read."""

    def __init__(self, code: str, message: str, *, quotes_upstream: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.quotes_upstream = quotes_upstream


class AnswerTooLarge(UpstreamError):
    """The upstream's answer went past the size bound: nothing of it is read further."""

    def __init__(self, message: str) -> None:
        super().__init__("result.oversized", message)


class _Envelope(msgspec.Struct):
    """A JSON-RPC message from the upstream, decoded no deeper than its envelope."""

    jsonrpc: str | None = None
    id: int | str | None = None
    method: str | None = None
    result: msgspec.Raw = msgspec.Raw(b"")  # empty: no result
    error: dict[str, Any] | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)


class InjectedHeaders(httpx2.Auth):
    """Headers set on every request at send time (a per-call credential changes them)."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"InjectedHeaders({sorted(self.headers)})"

    def auth_flow(self, request: httpx2.Request) -> Any:
        for name, value in self.headers.items():
            request.headers[name] = value
        yield request


class ScrubbedStderr:
    """A stdio upstream's standard error, passed on to the gateway's line by line with
    credentials redacted (an upstream that logs the key it was given, or a traceback
    quoting it, must not put it into the gateway's logs)."""

    def __init__(self, label: str, known: Callable[[], list[Known]] | None) -> None:
        read_fd, write_fd = os.pipe()
        self.label = label
        self.known = known
        self.writer = os.fdopen(write_fd, "w")
        self._reader = os.fdopen(read_fd, "r", errors="replace")
        threading.Thread(target=self._pump, name=f"stderr {label}", daemon=True).start()

    def _pump(self) -> None:
        with self._reader:
            for line in self._reader:
                try:
                    values = self.known() if self.known is not None else []
                except Exception:
                    values = []
                text = redact_text(line.rstrip("\n"), known=values)[0]
                # If the gateway's stderr is gone, the line is dropped.
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(f"[upstream {self.label}] {text}\n")

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def connect(
    config: UpstreamConfig,
    auth: httpx2.Auth | None = None,
    known: Callable[[], list[Known]] | None = None,
    on_http: Callable[[httpx2.AsyncClient], None] | None = None,
) -> AsyncIterator[Client]:
    """An entered MCP client for ``config`` (used by the supervisor and by catalogue import).

    A stdio upstream's standard error reaches the gateway's through :class:`ScrubbedStderr`.
    ``on_http`` is given the HTTP client (and its connection pool) of an HTTP upstream.
    """
    async with AsyncExitStack() as stack:
        if config.stdio is not None:
            stderr = ScrubbedStderr(config.name, known)
            stack.callback(stderr.close)
            params = StdioServerParameters(
                command=config.stdio.command,
                args=list(config.stdio.args),
                env=dict(config.stdio.env) or None,
                cwd=config.stdio.cwd,
            )
            transport: Any = stdio_client(params, errlog=stderr.writer)
        else:
            assert config.http is not None
            http = await stack.enter_async_context(
                httpx2.AsyncClient(
                    headers=dict(config.http.headers),
                    auth=auth,
                    timeout=httpx2.Timeout(
                        config.connect_timeout_seconds, read=config.call_timeout_seconds + 5
                    ),
                )
            )
            if on_http is not None:
                on_http(http)
            transport = streamable_http_client(config.http.url, http_client=http)
        client = Client(transport, mode=config.protocol, client_info=CLIENT_INFO, cache=None)
        yield await stack.enter_async_context(client)


async def list_all_tools(client: Client, *, pages: int = 50) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(pages):
        page = await client.list_tools(cursor=cursor, cache_mode="bypass")
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


class Upstream:
    """The live side of one configured upstream."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        auth: httpx2.Auth | None = None,
        label: str | None = None,
        known: Callable[[], list[Known]] | None = None,
        on_tools: Callable[[Upstream], None] | None = None,
        max_answer_bytes: int | None = None,
    ) -> None:
        self.config = config
        #: The most bytes of one answer read on a direct call (``None``: no bound).
        self.max_answer_bytes = max_answer_bytes
        #: Calls made directly over the pooled HTTP client (not through the SDK's client).
        self.direct_calls = 0
        #: Called after every read of ``tools/list`` (``self.tools`` is the new listing).
        self.on_tools = on_tools
        self.auth = auth
        self.known = known
        self.name = label or config.name
        self.tools: dict[str, types.Tool] = {}
        self.state = "starting"  # starting | ready | down
        self.last_error: str | None = None
        self.protocol_version: str | None = None
        self.attempted = anyio.Event()
        self._client: Client | None = None
        self._http: httpx2.AsyncClient | None = None
        self._ids = itertools.count(1)
        self._output_validators: dict[str, tuple[Any, Any]] = {}
        self._ready = anyio.Event()
        self._broken = anyio.Event()

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, state={self.state!r})"

    # -- supervision -----------------------------------------------------------------------
    async def run(self) -> None:
        """Keep a connection up until cancelled."""
        backoff = 0.25
        while True:
            connected = await self._connect_once()
            backoff = 0.25 if connected else min(backoff * 2, MAX_BACKOFF)
            await anyio.sleep(backoff)

    async def _connect_once(self) -> bool:
        deadline = anyio.current_time() + self.config.connect_timeout_seconds
        connected = False
        http: list[httpx2.AsyncClient] = []
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                async with connect(self.config, self.auth, self.known, http.append) as client:
                    listing = await list_all_tools(client)
                    scope.deadline = math.inf
                    connected = True
                    self.tools = {tool.name: tool for tool in listing}
                    self._listed()
                    self.protocol_version = client.protocol_version
                    self._client = client
                    self._http = http[0] if http else None
                    self._broken = anyio.Event()
                    self.state, self.last_error = "ready", None
                    self._ready.set()
                    self.attempted.set()
                    log.info(
                        "upstream %s ready (%s, %d tools)",
                        self.name,
                        self.protocol_version,
                        len(self.tools),
                    )
                    await self._serve(client)
            if scope.cancelled_caught and not connected:
                self.last_error = (
                    f"no answer within {self.config.connect_timeout_seconds:g} s of connecting"
                )
        except Exception as exc:  # any failure: note it, reconnect
            self.last_error = self._scrub(f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self._client = None
            self._http = None
            self._ready = anyio.Event()
            self.state = "down"
            self.attempted.set()
        if self.last_error:
            log.warning("upstream %s is down: %s", self.name, self.last_error)
        return connected

    async def _serve(self, client: Client) -> None:
        """Until the connection breaks: re-read ``tools/list`` every ``REFRESH_SECONDS``.

        The re-read keeps the tool list current and notices an upstream that died
        while idle, so the next call finds a fresh connection.
        """
        while True:
            with anyio.move_on_after(REFRESH_SECONDS):
                await self._broken.wait()
                return
            try:
                with anyio.fail_after(self.config.call_timeout_seconds):
                    listing = await list_all_tools(client)
            except Exception as exc:
                self.last_error = f"tools/list failed: {type(exc).__name__}: {exc}"[:500]
                return
            self.tools = {tool.name: tool for tool in listing}
            self._listed()

    def _listed(self) -> None:
        """Hand a fresh listing to ``on_tools``; its failure never breaks the connection."""
        if self.on_tools is None:
            return
        try:
            self.on_tools(self)
        except Exception:
            log.exception("upstream %s: checking its tool list failed", self.name)

    def _mark_broken(self, client: Client, why: str) -> None:
        if client is self._client:  # a stale client's failure says nothing of the new one
            self.last_error = self._scrub(why)
            self._broken.set()

    def _scrub(self, text: str) -> str:
        """``text`` (an upstream's words, for the log) without credentials in any form."""
        try:
            known = self.known() if self.known is not None else []
        except Exception:
            known = []
        return redact_text(text[:2000], known=known)[0]

    # -- calls -----------------------------------------------------------------------------
    async def _client_within(self, seconds: float) -> Client:
        if self._client is None:
            with anyio.move_on_after(seconds):
                await self._ready.wait()
        client = self._client
        if client is None:
            detail = f": {self.last_error}" if self.last_error else ""
            raise UpstreamError(
                "upstream.unavailable", f"upstream {self.name!r} is not available{detail}"
            )
        return client

    def direct(self) -> bool:
        """Whether calls go directly over the pooled HTTP client: a streamable-HTTP
        upstream on the stateless generation (no session to carry)."""
        return self._http is not None and self.protocol_version in MODERN_PROTOCOL_VERSIONS

    async def call_tool(self, tool: str, args: dict[str, Any]) -> types.CallToolResult:
        """Call ``tool`` upstream within the call timeout; raise :class:`UpstreamError`
        (:class:`AnswerTooLarge` for a direct call whose answer passed the size bound)."""
        timeout = self.config.call_timeout_seconds
        started = anyio.current_time()
        client = await self._client_within(timeout)
        remaining = max(0.1, timeout - (anyio.current_time() - started))
        http = self._http if self.direct() else None
        try:
            with anyio.fail_after(remaining):
                if http is not None:
                    self.direct_calls += 1
                    return await self._call_direct(http, tool, args)
                return await client.call_tool(tool, args)
        except TimeoutError:
            raise UpstreamError(
                "upstream.timeout",
                f"upstream {self.name!r} did not answer {tool!r} within {timeout:g} s",
            ) from None
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                self._mark_broken(client, f"connection closed during {tool!r}: {exc.message}")
                raise UpstreamError(
                    "upstream.unavailable",
                    f"upstream {self.name!r} closed the connection: {exc.message}",
                    # An upstream can send this code itself, with words of its own.
                    quotes_upstream=exc.message != CLOSED_MESSAGE,
                ) from None
            raise UpstreamError(
                "upstream.error",
                f"upstream {self.name!r} refused {tool!r}: {exc.message}",
                quotes_upstream=True,
            ) from None
        except UpstreamError:
            raise
        except (ValidationError, RuntimeError, ValueError, TypeError) as exc:
            raise UpstreamError(
                "upstream.invalid_response",
                f"upstream {self.name!r} answered {tool!r} with an invalid result "
                f"({type(exc).__name__})",
            ) from None
        except Exception as exc:
            self._mark_broken(client, f"{type(exc).__name__}: {exc}")
            raise UpstreamError(
                "upstream.unavailable",
                f"upstream {self.name!r} failed: {type(exc).__name__}",
            ) from None

    async def _call_direct(
        self, http: httpx2.AsyncClient, tool: str, args: dict[str, Any]
    ) -> types.CallToolResult:
        """One ``tools/call`` POSTed as the SDK's client would send it, answered in JSON
        or SSE; the answer is read within ``max_answer_bytes`` and checked as the SDK's
        client checks it. Raises :class:`MCPError` for a JSON-RPC error, ``ValueError``
        for a malformed answer, :class:`AnswerTooLarge` past the bound."""
        assert self.config.http is not None and self.protocol_version is not None
        version = self.protocol_version
        request_id = next(self._ids)
        body = msgspec.json.encode(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "tools/call",
                "params": {
                    "name": tool,
                    "arguments": args,
                    "_meta": {
                        PROTOCOL_VERSION_META_KEY: version,
                        CLIENT_INFO_META_KEY: _CLIENT_INFO,
                        CLIENT_CAPABILITIES_META_KEY: {},
                    },
                },
            }
        )
        headers = {
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            MCP_PROTOCOL_VERSION_HEADER: version,
            MCP_METHOD_HEADER: "tools/call",
            MCP_NAME_HEADER: encode_header_value(tool),
        }
        listed = self.tools.get(tool)
        if listed is not None:
            header_map = x_mcp_header_map(listed.input_schema)
            if header_map:
                headers.update(mcp_param_headers(header_map, args))
        async with http.stream(
            "POST", self.config.http.url, content=body, headers=headers
        ) as response:
            kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            # An answer comes with 200, as the SDK's client takes it: an error page, a
            # redirect or an "accepted" with a body is no answer, whatever its type.
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code} {kind or 'without a type'}")
            if kind == "text/event-stream":
                raw = await self._from_events(response, request_id)
            else:
                raw = await self._read_bounded(response)
                if kind != "application/json":
                    raise ValueError(f"HTTP {response.status_code} {kind or 'without a type'}")
        message = _ENVELOPE.decode(raw)
        if message.jsonrpc != "2.0" or message.id != request_id:
            raise ValueError("an answer to another request")
        if message.error is not None:
            code, said = message.error.get("code"), message.error.get("message")
            if not isinstance(code, int) or not isinstance(said, str):
                raise ValueError("a malformed JSON-RPC error")
            raise MCPError(code, said)
        if not message.result:
            raise ValueError("no result")
        result = msgspec.json.decode(message.result)
        if not isinstance(result, dict) or result.get("resultType", "complete") != "complete":
            raise ValueError("not a complete tool result")
        answer = types.CallToolResult.model_validate(result)
        self._check_output(tool, answer)
        return answer

    async def _read_bounded(self, response: httpx2.Response) -> bytes:
        limit = self._answer_limit()
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data.extend(chunk)
            if limit is not None and len(data) > limit:
                raise AnswerTooLarge(f"upstream {self.name!r} answered more than {limit} bytes")
        return bytes(data)

    async def _from_events(self, response: httpx2.Response, request_id: int) -> bytes:
        """The data of the SSE ``message`` event answering ``request_id``; notifications
        and anything else before it are skipped, all of it within the size bound."""
        limit = self._answer_limit()
        seen = 0
        data: list[str] = []
        event = "message"
        async for line in response.aiter_lines():
            seen += len(line) + 1
            if limit is not None and seen > limit:
                raise AnswerTooLarge(f"upstream {self.name!r} answered more than {limit} bytes")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif not line and data:
                payload = "\n".join(data).encode()
                data, kind, event = [], event, "message"
                if kind != "message":
                    continue
                head = _ENVELOPE.decode(payload)
                if head.id == request_id and head.method is None:
                    return payload
        raise ValueError("the event stream ended without an answer")

    def _answer_limit(self) -> int | None:
        if self.max_answer_bytes is None:
            return None
        return 4 * self.max_answer_bytes + ANSWER_SLACK

    def _check_output(self, tool: str, answer: types.CallToolResult) -> None:
        """The tool's declared output schema holds, as the SDK's client checks it (not on a
        tool's own error, which carries no structured result)."""
        listed = self.tools.get(tool)
        schema = listed.output_schema if listed is not None else None
        if schema is None or answer.is_error:
            return
        if answer.structured_content is None:
            raise RuntimeError(f"tool {tool!r} has an output schema but no structured content")
        cached = self._output_validators.get(tool)
        if cached is None or cached[0] is not schema:
            validator = jsonschema.validators.validator_for(schema)(schema)
            cached = self._output_validators[tool] = (schema, validator)
        error = jsonschema.exceptions.best_match(cached[1].iter_errors(answer.structured_content))
        if error is not None:
            raise RuntimeError(f"invalid structured content from tool {tool!r}")


async def read_tools(config: UpstreamConfig) -> list[types.Tool]:
    """Connect once to ``config``'s upstream and read its tools (within its connect timeout)."""
    with anyio.fail_after(config.connect_timeout_seconds):
        async with connect(config) as client:
            return await list_all_tools(client)
