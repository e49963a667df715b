"""Benchmark ``POST /v1/decisions`` over HTTP on loopback against the framework's floor.

Run ``.venv/bin/python bench/http_authorize.py`` (about 30 s; ``--tmpfs`` adds a run with
the home on /dev/shm, about 20 s more). See bench/README.md.

In one run, each server a separate ``uvicorn`` process with the same settings as
``tether serve`` (127.0.0.1, ``log_level="warning"``, ``access_log=False``):

* the floor: a bare Litestar app with one ``POST /bare`` endpoint that decodes the same
  JSON body into a msgspec struct and returns a small JSON object (no auth, no store);
* ``tether serve`` over an on-disk home (SQLite WAL, ``synchronous=FULL``: one fsync per
  receipt), hammered with ``POST /v1/decisions``, each request carrying a task token and
  its own single-use DPoP proof, signed before the clock starts;
* with ``--tmpfs``, the same over a home on /dev/shm, where fsync costs nothing;
* with ``--postgres``, ``tether serve`` over a fresh PostgreSQL schema with one worker,
  then with ``--workers 2`` (not pinned: the workers, PostgreSQL and this generator share
  the cores), and the scaling factor between the two.

The load generator is this process: ``--clients`` closed-loop clients (default 32), each
on its own keep-alive HTTP/1.1 connection, run for ``--warmup`` + ``--duration`` seconds.
Only requests that start after the warm-up and finish before the end are counted. The
servers are pinned to CPU 0 and the generator to CPU 1 (``--no-pin`` turns that off).

Results: a markdown table on stdout and JSON in bench/results/http_authorize.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from itertools import repeat
from pathlib import Path
from typing import Any

import httpx
import msgspec
from litestar import Litestar, post

import tether
from tether import Client, ProofKey

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEMO = ROOT / "examples" / "demo"
HOST = "127.0.0.1"
TRUST_DOMAIN = "acme.example"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/http-bench"
OWNER = "alice@acme.example"
TOOL = "bank.read_bills"
ARGS: dict[str, Any] = {"account": "checking", "month": "2026-05", "limit": 10}
BODY = json.dumps({"tool": TOOL, "args": ARGS}, separators=(",", ":")).encode()
ADHOC_ADMISSION = (
    '@id("bench-adhoc")\n'
    'permit (principal, action == Action::"open_task", resource == Template::"adhoc");\n'
)
TARGET_RPS = 3000.0
TARGET_P99_MS = 20.0
SERVER_CPU = 0
CLIENT_CPU = 1
PROOF_MARGIN = 1.3  # proofs signed per client, over the floor's pace for the whole run
MAX_PROOFS = 400_000  # about 250 MB of request bytes; a cap, never reached at 2 cores
START_TIMEOUT = 30.0
NOISE_CORES = 0.25  # CPU used by the rest of the machine beyond which a run is flagged
SHM = Path("/dev/shm")  # noqa: S108 - a private mkdtemp directory is made inside
PROOF_LIFETIME = 60.0  # tether.core._verify.PROOF_WINDOW: a proof older than this is stale


# -- the floor: the same framework, the same server settings, nothing else -------------------


class BareIn(msgspec.Struct, forbid_unknown_fields=True):
    tool: str
    args: dict[str, Any] = {}


class BareOut(msgspec.Struct):
    effect: str
    tool: str


@post("/bare", status_code=200)
async def bare(data: BareIn) -> BareOut:
    return BareOut(effect="allow", tool=data.tool)


def serve_floor(port: int) -> None:
    """What ``tether serve`` does, with a bare app: the framework's floor."""
    import uvicorn  # noqa: PLC0415 - only the floor process needs it

    app = Litestar(route_handlers=[bare], debug=False, request_max_body_size=1024 * 1024)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


# -- server processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


