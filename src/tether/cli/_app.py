"""The ``tether`` command line (typer + rich): the operator's client of the API.

Every verb that reads or changes the control plane sends its request to the server
named by ``--server`` / ``$TETHER_SERVER``, with the admin credential of
``$TETHER_TOKEN`` or of a 0600 file (``--token-file`` / ``$TETHER_TOKEN_FILE``); the
server checks the credential's role and names its owner in the receipt
(:mod:`tether.cli._client`). The store is opened here, with the KEK, only for
bootstrap (``init``, ``migrate``, the first admin credential), by the serving
processes (``serve``, ``gateway``), and in break-glass mode (``--break-glass`` or
``$TETHER_BREAK_GLASS=1``): then the same API is served inside this process over the
local store, after a receipt naming the OS user.

Every verb takes ``--json`` (one JSON object on stdout, instants in RFC 3339) and
``--home DIR`` (default ``$TETHER_HOME``, else ``./.tether``). Errors are one line on
stderr and a non-zero exit: 1 for a refusal or failure, 2 for bad usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tether._errors import Conflict, InvalidPolicy, TetherError, UsageError
from tether._tether import Tether
from tether.cli._client import (
    SERVER_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    Client,
    NoServer,
    Target,
    resolve_target,
)
from tether.core._intent import decode_intent
from tether.core._risk import Control, risk_tags
from tether.core._verify import strict_json
from tether.identity._credentials import credential_dict
from tether.tokens import ProofKey

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Tether: intent-bound authority for AI agents.",
)
identity_app = typer.Typer(no_args_is_help=True, help="Register, inspect and offboard identities.")
template_app = typer.Typer(no_args_is_help=True, help="Intent templates agents open tasks from.")
policy_app = typer.Typer(no_args_is_help=True, help="Cedar policies.")
task_app = typer.Typer(no_args_is_help=True, help="Open, inspect and end tasks.")
audit_app = typer.Typer(no_args_is_help=True, help="The receipt chain.")
keys_app = typer.Typer(no_args_is_help=True, help="Signing keys of the trust domain.")
app.add_typer(identity_app, name="identity")
app.add_typer(template_app, name="template")
app.add_typer(policy_app, name="policy")
app.add_typer(task_app, name="task")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
admin_app = typer.Typer(no_args_is_help=True, help="Admin credentials for humans.")
app.add_typer(admin_app, name="admin")
approval_app = typer.Typer(no_args_is_help=True, help="Human approvals of held calls.")
app.add_typer(approval_app, name="approval")
secret_app = typer.Typer(
    no_args_is_help=True,
    help="Brokered secrets: sealed, versioned, write-only (no verb ever prints a value).",
)
app.add_typer(secret_app, name="secret")
lease_app = typer.Typer(no_args_is_help=True, help="Leases of brokered credentials.")
app.add_typer(lease_app, name="lease")
catalogue_app = typer.Typer(
    no_args_is_help=True,
    help="The tool catalogue every door judges calls by (side effect, sensitivity, sinks).",
)
app.add_typer(catalogue_app, name="catalogue")

out = Console(highlight=False, soft_wrap=True)
_global_home: list[Path] = []


#: Set when the operator asks to open the store directly, bypassing the server.
BREAK_GLASS_ENV = "TETHER_BREAK_GLASS"
#: The base URL of the in-process API a break-glass command talks to (never a socket).
BREAK_GLASS_URL = "http://break-glass.tether.invalid"


@dataclass
class _Plane:
    """Where this command's requests go: the options of the root command."""

    server: str | None = None
    token_file: Path | None = None
    break_glass: bool = False


_plane = _Plane()
#: The API clients this command made: closed by :func:`main` on the way out.
_clients: list[Client] = []


def _version(value: bool) -> None:
    if value:
        from tether import __version__  # noqa: PLC0415

        out.print(f"tether {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Tether home (default $TETHER_HOME, else ./.tether)."),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help=f"URL of the Tether server every command talks to (default ${SERVER_ENV}).",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help=f"a 0600 file holding the admin credential (default ${TOKEN_FILE_ENV}, "
            f"else the credential itself in ${TOKEN_ENV}).",
            show_default=False,
        ),
    ] = None,
    break_glass: Annotated[
        bool,
        typer.Option(
            "--break-glass",
            help=f"open the local store with the KEK instead of asking a server (also "
            f"${BREAK_GLASS_ENV}=1): every change is attributed to break-glass:$USER and a "
            "receipt records the break-glass use.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _global_home.clear()
    if home is not None:
        _global_home.append(home)
    _plane.server, _plane.token_file = server, token_file
    _plane.break_glass = break_glass or os.environ.get(BREAK_GLASS_ENV, "").lower() in (
        "1",
        "true",
        "yes",
    )


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Tether home (default $TETHER_HOME, else ./.tether).", show_default=False
    ),
]


def home_dir(home: Path | None) -> Path:
    if home is not None:
        return home
    if _global_home:
        return _global_home[0]
    return Path(os.environ.get("TETHER_HOME") or ".tether")


#: Members holding an instant that are not named ``*_at``.
_INSTANTS = frozenset({"at", "verify_until", "usable_until"})


def rfc3339(at: float) -> str:
    """An instant (seconds since the epoch) as RFC 3339 in UTC: ``2026-12-05T21:07:56Z``,
    with milliseconds when it has a fraction of a second."""
    whole = int(at)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    millis = round((at - whole) * 1000)
    if millis == 1000:
        return rfc3339(float(whole + 1))
    return f"{text}.{millis:03d}Z" if millis else f"{text}Z"


