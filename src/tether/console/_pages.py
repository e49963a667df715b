"""The console's pages: server-rendered HTML under ``/console`` (Litestar + Jinja2).

Words are the API's and the CLI's: identities, tasks, intents, decisions, approvals,
receipts. Every page needs a session (else a redirect to the sign-in page); every POST
needs the session's CSRF token (else 403, before anything is read or changed). Roles
mirror the HTTP API:

- ``auditor``: reads the inventory, tasks, approvals, decisions, audit and the report;
- ``approver``: reads the inventory, tasks and approvals; approves and denies;
- ``owner``: reads the inventory and the tasks of the identities they own (in a
  delegation tree, another owner's task shows only as such); offboards them and ends
  their tasks; records and withdraws accepted risks;
- ``admin``: everything, including the kill switch.

Sessions live in the store (see :mod:`tether.console._sessions`): with several
``tether serve`` nodes behind one address, any node serves any signed-in operator, and
a restart signs nobody out.

Autoescaping is on in every template, so an argument such as ``<script>`` is shown as
text; pages carry a strict Content-Security-Policy (no inline script or style, nothing
from elsewhere), are never cached and never framed. A state-changing handler that fails
shows an error page; the service it calls runs in one store transaction, so nothing is
changed. Sign-ins (succeeded or refused, with the credential id, never the secret),
sign-outs and exports leave receipts. Audit verification runs in a worker thread, one
at a time per process.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import re
import threading
import time
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import msgspec
from jinja2 import Environment, PackageLoader, select_autoescape
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie, ResponseHeader
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.response import Redirect, Stream
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from tether._errors import (
    Conflict,
    InfrastructureError,
    NotFound,
    Rejected,
    TetherError,
    UsageError,
)
from tether._tether import Tether
from tether.console import _report, _words
from tether.console._accepted import AcceptedRisks
from tether.console._sessions import (
    HSTS,
    Session,
    Sessions,
    SignInFailures,
    client_address,
    cookie_name,
    expected_origin,
    is_loopback,
    is_tls,
    same_token,
)
from tether.core._flow import FlowState
from tether.core._intent import Intent, decode_intent
from tether.core._risk import Control, risk_tags
from tether.identity import Role
from tether.identity._credentials import credential_dict, credential_status
from tether.secrets import lease_dict
from tether.server._auth import Forbidden, Principal, RateLimited, RateLimiter, require
from tether.store import ApprovalRow, RecordRow, TaskRow

PAGE = 50
IDLE_DAYS = 30
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),  # keeps Origin on POSTs
    ResponseHeader(name="Cache-Control", value="no-store"),
    ResponseHeader(name="Cross-Origin-Opener-Policy", value="same-origin"),
]
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_MAX_FORM = 16 * 1024
_CREDENTIAL_ID = re.compile(r"[0-9a-f]{16}")
_SECRET = re.compile(r"tadm_([0-9a-f]{16})\..*", re.DOTALL)


class NeedSignIn(Exception):
    """No live session: the page redirects to the sign-in form."""


class CsrfRefused(Exception):
    """A POST without the session's CSRF token (or from another origin)."""


