"""Benchmark one ``tools/call`` through Tether's MCP gateway against direct and fastmcp.

Run ``.venv/bin/python bench/gateway.py`` (or ``make bench-gateway``; about a minute).
See bench/README.md.

One upstream (a small MCP tool server written with the SDK's ``MCPServer``, one ``echo``
tool, streamable HTTP on 127.0.0.1, its own process) is called in one run, by the same
official MCP client (``mcp.Client`` over ``httpx2``, one session per target, reused for
every call), through:

* direct: nothing; the client talks to the upstream;
* gateway: Tether's gateway, in its own process, built and served as ``tether gateway``
  serves it (``create_gateway_app``, the same uvicorn settings) over an on-disk Tether
  home. The client signs a DPoP proof per request with ``tether.TetherMCPAuth``, moving
  to a new task every ``--calls-per-task`` calls (20, the default intent budget); every
  call is authenticated, decided (intent with an argument constraint, Cedar, budget,
  flow state), forwarded over the gateway's one upstream session, and recorded;
* fastmcp proxy: fastmcp's ``create_proxy`` over a connected backend ``fastmcp.Client``,
  so one upstream session is reused as the gateway does, with a ``Middleware`` whose
  ``on_call_tool`` does the equivalent allow-list check (tool name in a set, the
  argument a string of bounded length), served over streamable HTTP in its own process.

Also measured, for context: two floors, ``http_relay`` (Starlette relaying the bytes of
each request to the upstream with one pooled ``httpx2`` client: no MCP at all, the least
a Python proxy on this stack adds) and ``sdk_passthrough`` (the MCP SDK's low-level server
forwarding each call over one upstream session, built like the gateway's MCP side but
doing nothing else: the hop the gateway is made of); fastmcp's default proxy
(``create_proxy(url)``, a fresh upstream session per call); and the client's own cost of
signing one proof (``TetherMCPAuth.auth_flow``).

After a warm-up, ``--rounds`` rounds each run a block of calls against every target, in
a rotating order. The figures are the median and p90 of ``time.perf_counter_ns`` around
``await client.call_tool(...)``. The gateway and the SDK floor also time their own steps
inside their processes (a timing wrapper around each step: a few µs per call in all).

Output: one JSON line on stdout; a summary on stderr; everything in
bench/results/gateway.json. ``--profile`` runs the gateway under cProfile (its figures
are then inflated and not comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import inspect
import io
import itertools
import json
import logging
import os
import platform
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from functools import wraps
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import tether
from tether import ProofKey, Tether, TetherMCPAuth, parse_intent

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HOST = "127.0.0.1"
TRUST_DOMAIN = "acme.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/gateway-bench"
OWNER = "alice@acme.example"
UPSTREAM = "bench"
UPSTREAM_IDENTITY = f"spiffe://{TRUST_DOMAIN}/tool/bench"
TOOL = "echo"
ARGS: dict[str, Any] = {"text": "hello from the benchmark"}
MAX_TEXT = 256
POLICIES = {
    "bench.cedar": (
        '@id("agents-open-tasks")\n'
        'permit (principal, action == Action::"open_task", resource);\n\n'
        '@id("bench-tools")\n'
        'permit (principal, action == Action::"call_tool", resource)\n'
        '  when { resource == Tool::"bench.echo" };\n\n'
        '@id("no-deletes")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"bench.delete");\n'
    )
}
# Timed targets, in the order of the first round.
TARGETS = (
    "direct",
    "gateway",
    "fastmcp_proxy",
    "sdk_passthrough",
    "http_relay",
    "fastmcp_proxy_default",
)
SLOW_TARGET = "fastmcp_proxy_default"  # about 50 ms a call: a fifth of the calls
SLOW_SHARE = 5
ROLES = ("upstream", *TARGETS[1:])
TARGET_ADDED_US = 1000.0
TARGET_RATIO = 3.0
TARGET_RELAY_RATIO = 2.0  # the gateway adds at most this times what the bare relay adds
# Where in its task a gateway call falls (its position, from 0), for --calls-per-task.
POSITION_EDGES = (0, 10, 100, 250, 500, 750, 1000, 2000, 5000)
START_TIMEOUT = 60.0
SIGN_SAMPLES = 2000
BUSY_LOAD = 0.5  # a 1-minute load average above this at the start is flagged
ENDPOINT = "endpoint (whole request)"
UPSTREAM_CALL = "upstream call (round trip)"
# The gateway's own work per call, as timed inside its process (see role_gateway).
STEPS = (
    "authenticate (token, proof, task)",
    "flow rules",
    "authorize (flow state, decide, spend, receipt)",
    "brokered values (for redaction)",
    "redact the result",
    "record the result (label, receipt)",
)
HOP_HEADERS = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "keep-alive", "date", "server"}
)


# -- timing ---------------------------------------------------------------------------


def _percentile(ordered: list[int], q: float) -> float:
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index] / 1000


def summarize(samples_ns: list[int]) -> dict[str, Any]:
    ordered = sorted(samples_ns)
    return {
        "median_us": round(_percentile(ordered, 0.5), 1),
        "p90_us": round(_percentile(ordered, 0.9), 1),
        "min_us": round(ordered[0] / 1000, 1),
        "samples": len(ordered),
    }


class Phases:
    """Durations of named steps, recorded inside a server process."""

    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = {}
        self.stamps: dict[str, list[tuple[int, int]]] = {}  # (start, end) of some steps

    def timed(
        self, label: str, fn: Callable[..., Any], *, stamps: bool = False
    ) -> Callable[..., Any]:
        samples = self.samples.setdefault(label, [])
        spans = self.stamps.setdefault(label, []) if stamps else None
        clock = time.perf_counter_ns
        if inspect.iscoroutinefunction(fn):

            @wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                start = clock()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    end = clock()
                    samples.append(end - start)
                    if spans is not None:
                        spans.append((start, end))

            return timed_async

        @wraps(fn)
        def timed_sync(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                samples.append(clock() - start)

        return timed_sync

    def wrap(self, owner: Any, attribute: str, label: str, *, stamps: bool = False) -> None:
        """Time ``owner.attribute`` (a step the code no longer has is left out)."""
        original = getattr(owner, attribute, None)
        if callable(original):
            setattr(owner, attribute, self.timed(label, original, stamps=stamps))

    def report(self) -> dict[str, Any]:
        return {"phases": self.samples, "stamps": self.stamps}

    def summary(self, last: int) -> dict[str, Any]:
        """Per step, over its ``last`` samples: the timed calls (a server's requests come
        one per call, in order, the warm-up first)."""
        return {
            label: summarize(values[-last:]) for label, values in self.samples.items() if values
        }


# -- the servers (each role runs in its own process: ``--role NAME``) --------------------


def _uvicorn(app: Any, port: int) -> Any:
    """uvicorn with ``tether gateway``'s settings (see ``run_gateway``), for every server.

    The server stops when the parent closes our stdin (or dies).
    """
    import uvicorn  # noqa: PLC0415 - only the server roles need it

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=HOST,
            port=port,
            lifespan="on",
            log_level="warning",
            access_log=False,
            server_header=False,
        )
    )

    def watch() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    return server


def _quiet() -> None:
    logging.getLogger("mcp").setLevel(logging.WARNING)  # one INFO line per session otherwise


def role_upstream(port: int) -> None:
    """The upstream: the SDK's ``MCPServer`` with one trivial tool (its default settings)."""
    from mcp.server.mcpserver import MCPServer  # noqa: PLC0415

    server = MCPServer("bench-upstream", version="1.0.0", log_level="WARNING")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    _quiet()
    app = server.streamable_http_app(streamable_http_path="/mcp", host=HOST)
    _uvicorn(app, port).run()