class ServerProcess:
    """One server process on loopback, its output in ``log``."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        path: str,
        log: Path,
        *,
        pin: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.env = env
        self.port = port
        self.url = f"http://{HOST}:{port}{path}"
        self.log = log
        self.pin = pin
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, probe: httpx.Request) -> ServerProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env)
        if self.pin:
            # Threads the server starts later (SQLite, anyio) inherit the mask.
            os.sched_setaffinity(self.process.pid, {SERVER_CPU})
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=1) as http:
            while time.monotonic() < deadline:
                try:
                    if http.send(probe).status_code < 500:
                        return self
                except httpx.HTTPError:
                    time.sleep(0.1)
                if self.process.poll() is not None:
                    break
        self.stop()
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def start_floor(work: Path, *, pin: bool) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-floor", str(port)]
    server = ServerProcess(argv, port, "/bare", work / "floor.log", pin=pin)
    return server.start(httpx.Request("POST", server.url, content=BODY))


def tether_cli(home: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tether", "--home", str(home), *args, "--json"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@dataclass
class TetherServer:
    home: Path
    server: ServerProcess
    admin: Client
    key: ProofKey
    tokens: list[str]


def start_tether(
    home: Path,
    clients: int,
    *,
    pin: bool,
    database_url: str | None = None,
    workers: int = 1,
) -> TetherServer:
    """``tether init`` and ``tether serve`` over ``home`` (over ``database_url``, a fresh
    PostgreSQL schema, when given); one agent, one task per client."""
    home.mkdir(parents=True)
    env = None
    if database_url is not None:
        env = {**os.environ, "TETHER_DATABASE_URL": database_url}
        tether_cli(home, "migrate", env=env)
    admin_secret = tether_cli(
        home, "init", "--trust-domain", TRUST_DOMAIN, "--admin", f"root@{TRUST_DOMAIN}", env=env
    )["admin_credential"]
    port = free_port()
    argv = [sys.executable, "-m", "tether", "--home", str(home), "serve"]
    # The per-principal limiter would throttle a benchmark; a huge rate keeps its cost.
    argv += ["--port", str(port), "--rate", "1e9", "--workers", str(workers)]
    server = ServerProcess(argv, port, "/v1/decisions", home / "server.log", pin=pin, env=env)
    server.start(httpx.Request("GET", f"http://{HOST}:{port}/healthz"))
    try:
        return setup_tether(home, server, admin_secret, clients)
    except BaseException:
        server.stop()
        raise


def setup_tether(
    home: Path, server: ServerProcess, admin_secret: str, clients: int
) -> TetherServer:
    """The demo policies plus an ad-hoc admission, one agent and ``clients`` open tasks."""
    base = f"http://{HOST}:{server.port}"
    admin = Client(base, admin=admin_secret)
    admin.register_identity(AGENT, kind="agent", owner=OWNER)
    files = {p.name: p.read_text() for p in sorted((DEMO / "policies").glob("*.cedar"))}
    files["bench-admission.cedar"] = ADHOC_ADMISSION
    admin.load_policies(files)
    admin.add_template(tomllib.loads((DEMO / "templates" / "pay-bill.toml").read_text()))
    # What the bank's tools do (an undescribed tool is judged most restrictively, and
    # its reads would exceed the intent's data ceiling).
    catalogue = tomllib.loads((DEMO / "bank.catalogue.toml").read_text())
    admin.post("/v1/catalogue", {"tools": catalogue["tools"], "prefix": "bank"})
    key = ProofKey()
    intent = {
        "purpose": "HTTP authorize benchmark",
        "capabilities": [{"tool": TOOL}],
        "budget": {"max_calls": 10**9},
        "ttl_seconds": 3600,
    }
    with Client(base, key=key) as agent:
        agent.attest(admin.join_token(AGENT))
        tokens = [agent.open_task(intent=intent).token for _ in range(clients)]
    return TetherServer(home, server, admin, key, tokens)


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum the Prometheus samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def filesystem(path: Path) -> str:
    """The filesystem type ``path`` lives on (Linux), or ``unknown``."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