@dataclass
class Console:
    tether: Tether
    sessions: Sessions
    risks: AcceptedRisks
    env: Environment
    sign_in_limiter: RateLimiter
    #: Per address: each sign-in form served records its one-time token in the store.
    form_limiter: RateLimiter
    failures: SignInFailures
    #: Held while an audit verification runs (one at a time in this process).
    verifying: threading.Lock

    @classmethod
    def create(cls, tether: Tether) -> Console:
        env = Environment(
            loader=PackageLoader("tether.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["when"] = _words.when
        env.filters["plain"] = _words.plain
        env.filters["pretty"] = _words.pretty
        env.filters["pretty_json"] = lambda text: _words.pretty(json.loads(text))
        env.globals["effects"] = _words.EFFECTS
        return cls(
            tether=tether,
            sessions=Sessions(tether.store, tether.clock, tether.audit.rows),
            risks=AcceptedRisks(tether.store, tether.audit, tether.clock),
            env=env,
            sign_in_limiter=RateLimiter(rate=1.0, burst=10.0),
            form_limiter=RateLimiter(rate=2.0, burst=30.0),
            failures=SignInFailures(tether.clock),
            verifying=threading.Lock(),
        )

    def render(
        self,
        template: str,
        request: Request,  # type: ignore[type-arg]
        session: Session | None,
        status_code: int = 200,
        **values: Any,
    ) -> Response[str]:
        flash = ""
        if session is not None and session.flash:
            flash = session.flash
            self.sessions.flash(session, "")
        now = self.tether.clock.now()
        html = self.env.get_template(template).render(
            session=session,
            flash=flash,
            now=now,
            ago=lambda at: _words.ago(at, now),
            trust_domain=self.tether.trust_domain,
            path=request.url.path,
            **values,
        )
        return Response(html, status_code=status_code, media_type="text/html; charset=utf-8")


_CONSOLES: weakref.WeakKeyDictionary[Tether, Console] = weakref.WeakKeyDictionary()


def _console(request: Request) -> Console:  # type: ignore[type-arg]
    """The console of the app's control plane (made by :func:`console_router`)."""
    return _CONSOLES[request.app.state.ctx.tether]


# -- sessions, roles and CSRF ---------------------------------------------------------------
def _session(request: Request, *, touch: bool = True) -> Session:  # type: ignore[type-arg]
    """The request's live session, or :class:`NeedSignIn`. A session whose credential was
    disabled since sign-in ends here. ``touch=False``: the request is no activity (a page
    reloading itself), so the idle timeout still runs."""
    console = _console(request)
    session = console.sessions.get(request.cookies.get(cookie_name(request)), touch=touch)
    if session is None:
        raise NeedSignIn
    credential = console.tether.store.get_credential(session.credential_id)
    if (
        credential is None
        or credential_status(credential, console.tether.clock.now()) != "enabled"
        or credential.role != session.role
    ):
        console.sessions.end(session)  # disabled, expired or changed since sign-in
        raise NeedSignIn
    request.state.principal = _principal(session)
    # The API's per-principal rate limit applies to the console's requests too.
    request.app.state.ctx.limiter.check(f"admin:{session.credential_id}")
    return session


def _principal(session: Session) -> Principal:
    return Principal("admin", session.credential_id, session.role, session.owner)


def _may(session: Session, *roles: str) -> bool:
    return session.role == Role.ADMIN or session.role in roles


def _page(request: Request, *roles: str, touch: bool = True) -> Session:  # type: ignore[type-arg]
    session = _session(request, touch=touch)
    require(_principal(session), *roles)
    return session


async def _form(request: Request, *roles: str) -> tuple[Session, dict[str, str]]:  # type: ignore[type-arg]
    """A POSTed form: same origin, a live session, its CSRF token, then the role."""
    _same_origin(request)
    session = _session(request)
    body = await request.body()
    if len(body) > _MAX_FORM:
        raise UsageError("the form is too large")
    form = await request.form()
    values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
    if not same_token(values.get("csrf"), session.csrf):
        raise CsrfRefused
    require(_principal(session), *roles)
    return session, values


def _same_origin(request: Request) -> None:  # type: ignore[type-arg]
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != expected_origin(request).lower():
        raise CsrfRefused


def _owns(console: Console, session: Session, spiffe_id: str) -> bool:
    if session.role == Role.ADMIN:
        return True
    identity = console.tether.store.get_identity(spiffe_id)
    return session.role == Role.OWNER and identity is not None and identity.owner == session.owner


def _back(console: Console, session: Session, to: str, flash: str) -> Redirect:
    console.sessions.flash(session, flash)
    return Redirect(to, status_code=303)


# -- errors ---------------------------------------------------------------------------------
def _error_page(request: Request, exc: Exception) -> Response[Any]:  # type: ignore[type-arg]
    console = _console(request)
    if isinstance(exc, NeedSignIn):
        target = request.url.path if request.method == "GET" else "/console"
        return Redirect("/console/sign-in?" + urlencode({"next": target}), status_code=303)
    if isinstance(exc, CsrfRefused):
        status, message = 403, "This form is missing its security token, or came from elsewhere."
    elif isinstance(exc, Forbidden):
        status, message = 403, exc.message
    elif isinstance(exc, RateLimited):
        status, message = 429, "Too many attempts; wait a moment."
    elif isinstance(exc, NotFound):
        status, message = 404, exc.message
    elif isinstance(exc, Conflict):
        status, message = 409, exc.message
    elif isinstance(exc, UsageError):
        status, message = 400, exc.message
    elif isinstance(exc, Rejected):
        status, message = 403, exc.message
    elif isinstance(exc, InfrastructureError):
        status, message = 503, "The store is unavailable; nothing was changed."
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
    else:
        status, message = 500, "Something failed; nothing was changed."
    session = None
    with contextlib.suppress(Exception):
        session = console.sessions.get(request.cookies.get(cookie_name(request)), touch=False)
    response = console.render("error.html", request, session, status_code=status, message=message)
    if is_tls(request):
        response.headers["Strict-Transport-Security"] = HSTS
    return response


def _hsts(app: ASGIApp) -> ASGIApp:
    """Adds Strict-Transport-Security to every console response served over TLS."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or not is_tls(Request(scope)):
            await app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"strict-transport-security" for k, _ in headers):
                    headers.append((b"strict-transport-security", HSTS.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_with_hsts)

    return middleware


# -- sign-in --------------------------------------------------------------------------------
@get("/")
async def home(request: Request) -> Redirect:  # type: ignore[type-arg]
    session = _session(request)
    if session.role in (Role.ADMIN, Role.AUDITOR):
        return Redirect("/console/identities", status_code=303)
    return Redirect(
        "/console/approvals" if session.role == Role.APPROVER else "/console/identities",
        status_code=303,
    )


def _next(value: str | None) -> str:
    """Only a console path is a place to go back to (no open redirect)."""
    if value and value.startswith("/console") and "//" not in value and "\\" not in value:
        return value
    return "/console"


def _cookie(
    request: Request,  # type: ignore[type-arg]
    name: str,
    value: str,
    max_age: int | None = None,
) -> Cookie:
    """A console cookie: HttpOnly, SameSite=Strict, and Secure (``__Host-``) over TLS."""
    tls = is_tls(request)
    return Cookie(
        key=name,
        value=value,
        max_age=max_age,
        path="/" if tls else "/console",
        httponly=True,
        samesite="strict",
        secure=tls,
    )


@get("/sign-in")
async def sign_in_form(request: Request) -> Response[str]:  # type: ignore[type-arg]
    console = _console(request)
    console.form_limiter.check(client_address(request) or "-")
    token = console.sessions.pre_token()
    response = console.render(
        "sign_in.html",
        request,
        None,
        csrf=token,
        next=_next(request.query_params.get("next")),
        plain_http=not is_tls(request),
    )
    response.set_cookie(_cookie(request, cookie_name(request, pre=True), token, 600))
    return response


def _sign_in_again(
    request: Request,  # type: ignore[type-arg]
    values: dict[str, str],
    status_code: int,
    error: str,
) -> Response[str]:
    console = _console(request)
    token = console.sessions.pre_token()
    response = console.render(
        "sign_in.html",
        request,
        None,
        status_code=status_code,
        csrf=token,
        next=_next(values.get("next")),
        error=error,
        plain_http=not is_tls(request),
    )
    response.set_cookie(_cookie(request, cookie_name(request, pre=True), token, 600))
    return response


def _receipt(
    console: Console,
    kind: str,
    chain: list[str],
    detail: dict[str, Any],
    *,
    refused: str | None = None,
) -> None:
    """A receipt of a console event (sign-in, sign-out, export)."""
    console.tether.audit.append(
        kind,
        chain=chain,
        effect="deny" if refused else "allow",
        reasons=[{"code": refused, "message": _REFUSALS[refused]}] if refused else None,
        detail=detail,
        risk_tags=list(risk_tags(Control.AUDIT)),
    )


_REFUSALS = {
    "credential.invalid": "unknown or wrong admin credential",
    "credential.locked": "too many failed sign-ins with this credential: locked for a while",
}


@post("/sign-in")
async def sign_in(request: Request) -> Response[Any]:  # type: ignore[type-arg]
    """Sign in with an admin credential. Each attempt leaves a ``console.sign_in`` receipt
    (the credential id and client address, never the secret); attempts are limited per
    address and, after repeated failures, per credential id."""
    console = _console(request)
    _same_origin(request)
    form = await request.form()
    values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
    if not console.sessions.take_pre_token(
        request.cookies.get(cookie_name(request, pre=True)), values.get("csrf")
    ):
        raise CsrfRefused
    address = client_address(request)
    console.sign_in_limiter.check(address or "-")
    if not is_tls(request) and not is_loopback(request):
        raise Forbidden("sign in over HTTPS: this connection is plain HTTP from another host")
    credential_id = values.get("credential_id", "").strip()
    secret = values.get("secret", "").strip()
    if secret.startswith("tadm_"):
        match = _SECRET.fullmatch(secret)
        credential_id = match.group(1) if match else ""
    # Only a well-formed id is recorded: a secret typed in the id field never is.
    shown_id = credential_id if _CREDENTIAL_ID.fullmatch(credential_id) else "(malformed)"
    detail = {"credential_id": shown_id, "client": address[:64]}
    if shown_id != "(malformed)" and console.failures.locked(shown_id):
        _receipt(console, "console.sign_in", [], detail, refused="credential.locked")
        return _sign_in_again(
            request, values, 429, "Too many failed sign-ins with this credential; wait 5 minutes."
        )
    try:
        if secret.startswith("tadm_"):
            row = console.tether.credentials.verify(secret)
        else:
            row = console.tether.credentials.verify_pair(credential_id, secret)
    except TetherError:
        if shown_id != "(malformed)":
            console.failures.failed(shown_id)
        _receipt(console, "console.sign_in", [], detail, refused="credential.invalid")
        return _sign_in_again(request, values, 401, "Unknown or wrong admin credential.")
    console.failures.succeeded(row.credential_id)
    _receipt(console, "console.sign_in", [row.owner], {**detail, "role": row.role})
    session = console.sessions.create(row.credential_id, row.role, row.owner)
    done = Redirect(_next(values.get("next")), status_code=303)
    done.set_cookie(_cookie(request, cookie_name(request), session.session_id))
    done.set_cookie(_cookie(request, cookie_name(request, pre=True), "", 0))
    return done


@post("/sign-out")
async def sign_out(request: Request) -> Response[Any]:  # type: ignore[type-arg]
    """Any signed-in role signs out; a ``console.sign_out`` receipt records it."""
    session, _ = await _form(request, "owner", "approver", "auditor")
    console = _console(request)
    console.sessions.end(session)
    _receipt(console, "console.sign_out", [session.owner], {"credential_id": session.credential_id})
    response = Redirect("/console/sign-in", status_code=303)
    response.set_cookie(_cookie(request, cookie_name(request), "", 0))
    return response


@get("/static/{name:str}")
async def static(name: str) -> Response[bytes]:
    if name not in _STATIC:
        raise NotFound("no such file")
    data = resources.files("tether.console").joinpath("static", name).read_bytes()
    return Response(
        data,
        media_type=_STATIC[name],
        headers={"Cache-Control": "public, max-age=300"},
    )


# -- inventory ------------------------------------------------------------------------------
@get("/identities")
async def identities(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """Every identity with its owner, kind, attestation, last activity, open tasks and
    standing privileges (long-lived tasks, leases outliving their task); unowned, idle
    and privileged ones are flagged."""
    session = _page(request, "owner", "approver", "auditor")
    console = _console(request)
    now = console.tether.clock.now()
    after = request.query_params.get("after") or None
    rows = console.tether.store.identity_summaries(
        after=after,
        limit=PAGE + 1,
        now=now,
        owner=session.owner if session.role == Role.OWNER else None,
    )
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    items = []
    for r in rows:
        flags = []
        if "@" not in r.identity.owner:
            flags.append("no owner")
        last = r.last_activity or r.identity.created_at
        if r.identity.status == "active" and now - last > IDLE_DAYS * 86400:
            flags.append(f"idle over {IDLE_DAYS} days")
        if r.long_tasks:
            flags.append(f"standing privilege: {r.long_tasks} task(s) living over a day")
        if r.orphan_leases:
            flags.append(f"standing privilege: {r.orphan_leases} lease(s) outliving their task")
        items.append(
            {
                "row": r,
                "flags": flags,
                "may_offboard": r.identity.status == "active"
                and _owns(console, session, r.identity.spiffe_id),
            }
        )
    return console.render(
        "identities.html",
        request,
        session,
        items=items,
        next_after=rows[-1].identity.spiffe_id if more and rows else None,
        idle_days=IDLE_DAYS,
    )


@post("/identities/offboard")
async def offboard(request: Request) -> Redirect:  # type: ignore[type-arg]
    """Offboard: disable the identity and revoke everything it holds (admins; owners for
    identities they own)."""
    session, form = await _form(request, "owner")
    console = _console(request)
    spiffe_id = form.get("spiffe_id", "")
    console.tether.identities.get(spiffe_id)
    if not _owns(console, session, spiffe_id):
        raise Forbidden(f"{session.owner} does not own {spiffe_id}")
    _, revoked = console.tether.disable_identity(spiffe_id)
    return _back(
        console,
        session,
        "/console/identities",
        f"{spiffe_id} offboarded; {len(revoked)} task(s) revoked",
    )


# -- admin credentials -----------------------------------------------------------------------
@get("/credentials")
async def credentials(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """Every admin credential (admins): role, owner, status, expiry; disable or rotate."""
    session = _page(request)
    console = _console(request)
    now = console.tether.clock.now()
    rows = [credential_dict(r, now) for r in console.tether.credentials.list()]
    return console.render("credentials.html", request, session, rows=rows, issued=None)


@post("/credentials/{credential_id:str}")
async def credential_change(request: Request, credential_id: str) -> Response[Any]:  # type: ignore[type-arg]
    """Disable a credential, or rotate it (its new secret shown once, on this page only)."""
    session, form = await _form(request)
    console = _console(request)
    action = form.get("action", "")
    if action == "disable":
        console.tether.credentials.disable(
            credential_id, by=session.owner, reason=form.get("reason", "")[:500]
        )
        return _back(console, session, "/console/credentials", f"{credential_id} disabled")
    if action != "rotate":
        raise UsageError("action must be disable or rotate")
    row, secret = console.tether.credentials.rotate(credential_id, by=session.owner)
    now = console.tether.clock.now()
    rows = [credential_dict(r, now) for r in console.tether.credentials.list()]
    response = console.render(
        "credentials.html",
        request,
        session,
        rows=rows,
        issued={"credential_id": row.credential_id, "replaces": credential_id, "secret": secret},
    )
    response.headers["Cache-Control"] = "no-store"
    return response


# -- tasks ----------------------------------------------------------------------------------
def _task_view(console: Console, row: TaskRow, counts: dict[str, int]) -> dict[str, Any]:
    tether = console.tether
    intent: Intent | None
    try:
        intent = decode_intent(row.intent_json)
    except Exception:  # an intent this version cannot read still shows as a task
        intent = None
    token_exp = row.expires_at
    if intent is not None and intent.token_ttl_seconds is not None:
        issued = row.opened_at
        renewals = tether.store.records_page(
            limit=1, kind="task.renew", task_id=row.task_id, effect="allow"
        )
        if renewals:
            issued = renewals[0].created_at
        token_exp = min(row.expires_at, issued + intent.token_ttl_seconds)
    labels = tether.store.list_task_labels(row.task_id)
    flow: FlowState | None = None
    raw = tether.store.get_task_flow(row.task_id)
    if raw is not None:
        with contextlib.suppress(Exception):
            flow = msgspec.json.decode(raw, type=FlowState)
    drift = []
    if counts.get("deny"):
        drift.append(f"{counts['deny']} call(s) denied")
    if counts.get("approval_required"):
        drift.append(f"{counts['approval_required']} call(s) held for approval")
    if flow is not None:
        if flow.untrusted_sources:
            drift.append("read untrusted content: " + ", ".join(flow.untrusted_sources[:3]))
        if flow.sensitive_sources:
            drift.append("read confidential data: " + ", ".join(flow.sensitive_sources[:3]))
        if flow.discovery_calls:
            drift.append(f"{flow.discovery_calls} discovery call(s)")
    budget = intent.budget.max_calls if intent is not None else None
    if budget and row.calls_used >= budget:
        drift.append("budget spent")
    return {
        "row": row,
        "intent": intent,
        "purpose": intent.purpose if intent is not None else "(unreadable intent)",
        "budget": budget,
        "token_expires_at": token_exp,
        "labels": labels,
        "counts": counts,
        "drift": drift,
        "depth": len(json.loads(row.chain_json)) - 1,
    }


@get("/tasks")
async def tasks(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """Live tasks (or ``?status=all``): intent, token expiry, calls, labels, budget, drift."""
    session = _page(request, "owner", "approver", "auditor")
    console = _console(request)
    status = request.query_params.get("status", "open")
    before = None
    if cursor := request.query_params.get("before"):
        at, _, task_id = cursor.partition("|")
        with contextlib.suppress(ValueError):
            before = (float(at), task_id)
    rows = console.tether.store.tasks_page(
        status=None if status == "all" else "open",
        owner=session.owner if session.role == Role.OWNER else None,
        before=before,
        limit=PAGE + 1,
    )
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    counts = console.tether.store.task_effect_counts([r.task_id for r in rows])
    items = [_task_view(console, r, counts.get(r.task_id, {})) for r in rows]
    for item in items:
        item["may_end"] = item["row"].status == "open" and (
            _owns(console, session, item["row"].agent_id)
        )
    last = rows[-1] if more and rows else None
    return console.render(
        "tasks.html",
        request,
        session,
        items=items,
        status=status,
        next_before=f"{last.opened_at!r}|{last.task_id}" if last else None,
        may_kill=session.role == Role.ADMIN,
    )


@get("/tasks/{task_id:str}")
async def task_detail(request: Request, task_id: str) -> Response[str]:  # type: ignore[type-arg]
    session = _page(request, "owner", "approver", "auditor")
    console = _console(request)
    row = console.tether.show_task(task_id)
    if session.role == Role.OWNER and not _owns(console, session, row.agent_id):
        raise Forbidden("not allowed to see this task")
    tree = console.tether.tasks.tree(task_id)
    shown = _visible(console, session, tree)
    counts = console.tether.store.task_effect_counts([r.task_id for r in shown])
    views: dict[str, dict[str, Any]] = {
        r.task_id: _task_view(console, r, counts.get(r.task_id, {})) for r in shown
    }
    for r in tree:  # another owner's task: only that it is there
        views.setdefault(r.task_id, {"redacted": True})
    children: dict[str, list[str]] = {}
    for r in tree:
        if r.parent_task_id is not None:
            children.setdefault(r.parent_task_id, []).append(r.task_id)
    recent = console.tether.store.records_page(limit=PAGE, task_id=task_id)
    return console.render(
        "task.html",
        request,
        session,
        item=views[task_id],
        views=views,
        children=children,
        root=tree[0].task_id,
        receipts=[_record(r) for r in recent],
        may_end=row.status == "open" and _owns(console, session, row.agent_id),
        may_kill=session.role == Role.ADMIN,
    )


def _visible(console: Console, session: Session, tree: list[TaskRow]) -> list[TaskRow]:
    """The nodes of a delegation tree the session may see: an owner, those of the agents
    they own; every other role, all."""
    if session.role != Role.OWNER:
        return tree
    owned: dict[str, bool] = {}
    for r in tree:
        if r.agent_id not in owned:
            identity = console.tether.store.get_identity(r.agent_id)
            owned[r.agent_id] = identity is not None and identity.owner == session.owner
    return [r for r in tree if owned[r.agent_id]]


@post("/tasks/{task_id:str}/end")
async def task_end(request: Request, task_id: str) -> Redirect:  # type: ignore[type-arg]
    session, _ = await _form(request, "owner")
    console = _console(request)
    row = console.tether.tasks.get(task_id)
    if not _owns(console, session, row.agent_id):
        raise Forbidden("not allowed to end this task")
    if row.status != "open":
        raise Conflict(f"task {task_id} is {row.status}")
    console.tether.end_task(task_id)
    return _back(console, session, f"/console/tasks/{task_id}", f"task {task_id} ended")


@post("/kill")
async def kill(request: Request) -> Redirect:  # type: ignore[type-arg]
    """The kill switch for one agent (admins): every open task of the agent, its sub-tasks,
    tokens and leases are revoked now, with one receipt."""
    session, form = await _form(request)
    console = _console(request)
    agent = form.get("agent", "")
    console.tether.identities.get(agent)
    reason = form.get("reason", "").strip() or "killed from the console"
    result = console.tether.kill(reason[:500], by=session.owner, agent=agent)
    return _back(
        console,
        session,
        "/console/tasks",
        f"kill switch for {agent}: {len(result['tasks'])} task(s)",
    )


# -- decisions ------------------------------------------------------------------------------
_FILTERS = ("agent", "tool", "effect", "rule", "risk_tag")


def _record(row: RecordRow) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(row.body)
    body["hash"] = row.hash
    raw = body.get("reasons")
    reasons: list[Any] = raw if isinstance(raw, list) else []
    body["plain"] = [
        {"code": str(r.get("code", "")), "message": str(r.get("message", ""))}
        for r in reasons
        if isinstance(r, dict)
    ]
    chain = body.get("chain")
    body["agent"] = chain[0] if isinstance(chain, list) and chain else ""
    return body


@get("/decisions")
async def decisions(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """The decision receipts, newest first, filtered in the store, a page at a time."""
    q = request.query_params
    before = None
    with contextlib.suppress(ValueError):
        before = int(q.get("before", "")) if q.get("before") else None
    follow = q.get("follow") == "1" and before is None  # the newest page, reloaded every 5 s
    # A reload of a followed page is no activity: an unattended tab still times out.
    session = _page(request, "auditor", touch=not follow)
    console = _console(request)
    filters: dict[str, str] = {k: str(q.get(k, "")).strip()[:512] for k in _FILTERS}
    rows = console.tether.store.records_page(
        before_seq=before,
        limit=PAGE + 1,
        kind="decision",
        agent=filters["agent"] or None,
        tool=filters["tool"] or None,
        effect=filters["effect"] or None,
        rule=filters["rule"] or None,
        risk_tag=filters["risk_tag"] or None,
    )
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    query = {k: v for k, v in filters.items() if v}
    return console.render(
        "decisions.html",
        request,
        session,
        records=[_record(r) for r in rows],
        filters=filters,
        next_page=urlencode({**query, "before": rows[-1].seq}) if more and rows else None,
        follow=follow,
        follow_link=urlencode({**query, **({} if follow else {"follow": "1"})}),
    )


# -- approvals ------------------------------------------------------------------------------
@get("/approvals")
async def approvals(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """The approvals queue, newest first, a page at a time (keyset in the store): each
    exact call held for a human, with the data origins the task had read when a rule asked
    for approval."""
    session = _page(request, "approver", "auditor")
    console = _console(request)
    status = request.query_params.get("status", "pending")
    if status not in ("pending", "approved", "denied", "used", "all"):
        status = "pending"
    before = None
    if cursor := request.query_params.get("before"):
        at, _, approval_id = cursor.partition("|")
        with contextlib.suppress(ValueError):
            before = (float(at), approval_id)
    rows = console.tether.store.approvals_page(
        status=None if status == "all" else status, before=before, limit=PAGE + 1
    )
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    comments = _comments(console, rows)
    labels: dict[str, list[tuple[str, str, bool, str, float]]] = {}
    items = []
    for r in rows:
        if r.task_id not in labels:  # once per task on the page
            labels[r.task_id] = console.tether.store.list_task_labels(r.task_id)
        items.append(
            {
                "row": r,
                "args": json.loads(r.args_json),
                "reasons": json.loads(r.reasons_json),
                "origins": labels[r.task_id],
                "comment": comments.get(r.approval_id, ""),
                "review": console.tether.approvals.review(r, session.owner),
            }
        )
    last = rows[-1] if more and rows else None
    return console.render(
        "approvals.html",
        request,
        session,
        items=items,
        status=status,
        next_page=urlencode({"status": status, "before": f"{last.created_at!r}|{last.approval_id}"})
        if last
        else None,
        may_decide=_may(session, "approver"),
    )


def _comments(console: Console, rows: list[ApprovalRow]) -> dict[str, str]:
    """The human's words of each decided approval on the page, from the ``approval.decide``
    receipts made while they were decided (one query, a few for a busy period)."""
    wanted = {r.approval_id: r.decided_at for r in rows if r.decided_at is not None}
    found: dict[str, str] = {}
    if not wanted:
        return found
    since, until = min(wanted.values()) - 1.0, max(wanted.values()) + 1.0
    before: int | None = None
    while len(found) < len(wanted):
        page = console.tether.store.records_page(
            kind="approval.decide", since=since, until=until, before_seq=before, limit=500
        )
        for record in page:
            detail = json.loads(record.body).get("detail") or {}
            approval_id = str(detail.get("approval_id", ""))
            if approval_id in wanted and approval_id not in found:
                found[approval_id] = str(detail.get("comment", ""))
        if len(page) < 500:
            break
        before = page[-1].seq
    return found


@post("/approvals/{approval_id:str}")
async def approval_decide(request: Request, approval_id: str) -> Redirect:  # type: ignore[type-arg]
    """Approve or deny with a comment (kept in the receipt); the agent's identical call
    then goes through once, or stays refused."""
    session, form = await _form(request, "approver")
    console = _console(request)
    verdict = form.get("decision")
    if verdict not in ("approve", "deny"):
        raise UsageError("decide approve or deny")
    console.tether.approvals.decide(
        approval_id,
        approve=verdict == "approve",
        by=session.owner,
        comment=form.get("comment", "").strip(),
    )
    word = "approved" if verdict == "approve" else "denied"
    return _back(console, session, "/console/approvals", f"{approval_id} {word}")


# -- audit ----------------------------------------------------------------------------------
@get("/audit")
async def audit(request: Request) -> Response[str]:  # type: ignore[type-arg]
    session = _page(request, "auditor")
    return _audit_page(request, session, None)


def _audit_page(request: Request, session: Session, report: Any) -> Response[str]:  # type: ignore[type-arg]
    console = _console(request)
    recent = console.tether.store.records_page(limit=20)
    return console.render(
        "audit.html",
        request,
        session,
        report=report,
        records=[_record(r) for r in recent],
        checkpoints=len(console.tether.store.list_checkpoints()),
    )


@post("/audit/verify")
async def audit_verify(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """Walk the whole chain and every signed checkpoint; show the result."""
    session, _ = await _form(request, "auditor")
    console = _console(request)
    if not console.verifying.acquire(blocking=False):
        raise RateLimited("an audit verification is already running")
    try:
        # The walk reads the whole chain: off the event loop, so other requests go on.
        report = await asyncio.to_thread(console.tether.verify_audit)
    finally:
        console.verifying.release()
    return _audit_page(request, session, report)


MAX_TRACE = 2000


def _trace(console: Console, task_id: str) -> dict[str, Any]:
    """What :meth:`tether.Tether.trace` returns, from indexed queries (the receipts of each
    task of the tree, newest :data:`MAX_TRACE` of each) instead of a walk of the chain."""
    rows = console.tether.tasks.tree(task_id)
    records: list[RecordRow] = []
    for row in rows:
        records.extend(console.tether.store.records_page(task_id=row.task_id, limit=MAX_TRACE))
    receipts = [_record(r) for r in sorted(records, key=lambda r: r.seq)]
    leases = [
        lease_dict(lease)
        for row in rows
        for lease in console.tether.store.list_leases(task_id=row.task_id)
    ]
    tasks = [
        {
            "task_id": r.task_id,
            "parent_task_id": r.parent_task_id,
            "agent": r.agent_id,
            "delegated_by": json.loads(r.chain_json)[1] if r.parent_task_id else None,
            "status": r.status,
            "end_reason": r.end_reason,
            "calls_used": r.calls_used,
            "intent": json.loads(r.intent_json),
        }
        for r in rows
    ]
    return {"task_id": task_id, "tasks": tasks, "receipts": receipts, "leases": leases}


@get("/audit/trace")
async def audit_trace(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """A task's whole delegation tree, every receipt of it and every lease."""
    session = _page(request, "auditor")
    console = _console(request)
    task_id = request.query_params.get("task_id", "").strip()
    if not task_id:
        raise UsageError("name a task")
    trace = _trace(console, task_id)
    children: dict[str | None, list[dict[str, Any]]] = {}
    for t in trace["tasks"]:
        children.setdefault(t["parent_task_id"], []).append(t)
    return console.render(
        "trace.html", request, session, trace=trace, children=children, task_id=task_id
    )


def _day(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%d")))
    except ValueError:
        raise UsageError("dates are YYYY-MM-DD") from None


@get("/audit/export.jsonl")
async def audit_export(request: Request) -> Stream:  # type: ignore[type-arg]
    """Every receipt as JSON lines: ``seq``, ``prev_hash``, ``hash`` and the ``record``
    (its canonical JSON re-encoded is what the hash covers), optionally in a period. The
    lines are ASCII (``\\uXXXX`` escapes), so U+2028 and U+2029 never appear raw. The
    export leaves a ``console.export`` receipt."""
    session = _page(request, "auditor")
    console = _console(request)
    store = console.tether.store
    since = _day(request.query_params.get("since"), 0.0)
    until = _day(request.query_params.get("until"), float("inf"))
    if request.query_params.get("until"):
        until += 86400.0
    period = {
        "since": request.query_params.get("since") or None,
        "until": request.query_params.get("until") or None,
    }
    _receipt(
        console,
        "console.export",
        [session.owner],
        {"credential_id": session.credential_id, **{k: v for k, v in period.items() if v}},
    )

    def lines() -> Any:
        for row in store.iter_records():
            if since <= row.created_at < until:
                line = {
                    "seq": row.seq,
                    "prev_hash": row.prev_hash,
                    "hash": row.hash,
                    "record": json.loads(row.body),
                }
                yield (json.dumps(line, sort_keys=True, ensure_ascii=True) + "\n").encode()

    return Stream(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="tether-receipts.jsonl"'},
    )


# -- risk report and accepted risks -------------------------------------------------------
@get("/risk")
async def risk_report(request: Request) -> Response[str]:  # type: ignore[type-arg]
    """Receipts by framework over a period, with charts; accepted risks in force beside
    the rows they are about. Printable (the print stylesheet drops the navigation)."""
    # Approvers too: the page holds the Accept button of the risks that name them.
    session = _page(request, "auditor", "owner", "approver")
    console = _console(request)
    now = console.tether.clock.now()
    today = float(calendar.timegm((*time.gmtime(now)[:3], 0, 0, 0)))
    since = _day(request.query_params.get("from"), today - 29 * 86400)
    until = _day(request.query_params.get("to"), today) + 86400.0
    if until <= since:
        raise UsageError("the period ends before it starts")
    counts = console.tether.store.record_tag_counts(since, until)
    risks = console.risks.list()
    in_force: dict[str, list[str]] = {}
    for risk in risks:
        if risk.in_force:
            in_force.setdefault(risk.row.risk_tag, []).append(risk.row.title)
    sections = _report.build(counts, in_force)
    # Receipts once each (a receipt carries several tags), and tag counts apart.
    effects = console.tether.store.record_effect_counts(since, until)
    totals = {
        "receipts": sum(effects.values()),
        "findings": effects.get("deny", 0) + effects.get("approval_required", 0),
        "tags": sum(c for _, _, c in counts),
    }
    return console.render(
        "risk.html",
        request,
        session,
        sections=sections,
        since=since,
        until=until,
        period_from=time.strftime("%Y-%m-%d", time.gmtime(since)),
        period_to=time.strftime("%Y-%m-%d", time.gmtime(until - 86400)),
        risks=risks,
        tags=[s.prefix + ":" + r.key for s in sections for r in s.rows],
        may_record=_may(session, "owner"),
        totals=totals,
    )


@post("/risks")
async def risk_record(request: Request) -> Redirect:  # type: ignore[type-arg]
    session, form = await _form(request, "owner")
    try:
        days = int(form.get("days", ""))
    except ValueError:
        raise UsageError("the expiry is a number of days") from None
    console = _console(request)
    row = console.risks.record(
        title=form.get("title", ""),
        risk_tag=form.get("risk_tag", ""),
        scope=form.get("scope", ""),
        justification=form.get("justification", ""),
        approver=form.get("approver", ""),
        days=days,
        by=session.owner,
    )
    return _back(
        console,
        session,
        "/console/risk",
        f"accepted risk {row.risk_id} recorded; awaiting {row.approver}",
    )


@post("/risks/{risk_id:str}")
async def risk_decide(request: Request, risk_id: str) -> Redirect:  # type: ignore[type-arg]
    session, form = await _form(request, "owner", "approver")
    console = _console(request)
    action = form.get("action")
    if action == "withdraw":
        console.risks.withdraw(risk_id, by=session.owner, admin=session.role == Role.ADMIN)
    elif action in ("accept", "reject"):
        require(_principal(session), "approver")
        console.risks.decide(risk_id, accept=action == "accept", by=session.owner)
    else:
        raise UsageError("accept, reject or withdraw")
    return _back(console, session, "/console/risk", f"accepted risk {risk_id}: {action}")


HANDLERS = [
    home,
    sign_in_form,
    sign_in,
    sign_out,
    static,
    identities,
    offboard,
    credentials,
    credential_change,
    tasks,
    task_detail,
    task_end,
    kill,
    decisions,
    approvals,
    approval_decide,
    audit,
    audit_verify,
    audit_trace,
    audit_export,
    risk_report,
    risk_record,
    risk_decide,
]


def console_router(tether: Tether) -> Router:
    """The console of ``tether``, to mount in its server's app under ``/console``."""
    _CONSOLES[tether] = Console.create(tether)
    return Router(
        path="/console",
        route_handlers=HANDLERS,
        response_headers=HEADERS,
        middleware=[_hsts],
        exception_handlers={Exception: _error_page},
        include_in_schema=False,
    )