def role_proxy(port: int, upstream_url: str, mode: str, *, reuse: bool) -> None:
    """A fastmcp proxy with an allow-list middleware equivalent to the gateway's intent."""
    from fastmcp import Client as FastMCPClient  # noqa: PLC0415
    from fastmcp.exceptions import ToolError  # noqa: PLC0415
    from fastmcp.server import create_proxy  # noqa: PLC0415
    from fastmcp.server.middleware import Middleware  # noqa: PLC0415

    _quiet()
    allowed = frozenset({TOOL})

    class AllowList(Middleware):  # type: ignore[misc]
        """The tool is allow-listed and its argument a string of at most ``MAX_TEXT``."""

        async def on_call_tool(self, context: Any, call_next: Any) -> Any:
            params = context.message
            if params.name not in allowed:
                raise ToolError(f"denied: {params.name!r} is not allowed")
            text = (params.arguments or {}).get("text")
            if not isinstance(text, str) or len(text) > MAX_TEXT:
                raise ToolError(f"denied: 'text' must be a string of at most {MAX_TEXT}")
            return await call_next(context)

    async def serve() -> None:
        async with AsyncExitStack() as stack:
            if reuse:  # a connected client: fastmcp reuses its one session for every call
                target: Any = await stack.enter_async_context(
                    FastMCPClient(upstream_url, mode=mode)
                )
                proxy = create_proxy(target, name="bench-proxy")
            else:  # fastmcp's default for a URL: a fresh upstream session per request
                proxy = create_proxy(upstream_url, name="bench-proxy", mode=mode)
            proxy.add_middleware(AllowList())
            await _uvicorn(proxy.http_app(path="/mcp"), port).serve()

    asyncio.run(serve())