def instants_as_text(value: Any, key: str = "") -> Any:
    """``value`` with every instant (a number under a member named ``*_at``, ``at``,
    ``verify_until`` or ``usable_until``) as RFC 3339 text."""
    if isinstance(value, dict):
        return {k: instants_as_text(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [instants_as_text(v, key) for v in value]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and (key.endswith("_at") or key in _INSTANTS):
        return rfc3339(float(value))
    return value


def emit(value: dict[str, Any], as_json: bool, human: Callable[[], None] | None = None) -> None:
    if as_json or human is None:
        text = json.dumps(instants_as_text(value), sort_keys=True, default=str)
        sys.stdout.write(text + "\n")
    else:
        human()


#: The trust domains this command opened: closed by :func:`main` on the way out, which
#: signs a tree head over the receipts the command (or server) wrote.
_opened: weakref.WeakSet[Tether] = weakref.WeakSet()


def _open(home: Path | None) -> Tether:
    """The local store, opened with the KEK: for bootstrap and the gateway's host."""
    tether = Tether.open(home_dir(home))
    _opened.add(tether)
    return tether


def _os_user() -> str:
    import getpass  # noqa: PLC0415

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _verbs(typer_app: typer.Typer, prefix: str) -> dict[Any, str]:
    """The code of every command callback of ``typer_app`` and the words that run it."""
    found: dict[Any, str] = {}
    for command in typer_app.registered_commands:
        if command.callback is not None:
            name = command.name or command.callback.__name__.replace("_", "-")
            found[command.callback.__code__] = f"{prefix} {name}"
    for group in typer_app.registered_groups:
        if group.typer_instance is not None and group.name:
            found.update(_verbs(group.typer_instance, f"{prefix} {group.name}"))
            callback = group.typer_instance.registered_callback
            if callback is not None and callback.callback is not None:
                found[callback.callback.__code__] = f"{prefix} {group.name}"
    return found


def _command_path() -> str:
    """The words of the command running now (``tether identity disable``), never its
    arguments: found by the command's callback on the call stack."""
    verbs = _verbs(app, "tether")
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in verbs:
            return verbs[frame.f_code]
        frame = frame.f_back  # type: ignore[assignment]
    return "tether"


def _break_glass_open(home: Path | None) -> Tether:
    """The local store in break-glass mode: opened with the KEK, and a receipt that says
    so, who ran it (the OS user) and what (the command, never its arguments)."""
    tether = _open(home)
    user = _os_user()
    tether.audit.append(
        "cli.break_glass",
        chain=[f"break-glass:{user}"],
        effect="allow",
        reasons=[{"code": "cli.break_glass", "message": "the store was opened directly"}],
        detail={
            "os_user": user,
            "host": socket.gethostname()[:255],
            "command": _command_path()[:200],
            "pid": os.getpid(),
        },
        risk_tags=list(risk_tags(Control.AUDIT)),
    )
    return tether


class _BreakGlassAuth:
    """The in-process API's authenticator in break-glass mode: every request is the
    operator at the console of the store's host, an admin named ``break-glass:<user>``."""

    def __init__(self, name: str) -> None:
        from tether.server._auth import Principal  # noqa: PLC0415

        self.principal = Principal("admin", "break-glass", "admin", name)

    def authenticate(self, _request: Any) -> Any:
        return self.principal


def _api(home: Path | None = None) -> Client:
    """The API this command talks to: the server (``--server``/``$TETHER_SERVER``) with
    the operator's credential; or, in break-glass mode, the same API served in this
    process over the local store (no socket), after a break-glass receipt."""
    if _plane.break_glass:
        from litestar.testing import TestClient  # noqa: PLC0415

        from tether.server import ServerSettings, create_app  # noqa: PLC0415

        tether = _break_glass_open(home)
        name = f"break-glass:{_os_user()}"
        settings = ServerSettings(rate=0.0, log_level="WARNING", reap_interval=0.0)
        server = create_app(tether, settings)
        server.state.ctx.auth = _BreakGlassAuth(name)
        http = TestClient(server, base_url=BREAK_GLASS_URL)
        client = Client(Target(BREAK_GLASS_URL, None), http=http, principal_name=name)
    else:
        target = resolve_target(_plane.server, _plane.token_file)
        if target is None:
            raise NoServer(
                f"no Tether server to talk to: set {SERVER_ENV}=https://tether.example (or "
                f"pass --server URL) and {TOKEN_ENV} to an admin credential (or "
                f"{TOKEN_FILE_ENV} / --token-file to a 0600 file holding one); on the "
                f"store's own host, --break-glass (or {BREAK_GLASS_ENV}=1) opens the store "
                "directly and leaves a receipt saying so"
            )
        client = Client(target)
    _clients.append(client)
    return client


def _attributed(client: Client, by: str | None) -> None:
    """Refuse ``--by`` naming anyone but the authenticated principal: the server
    attributes the action to the credential, never to a name the operator typed."""
    if by is None:
        return
    name = client.principal_name()
    if by != name:
        raise UsageError(
            f"--by {by!r} is not who this credential is ({name!r}): actions are attributed "
            "to the authenticated principal; drop --by"
        )


def _store_only(home: Path | None) -> Tether:
    """The local store for a command the API does not offer: break-glass mode only."""
    if not _plane.break_glass:
        raise NoServer(
            f"'{_command_path()}' works on the store itself, which the API does not offer: "
            f"run it on the store's host with --break-glass (or {BREAK_GLASS_ENV}=1); "
            "a receipt records who did"
        )
    return _break_glass_open(home)


def _initialised(home: Path | None) -> bool:
    """Whether the home (and its store) already holds a trust domain."""
    try:
        Tether.open(home_dir(home)).close()
    except TetherError:
        return False
    return True


# -- init, bundle, keys -----------------------------------------------------------------
@app.command()
def init(
    trust_domain: Annotated[str, typer.Option("--trust-domain", help="e.g. acme.example")],
    admin: Annotated[str | None, typer.Option("--admin", help="email of the first admin")] = None,
    credential_file: Annotated[
        Path | None,
        typer.Option(
            "--credential-file",
            help="write the first admin credential to this new 0600 file, not to the "
            "terminal (for compose: never a log)",
        ),
    ] = None,
    credential_secret: Annotated[
        str | None,
        typer.Option(
            "--credential-secret",
            help="inside a Kubernetes pod: create this Secret ([NAMESPACE/]NAME, key "
            "'credential') with the first admin credential, as the pod's service account "
            "(never a log; never overwritten)",
            show_default=False,
        ),
    ] = None,
    ttl: TtlOpt = None,
    exists_ok: Annotated[
        bool,
        typer.Option(
            "--exists-ok",
            help="a home (or database) that already holds a trust domain is left as it is, "
            "exit 0 (a bootstrap job run again)",
        ),
    ] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Create a trust domain: signing key, X.509 CA, sealed at rest; and an admin credential,
    shown once (or written to ``--credential-file`` or ``--credential-secret``)."""
    from tether.cli._k8s import SecretWriter, in_cluster  # noqa: PLC0415

    if credential_file is not None and credential_secret is not None:
        raise UsageError("give --credential-file or --credential-secret, not both")

    def left_as_it_is(why: str) -> None:
        emit(
            {"home": str(home_dir(home)), "created": False},
            as_json,
            lambda: out.print(f"{why}: left as it is"),
        )

    delivering = credential_file is not None or credential_secret is not None
    if exists_ok and delivering and _initialised(home):
        # Run again (a bootstrap job): nothing to make, nothing to deliver.
        left_as_it_is("the trust domain exists")
        return
    if credential_file is not None and credential_file.exists():
        raise UsageError(f"{credential_file} exists: a credential file is never overwritten")
    writer = SecretWriter(in_cluster(credential_secret)) if credential_secret else None
    try:
        if writer is not None:
            writer.check_absent()  # before anything is made that could not be delivered
        try:
            tether = Tether.init(home_dir(home), trust_domain)
        except Conflict as exc:
            if not exists_ok:
                raise
            left_as_it_is(exc.message)
            return
        _opened.add(tether)
        keys = tether.jwks()["keys"]
        row, secret = tether.credentials.create(
            "admin", admin or f"admin@{trust_domain}", ttl=ttl, by="tether init"
        )
        delivered: dict[str, Any] = {"admin_credential": secret}
        try:
            if credential_file is not None:
                write_secret_file(credential_file, secret)
                delivered = {"credential_file": str(credential_file)}
            elif writer is not None:
                writer.create(secret, credential_id=row.credential_id, expires_at=row.expires_at)
                delivered = {"credential_secret": writer.where}
        except TetherError as exc:
            # Not delivered: disabled now, so no copy of it can ever be used; the store
            # has no live admin credential, so 'tether admin create' makes the next one.
            tether.credentials.disable(row.credential_id, by="tether init", reason="not delivered")
            raise type(exc)(
                f"{exc.message}; the trust domain was made and its admin credential "
                f"{row.credential_id} disabled: make another on the store's host with "
                "'tether admin create --role admin --owner EMAIL --output FILE'",
                code=exc.code,
            ) from None
    finally:
        if writer is not None:
            writer.close()
    result = {
        "trust_domain": tether.trust_domain,
        "home": str(home_dir(home)),
        "jwt_kid": keys[0]["kid"],
        "credential_id": row.credential_id,
        "expires_at": row.expires_at,
        **delivered,
    }

    def human() -> None:
        out.print(
            f"[green]✓[/] trust domain [bold]{tether.trust_domain}[/] created in {home_dir(home)}"
        )
        if "admin_credential" in delivered:
            out.print(f"admin credential (shown once, stored hashed): {secret}")
        else:
            where = delivered.get("credential_file") or delivered.get("credential_secret")
            mode = " (0600)" if "credential_file" in delivered else ""
            out.print(f"admin credential {row.credential_id} written to {where}{mode}")

    emit(result, as_json, human)


@app.command()
def migrate(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="postgresql://... (default $TETHER_DATABASE_URL)",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create or upgrade the PostgreSQL store's schema to the newest revision."""
    from tether.store import database_url as configured_url  # noqa: PLC0415
    from tether.store import migrate as run_migrations  # noqa: PLC0415
    from tether.store._postgres import redact, schema_of  # noqa: PLC0415

    url = configured_url(database_url)
    if url is None:
        raise UsageError("no database: set TETHER_DATABASE_URL or pass --database-url")
    before, after = run_migrations(url)
    result = {
        "database": redact(url),
        "schema": schema_of(url),
        "from_revision": before,
        "revision": after,
    }

    def human() -> None:
        change = "already at" if before == after else f"{before or 'empty'} →"
        out.print(f"[green]✓[/] {result['database']}: {change} revision {after}")

    emit(result, as_json, human)


@app.command()
def bundle(
    fmt: Annotated[str, typer.Option("--format", help="spiffe or jwks")] = "spiffe",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Export the trust bundle (SPIFFE bundle, or the JWKS of the JWT keys)."""
    if fmt not in ("spiffe", "jwks"):
        raise UsageError("--format must be spiffe or jwks")
    path = "/.well-known/spiffe-bundle" if fmt == "spiffe" else "/.well-known/jwks.json"
    emit(_api(home).request("GET", path, authenticated=False), True)


@keys_app.command("rotate")
def keys_rotate(
    use: Annotated[str, typer.Option("--use", help="jwt-svid or x509-ca")] = "jwt-svid",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Rotate a signing key; the old one keeps verifying until what it signed expires."""
    if use not in ("jwt-svid", "x509-ca"):
        raise UsageError("--use must be jwt-svid or x509-ca")
    kid = _store_only(home).rotate_keys(use)
    emit({"use": use, "kid": kid}, as_json, lambda: out.print(f"[green]✓[/] new {use} key {kid}"))


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Every signing key row: its use, state, and whether it is authentic (a row that fails
    authentication under the KEK is ignored for signing and verifying)."""
    tether = _store_only(home)
    from tether.tokens._keys import key_status  # noqa: PLC0415

    now = tether.clock.now()
    keys = [
        {
            "kid": row.kid,
            "use": row.use,
            "status": key_status(row, now) if ok else "unauthenticated (ignored)",
            "authentic": ok,
            "problem": None if ok else tether.keys.rejected.get(row.kid),
            "created_at": row.created_at,
            "retired_at": row.retired_at,
            "verify_until": row.verify_until,
            "revoked_at": row.revoked_at,
        }
        for row, ok in tether.keys.all_keys()
    ]

    def human() -> None:
        table = Table("kid", "use", "status", "problem")
        for k in keys:
            style = "" if k["authentic"] else "[red]"
            table.add_row(
                str(k["kid"]), str(k["use"]), f"{style}{k['status']}", str(k["problem"] or "")
            )
        out.print(table)

    emit({"keys": keys}, as_json, human)
    if any(not k["authentic"] for k in keys):
        raise typer.Exit(1)


@keys_app.command("revoke")
def keys_revoke(
    kid: str,
    now: Annotated[bool, typer.Option("--now", help="revoke at once (an emergency)")] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Revoke a signing key at once: nothing it signed verifies any more, on every node
    from its next call (a key still signing is replaced first)."""
    if not now:
        raise UsageError("revocation is immediate: pass --now (or 'tether keys rotate')")
    result = _store_only(home).revoke_key(kid, by=f"break-glass:{_os_user()}")
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[green]✓[/] {kid} revoked"
            + (f"; new {result['use']} key {result['successor']}" if result["successor"] else "")
        ),
    )


@keys_app.command("adopt")
def keys_adopt(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Once, after upgrading a store made before keys and receipts were authenticated:
    tag its key rows and accept its receipts so far (run it before anyone else can have
    written the store)."""
    tether = _store_only(home)
    kids = tether.keys.adopt(tether.clock.now())
    upto = tether.audit.mark_untagged()
    result = {"adopted": kids, "untagged_receipts": upto}
    emit(result, as_json, lambda: out.print(f"[green]✓[/] adopted {len(kids)} keys"))


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8700,
    rate: Annotated[float, typer.Option("--rate", help="requests/s per principal")] = 2000.0,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            help="HOST:PORT of a listener serving /metrics alone (an internal interface); "
            "$TETHER_METRICS_TOKEN, if set, is required there too",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="server processes sharing the listener (PostgreSQL only); each is a node "
            "and applies --rate on its own",
        ),
    ] = 1,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Serve the HTTP API (and /metrics, /openapi.json) over the home's store.

    ``/metrics`` on the API's listener takes an admin or auditor credential, or
    ``Authorization: Bearer $TETHER_METRICS_TOKEN``. ``--workers N`` runs N processes
    over one PostgreSQL store (refused over SQLite)."""
    import uvicorn  # noqa: PLC0415 - keeps every other verb fast to start

    from tether.observability import configure_tracing  # noqa: PLC0415
    from tether.server import ServerSettings, create_app, create_metrics_app  # noqa: PLC0415

    metrics_at: tuple[str, int] | None = None
    if metrics_listen is not None:
        m_host, _, m_port = metrics_listen.rpartition(":")
        if not m_host or not m_port.isdigit() or not 0 < int(m_port) < 65536:
            raise UsageError("--metrics-listen must be HOST:PORT")
        metrics_at = (m_host.strip("[]"), int(m_port))
    tether = _open(home)
    configure_tracing()  # only when the OTEL_* variables ask for export
    settings = ServerSettings(
        rate=rate, burst=rate * 2, metrics_token=os.environ.get("TETHER_METRICS_TOKEN") or None
    )
    if workers > 1:
        from tether.server._workers import (  # noqa: PLC0415
            WORKER_ENV,
            refuse_sqlite,
            worker_environment,
        )

        refuse_sqlite(tether, workers)
        if metrics_at is not None:
            raise UsageError("--metrics-listen serves one process: not with --workers")
        os.environ[WORKER_ENV] = worker_environment(home_dir(home).resolve(), settings)
        sys.stderr.write(
            f"tether: serving {tether.trust_domain} on http://{host}:{port} "
            f"with {workers} workers\n"
        )
        tether.close()  # each worker opens its own store
        uvicorn.run(
            "tether.server._workers:worker_app",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            proxy_headers=False,
        )
        return
    app = create_app(tether, settings)
    sys.stderr.write(f"tether: serving {tether.trust_domain} on http://{host}:{port}\n")
    if metrics_at is None:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # the per-address limits are not the caller's to choose
        )
        return
    sys.stderr.write(f"tether: /metrics on http://{metrics_at[0]}:{metrics_at[1]}\n")

    class MetricsServer(uvicorn.Server):
        """The API's server takes the signals; this one stops when it does."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    servers = [
        cls(
            uvicorn.Config(
                a, host=h, port=p, log_level="warning", access_log=False, proxy_headers=False
            )
        )
        for cls, a, h, p in (
            (uvicorn.Server, app, host, port),
            (MetricsServer, create_metrics_app(app), *metrics_at),
        )
    ]

    async def both() -> None:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:  # one stopped (a signal, a failed bind): stop the other
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(both())


gateway_app = typer.Typer(
    no_args_is_help=False, help="The MCP gateway (enforcement point).", invoke_without_command=True
)
app.add_typer(gateway_app, name="gateway")


@gateway_app.callback()
def gateway(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="gateway TOML file")] = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port")] = None,
    home: HomeOpt = None,
) -> None:
    """Serve the MCP gateway in front of the configured upstream MCP servers."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        raise UsageError("give --config FILE")
    from tether.gateway import run_gateway  # noqa: PLC0415 - keeps other verbs fast

    chosen = home if home is not None else (_global_home[0] if _global_home else None)
    if chosen is None and os.environ.get("TETHER_HOME"):
        chosen = Path(os.environ["TETHER_HOME"])
    run_gateway(config, chosen, host=host, port=port)


GatewayByOpt = Annotated[
    str | None,
    typer.Option(
        "--by",
        help="refused unless it names the authenticated principal: a pin is attributed "
        "to the credential that made it (break-glass:$USER with --break-glass)",
        show_default=False,
    ),
]


def _shown(text: str) -> str:
    """An upstream's word (a tool name), safe to print: no markup, no control characters."""
    return escape(text if text.isprintable() else repr(text))


def _gateway_home(home: Path | None, configured: str | None) -> Path:
    """The Tether home of a gateway command: --home, then $TETHER_HOME, then the
    configuration's ``home``, else ./.tether (as ``tether gateway --config`` serves)."""
    if home is not None:
        return home
    if _global_home:
        return _global_home[0]
    if os.environ.get("TETHER_HOME"):
        return Path(os.environ["TETHER_HOME"])
    return Path(configured) if configured else Path(".tether")


def _pin_api(home: Path, by: str | None) -> Client:
    """The API that pins reviewed definitions: the server, or break-glass over ``home``;
    checked before the upstream is contacted, so a refusal costs nothing."""
    if not _plane.break_glass and resolve_target(_plane.server, _plane.token_file) is None:
        raise NoServer(
            f"pinning goes through the server: set {SERVER_ENV} and {TOKEN_ENV} (or "
            f"{TOKEN_FILE_ENV}) to an admin's; on the store's host, --break-glass (a receipt "
            "records who did); 'tether gateway catalogue --no-pin' only prints the draft"
        )
    client = _api(home)
    _attributed(client, by)
    return client


def _pin(client: Client, upstream: str, tools: list[Any], *, dry_run: bool, source: str) -> Any:
    wire = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]
    body = {"upstream": upstream, "tools": wire, "dry_run": dry_run, "source": source}
    return client.post("/v1/pins", body)


@gateway_app.command("catalogue")
def gateway_catalogue(
    config: Annotated[Path, typer.Option("--config", help="gateway TOML file")],
    upstream: Annotated[str, typer.Option("--upstream", help="upstream name")],
    pin: Annotated[
        bool,
        typer.Option(
            "--pin/--no-pin",
            help="pin the printed tool definitions, through the server (or --break-glass)",
        ),
    ] = True,
    by: GatewayByOpt = None,
    home: HomeOpt = None,
) -> None:
    """Print a draft tool catalogue from an upstream's tools/list, for review, and pin the
    definitions it printed (a receipt for each new or changed pin, naming the
    authenticated admin)."""
    from tether.gateway._config import load_config  # noqa: PLC0415 - keeps other verbs fast
    from tether.gateway._import import draft_catalogue, read_upstream_tools  # noqa: PLC0415

    loaded = load_config(config, resolve_catalogues=False)
    target = loaded.upstream(upstream)
    client = _pin_api(_gateway_home(home, loaded.home), by) if pin else None
    tools = read_upstream_tools(target)
    draft = draft_catalogue(target, tools)
    named = [t for t in tools if t.name]
    if client is not None and named:
        done = _pin(client, target.name, named, dry_run=False, source="catalogue")
        sys.stderr.write(
            f"tether: pinned the definitions of {len(named)} tools of upstream "
            f"{target.name!r} ({len(done['changed'])} new or changed, by {done['by']})\n"
        )
    sys.stdout.write(draft)


@gateway_app.command("pin")
def gateway_pin(
    config: Annotated[Path, typer.Argument(help="gateway TOML file", show_default=False)],
    upstream: Annotated[str, typer.Argument(help="upstream name", show_default=False)],
    tool: Annotated[
        list[str] | None,
        typer.Option("--tool", help="pin only this tool (repeatable; default: every tool)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show what would change, pin nothing")
    ] = False,
    by: GatewayByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Pin an upstream's current tool definitions after reviewing them, through the server
    (a receipt per changed pin, naming the authenticated admin): a tool whose definition
    changed since it was pinned is hidden and refused by the gateway until it is pinned
    again. Prints the changes (previous and new digest)."""
    from tether.gateway._config import load_config  # noqa: PLC0415 - keeps other verbs fast
    from tether.gateway._import import read_upstream_tools  # noqa: PLC0415

    loaded = load_config(config, resolve_catalogues=False)
    target = loaded.upstream(upstream)
    client = _pin_api(_gateway_home(home, loaded.home), by)
    offered = {t.name: t for t in read_upstream_tools(target) if t.name}
    names = sorted(set(tool)) if tool else sorted(offered)
    missing = [n for n in names if n not in offered]
    if missing:
        raise UsageError(
            f"upstream {target.name!r} offers no tool named {', '.join(map(repr, missing))}"
        )
    if not names:
        raise UsageError(f"upstream {target.name!r} offers no tools to pin")
    done = _pin(client, target.name, [offered[n] for n in names], dry_run=dry_run, source="pin")
    changed: list[dict[str, Any]] = done["changed"]
    for c in changed:
        c["description"] = offered[c["tool"]].description or ""
    unchanged: list[str] = done["unchanged"]
    result = {
        "upstream": target.name,
        "dry_run": dry_run,
        "changed": changed,
        "unchanged": unchanged,
        "by": done["by"],
    }

    def human() -> None:
        verb = "would pin" if dry_run else "pinned"
        if not changed:
            out.print(f"[green]✓[/] upstream {target.name}: every pin is current")
        for c in changed:
            out.print(f"[green]✓[/] {verb} {target.name}.{_shown(c['tool'])}")
            out.print(f"    previous: {c['previous'] or '(not pinned)'}", markup=False)
            out.print(f"    new:      {c['digest']}", markup=False)
            out.print(f"    description: {c['description']!r}", markup=False)
        if unchanged:
            out.print("unchanged: " + ", ".join(map(_shown, unchanged)))

    emit(result, as_json, human)


TtlOpt = Annotated[
    float | None,
    typer.Option(
        "--ttl",
        help="seconds the credential lives (default $TETHER_CREDENTIAL_TTL or 30 days; "
        "at most 366 days)",
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="write the credential to this file (created 0600, never overwritten) "
        "instead of printing it",
    ),
]


def _iso(at: float) -> str:
    """An instant as ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def write_secret_file(path: Path, secret: str) -> None:
    """Write a secret to a new file, mode 0600 from its creation (never overwriting)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: a credential file is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")


def _issued(credential: dict[str, Any], secret: str, output: Path | None, as_json: bool) -> None:
    if output is not None:
        write_secret_file(output, secret)
    result = dict(credential)
    if output is None:
        result["credential"] = secret
    else:
        result["credential_file"] = str(output)

    def human() -> None:
        if output is None:
            out.print(secret, markup=False)
        else:
            out.print(
                f"[green]✓[/] credential {credential['credential_id']} ({credential['role']}, "
                f"{credential['owner']}) written to {output} (0600)"
            )

    emit(result, as_json, human)


ByOpt = Annotated[
    str | None,
    typer.Option(
        "--by",
        help="refused unless it names the authenticated principal: the server attributes "
        "every change to the credential that made it",
        show_default=False,
    ),
]


def _live_admin(tether: Tether, now: float) -> bool:
    return any(
        r.role == "admin" and credential_dict(r, now)["status"] == "enabled"
        for r in tether.credentials.list()
    )


@admin_app.command("create")
def admin_create(
    role: Annotated[str, typer.Option("--role", help="admin, owner, approver or auditor")],
    owner: Annotated[str, typer.Option("--owner", help="the human's email")],
    ttl: TtlOpt = None,
    output: OutputOpt = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Create an admin credential, expiring (shown once, stored hashed), through the
    server. With no server named, only the very first admin credential of a store that
    has no live one is made locally (bootstrap)."""
    if _plane.break_glass or resolve_target(_plane.server, _plane.token_file) is not None:
        client = _api(home)
        _attributed(client, by)
        body: dict[str, Any] = {"role": role, "owner": owner}
        if ttl is not None:
            body["ttl_seconds"] = ttl
        issued = client.post("/v1/credentials", body)
        _issued(issued["info"], issued["credential"], output, as_json)
        return
    tether = _open(home)
    if role != "admin" or _live_admin(tether, tether.clock.now()):
        raise NoServer(
            "this store has a live admin credential: create credentials through the server "
            f"({SERVER_ENV} and {TOKEN_ENV}); only the first admin credential is made locally"
        )
    bootstrap = f"bootstrap:{_os_user()}"
    if by is not None and by != bootstrap:
        raise UsageError(f"--by {by!r}: the first admin credential is made by {bootstrap}")
    row, secret = tether.credentials.create(role, owner, ttl=ttl, by=bootstrap)
    _issued(credential_dict(row, tether.clock.now()), secret, output, as_json)


@admin_app.command("list")
def admin_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Every admin credential: id, role, owner, status, expiry (never a secret or hash)."""
    rows: list[dict[str, Any]] = _api(home).get("/v1/credentials")

    def human() -> None:
        table = Table("credential", "role", "owner", "status", "expires")
        for r in rows:
            expires = r["expires_at"]
            table.add_row(
                r["credential_id"],
                r["role"],
                r["owner"],
                r["status"],
                "never" if expires is None else _iso(expires),
            )
        out.print(table)

    emit({"credentials": rows}, as_json, human)


@admin_app.command("show")
def admin_show(credential_id: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """One admin credential."""
    row = _api(home).get(f"/v1/credentials/{_segment(credential_id)}")
    emit(row, as_json, lambda: out.print_json(data=instants_as_text(row)))


@admin_app.command("disable")
def admin_disable(
    credential_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "",
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Disable an admin credential now (its console sessions end with it)."""
    client = _api(home)
    _attributed(client, by)
    result = client.post(f"/v1/credentials/{_segment(credential_id)}/disable", {"reason": reason})
    emit(result, as_json, lambda: out.print(f"[green]✓[/] credential {credential_id} disabled"))


@admin_app.command("rotate")
def admin_rotate(
    credential_id: str,
    ttl: TtlOpt = None,
    output: OutputOpt = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """A new secret for the same role and owner; the old credential is disabled at once."""
    client = _api(home)
    _attributed(client, by)
    body = {"ttl_seconds": ttl} if ttl is not None else {}
    issued = client.post(f"/v1/credentials/{_segment(credential_id)}/rotate", body)
    _issued(issued["info"], issued["credential"], output, as_json)


def _segment(value: str) -> str:
    """``value`` as one path segment of a URL."""
    from urllib.parse import quote  # noqa: PLC0415

    return quote(value, safe="")


@app.command("issuer")
def issuer_add(
    issuer: Annotated[str, typer.Option("--issuer", help="the iss of user tokens")],
    audience: Annotated[str, typer.Option("--audience")],
    jwks_file: Annotated[Path, typer.Option("--jwks", help="JWKS file of the issuer")],
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Trust a user-token issuer as a token-exchange subject."""
    try:
        jwks_doc = strict_json(jwks_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {jwks_file}: {exc}") from None
    _store_only(home).add_user_issuer(issuer, audience=audience, jwks=jwks_doc)
    emit(
        {"issuer": issuer, "audience": audience},
        as_json,
        lambda: out.print(f"[green]✓[/] trusting user tokens from {issuer}"),
    )


# -- identities ------------------------------------------------------------------------
@identity_app.command("register")
def identity_register(
    spiffe_id: str,
    kind: Annotated[str, typer.Option("--kind", help="agent, tool, service or human")],
    owner: Annotated[str, typer.Option("--owner", help="email of the accountable human")],
    description: Annotated[str, typer.Option("--description")] = "",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Register an identity by SPIFFE ID."""
    row = _api(home).post(
        "/v1/identities",
        {"spiffe_id": spiffe_id, "kind": kind, "owner": owner, "description": description},
    )
    emit(
        row,
        as_json,
        lambda: out.print(f"[green]✓[/] {row['kind']} {row['spiffe_id']} (owner {row['owner']})"),
    )


@identity_app.command("list")
def identity_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """List identities."""
    rows = _api(home).get("/v1/identities")["identities"]

    def human() -> None:
        table = Table("SPIFFE ID", "kind", "owner", "status")
        for r in rows:
            table.add_row(r["spiffe_id"], r["kind"], r["owner"], r["status"])
        out.print(table)

    emit({"identities": rows}, as_json, human)


@identity_app.command("show")
def identity_show(spiffe_id: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Show one identity."""
    row = _api(home).get("/v1/identity", spiffe_id=spiffe_id)
    emit(row, as_json, lambda: out.print_json(data=instants_as_text(row)))


@identity_app.command("disable")
def identity_disable(
    spiffe_id: str, by: ByOpt = None, as_json: JsonOpt = False, home: HomeOpt = None
) -> None:
    """Offboard an identity: disable it and revoke every task and token it holds (the
    receipt names the credential that did it)."""
    client = _api(home)
    _attributed(client, by)
    done = client.post("/v1/identities/disable", {"spiffe_id": spiffe_id})
    result = {**done["identity"], "revoked_tasks": done["revoked_tasks"]}
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[yellow]✓[/] {spiffe_id} disabled; {len(result['revoked_tasks'])} task(s) revoked"
        ),
    )


@identity_app.command("join-token")
def identity_join_token(
    spiffe_id: str,
    ttl: Annotated[float, typer.Option("--ttl", help="seconds")] = 600.0,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Mint a one-time join token a workload exchanges for its SVIDs."""
    made = _api(home).post("/v1/identities/join-token", {"spiffe_id": spiffe_id, "ttl": ttl})
    emit(made, as_json, lambda: out.print(made["join_token"]))


@app.command()
def attest(
    join_token: Annotated[str, typer.Option("--join-token")],
    out_dir: Annotated[Path, typer.Option("--out", help="where to write the SVID files")],
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Redeem a join token: a fresh key pair, a JWT-SVID and an X.509-SVID bound to it."""
    key = ProofKey()
    svids = _api(home).request(
        "POST", "/v1/attest", json={"join_token": join_token, "jwk": key.jwk}, authenticated=False
    )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(out_dir / "svid.key", key.to_pem())
    (out_dir / "svid.pem").write_text(svids["x509_svid_pem"])
    (out_dir / "svid.jwt").write_text(svids["jwt_svid"] + "\n")
    result = {
        "spiffe_id": svids["spiffe_id"],
        "expires_at": svids["expires_at"],
        "files": sorted(str(p) for p in out_dir.iterdir()),
    }
    emit(
        result,
        as_json,
        lambda: out.print(f"[green]✓[/] SVIDs for {result['spiffe_id']} written to {out_dir}"),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# -- templates and policies ---------------------------------------------------------------
def _read_table(file: Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file holding one table."""
    import tomllib  # noqa: PLC0415

    try:
        text = file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if file.suffix == ".toml" else strict_json(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise UsageError(f"{file}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file} must hold a table")
    return data


@template_app.command("add")
def template_add(file: Path, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Add or replace an intent template (TOML or JSON)."""
    template = _api(home).post("/v1/templates", {"template": _read_table(file)})
    emit(
        {"name": template["name"], "params": template["params"]},
        as_json,
        lambda: out.print(f"[green]✓[/] template {template['name']}"),
    )


@template_app.command("list")
def template_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """List intent templates."""
    templates = _api(home).get("/v1/templates")["templates"]

    def human() -> None:
        table = Table("name", "params", "description")
        for t in templates:
            table.add_row(str(t["name"]), ", ".join(t["params"]), str(t["description"]))
        out.print(table)

    emit({"templates": templates}, as_json, human)


@policy_app.command("load")
def policy_load(
    directory: Path,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="load as the shadow set: evaluated beside the live set on every call and "
            "recorded on its receipt, never enforced (see `tether policy shadow`)",
        ),
    ] = False,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Validate and load every *.cedar file of DIRECTORY as the live policy set (or, with
    --shadow, as the candidate set in shadow mode); the receipt names the credential."""
    from tether.policy._testing import read_dir  # noqa: PLC0415

    sources, schema = read_dir(directory)
    client = _api(home)
    _attributed(client, by)
    loaded = client.post("/v1/policies", {"files": sources, "schema": schema, "shadow": shadow})
    what = "shadow set loaded: recorded, not enforced" if shadow else "policies loaded"
    emit(
        {
            "digest": loaded["digest"],
            "policies": [p["id"] for p in loaded["policies"]],
            "shadow": shadow,
        },
        as_json,
        lambda: out.print(
            f"[green]✓[/] {len(loaded['policies'])} {what} ({loaded['digest'][:19]}…)"
        ),
    )


@policy_app.command("shadow")
def policy_shadow(
    off: Annotated[bool, typer.Option("--off", help="stop evaluating the shadow set")] = False,
    limit: Annotated[int, typer.Option(help="changed decisions to list")] = 20,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """What the shadow set would change: the calls it saw and each whose effect it would
    change (would deny, would hold, would allow), from the receipts; --off ends it."""
    client = _api(home)
    if off:
        removed = client.delete("/v1/policies/shadow")["removed"]
        emit(
            {"removed": removed},
            as_json,
            lambda: out.print("shadow mode off" if removed else "no shadow set was loaded"),
        )
        return
    report = client.get("/v1/policies/shadow", limit=max(0, min(limit, 500)))

    def human() -> None:
        if report["digest"] is None:
            out.print("no shadow set (tether policy load DIR --shadow)")
            return
        out.print(
            f"shadow set {report['digest'][:19]}…: {report['evaluated']} call(s) evaluated, "
            f"{report['would_change']} would change"
        )
        for transition, count in sorted(report["changes"].items()):
            out.print(f"  {transition}: {count}")
        table = Table("receipt", "agent", "tool", "live", "shadow", "policies")
        for c in report["changed"]:
            table.add_row(
                f"#{c['seq']}", str(c["agent"]), str(c["tool"]), str(c["live"]),
                str(c["shadow"]), ", ".join(c["policies"]),
            )  # fmt: skip
        if report["changed"]:
            out.print(table)

    emit(report, as_json, human)


def parse_instant(text: str, option: str) -> float:
    """An instant given on the command line: RFC 3339 / ISO 8601 (a time without a zone
    is UTC), or seconds since the epoch."""
    from datetime import UTC, datetime  # noqa: PLC0415

    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a time: give RFC 3339 (2026-12-05T21:00:00Z) "
            "or seconds since the epoch"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@app.command()
def replay(
    policies: Annotated[
        Path, typer.Option("--policies", help="directory of the candidate *.cedar files")
    ],
    since: Annotated[
        str | None,
        typer.Option(
            "--from", help="first instant (RFC 3339 or epoch seconds)", show_default=False
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--to", help="last instant (RFC 3339 or epoch seconds)", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(help="changed decisions to list")] = 1000,
    fail_on_change: Annotated[
        bool, typer.Option("--fail-on-change", help="exit 1 if any decision would change")
    ] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Re-decide the recorded calls under a candidate policy set (not loaded): every
    decision whose effect would change (old → new, tool, task, receipt, reason codes),
    and the calls that cannot be replayed faithfully, with why."""
    from tether.policy._testing import read_dir  # noqa: PLC0415

    sources, schema = read_dir(policies)
    body: dict[str, Any] = {"files": sources, "schema": schema, "limit": max(0, limit)}
    if since is not None:
        body["from"] = parse_instant(since, "--from")
    if until is not None:
        body["to"] = parse_instant(until, "--to")
    report = _api(home).post("/v1/policies/replay", body)
    for end in ("from", "to"):  # instants, though not named like one
        if report.get(end) is not None:
            report[end] = rfc3339(report[end])

    def human() -> None:
        out.print(
            f"candidate {report['candidate'][:19]}… against live {report['live'][:19]}…: "
            f"{report['replayed']} decision(s) replayed, {report['would_change']} would "
            f"change, {report['before_policy']} refused before the policy step, "
            f"{report['unreplayable_count']} not replayable"
        )
        for transition, count in sorted(report["changes"].items()):
            out.print(f"  {transition}: {count}")
        if report["changed"]:
            table = Table("receipt", "task", "tool", "old", "new", "reasons")
            for c in report["changed"]:
                note = "" if c["complete"] else " (later checks not replayed)"
                table.add_row(
                    f"#{c['seq']}", str(c["task_id"]), _shown(str(c["tool"])), c["old"],
                    c["new"] + note,
                    ", ".join(c["old_reasons"]) + " → " + ", ".join(c["new_reasons"]),
                )  # fmt: skip
            out.print(table)
        for u in report["unreplayable"][:20]:
            out.print(f"  not replayable: #{u['seq']} {_shown(str(u['tool']))}: {u['why']}")

    emit(report, as_json, human)
    if fail_on_change and report["would_change"]:
        raise typer.Exit(1)


def _policy_dir(directory: Path) -> tuple[dict[str, str], str]:
    from tether.policy._service import default_schema  # noqa: PLC0415
    from tether.policy._testing import read_dir  # noqa: PLC0415

    sources, schema = read_dir(directory)
    return sources, schema if schema is not None else default_schema()


@policy_app.command("validate")
def policy_validate(
    directory: Path,
    strict: Annotated[bool, typer.Option("--strict", help="exit non-zero on warnings too")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check a policy directory offline, as a load would (schema, file and line), and
    warn about wildcard permits, permits of every tool, duplicates and permits an
    unconditional forbid shadows. Exit 1 on an error (or a warning with --strict)."""
    from tether.policy._testing import lint  # noqa: PLC0415

    report = lint(*_policy_dir(directory))
    findings = [f.to_dict() for f in report.findings]
    count = len(report.snapshot.policies) if report.snapshot is not None else 0

    def human() -> None:
        for f in report.findings:
            colour = "red" if f.level == "error" else "yellow"
            out.print(f"[{colour}]{f.level}[/] {f.where}: {f.code}: {f.message}")
        if not report.errors:
            out.print(
                f"[green]✓[/] {count} policies valid against the schema, "
                f"{len(report.warnings)} warning(s)"
            )

    emit({"ok": not report.errors, "policies": count, "findings": findings}, as_json, human)
    if report.errors or (strict and report.warnings):
        raise typer.Exit(1)


@policy_app.command("test")
def policy_test(
    directory: Path,
    cases: Annotated[Path, typer.Argument(help="TOML or JSON file of [[case]] entries")],
    as_json: JsonOpt = False,
) -> None:
    """Evaluate test cases against a policy directory (no store): each case names an
    agent, its owner, the action (call_tool or open_task), the tool and arguments or
    the template and intent, optional flow summary, and the effect it must have.
    Exit 1 if any case has another effect."""
    from tether.policy._testing import lint, load_cases, run_cases  # noqa: PLC0415

    report = lint(*_policy_dir(directory))
    if report.snapshot is None:
        raise InvalidPolicy(f"{report.errors[0].where}: {report.errors[0].message}")
    results = run_cases(report.snapshot, load_cases(cases))
    failed = [r for r in results if not r.passed]

    def human() -> None:
        for r in results:
            mark = "[green]✓[/]" if r.passed else "[red]✗[/]"
            fired = f" [dim]({', '.join(r.policies)})[/]" if r.policies else ""
            wrong = "" if r.passed else f" [red]expected {r.expect}[/]"
            out.print(f"{mark} {r.name}: {r.effect}{wrong}{fired}")
        out.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")

    emit(
        {"passed": len(results) - len(failed), "failed": len(failed),
         "cases": [r.to_dict() for r in results]},
        as_json,
        human,
    )  # fmt: skip
    if failed:
        raise typer.Exit(1)


@policy_app.command("format")
def policy_format(
    directory: Path,
    check: Annotated[
        bool, typer.Option("--check", help="exit 1 if a file is not formatted; change nothing")
    ] = False,
    write: Annotated[bool, typer.Option("--write", help="rewrite the files in place")] = False,
) -> None:
    """Format every *.cedar file with Cedar's formatter: print them (default), rewrite
    them (--write) or only check them (--check)."""
    from tether.policy._testing import format_sources, read_dir  # noqa: PLC0415

    sources, _schema = read_dir(directory)
    formatted = format_sources(sources)
    changed = sorted(name for name in sources if formatted[name] != sources[name])
    if check:
        for name in changed:
            out.print(f"[yellow]would reformat[/] {directory / name}")
        if changed:
            raise typer.Exit(1)
        out.print(f"[green]✓[/] {len(sources)} file(s) formatted")
        return
    if write:
        for name in changed:
            (directory / name).write_text(formatted[name])
            out.print(f"reformatted {directory / name}")
        return
    for name in sorted(formatted):
        sys.stdout.write(f"// {name}\n{formatted[name]}")


@catalogue_app.command("load")
def catalogue_load(
    files: Annotated[list[Path], typer.Argument(help="Catalogue TOML files ([tools.<name>]).")],
    prefix: Annotated[
        str | None, typer.Option(help="Name the tools PREFIX.<name> (an upstream's name).")
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Replace the trust domain's tool catalogue with the entries of FILES (a receipt)."""
    from tether.gateway._profiles import profiles_from_catalogue  # noqa: PLC0415

    tools: dict[str, Any] = {}
    for path in files:
        table = _read_table(path)
        profiles_from_catalogue(table, None)  # refused here, with the file's name, if wrong
        found = table.get("tools")
        if isinstance(found, dict):
            tools.update(found)
    loaded = _api(home).post("/v1/catalogue", {"tools": tools, "prefix": prefix})
    emit(
        {"digest": loaded["digest"], "tools": loaded["tools"]},
        as_json,
        lambda: out.print(
            f"[green]✓[/] {len(loaded['tools'])} tools described ({loaded['digest'][:19]}…)"
        ),
    )


@catalogue_app.command("list")
def catalogue_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """List the catalogue's entries (a tool no entry names is judged most restrictively)."""
    rows = _api(home).get("/v1/catalogue")["entries"]

    def human() -> None:
        table = Table("tool", "side effect", "sensitivity", "output")
        for r in rows:
            trust = "trusted" if r["trusted"] else "untrusted"
            table.add_row(str(r["tool"]), str(r["side_effect"]), str(r["sensitivity"]), trust)
        out.print(table)

    emit({"tools": rows}, as_json, human)


@policy_app.command("list")
def policy_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """List the live policies."""
    snapshot = _api(home).get("/v1/policies")
    rows = snapshot["policies"]

    def human() -> None:
        table = Table("id", "effect", "where")
        for r in rows:
            effect = "forbid (approval)" if r["approval"] else str(r["effect"])
            table.add_row(str(r["id"]), effect, f"{r['file']}:{r['line']}")
        out.print(table)

    emit({"digest": snapshot["digest"], "policies": rows}, as_json, human)


# -- tasks and decisions -------------------------------------------------------------------
DECISIONS = "/v1/decisions"


def _task_file(home: Path | None, task_id: str) -> Path:
    if not task_id.replace("_", "").isalnum():
        raise UsageError(f"malformed task id {task_id[:80]!r}")
    return home_dir(home) / "tasks" / f"{task_id}.json"


def _parse_params(params: list[str]) -> dict[str, str]:
    result = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param wants key=value, got {item!r}")
        result[key] = value
    return result


@task_app.command("open")
def task_open(
    agent: Annotated[str, typer.Option("--agent", help="the agent's SPIFFE ID")],
    template: Annotated[str | None, typer.Option("--template")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="k=v (repeatable)")] = None,
    intent: Annotated[str | None, typer.Option("--intent", help="inline JSON or @file")] = None,
    request: Annotated[
        str | None, typer.Option("--request", help="the user's request the task serves")
    ] = None,
    resource: Annotated[
        list[str] | None,
        typer.Option(
            "--resource",
            help="a resource server the token is for, e.g. the MCP gateway's URI (repeatable)",
        ),
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Open a task (template + params, or an explicit intent) and mint its task token
    (its audiences: the trust domain and every --resource)."""
    _open_and_keep(
        home, agent, template, param, intent, request, None, as_json, tuple(resource or ())
    )


def _intent_text(intent: str | None) -> str:
    if intent is None:
        return ""
    if not intent.startswith("@"):
        return intent
    try:
        return Path(intent[1:]).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {intent[1:]}: {exc.strerror}") from None


def _explicit_intent(template: str | None, intent: str | None) -> Any:
    if (template is None) == (intent is None):
        raise UsageError("give exactly one of --template or --intent")
    if intent is None:
        return None
    text = _intent_text(intent)
    try:
        strict_json(text)
    except ValueError as exc:
        raise UsageError(f"--intent is not valid JSON: {exc}") from None
    return decode_intent(text)


def _keep_task(home: Path | None, task_id: str, token: str, key: ProofKey) -> None:
    """Keep a task's token and proof key under the home (mode 0600)."""
    path = _task_file(home, task_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(path, json.dumps({"token": token, "proof_key": key.to_pem().decode()}).encode())


def _open_and_keep(
    home: Path | None,
    agent: str,
    template: str | None,
    param: list[str] | None,
    intent: str | None,
    request: str | None,
    parent: str | None,
    as_json: bool,
    resources: tuple[str, ...] = (),
) -> None:
    explicit = _explicit_intent(template, intent)
    key = ProofKey()
    body: dict[str, Any] = {
        "agent": agent,
        "jwk": key.jwk,
        "template": template,
        "params": _parse_params(param or []),
        "intent": strict_json(_intent_text(intent)) if explicit is not None else None,
        "request": request,
        "parent_task_id": parent,
        "resources": list(resources),
    }
    opened = _api(home).post("/v1/tasks", {k: v for k, v in body.items() if v is not None})
    _keep_task(home, opened["task_id"], opened["token"], key)
    result = {
        "task_id": opened["task_id"],
        "token": opened["token"],
        "expires_at": opened["expires_at"],
        **(
            {"token_expires_at": opened["token_expires_at"]}
            if opened["token_expires_at"] != opened["expires_at"]
            else {}
        ),
        **({"parent_task_id": parent} if parent else {}),
    }
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[green]✓[/] task {opened['task_id']} open until "
            f"{time.strftime('%H:%M:%S', time.localtime(opened['expires_at']))}"
            + (f" (delegated from {parent})" if parent else "")
        ),
    )


@task_app.command("delegate")
def task_delegate(
    parent: Annotated[str, typer.Option("--parent", help="the parent task id")],
    agent: Annotated[str, typer.Option("--agent", help="the sub-agent's SPIFFE ID")],
    template: Annotated[str | None, typer.Option("--template")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="k=v (repeatable)")] = None,
    intent: Annotated[str | None, typer.Option("--intent", help="inline JSON or @file")] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Delegate part of a task to a sub-agent: a child task whose intent must be within
    the parent's (tools, arguments, ceiling, egress, budget, lifetime, depth)."""
    _open_and_keep(home, agent, template, param, intent, None, parent, as_json)


@task_app.command("renew")
def task_renew(task_id: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Renew a long-running task's token against the current policy (old token revoked)."""
    path = _task_file(home, task_id)
    renewed = _api(home).post(f"/v1/tasks/{_segment(task_id)}/renew")
    if path.exists():
        held = json.loads(path.read_text())
        _keep_task(home, task_id, renewed["token"], ProofKey.from_pem(held["proof_key"].encode()))
    result = {
        "task_id": renewed["task_id"],
        "token": renewed["token"],
        "expires_at": renewed["expires_at"],
        "token_expires_at": renewed["token_expires_at"],
    }
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[green]✓[/] task {task_id} renewed; token valid until "
            f"{time.strftime('%H:%M:%S', time.localtime(renewed['token_expires_at']))}"
        ),
    )


def _task_dict(row: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "task_id", "agent", "template", "status", "calls_used", "opened_at", "expires_at",
        "ended_at", "end_reason", "intent_digest", "intent", "parent_task_id", "chain",
    )  # fmt: skip
    return {k: row.get(k) for k in keep}


@task_app.command("show")
def task_show(task_id: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Show a task: status, intent, budget used."""
    row = _task_dict(_api(home).get(f"/v1/tasks/{_segment(task_id)}"))
    emit(row, as_json, lambda: out.print_json(data=instants_as_text(row)))


@task_app.command("end")
def task_end(task_id: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """End a task; its token is revoked."""
    row = _task_dict(_api(home).post(f"/v1/tasks/{_segment(task_id)}/end"))
    emit(row, as_json, lambda: out.print(f"[green]✓[/] task {task_id} {row['status']}"))


@app.command()
def authorize(
    task: Annotated[str, typer.Option("--task", help="task id (from 'task open')")],
    tool: Annotated[str, typer.Option("--tool")],
    args: Annotated[str, typer.Option("--args", help="arguments as a JSON object")] = "{}",
    fail_on_deny: Annotated[
        bool,
        typer.Option(
            "--fail-on-deny",
            help="exit 1 on deny and 3 on approval_required (default: 0 whatever the effect)",
        ),
    ] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Decide one tool call of a task, as its agent would: the task token and a proof
    by the key kept under the home when the task was opened. Exits 0 whatever the
    effect, unless --fail-on-deny."""
    try:
        call_args = strict_json(args)
    except ValueError as exc:
        raise UsageError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(call_args, dict):
        raise UsageError("--args must be a JSON object")
    path = _task_file(home, task)
    if not path.exists():
        raise UsageError(
            f"no task token held for {task} under {path.parent} (the home the task was "
            "opened with keeps its token and proof key)"
        )
    held = json.loads(path.read_text())
    token = held["token"]
    key = ProofKey.from_pem(held["proof_key"].encode())
    client = _api(home)
    proof = key.prove(
        token, tool, call_args, now=time.time(), htm="POST", htu=client.server + DECISIONS
    )
    result = client.request(
        "POST",
        DECISIONS,
        json={"tool": tool, "args": call_args},
        headers={"Authorization": f"DPoP {token}", "DPoP": proof},
        authenticated=False,
    )

    def human() -> None:
        colour = {"allow": "green", "deny": "red"}.get(result["effect"], "yellow")
        approval = result.get("approval_id")
        out.print(
            f"[{colour}]{result['effect']}[/] {tool}: "
            + "; ".join(r["message"] for r in result["reasons"])
            + (f" (approval {approval})" if approval else "")
            + f" [dim]receipt #{result['receipt']['seq']}[/]"
        )

    emit(result, as_json, human)
    if fail_on_deny and result["effect"] != "allow":
        raise typer.Exit(3 if result["effect"] == "approval_required" else 1)


# -- approvals ----------------------------------------------------------------------------
@approval_app.command("list")
def approval_list(
    status: Annotated[str | None, typer.Option("--status")] = "pending",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """List approvals (pending by default), each with the call in full."""
    rows = _api(home).get("/v1/approvals", status=status)["approvals"]

    def human() -> None:
        # A block per approval, ids on lines of their own: copied whole at any width.
        for r in rows:
            out.print(f"[bold]{r['approval_id']}[/]  {r['status']}  {r['tool']}")
            out.print(f"  task  {r['task_id']}\n  agent {r['agent']}")
            out.print(f"  args  {json.dumps(r['args'], ensure_ascii=True)}")
            for reason in r["reasons"]:
                out.print(f"  why   {reason.get('code')}: {reason.get('message')}")
        if not rows:
            out.print(f"no {status or ''} approvals".replace("  ", " "))

    emit({"approvals": rows}, as_json, human)


CommentOpt = Annotated[str, typer.Option("--comment", help="kept in the receipt")]


def _decide_approval(
    approval_id: str,
    approve: bool,
    by: str | None,
    comment: str,
    as_json: bool,
    home: Path | None,
) -> None:
    client = _api(home)
    _attributed(client, by)
    verb = "approve" if approve else "deny"
    row = client.post(f"/v1/approvals/{_segment(approval_id)}/{verb}", {"comment": comment})
    emit(row, as_json, lambda: out.print(f"{row['status']}: {approval_id} ({row['tool']})"))


@approval_app.command("approve")
def approval_approve(
    approval_id: str,
    by: ByOpt = None,
    comment: CommentOpt = "",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Approve one held call; the identical call then goes through once. The receipt
    names the credential that approved it."""
    _decide_approval(approval_id, True, by, comment, as_json, home)


@approval_app.command("deny")
def approval_deny(
    approval_id: str,
    by: ByOpt = None,
    comment: CommentOpt = "",
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Deny one held call (the receipt names the credential that denied it)."""
    _decide_approval(approval_id, False, by, comment, as_json, home)


# -- audit ------------------------------------------------------------------------------
@audit_app.command("verify")
def audit_verify(
    bundle_file: Annotated[
        Path | None,
        typer.Option("--bundle", help="verify an exported bundle offline (no database)"),
    ] = None,
    trust: Annotated[
        Path | None,
        typer.Option("--trust", help="with --bundle: JWKS or SPIFFE bundle of trusted keys"),
    ] = None,
    witness: Annotated[
        Path | None,
        typer.Option("--witness", help="with --bundle: witness file (default $TETHER_WITNESS)"),
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Verify the log: the chain, receipt tags, checkpoints, signed tree heads and the
    witness (then sign a head over what is not yet covered); or, with --bundle, an
    exported bundle with no database."""
    if bundle_file is not None:
        _verify_bundle(bundle_file, trust, witness, as_json)
        return
    result = _api(home).get("/v1/audit/verify")
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[green]✓[/] {result['records']} receipts, {result['checkpoints']} checkpoints, "
            f"{result['heads']} signed heads, {result['witnessed']} witnessed heads verified"
            if result["ok"]
            else f"[red]✗[/] position {result['first_bad']}: {result['problem']}"
        ),
    )
    if not result["ok"]:
        raise typer.Exit(1)


def _verify_bundle(
    bundle_file: Path, trust: Path | None, witness: Path | None, as_json: bool
) -> None:
    from tether.audit._chain import WITNESS_ENV  # noqa: PLC0415
    from tether.audit._verifier import loads, verify_bundle  # noqa: PLC0415

    def read_json(path: Path) -> Any:
        try:
            return loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None

    bundle = read_json(bundle_file)
    trusted = read_json(trust) if trust is not None else None
    where = witness or (Path(os.environ[WITNESS_ENV]) if os.environ.get(WITNESS_ENV) else None)
    lines = None
    if where is not None:
        try:
            lines = where.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read the witness {where}: {exc}") from None
    if not isinstance(bundle, dict) or (trusted is not None and not isinstance(trusted, dict)):
        raise UsageError("a bundle and a trust file are JSON objects")
    report = verify_bundle(bundle, trust=trusted, witness=lines)
    result = dict(report.__dict__)
    result["trusted_keys"] = "given" if trusted is not None else "the bundle's own"
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[green]✓[/] {report.records} receipts under a signed head of {report.size} "
            f"({report.heads} heads, keys: {result['trusted_keys']})"
            if report.ok
            else f"[red]✗[/] position {report.first_bad}: {report.problem}"
        ),
    )
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    out_file: Annotated[Path, typer.Argument(help="the bundle file to write (JSON)")],
    first: Annotated[int, typer.Option("--from", help="first receipt position")] = 1,
    last: Annotated[
        int | None, typer.Option("--to", help="last receipt position (default: newest)")
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Write an offline-verifiable bundle: receipts, inclusion proofs, signed heads with
    consistency proofs, public keys (check it with 'tether audit verify --bundle')."""
    bundle = _store_only(home).export_audit(first, last)
    out_file.write_text(json.dumps(bundle, sort_keys=True) + "\n", encoding="utf-8")
    result = {
        "file": str(out_file),
        "from": bundle["from"],
        "to": bundle["to"],
        "heads": len(bundle["heads"]),
    }
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[green]✓[/] receipts {result['from']}..{result['to']} written to {out_file}"
        ),
    )


@audit_app.command("head")
def audit_head(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Sign a tree head over every receipt now (and publish it to the witness)."""
    head = _store_only(home).audit.sign_head()
    result = {"size": head.size if head else None, "root": head.root if head else None}
    emit(result, as_json, lambda: out.print(f"signed head at {result['size']}"))


@audit_app.command("tail")
def audit_tail(
    limit: Annotated[int, typer.Option("-n", "--limit")] = 20,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """The newest receipts."""
    records = _api(home).get("/v1/audit", limit=max(1, min(limit, 10_000)))["records"]

    def human() -> None:
        table = Table("#", "kind", "effect", "tool", "reason")
        for r in records:
            reasons = r.get("reasons") or []
            table.add_row(
                str(r["seq"]),
                r["kind"],
                r.get("effect", ""),
                r.get("tool", ""),
                reasons[0]["message"] if reasons else "",
            )
        out.print(table)

    emit({"records": records}, as_json, human)


@audit_app.command("checkpoint")
def audit_checkpoint(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Sign the current head of the chain now."""
    cp = _store_only(home).audit.checkpoint()
    result = {"seq": cp.seq if cp else None, "hash": cp.hash if cp else None}
    emit(result, as_json, lambda: out.print(f"checkpoint at {result['seq']}"))


# -- secrets and leases ------------------------------------------------------------------
def _read_value(from_file: Path | None, from_env: str | None, from_stdin: bool) -> bytes | None:
    """The value from exactly one source, never from the command line (argv is visible
    to every user of the machine and lands in shell history)."""
    given = [x for x in (from_file, from_env) if x is not None] + ([True] if from_stdin else [])
    if len(given) > 1:
        raise UsageError("give at most one of --from-file, --from-env, --from-stdin")
    if from_file is not None:
        try:
            data = from_file.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {from_file}: {exc.strerror}") from None
    elif from_env is not None:
        found = os.environb.get(from_env.encode())
        if found is None:
            raise UsageError(f"environment variable {from_env} is not set")
        data = found
    elif from_stdin:
        data = sys.stdin.buffer.read()
    else:
        return None
    # One trailing newline is how files and pipes end, not part of the value.
    return data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data


def _read_meta(meta_file: Path | None) -> dict[str, Any]:
    if meta_file is None:
        return {}
    try:
        text = meta_file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {meta_file}: {exc.strerror}") from None
    try:
        if meta_file.suffix == ".json":
            data = strict_json(text)
        else:
            import tomllib  # noqa: PLC0415

            data = tomllib.loads(text)
    except ValueError as exc:
        raise UsageError(
            f"{meta_file} is not valid {meta_file.suffix[1:] or 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{meta_file} must hold a table")
    return data


FromFile = Annotated[
    Path | None,
    typer.Option("--from-file", help="read the value from this file", show_default=False),
]
FromEnv = Annotated[
    str | None,
    typer.Option(
        "--from-env", help="read the value from this environment variable", show_default=False
    ),
]
FromStdin = Annotated[bool, typer.Option("--from-stdin", help="read the value from standard input")]


def _secret_line(info: dict[str, Any]) -> str:
    versions = ", ".join(f"v{v['version']} {v['state']}" for v in info["versions"])
    return f"{info['name']} ({info['kind']}): {versions}"


@secret_app.command("put")
def secret_put(
    name: str,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="api_key, password, oauth_refresh_token, service_account, postgres or generic",
        ),
    ] = "generic",
    from_file: FromFile = None,
    from_env: FromEnv = None,
    from_stdin: FromStdin = False,
    description: Annotated[str, typer.Option("--description")] = "",
    tool: Annotated[
        list[str] | None, typer.Option("--tool", help="tool-name glob that may use it (repeatable)")
    ] = None,
    overlap: Annotated[
        float | None,
        typer.Option("--overlap", help="seconds old versions stay usable after a rotation"),
    ] = None,
    rotate_command: Annotated[
        str | None,
        typer.Option(
            "--rotate-command", help="rotation hook: a command (no shell) that prints the new value"
        ),
    ] = None,
    meta_file: Annotated[
        Path | None,
        typer.Option(
            "--meta", help="TOML/JSON: tools, overlap_seconds, rotate_command, [postgres] grants"
        ),
    ] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Seal a new secret. The value comes from --from-file, --from-env or --from-stdin,
    never from the command line; no verb ever shows it again."""
    import shlex  # noqa: PLC0415

    value = _read_value(from_file, from_env, from_stdin)
    if value is None:
        raise UsageError("give the value with --from-file, --from-env or --from-stdin")
    meta = _read_meta(meta_file)
    if tool:
        meta["tools"] = list(tool)
    if overlap is not None:
        meta["overlap_seconds"] = overlap
    if rotate_command is not None:
        meta["rotate_command"] = shlex.split(rotate_command)
    if "rotate_command" in meta:
        # A command to run is never accepted over HTTP: set on the store's host only.
        tether = _store_only(home)
        who = f"break-glass:{_os_user()}"
        if by is not None and by != who:
            raise UsageError(f"--by {by!r}: this change is made by {who}")
        sealed = tether.put_secret(
            name, value, kind=kind, by=who, description=description, meta=meta
        ).to_dict()
    else:
        client = _api(home)
        _attributed(client, by)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the API takes UTF-8 secret values") from None
        body = {"name": name, "value": text, "kind": kind, "description": description}
        body.update({k: meta[k] for k in ("tools", "overlap_seconds", "postgres") if k in meta})
        unknown = sorted(set(meta) - {"tools", "overlap_seconds", "postgres"})
        if unknown:
            raise UsageError(f"--meta: unknown member(s) {', '.join(unknown)}")
        sealed = client.post("/v1/secrets", body)
    emit(sealed, as_json, lambda: out.print(f"[green]✓[/] sealed {_secret_line(sealed)}"))


@secret_app.command("rotate")
def secret_rotate(
    name: str,
    from_file: FromFile = None,
    from_env: FromEnv = None,
    from_stdin: FromStdin = False,
    overlap: Annotated[
        float | None, typer.Option("--overlap", help="seconds the previous version stays usable")
    ] = None,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Add a new version (from a value source, else from the secret's rotation hook);
    the previous one stays usable for the overlap window."""
    value = _read_value(from_file, from_env, from_stdin)
    client = _api(home)
    _attributed(client, by)
    try:
        text = value.decode("utf-8") if value is not None else None
    except UnicodeDecodeError:
        raise UsageError("the API takes UTF-8 secret values") from None
    body = {"value": text, "overlap_seconds": overlap}
    info = client.post(
        f"/v1/secrets/{_segment(name)}/rotate", {k: v for k, v in body.items() if v is not None}
    )
    emit(info, as_json, lambda: out.print(f"[green]✓[/] rotated {_secret_line(info)}"))


@secret_app.command("list")
def secret_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Names, kinds and versions of the secrets (never a value)."""
    infos = _api(home).get("/v1/secrets")["secrets"]

    def human() -> None:
        table = Table("name", "kind", "versions", "tools")
        for info in infos:
            table.add_row(
                info["name"],
                info["kind"],
                ", ".join(f"v{v['version']} {v['state']}" for v in info["versions"]),
                ", ".join(info["tools"]) or "(any allowed)",
            )
        out.print(table)

    emit({"secrets": infos}, as_json, human)


@lease_app.command("list")
def lease_list(
    task: Annotated[str | None, typer.Option("--task")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, active, revoked or expired")
    ] = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Leases (who holds what, for which task, until when; never a value)."""
    rows = _api(home).get("/v1/leases", task_id=task, status=status)["leases"]

    def human() -> None:
        table = Table("lease", "task", "kind", "secret", "tool", "status", "expires")
        for r in rows:
            secret = f"{r['secret']} v{r['version']}" if r["secret"] else "-"
            table.add_row(
                r["lease_id"],
                r["task_id"],
                r["kind"],
                secret,
                r["tool"] or "",
                r["status"],
                time.strftime("%H:%M:%S", time.localtime(r["expires_at"])),
            )
        out.print(table)

    emit({"leases": rows}, as_json, human)


@lease_app.command("revoke")
def lease_revoke(
    lease_id: str,
    reason: Annotated[str, typer.Option("--reason")] = "revoked by operator",
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Revoke one lease (a dynamic credential is destroyed at once)."""
    client = _api(home)
    _attributed(client, by)
    lease = client.post(f"/v1/leases/{_segment(lease_id)}/revoke", {"reason": reason})
    done = lease["status"] == "revoked"
    emit(
        {"lease_id": lease_id, "revoked": done, "lease": lease},
        as_json,
        lambda: out.print(f"{'[green]✓[/] revoked' if done else 'not live:'} {lease_id}"),
    )


@lease_app.command("reap")
def lease_reap(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """End expired tasks and leases now and destroy what they left (the servers do this
    periodically too)."""
    report = _store_only(home).reap().to_dict()
    emit(report, as_json, lambda: out.print_json(json.dumps(report)))


def _interactive() -> bool:
    return sys.stdin.isatty()


def _kill(
    reason: str,
    agent: str | None,
    owner: str | None,
    template: str | None,
    trust_domain: str | None,
    everything: bool,
    yes: bool,
    by: str | None,
    as_json: bool,
    home: Path | None,
) -> None:
    if not (everything or agent or owner or template or trust_domain):
        raise UsageError("name a scope: --agent, --owner, --template, --trust-domain or --all")
    scope = (
        "EVERY open task and every lease"
        if everything
        else "every open task of "
        + ", ".join(
            f"{name} {value}"
            for name, value in (
                ("agent", agent),
                ("owner", owner),
                ("template", template),
                ("trust domain", trust_domain),
            )
            if value
        )
    )
    if not yes:
        if not _interactive():
            raise UsageError("the kill switch needs --yes when not run interactively")
        if not typer.confirm(f"Revoke {scope} (with their sub-tasks), now?", err=True):
            raise typer.Abort()
    client = _api(home)
    _attributed(client, by)
    body = {
        "reason": reason,
        "agent": agent,
        "owner": owner,
        "template": template,
        "trust_domain": trust_domain,
        "all": everything,
    }
    result = client.post("/v1/kill", {k: v for k, v in body.items() if v is not None})
    emit(
        result,
        as_json,
        lambda: out.print(
            f"[yellow]✓[/] {len(result['tasks'])} task(s) and {len(result['leases'])} "
            "lease(s) revoked"
        ),
    )


ReasonOpt = Annotated[str, typer.Option("--reason", help="why (recorded in the receipt)")]
KillAgent = Annotated[str | None, typer.Option("--agent", help="this agent's tasks")]
KillOwner = Annotated[str | None, typer.Option("--owner", help="the tasks of this owner's agents")]
KillTemplate = Annotated[str | None, typer.Option("--template", help="tasks of this template")]
KillDomain = Annotated[
    str | None, typer.Option("--trust-domain", help="tasks of this trust domain's agents")
]
KillAll = Annotated[bool, typer.Option("--all", help="every open task and every lease")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


@app.command("kill")
def kill(
    reason: ReasonOpt,
    agent: KillAgent = None,
    owner: KillOwner = None,
    template: KillTemplate = None,
    trust_domain: KillDomain = None,
    everything: KillAll = False,
    yes: YesOpt = False,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """The kill switch: revoke every open task in scope (every filter given must match),
    with its sub-tasks, tokens and leases, effective on the next call. Asks first unless
    --yes; refuses to run unattended without --yes."""
    _kill(reason, agent, owner, template, trust_domain, everything, yes, by, as_json, home)


@app.command("kill-switch")
def kill_switch(
    reason: ReasonOpt,
    agent: KillAgent = None,
    owner: KillOwner = None,
    template: KillTemplate = None,
    trust_domain: KillDomain = None,
    yes: YesOpt = False,
    by: ByOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Alias of 'kill'; with no scope it revokes everything (like 'kill --all')."""
    everything = not (agent or owner or template or trust_domain)
    _kill(reason, agent, owner, template, trust_domain, everything, yes, by, as_json, home)


@audit_app.command("trace")
def audit_trace(task_id: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """The whole delegation tree of a task: who delegated what to whom, every decision,
    every lease."""
    trace = _api(home).get("/v1/audit/trace", task_id=task_id)

    def human() -> None:
        tasks = {t["task_id"]: t for t in trace["tasks"]}
        receipts: dict[str, list[dict[str, Any]]] = {}
        for r in trace["receipts"]:
            receipts.setdefault(r.get("task_id") or "", []).append(r)
        leases: dict[str, list[dict[str, Any]]] = {}
        for lease in trace["leases"]:
            leases.setdefault(lease["task_id"], []).append(lease)

        def show(task_id: str, depth: int) -> None:
            t = tasks[task_id]
            pad = "  " * depth
            by = f" ← delegated by {t['delegated_by']}" if t["delegated_by"] else ""
            out.print(f"{pad}[bold]{task_id}[/] {t['agent']} ({t['template']}) {t['status']}{by}")
            for r in receipts.get(task_id, []):
                what = r.get("tool") or ""
                why = "; ".join(x.get("code", "") for x in r.get("reasons") or [])
                out.print(f"{pad}  #{r['seq']} {r['kind']} {what} {r.get('effect', '')} {why}")
            for lease in leases.get(task_id, []):
                out.print(
                    f"{pad}  lease {lease['lease_id']} {lease['kind']} "
                    f"{lease['secret'] or ''} {lease['status']}"
                )
            for child in t["children"]:
                show(child, depth + 1)

        show(trace["root_task_id"], 0)

    emit(trace, as_json, human)


# -- federated SPIFFE trust ---------------------------------------------------------------
federation_app = typer.Typer(
    no_args_is_help=True,
    help="Federated SPIFFE trust: foreign trust domains whose SVIDs attest identities here.",
)
app.add_typer(federation_app, name="federation")


@federation_app.command("add")
def federation_add(
    trust_domain: Annotated[str, typer.Argument(help="the foreign trust domain")],
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", help="its bundle endpoint URL (profile https_web)"),
    ] = None,
    bundle_file: Annotated[
        Path | None,
        typer.Option("--bundle-file", help="a static SPIFFE bundle (JWKS) file, e.g. SPIRE's"),
    ] = None,
    refresh: Annotated[
        float | None,
        typer.Option("--refresh", help="seconds between fetches (default: its refresh hint)"),
    ] = None,
    max_age: Annotated[
        float | None,
        typer.Option("--max-age", help="refuse its SVIDs when no bundle this fresh (s)"),
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="replace its source")] = False,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Federate a foreign trust domain, from its bundle endpoint or a static bundle."""
    if (endpoint is None) == (bundle_file is None):
        raise UsageError("give --endpoint URL or --bundle-file FILE")
    body: dict[str, Any] = {
        "trust_domain": trust_domain,
        "refresh_interval": refresh,
        "max_age": max_age,
        "replace": replace,
    }
    if endpoint is not None:
        body |= {"profile": "https_web", "endpoint_url": endpoint}
    else:
        assert bundle_file is not None
        try:
            body |= {"profile": "static", "bundle": strict_json(bundle_file.read_bytes())}
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the bundle {bundle_file}: {exc}") from None
    entry = _api(home).post("/v1/federation", body)
    emit(entry, as_json, lambda: out.print(f"[green]✓[/] federated {trust_domain}"))


@federation_app.command("list")
def federation_list(as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """The federated trust domains, their links, and the bundle the server holds of each."""
    rows: list[dict[str, Any]] = _api(home).get("/v1/federation")

    def human() -> None:
        table = Table("trust domain", "source", "bundle", "links")
        for r in rows:
            held = r["bundle"]
            table.add_row(
                r["trust_domain"],
                r["endpoint_url"] or "static",
                "none" if held is None else f"seq {held['sequence']}, {len(held['jwt_kids'])} keys",
                ", ".join(f"{f} -> {local}" for f, local in r["links"].items()),
            )
        out.print(table)

    emit({"trust_domains": rows}, as_json, human)


@federation_app.command("remove")
def federation_remove(trust_domain: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Stop trusting a foreign trust domain now (its links go with it)."""
    entry = _api(home).delete(f"/v1/federation/{_segment(trust_domain)}")
    emit(entry, as_json, lambda: out.print(f"[green]✓[/] {trust_domain} is no longer trusted"))


@federation_app.command("refresh")
def federation_refresh(trust_domain: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """Fetch a federated trust domain's bundle now (on the server that answers)."""
    status = _api(home).post(f"/v1/federation/{_segment(trust_domain)}/refresh")
    held = status.get("bundle") or {}
    emit(
        status,
        as_json,
        lambda: out.print(
            f"[green]✓[/] {trust_domain}: sequence {held.get('sequence')}, "
            f"{len(held.get('jwt_kids', []))} JWT keys"
            + (
                f" [red](last error: {escape(status['last_error'])})"
                if status["last_error"]
                else ""
            )
        ),
    )


@federation_app.command("link")
def federation_link(
    spiffe_id: Annotated[str, typer.Argument(help="a registered identity of this domain")],
    attested_by: Annotated[
        str, typer.Option("--attested-by", help="the foreign SPIFFE ID whose SVIDs attest it")
    ],
    as_json: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Let SVIDs of a foreign SPIFFE ID attest a registered identity."""
    body = {"spiffe_id": spiffe_id, "attested_by": attested_by}
    result = _api(home).post("/v1/federation/links", body)
    emit(result, as_json, lambda: out.print(f"[green]✓[/] {attested_by} attests {spiffe_id}"))


@federation_app.command("unlink")
def federation_unlink(attested_by: str, as_json: JsonOpt = False, home: HomeOpt = None) -> None:
    """A foreign SPIFFE ID attests no identity any more."""
    result = _api(home).post("/v1/federation/unlink", {"attested_by": attested_by})
    emit(result, as_json, lambda: out.print(f"[green]✓[/] {attested_by} attests nothing"))


def main() -> None:
    """Entry point: one clear line on stderr for any error, never a traceback."""
    try:
        _run_app()
    finally:
        for client in _clients:
            with contextlib.suppress(Exception):
                client.close()
        _clients.clear()
        for tether in list(_opened):
            with contextlib.suppress(Exception):  # already reported by close itself
                tether.close()


def _run_app() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except TetherError as exc:
        sys.stderr.write(f"tether: error: {exc.message}\n")
        raise SystemExit(2 if isinstance(exc, UsageError) else 1) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        sys.stderr.write("tether: aborted\n")
        raise SystemExit(1) from None
    except typer.TyperException as exc:
        formatter = getattr(exc, "format_message", None)
        message = formatter() if callable(formatter) else str(exc)
        code = int(getattr(exc, "exit_code", 2))
        sys.stderr.write(f"tether: {'usage' if code == 2 else 'error'}: {message}\n")
        raise SystemExit(code) from None
    except Exception as exc:
        sys.stderr.write(f"tether: internal error: {type(exc).__name__}: {exc}\n")
        raise SystemExit(70) from None