# -- proofs, signed before the clock starts ---------------------------------------------------


def sign_proofs(pem: bytes, token: str, count: int, htu: str) -> list[bytes]:
    key = ProofKey.from_pem(pem)
    return [
        key.prove(token, TOOL, ARGS, now=time.time(), htm="POST", htu=htu).encode()
        for _ in range(count)
    ]


def sign_all(key: ProofKey, tokens: list[str], per_client: int, htu: str) -> list[list[bytes]]:
    workers = max(1, min(len(tokens), os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(sign_proofs, key.to_pem(), t, per_client, htu) for t in tokens]
        return [f.result() for f in futures]


# -- the load generator -----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy_seconds() -> float:
    """CPU time spent by the whole machine (every CPU), idle and I/O wait excluded."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` and of its descendants (``--workers``' processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0.0
    for member in tree:
        try:
            total += cpu_seconds(member)
        except OSError:  # gone meanwhile
            continue
    return total


def cpu_snapshot(server_pid: int) -> tuple[float, float, float, float]:
    return (time.perf_counter(), tree_cpu_seconds(server_pid), time.process_time(), machine_busy())


def machine_busy() -> float:
    try:
        return machine_busy_seconds()
    except (OSError, ValueError):
        return math.nan


async def watch_cpu(window: Window, server_pid: int, tally: Tally) -> None:
    """CPU use of the server, of this generator and of the rest of the machine, timed window."""
    try:
        await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
        t0, server0, gen0, busy0 = cpu_snapshot(server_pid)
        await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
        t1, server1, gen1, busy1 = cpu_snapshot(server_pid)
    except (OSError, ValueError):  # no /proc: not Linux
        return
    wall = t1 - t0
    server, generator = (server1 - server0) / wall, (gen1 - gen0) / wall
    tally.cpu = {
        "server": round(server, 3),
        "generator": round(generator, 3),
        "rest_of_machine": round((busy1 - busy0) / wall - server - generator, 3),
    }


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    non_200: int = 0
    not_allow: int = 0
    broken: int = 0  # requests lost to a closed or garbled connection
    exhausted: int = 0  # clients that ran out of pre-signed proofs before the end
    statuses: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # cores used in the timed window

    def check(self, status: int, body: bytes) -> None:
        self.sent += 1
        if status != 200:
            self.non_200 += 1
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            return
        try:
            effect = msgspec.json.decode(body).get("effect")
        except (msgspec.DecodeError, AttributeError):
            effect = None
        if effect != "allow":
            self.not_allow += 1


@dataclass
class Window:
    """Set once every client is connected: warm-up until ``start``, timed until ``end``."""

    connected: asyncio.Barrier
    go: asyncio.Event = field(default_factory=asyncio.Event)
    start: float = math.inf
    end: float = math.inf

    async def wait(self) -> None:
        await self.connected.wait()
        await self.go.wait()


@dataclass(frozen=True)
class Target:
    port: int
    path: str
    tokens: list[str]
    proofs: list[Iterator[bytes]]


def request_head(target: Target, token: str) -> tuple[bytes, bytes]:
    """The bytes of one request before and after its proof."""
    before = (
        f"POST {target.path} HTTP/1.1\r\nhost: {HOST}:{target.port}\r\n"
        f"authorization: DPoP {token}\r\ndpop: "
    ).encode()
    after = (
        f"\r\ncontent-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    return before, after


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        raise ConnectionError(f"response without content-length: {head[:200]!r}")
    length = int(lowered[at + 17 : lowered.find(b"\r\n", at + 2)])
    return int(head[9:12]), await reader.readexactly(length)


async def raw_client(target: Target, i: int, window: Window, tally: Tally) -> None:
    """One client: a keep-alive HTTP/1.1 connection, one request in flight at a time.

    A broken connection is counted and replaced; the request it carried is not timed."""
    reader, writer = await asyncio.open_connection(HOST, target.port)
    before, after = request_head(target, target.tokens[i])
    proofs = target.proofs[i]
    clock = time.perf_counter
    await window.wait()
    start, end = window.start, window.end
    try:
        while (t0 := clock()) < end:
            proof = next(proofs, None)
            if proof is None:
                tally.exhausted += 1
                return
            try:
                writer.write(before + proof + after)
                status, body = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                tally.sent += 1
                tally.broken += 1
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, target.port)
                continue
            t1 = clock()
            if t0 >= start and t1 <= end:
                tally.latencies.append(t1 - t0)
            tally.check(status, body)
    finally:
        writer.close()


async def httpx_client(
    target: Target, i: int, window: Window, tally: Tally, http: httpx.AsyncClient
) -> None:
    url = f"http://{HOST}:{target.port}{target.path}"
    headers = {"authorization": f"DPoP {target.tokens[i]}", "content-type": "application/json"}
    proofs = target.proofs[i]
    # Open this client's connection before the clock starts (checked, never timed).
    first = next(proofs, b"")
    response = await http.post(url, content=BODY, headers={**headers, "dpop": first.decode()})
    tally.check(response.status_code, response.content)
    clock = time.perf_counter
    await window.wait()
    start, end = window.start, window.end
    while True:
        t0 = clock()
        if t0 >= end:
            return
        proof = next(proofs, None)
        if proof is None:
            tally.exhausted += 1
            return
        try:
            response = await http.post(
                url, content=BODY, headers={**headers, "dpop": proof.decode()}
            )
        except httpx.TransportError:
            tally.sent += 1
            tally.broken += 1
            continue
        t1 = clock()
        if t0 >= start and t1 <= end:
            tally.latencies.append(t1 - t0)
        tally.check(response.status_code, response.content)


async def hammer(
    target: Target, kind: str, warmup: float, duration: float, server_pid: int
) -> Tally:
    clients = len(target.tokens)
    tally = Tally()
    window = Window(asyncio.Barrier(clients + 1))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        tasks = [
            asyncio.ensure_future(
                httpx_client(target, i, window, tally, http)
                if kind == "httpx"
                else raw_client(target, i, window, tally)
            )
            for i in range(clients)
        ]
        await window.connected.wait()
        now = time.perf_counter()
        window.start, window.end = now + warmup, now + warmup + duration
        window.go.set()
        await asyncio.gather(watch_cpu(window, server_pid, tally), *tasks)
    return tally


# -- statistics and output --------------------------------------------------------------------


@dataclass
class Row:
    server: str
    store: str
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    sent: int
    non_200: int
    not_allow: int
    broken_connections: int
    exhausted_clients: int
    statuses: dict[str, int]
    cpu_cores: dict[str, float]
    server_cpu_us_per_request: float
    ratio_to_floor: float | None = None
    server_allow: float | None = None
    audit_records: int | None = None
    audit_ok: bool | None = None
    home_fs: str | None = None


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(server: str, store: str, tally: Tally, duration: float) -> Row:
    ordered = sorted(tally.latencies)
    ms = 1000.0
    return Row(
        server=server,
        store=store,
        requests=len(ordered),
        rps=round(len(ordered) / duration, 1),
        p50_ms=round(percentile(ordered, 0.50) * ms, 2),
        p90_ms=round(percentile(ordered, 0.90) * ms, 2),
        p99_ms=round(percentile(ordered, 0.99) * ms, 2),
        max_ms=round((ordered[-1] if ordered else math.nan) * ms, 2),
        mean_ms=round((sum(ordered) / len(ordered) if ordered else math.nan) * ms, 2),
        sent=tally.sent,
        non_200=tally.non_200,
        not_allow=tally.not_allow,
        broken_connections=tally.broken,
        exhausted_clients=tally.exhausted,
        statuses=tally.statuses,
        cpu_cores=tally.cpu,
        server_cpu_us_per_request=round(
            tally.cpu.get("server", math.nan) * duration / max(1, len(ordered)) * 1e6, 1
        ),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| server | store | decisions/s | p50 ms | p90 ms | p99 ms | max ms | vs floor "
        "| server CPU | server CPU µs/req | non-200 / broken | not allow |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "1.00" if r.ratio_to_floor is None else f"{r.ratio_to_floor:.2f}"
        cores = r.cpu_cores.get("server", math.nan)
        lines.append(
            f"| {r.server} | {r.store} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.max_ms:.2f} | {ratio} | {cores:.2f} cores "
            f"| {r.server_cpu_us_per_request:,.0f} | {r.non_200} / {r.broken_connections} "
            f"| {r.not_allow} |"
        )
    return "\n".join(lines)


def source_state() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        return {"commit": None, "src_dirty": None}
    return {"commit": commit or None, "src_dirty": any(line.strip() for line in dirty)}


def http_stack() -> dict[str, str]:
    """What uvicorn's ``auto`` settings pick in this environment (as in ``tether serve``)."""
    found = {name: importlib.util.find_spec(name) is not None for name in ("httptools", "uvloop")}
    return {
        "http": "httptools" if found["httptools"] else "h11",
        "loop": "uvloop" if found["uvloop"] else "asyncio",
    }


# -- the run ----------------------------------------------------------------------------------


def run_load(target: Target, opts: argparse.Namespace, server_pid: int) -> Tally:
    """Run the generator in this process, on its own CPU when pinning."""
    previous = os.sched_getaffinity(0) if opts.pin else None
    if opts.pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        return asyncio.run(hammer(target, opts.client, opts.warmup, opts.duration, server_pid))
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)