def role_passthrough(port: int, upstream_url: str, mode: str, report: Path | None) -> None:
    """The SDK floor: the MCP SDK's low-level server forwarding each call, nothing else.

    Built like the gateway's MCP side (a raw ASGI endpoint in Starlette, a stateless
    ``StreamableHTTPSessionManager`` answering over SSE, one ``mcp.Client`` to the
    upstream held open, tool schemas from the upstream's list read at start), without
    authentication, decisions, redaction or receipts.
    """
    import mcp_types as types  # noqa: PLC0415
    from mcp.server.lowlevel.server import Server  # noqa: PLC0415
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    _quiet()
    phases = Phases()
    upstream: dict[str, Any] = {}

    async def forward(name: str, args: dict[str, Any]) -> types.CallToolResult:
        result: types.CallToolResult = await upstream["client"].call_tool(name, args)
        return result

    timed_forward = phases.timed("upstream call (MCP client round trip)", forward)

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(upstream["tools"].values()))

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        result: types.CallToolResult = await timed_forward(
            params.name, dict(params.arguments or {})
        )
        return result

    def input_schema(name: str) -> Any:
        # As the gateway does: from the upstream's tool list, read once (otherwise the SDK
        # calls tools/list on every tools/call to validate Mcp-Param headers).
        tool = upstream["tools"].get(name)
        return tool.input_schema if tool is not None else None

    server: Server[Any] = Server(
        "bench-passthrough",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        get_tool_input_schema=input_schema,
    )
    manager = StreamableHTTPSessionManager(app=server, stateless=True, json_response=False)

    class Endpoint:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await manager.handle_request(scope, receive, send)

    Endpoint.__call__ = phases.timed(  # type: ignore[method-assign]
        ENDPOINT, Endpoint.__call__, stamps=True
    )

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx2.AsyncClient(timeout=60))
            transport = streamable_http_client(upstream_url, http_client=http)
            client = await stack.enter_async_context(Client(transport, mode=mode, cache=None))
            upstream["client"] = client
            upstream["tools"] = {tool.name: tool for tool in (await client.list_tools()).tools}
            async with manager.run():
                yield

    app = Starlette(routes=[Route("/mcp", endpoint=Endpoint())], lifespan=lifespan)
    _uvicorn(app, port).run()
    if report is not None:
        report.write_text(json.dumps(phases.report()))


def role_relay(port: int, upstream_url: str) -> None:
    """The HTTP floor: relay each request's bytes to the upstream and its answer back.

    No MCP at all (no parsing, no session): Starlette on uvicorn receiving, one pooled
    ``httpx2`` client sending. The least any Python proxy on this stack can add.
    """
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import Response  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    state: dict[str, httpx2.AsyncClient] = {}

    async def relay(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k not in HOP_HEADERS}
        answer = await state["http"].request(
            request.method, upstream_url, content=await request.body(), headers=headers
        )
        back = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(answer.content, status_code=answer.status_code, headers=back)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with httpx2.AsyncClient(timeout=60) as http:
            state["http"] = http
            yield

    routes = [Route("/mcp", relay, methods=["GET", "POST", "DELETE"])]
    _uvicorn(Starlette(routes=routes, lifespan=lifespan), port).run()


def role_gateway(
    port: int, config_path: Path, home: Path, report: Path | None, *, profile: bool
) -> None:
    """What ``tether gateway --config FILE`` runs (``run_gateway``), with its steps timed."""
    from tether.gateway import _app, _auth, _upstream  # noqa: PLC0415

    phases = Phases()
    phases.wrap(_app.Gateway, "mcp_endpoint", ENDPOINT, stamps=True)
    phases.wrap(_auth.Authenticator, "authenticate", STEPS[0])
    phases.wrap(_app.Gateway, "_lean_params", "lean path: the SDK's request checks")
    phases.wrap(_app.Gateway, "call_tool", "tools/call handler")
    phases.wrap(_app.Gateway, "_flow_check", STEPS[1])  # gone once flow moved into decide
    phases.wrap(_app.Gateway, "_authorize", STEPS[2])
    phases.wrap(_upstream.Upstream, "call_tool", UPSTREAM_CALL)
    phases.wrap(_app.Gateway, "_known", STEPS[3])
    phases.wrap(_app, "redact_result", STEPS[4])
    phases.wrap(_app.Gateway, "_record_result", STEPS[5])

    config = _app.load_config(config_path)
    gateway_tether = Tether.open(home)
    profiler = cProfile.Profile() if profile else None
    app = None
    try:
        app = _app.create_gateway_app(gateway_tether, config)
        server = _uvicorn(app, port)
        if profiler is not None:
            profiler.enable()
        server.run()
    finally:
        if profiler is not None:
            profiler.disable()
        gateway_tether.close()
    if report is None:
        return
    out = phases.report()
    if app is not None:  # which path the calls took (counters, not timing)
        gateway = app.state.gateway
        out["lean_calls"] = getattr(gateway, "lean_calls", None)
        out["direct_upstream_calls"] = sum(
            getattr(u, "direct_calls", 0) for u in gateway.upstreams.values()
        )
    if profiler is not None:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs()
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        out["profile"] = text.getvalue()
    report.write_text(json.dumps(out))


# -- the client side ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Process:
    """One server role in a child process; it exits when its stdin is closed."""

    def __init__(self, role: str, port: int, *args: str, report: Path | None = None) -> None:
        self.role = role
        self.port = port
        self.url = f"http://{HOST}:{port}/mcp"
        self.report = report
        command = [sys.executable, str(Path(__file__).resolve()), "--role", role]
        command += ["--port", str(port), *args]
        if report is not None:
            command += ["--report", str(report)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, env={**os.environ, "FASTMCP_LOG_LEVEL": "WARNING"}
        )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.process.returncode}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.role} did not listen on {HOST}:{self.port}")

    def cpu_seconds(self) -> float | None:
        """The process's CPU time so far (user + system), from ``/proc`` (Linux only)."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # fields 3 on; utime and stime are 14, 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        """Stop the server (gracefully: close its stdin) and read its report, if any."""
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.report is not None and self.report.exists():
            found: dict[str, Any] = json.loads(self.report.read_text())
            return found
        return {}


Task = tuple[ProofKey, str]  # a task's proof key and token


def setup_home(home: Path, resource: str, tasks: int, calls_per_task: int) -> list[Task]:
    """A trust domain, the agent, the upstream's identity, policies and ``tasks`` open
    tasks, each with its own key and a budget of ``calls_per_task`` calls."""
    admin = Tether.init(home, TRUST_DOMAIN)
    opened: list[Task] = []
    try:
        admin.register_identity(AGENT, kind="agent", owner=OWNER)
        admin.register_identity(UPSTREAM_IDENTITY, kind="tool", owner=OWNER)
        admin.policies.load(POLICIES)
        intent = parse_intent(
            {
                "purpose": "benchmark the gateway",
                "capabilities": [
                    {"tool": f"{UPSTREAM}.{TOOL}", "args": {"text": {"max_length": MAX_TEXT}}}
                ],
                "data_ceiling": "internal",
                "budget": {"max_calls": calls_per_task},
                "ttl_seconds": 3600,
            }
        )
        for _ in range(tasks):
            key = ProofKey()
            task = admin.open_task(AGENT, proof_jwk=key.jwk, intent=intent, resources=(resource,))
            opened.append((key, task.token))
    finally:
        admin.close()
    return opened


class TaskAuth(httpx2.Auth):
    """``TetherMCPAuth`` for one task after another: the next task after ``per_task``
    tools/call requests (an agent's tasks are short; a task's state grows with its calls).
    """

    requires_request_body = True

    def __init__(self, tasks: list[Task], per_task: int) -> None:
        self.auths = [TetherMCPAuth(token, key) for key, token in tasks]
        self.per_task = per_task
        self.calls = 0

    def auth_flow(self, request: httpx2.Request) -> Any:
        current = self.auths[min(self.calls // self.per_task, len(self.auths) - 1)]
        if b'"tools/call"' in request.content:
            self.calls += 1
        return current.auth_flow(request)


def write_config(path: Path, port: int, upstream_url: str, mode: str) -> None:
    path.write_text(
        f'resource = "http://{HOST}:{port}/mcp"\n'
        'authorization_servers = ["https://tether.acme.example"]\n'
        f'host = "{HOST}"\n'
        f"port = {port}\n\n"
        "[[upstreams]]\n"
        f'name = "{UPSTREAM}"\n'
        f'identity = "{UPSTREAM_IDENTITY}"\n'
        f'protocol = "{mode}"\n\n'
        "[upstreams.http]\n"
        f'url = "{upstream_url}"\n\n'
        f"[upstreams.tools.{TOOL}]\n"
        'side_effect = "read"\n'
        'sensitivity = "public"\n'
        "trusted = true\n"
        "sinks = []\n",
        encoding="utf-8",
    )


@asynccontextmanager
async def mcp_session(url: str, mode: str, auth: httpx2.Auth | None) -> AsyncIterator[Any]:
    """The official MCP client on its own HTTP client (the same settings for every target)."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx2.AsyncClient(auth=auth, timeout=60))
        transport = streamable_http_client(url, http_client=http)
        yield await stack.enter_async_context(Client(transport, mode=mode))


def tool_name(target: str) -> str:
    return f"{UPSTREAM}.{TOOL}" if target == "gateway" else TOOL


async def timed_calls(client: Any, name: str, count: int, spans: list[tuple[int, int]]) -> None:
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        result = await client.call_tool(name, ARGS)
        spans.append((start, clock()))
        if result.is_error:
            raise RuntimeError(f"{name} failed: {result.content}")