def run_floor(work: Path, opts: argparse.Namespace, token: str, proof: bytes) -> Row:
    server = start_floor(work, pin=opts.pin)
    try:
        # The same headers as a decision (a real task token and proof), so parsing them
        # costs the same; the floor never looks at them.
        tokens = [token] * opts.clients
        proofs: list[Iterator[bytes]] = [repeat(proof) for _ in range(opts.clients)]
        assert server.process is not None
        tally = run_load(Target(server.port, "/bare", tokens, proofs), opts, server.process.pid)
    finally:
        server.stop()
    return summarize("bare Litestar (floor)", "none", tally, opts.duration)


def run_tether(srv: TetherServer, store: str, opts: argparse.Namespace, floor_rps: float) -> Row:
    try:
        pace = max(floor_rps, TARGET_RPS) * PROOF_MARGIN * (opts.warmup + opts.duration + 1.0)
        per_client = min(math.ceil(pace / opts.clients), MAX_PROOFS // opts.clients)
        started = time.perf_counter()
        signed = sign_all(srv.key, srv.tokens, per_client, srv.server.url)
        print(
            f"  signed {per_client * opts.clients:,} proofs in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        proofs: list[Iterator[bytes]] = [iter(p) for p in signed]
        assert srv.server.process is not None
        target = Target(srv.server.port, "/v1/decisions", srv.tokens, proofs)
        tally = run_load(target, opts, srv.server.process.pid)
        del signed, proofs
        workers = int(srv.server.argv[srv.server.argv.index("--workers") + 1])
        name = "tether serve" + (f" --workers {workers}" if workers > 1 else "")
        row = summarize(name, store, tally, opts.duration)
        if workers == 1:  # with more, /metrics answers for the one worker it reached
            text = httpx.get(
                f"http://{HOST}:{srv.server.port}/metrics",
                headers={"Authorization": f"Bearer {srv.admin.requests.admin}"},
                timeout=30,
            ).text
            row.server_allow = metric_total(text, "tether_decisions_total", effect="allow")
        report = srv.admin.verify_audit()
        row.audit_records, row.audit_ok = report["records"], report["ok"]
        row.home_fs = filesystem(srv.home)
    finally:
        srv.admin.close()
        srv.server.stop()
    return row


def run_postgres(work: Path, opts: argparse.Namespace, floor_rps: float, workers: int) -> Row:
    """``tether serve --workers N`` over a fresh PostgreSQL schema, dropped afterwards.
    Not pinned: the workers, PostgreSQL and the generator share the machine's cores."""
    import psycopg  # noqa: PLC0415 - only this mode needs it

    from tether.store import url_with_schema  # noqa: PLC0415

    schema = f"tether_http_bench_{os.getpid()}_{workers}"
    with psycopg.connect(opts.database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        url = url_with_schema(opts.database_url, schema)
        srv = start_tether(
            work / "home", opts.clients, pin=False, database_url=url, workers=workers
        )
        return run_tether(srv, "postgresql", opts, floor_rps)
    finally:
        with psycopg.connect(opts.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="timed seconds per server")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first")
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="raw asyncio HTTP/1.1 (default) or httpx.AsyncClient",
    )
    parser.add_argument(
        "--tmpfs",
        action="store_true",
        help="also run tether with its home on /dev/shm (no fsync cost), for comparison",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the servers to CPU 0 and the generator to CPU 1",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also run tether over PostgreSQL with one worker and with --workers 2 (the "
        "servers not pinned), and report the scaling factor",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TETHER_TEST_DATABASE", "postgresql://postgres@127.0.0.1:5432/test"),
        help="the PostgreSQL database --postgres uses (a fresh schema, dropped after)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the homes and server logs")
    parser.add_argument("--out", type=Path, default=RESULTS / "http_authorize.json")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.pin = opts.pin and can_pin()
    if opts.serve_floor is None:
        # Every proof is signed before the clock starts and must still be fresh at the end.
        if opts.warmup + opts.duration > PROOF_LIFETIME - 15:
            parser.error(f"--warmup + --duration must stay under {PROOF_LIFETIME - 15:g} s")
        if opts.clients < 1 or opts.duration <= 0 or opts.warmup < 0:
            parser.error("--clients, --duration and --warmup must be positive")
        if opts.tmpfs and not SHM.is_dir():
            parser.error("--tmpfs needs /dev/shm")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.serve_floor is not None:
        serve_floor(opts.serve_floor)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The on-disk home lives beside the results (gitignored), never in a tmpfs /tmp.
    work = Path(tempfile.mkdtemp(prefix="http_authorize-", dir=RESULTS))
    shm = Path(tempfile.mkdtemp(prefix="tether-http-", dir=SHM)) if opts.tmpfs else None
    if filesystem(work) == "tmpfs":
        print(f"warning: {work} is on tmpfs; the disk row will not pay for fsync", flush=True)
    rows: list[Row] = []
    stack = http_stack()
    try:
        print(
            f"{opts.clients} clients, {opts.warmup:g} s warm-up + {opts.duration:g} s timed, "
            f"{opts.client} client, {'pinned' if opts.pin else 'not pinned'}, "
            f"uvicorn with {stack['http']} on {stack['loop']}",
            flush=True,
        )
        # Set up the on-disk server first: the floor gets the same headers (a real token).
        srv = start_tether(work / "home", opts.clients, pin=opts.pin)
        try:
            proof = srv.key.prove(srv.tokens[0], TOOL, ARGS, now=time.time(), htu=srv.server.url)
            print("floor: bare Litestar, POST /bare", flush=True)
            floor = run_floor(work, opts, srv.tokens[0], proof.encode())
        except BaseException:
            srv.admin.close()
            srv.server.stop()
            raise
        rows.append(floor)
        print("tether serve, home on disk: POST /v1/decisions", flush=True)
        rows.append(run_tether(srv, "disk", opts, floor.rps))
        if shm is not None:
            print("tether serve, home on tmpfs (/dev/shm): POST /v1/decisions", flush=True)
            srv = start_tether(shm / "home", opts.clients, pin=opts.pin)
            rows.append(run_tether(srv, "tmpfs", opts, floor.rps))
        if opts.postgres:
            for workers in (1, 2):
                print(f"tether serve --workers {workers} over PostgreSQL", flush=True)
                rows.append(run_postgres(work / f"pg-{workers}", opts, floor.rps, workers))
        for row in rows[1:]:
            row.ratio_to_floor = round(row.rps / floor.rps, 3) if floor.rps else None
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
            if shm is not None:
                shutil.rmtree(shm, ignore_errors=True)
        else:
            print(f"kept {work}" + (f" and {shm}" if shm else ""))

    print()
    print(table(rows))
    print()
    main_row = next(r for r in rows if r.store == "disk")
    checks = {
        "throughput": main_row.rps >= TARGET_RPS,
        "p99": main_row.p99_ms <= TARGET_P99_MS,
        "all_allow": all(
            r.non_200 == 0 and r.not_allow == 0 and r.broken_connections == 0 for r in rows
        ),
        "enough_proofs": all(r.exhausted_clients == 0 for r in rows),
    }
    print(
        f"tether (disk): {main_row.rps:,.0f} decisions/s (target >= {TARGET_RPS:,.0f}), "
        f"p99 {main_row.p99_ms:.2f} ms (target <= {TARGET_P99_MS:g} ms), "
        f"{main_row.ratio_to_floor or 0:.2f}x the floor's throughput"
    )
    for r in rows:
        if r.audit_records is not None:
            counted = "" if r.server_allow is None else f"{r.server_allow:,.0f} allows counted, "
            print(
                f"  {r.server} ({r.store}): {counted}{r.sent:,} requests sent; audit chain "
                f"{r.audit_records:,} records, ok={r.audit_ok}; home on {r.home_fs}"
            )
    noisy = [r for r in rows if r.cpu_cores.get("rest_of_machine", 0.0) > NOISE_CORES]
    for r in noisy:
        print(
            f"  warning: the rest of the machine used {r.cpu_cores['rest_of_machine']:.2f} "
            f"cores during the {r.server} ({r.store}) run: the figures are not from a quiet "
            "machine"
        )
    pg = {r.server: r for r in rows if r.store == "postgresql"}
    scaling = None
    if len(pg) == 2:
        one, two = pg["tether serve"], pg["tether serve --workers 2"]
        scaling = round(two.rps / one.rps, 3) if one.rps else None
        print(
            f"  postgresql: {one.rps:,.0f} decisions/s with one worker, {two.rps:,.0f} with "
            f"--workers 2: a scaling factor of {scaling}"
        )
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "environment": {
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "system": platform.system(),
                    "cpus": os.cpu_count(),
                    "tether": tether.__version__,
                    "litestar": metadata.version("litestar"),
                    "uvicorn": metadata.version("uvicorn"),
                    "httpx": metadata.version("httpx"),
                    "source": source_state(),
                },
                "settings": {
                    "clients": opts.clients,
                    "duration_s": opts.duration,
                    "warmup_s": opts.warmup,
                    "client": opts.client,
                    "pinned": opts.pin,
                    "server_cpu": SERVER_CPU if opts.pin else None,
                    "client_cpu": CLIENT_CPU if opts.pin else None,
                    "http_stack": stack,
                    "proofs_signed_per_client_margin": PROOF_MARGIN,
                    "tool": TOOL,
                    "body_bytes": len(BODY),
                },
                "targets": {"decisions_per_s": TARGET_RPS, "p99_ms": TARGET_P99_MS},
                "checks": checks,
                "workers_scaling_postgresql": scaling,
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {opts.out.relative_to(ROOT) if opts.out.is_relative_to(ROOT) else opts.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