async def run_calls(
    urls: dict[str, str],
    tasks: list[Task],
    options: argparse.Namespace,
    mark: Callable[[str], None] = lambda _when: None,
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, str | None]]:
    spans: dict[str, list[tuple[int, int]]] = {target: [] for target in urls}
    protocols: dict[str, str | None] = {}
    async with AsyncExitStack() as stack:
        clients: dict[str, Any] = {}
        for target, url in urls.items():
            auth = TaskAuth(tasks, options.calls_per_task) if target == "gateway" else None
            client = await stack.enter_async_context(mcp_session(url, options.mode, auth))
            clients[target] = client
            protocols[target] = client.protocol_version
            first = await client.call_tool(tool_name(target), ARGS)
            text = "".join(getattr(block, "text", "") for block in first.content)
            if first.is_error or text != ARGS["text"]:
                raise RuntimeError(f"{target}: unexpected answer {first.content!r}")
        share = {t: SLOW_SHARE if t == SLOW_TARGET else 1 for t in clients}
        for target, client in clients.items():
            await timed_calls(client, tool_name(target), options.warmup // share[target], [])
        order = list(clients)
        mark("start")
        for round_no in range(options.rounds):
            shift = round_no % len(order)
            for target in order[shift:] + order[:shift]:
                count = max(1, options.calls // options.rounds // share[target])
                gc.collect()
                await timed_calls(clients[target], tool_name(target), count, spans[target])
        mark("end")
    return spans, protocols


def signing_cost(key: ProofKey, token: str, url: str) -> dict[str, Any]:
    """``TetherMCPAuth``'s work on one ``tools/call`` request: one ES256 proof + headers."""
    auth = TetherMCPAuth(token, key)
    rpc = {"name": tool_name("gateway"), "arguments": ARGS}
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": rpc})
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(SIGN_SAMPLES + 200):
        request = httpx2.Request("POST", url, content=body.encode())
        start = clock()
        next(auth.auth_flow(request))
        if i >= 200:
            samples.append(clock() - start)
    return summarize(samples)


# -- the run --------------------------------------------------------------------------


def run(options: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tether-gateway-bench-", dir=options.home_dir))
    processes: list[Process] = []
    reports: dict[str, dict[str, Any]] = {}
    try:
        upstream = Process("upstream", free_port())
        processes.append(upstream)
        upstream.wait_ready(time.monotonic() + START_TIMEOUT)  # before anything connects
        gateway_port = free_port()
        gateway_url = f"http://{HOST}:{gateway_port}/mcp"
        needed = -(-(1 + options.warmup + options.calls) // options.calls_per_task) + 1
        tasks = setup_home(work / "home", gateway_url, needed, options.calls_per_task)
        config = work / "gateway.toml"
        write_config(config, gateway_port, upstream.url, options.upstream_mode)
        gateway_args = ["--config", str(config), "--home", str(work / "home")]
        gateway_args += ["--profile"] if options.profile else []
        backend = ["--upstream", upstream.url, "--upstream-mode", options.upstream_mode]
        servers = {
            "gateway": Process(
                "gateway", gateway_port, *gateway_args, report=work / "gateway.json"
            ),
            "fastmcp_proxy": Process("fastmcp_proxy", free_port(), *backend, "--reuse"),
            "sdk_passthrough": Process(
                "sdk_passthrough", free_port(), *backend, report=work / "passthrough.json"
            ),
            "http_relay": Process("http_relay", free_port(), *backend),
        }
        if not options.skip_default_proxy:
            servers[SLOW_TARGET] = Process(SLOW_TARGET, free_port(), *backend)
        processes += servers.values()
        deadline = time.monotonic() + START_TIMEOUT
        for process in servers.values():
            process.wait_ready(deadline)
        urls = {"direct": upstream.url} | {name: p.url for name, p in servers.items()}
        urls = {target: urls[target] for target in TARGETS if target in urls}
        # Each server's CPU time over the timed calls: what a call costs its process,
        # much less sensitive to a busy machine than the wall-clock latency.
        by_role = {"direct": upstream} | servers
        cpu: dict[str, dict[str, float | None]] = {"start": {}, "end": {}}

        def mark(when: str) -> None:
            cpu[when] = {name: by_role[name].cpu_seconds() for name in urls}

        started = time.monotonic()
        spans, protocols = asyncio.run(run_calls(urls, tasks, options, mark))
        elapsed = time.monotonic() - started
        signing = signing_cost(*tasks[-1], gateway_url)
        for name in ("gateway", "sdk_passthrough"):
            reports[name] = servers[name].stop()
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "stats": {
            target: summarize([end - start for start, end in values])
            for target, values in spans.items()
        },
        "legs": {name: legs(spans[name], report) for name, report in reports.items()},
        "protocols": protocols,
        "signing": signing,
        "inside": {
            name: inside_summary(report, len(spans[name])) for name, report in reports.items()
        },
        "profile": reports.get("gateway", {}).get("profile"),
        "cpu_per_call_us": cpu_per_call(cpu, spans),
        "paths": {
            key: reports.get("gateway", {}).get(key)
            for key in ("lean_calls", "direct_upstream_calls")
        },
        "by_position": by_position(spans["gateway"], reports.get("gateway", {}), options),
        "elapsed_s": round(elapsed, 1),
        "load": [round(x, 2) for x in (*load_before, *os.getloadavg())],
    }


def cpu_per_call(
    cpu: dict[str, dict[str, float | None]], spans: dict[str, list[tuple[int, int]]]
) -> dict[str, float]:
    """Each server's CPU time over the timed calls, per call to it (µs). ``direct`` is the
    upstream, which serves every row's calls: its figure is per call of all rows."""
    out: dict[str, float] = {}
    total = sum(len(values) for values in spans.values())
    for name, values in spans.items():
        start, end = cpu["start"].get(name), cpu["end"].get(name)
        calls = total if name == "direct" else len(values)
        if start is not None and end is not None and calls:
            out[name] = round((end - start) / calls * 1e6, 1)
    return out


def legs(client: list[tuple[int, int]], report: dict[str, Any]) -> dict[str, Any] | None:
    """Each timed call split where the server's endpoint starts handling it.

    ``perf_counter_ns`` is the system-wide monotonic clock on Linux, so the client's and
    the server's timestamps compare. A server sees one request per call, in order, so the
    last requests it saw are the timed calls; a pairing whose start falls outside its call
    is dropped. (The endpoint may return after the client has its answer: the SDK closes
    the SSE stream after the last event, so the split is at the endpoint's start.)
    """
    served = report.get("stamps", {}).get(ENDPOINT, [])
    if sys.platform != "linux" or len(served) < len(client):
        return None
    paired = [
        (start, entry, end)
        for (start, end), (entry, _leave) in zip(client, served[-len(client) :], strict=True)
        if start <= entry <= end
    ]
    if len(paired) < len(client) * 0.95:
        return None
    return {
        "client call to endpoint start": summarize([e - s for s, e, _n in paired]),
        "endpoint start to client done": summarize([n - e for _s, e, n in paired]),
    }


def by_position(
    client: list[tuple[int, int]], report: dict[str, Any], options: argparse.Namespace
) -> dict[str, Any]:
    """The gateway's timed calls grouped by their position in their task (0: a task's
    first call): the client's latency and the gateway's steps, medians per group. With
    ``--calls-per-task 1000`` this says whether a call costs the same at 10 and at 1,000.

    Call ``i`` of the timed ones is the gateway's ``1 + warmup + i``-th ``tools/call``
    (the first call and the warm-up come before); the client moves to a new task every
    ``--calls-per-task`` calls."""
    first = 1 + options.warmup
    positions = [(first + i) % options.calls_per_task for i in range(len(client))]
    steps = {
        label: report.get("phases", {}).get(label, [])[-len(client) :]
        for label in (STEPS[0], STEPS[2], STEPS[5], UPSTREAM_CALL)
    }
    out: dict[str, Any] = {}
    for low, high in itertools.pairwise(POSITION_EDGES):
        if low >= options.calls_per_task:
            break
        chosen = [i for i, p in enumerate(positions) if low <= p < high]
        if not chosen:
            continue
        group = {"calls": len(chosen)}
        group["client_median_us"] = summarize([client[i][1] - client[i][0] for i in chosen])[
            "median_us"
        ]
        for label, samples in steps.items():
            if len(samples) == len(client):
                group[label] = summarize([samples[i] for i in chosen])["median_us"]
        out[f"{low}-{min(high, options.calls_per_task) - 1}"] = group
    return out


def inside_summary(report: dict[str, Any], last: int) -> dict[str, Any]:
    phases = Phases()
    phases.samples = report.get("phases", {})
    return phases.summary(last)


def _median(inside: dict[str, Any], label: str) -> float:
    found = inside.get(label)
    return float(found["median_us"]) if found else 0.0


def breakdown(result: dict[str, Any]) -> dict[str, Any]:
    """Where the gateway's added time goes, from medians (an approximation: medians of parts
    do not add up exactly to the median of the whole)."""
    stats, gateway = result["stats"], result["inside"].get("gateway", {})
    direct = stats["direct"]["median_us"]
    parts = {"client: sign the proof (TetherMCPAuth)": result["signing"]["median_us"]}
    for step in STEPS:  # the gateway's own steps that this version of it has
        if step in gateway:
            parts[f"gateway: {step}"] = gateway[step]["median_us"]
    tether_work = round(sum(parts.values()), 1)
    out: dict[str, Any] = {"tether_work_us": parts, "tether_work_total_us": tether_work}
    if "http_relay" in stats:
        out["http_hop_added_us"] = round(stats["http_relay"]["median_us"] - direct, 1)
    if "sdk_passthrough" in stats:
        hop = round(stats["sdk_passthrough"]["median_us"] - direct, 1)
        out["sdk_hop_added_us"] = hop
        out["gateway_over_sdk_floor_us"] = round(
            stats["gateway"]["median_us"] - stats["sdk_passthrough"]["median_us"], 1
        )
    endpoint = _median(gateway, "endpoint (whole request)")
    if endpoint:
        out["gateway_endpoint_us"] = endpoint
        out["gateway_upstream_call_us"] = _median(gateway, UPSTREAM_CALL)
        out["gateway_mcp_machinery_us"] = round(
            endpoint - _median(gateway, STEPS[0]) - _median(gateway, "tools/call handler"),
            1,
        )
    return out


def build_report(result: dict[str, Any], options: argparse.Namespace) -> dict[str, Any]:
    stats = result["stats"]
    direct, gateway, proxy = (stats[t] for t in ("direct", "gateway", "fastmcp_proxy"))
    gateway_added = round(gateway["median_us"] - direct["median_us"], 1)
    proxy_added = round(proxy["median_us"] - direct["median_us"], 1)
    ratio = round(proxy_added / gateway_added, 2) if gateway_added > 0 else None
    relay = stats.get("http_relay")
    relay_added = round(relay["median_us"] - direct["median_us"], 1) if relay else None
    over_relay = (
        round(gateway_added / relay_added, 2)
        if relay_added is not None and relay_added > 0
        else None
    )
    headline: dict[str, Any] = {
        "direct_us": direct["median_us"],
        "gateway_us": gateway["median_us"],
        "fastmcp_proxy_us": proxy["median_us"],
        "gateway_added_us": gateway_added,
        "proxy_added_us": proxy_added,
        "proxy_added_over_gateway_added": ratio,
        "target_gateway_added_le_1ms": gateway_added <= TARGET_ADDED_US,
        "target_3x_less_than_proxy": (proxy_added > 0 if ratio is None else ratio >= TARGET_RATIO),
        "relay_added_us": relay_added,
        "gateway_added_over_relay_added": over_relay,
        "target_le_2x_relay": over_relay is not None and over_relay <= TARGET_RELAY_RATIO,
        "direct_p90_us": direct["p90_us"],
        "gateway_p90_us": gateway["p90_us"],
        "fastmcp_proxy_p90_us": proxy["p90_us"],
        "client_sign_us": result["signing"]["median_us"],
    }
    for extra in ("sdk_passthrough", "http_relay", SLOW_TARGET):
        if extra in stats:
            headline[f"{extra}_us"] = stats[extra]["median_us"]
    load = result["load"]
    return {
        "headline": headline,
        "per_target": stats,
        "protocols": result["protocols"],
        "client_signing": result["signing"],
        "gateway_breakdown": breakdown(result),
        "inside": result["inside"],
        "legs": result["legs"],
        "gateway_profile": result["profile"],
        "gateway_paths": result["paths"],
        "cpu_per_call_us": result["cpu_per_call_us"],
        "gateway_by_position": result["by_position"],
        "method": {
            "calls_per_target": options.calls,
            "warmup_per_target": options.warmup,
            "rounds": options.rounds,
            "gateway_calls_per_task": options.calls_per_task,
            f"{SLOW_TARGET}_calls": f"1/{SLOW_SHARE} of the others",
            "client_mode": options.mode,
            "upstream_mode": options.upstream_mode,
            "tether_home_under": options.home_dir or tempfile.gettempdir(),
            "gateway_profiled": options.profile,
            "timed_seconds": result["elapsed_s"],
        },
        "environment": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_before": load[:3],
            "load_average_after": load[3:],
            "busy": load[0] > BUSY_LOAD,
            "tether": getattr(tether, "__version__", "dev"),
            "packages": {
                name: metadata.version(name)
                for name in ("mcp", "fastmcp", "uvicorn", "httpx2", "starlette")
            },
            # uvicorn picks these up when installed (its "auto" loop and http settings).
            "uvicorn_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "uvicorn_http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        },
    }


def describe(report: dict[str, Any]) -> str:
    h = report["headline"]
    lines = ["", "tools/call latency (µs), same upstream, same official MCP client:", ""]
    lines.append(f"  {'target':<24}{'median':>10}{'p90':>10}{'min':>10}{'n':>7}")
    for target, s in report["per_target"].items():
        lines.append(
            f"  {target:<24}{s['median_us']:>10.1f}{s['p90_us']:>10.1f}"
            f"{s['min_us']:>10.1f}{s['samples']:>7}"
        )
    met = {True: "met", False: "MISSED"}
    lines += [
        "",
        f"  gateway adds {h['gateway_added_us']:.1f} µs over direct "
        f"(target ≤ {TARGET_ADDED_US:.0f}: {met[h['target_gateway_added_le_1ms']]})",
        f"  fastmcp proxy adds {h['proxy_added_us']:.1f} µs: "
        f"{h['proxy_added_over_gateway_added']}x the gateway's "
        f"(target ≥ {TARGET_RATIO:g}x: {met[h['target_3x_less_than_proxy']]})",
    ]
    if h["gateway_added_over_relay_added"] is not None:
        lines.append(
            f"  the bare http_relay adds {h['relay_added_us']:.1f} µs: the gateway adds "
            f"{h['gateway_added_over_relay_added']}x that "
            f"(target ≤ {TARGET_RELAY_RATIO:g}x: {met[h['target_le_2x_relay']]})"
        )
    lines.append(f"  protocols: {report['protocols']}")
    lines.append(f"  gateway paths (counters): {report['gateway_paths']}")
    if report["cpu_per_call_us"]:
        lines += ["", "  CPU time of each server per call to it, over the timed calls (µs):"]
        for name, value in report["cpu_per_call_us"].items():
            what = "the upstream, per call of every row" if name == "direct" else name
            lines.append(f"    {what:<44}{value:>10.1f}")
    parts = report["gateway_breakdown"]
    lines += ["", "  Tether's own work per call (medians, µs):"]
    for label, value in parts["tether_work_us"].items():
        lines.append(f"    {label:<56}{value:>9.1f}")
    lines.append(f"    {'total':<56}{parts['tether_work_total_us']:>9.1f}")
    if "http_hop_added_us" in parts:
        lines.append(
            f"  a bare HTTP relay adds (http_relay - direct): {parts['http_hop_added_us']:.1f} µs"
        )
    if "sdk_hop_added_us" in parts:
        lines.append(
            f"  the SDK hop adds (sdk_passthrough - direct): {parts['sdk_hop_added_us']:.1f} µs;"
            f" gateway - sdk_passthrough: {parts['gateway_over_sdk_floor_us']:.1f} µs"
        )
    for name, phases in report["inside"].items():
        lines += ["", f"  inside {name}, per call (µs):    median       p90"]
        for label, s in phases.items():
            lines.append(f"    {label:<44}{s['median_us']:>10.1f}{s['p90_us']:>10.1f}")
    for name, split in report["legs"].items():
        if split:
            lines += ["", f"  {name}, each call split at its endpoint (µs):    median       p90"]
            for label, s in split.items():
                lines.append(f"    {label:<44}{s['median_us']:>10.1f}{s['p90_us']:>10.1f}")
    if report["gateway_by_position"]:
        lines += ["", "  gateway calls by position in their task (medians, µs):"]
        for span, group in report["gateway_by_position"].items():
            rest = ", ".join(
                f"{label.split(' (')[0]} {value:.0f}"
                for label, value in group.items()
                if label not in ("calls", "client_median_us")
            )
            client = group["client_median_us"]
            lines.append(
                f"    calls {span:<10} n={group['calls']:<5} client {client:>8.1f}  ({rest})"
            )
    env = report["environment"]
    if env["busy"]:
        lines += [
            "",
            f"  WARNING: load average {env['load_average_before'][0]} at the start: the "
            "machine was busy, the figures are noisy",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tools/call latency: direct, through Tether's gateway, through fastmcp"
    )
    parser.add_argument("--calls", type=int, default=500, help="timed calls per target")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up calls per target")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved rounds")
    parser.add_argument(
        "--calls-per-task",
        type=int,
        default=20,
        help="gateway calls per task before the client moves to a new task (default: 20, "
        "the default intent budget)",
    )
    parser.add_argument(
        "--mode", default="auto", help="the client's protocol mode: auto, legacy or a version"
    )
    parser.add_argument(
        "--upstream-mode", default="auto", help="the proxies' protocol mode to the upstream"
    )
    parser.add_argument(
        "--home-dir", default=None, help="where the Tether home goes (default: the temp dir)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the gateway process")
    parser.add_argument(
        "--skip-default-proxy", action="store_true", help="leave fastmcp's default proxy out"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "gateway.json")
    # The server roles: this script runs itself in its child processes.
    parser.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def serve_role(options: argparse.Namespace) -> None:
    if options.role == "upstream":
        role_upstream(options.port)
    elif options.role == "gateway":
        role_gateway(
            options.port, options.config, options.home, options.report, profile=options.profile
        )
    elif options.role == "http_relay":
        role_relay(options.port, options.upstream)
    elif options.role == "sdk_passthrough":
        role_passthrough(options.port, options.upstream, options.upstream_mode, options.report)
    else:
        role_proxy(options.port, options.upstream, options.upstream_mode, reuse=options.reuse)


def main() -> None:
    options = parse_args()
    if options.role is not None:
        serve_role(options)
        return
    if options.calls < options.rounds * SLOW_SHARE:
        raise SystemExit(f"--calls must be at least {SLOW_SHARE} x --rounds")
    report = build_report(run(options), options)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(describe(report), file=sys.stderr)
    if report["gateway_profile"]:
        print(report["gateway_profile"], file=sys.stderr)
    print(f"\n  full results: {options.output}\n", file=sys.stderr)
    print(json.dumps(report["headline"]), flush=True)


if __name__ == "__main__":
    main()
