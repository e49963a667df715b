"""Console sessions and CSRF protection.

- Sessions live in the store (table ``console_sessions``), so every node over one store
  serves every signed-in operator and a restart signs nobody out. The cookie carries a
  random 256-bit id; the store keeps only its SHA-256 hash with the admin credential's
  id, role and owner, the sign-in time, the last activity (``seen_at``) and the absolute
  end (``expires_at``). Sessions end after :data:`IDLE_SECONDS` without a request and
  :data:`MAX_SECONDS` after sign-in, and at once when their admin credential is disabled
  (checked on every request); expired rows are deleted when they are next presented, at
  every sign-in and by the server's reaper. A page reloading itself (``follow=1``) is no activity.
- ``seen_at`` is written at most once per :data:`TOUCH_SECONDS` per session, not on every
  request: a session may therefore end up to one minute before 15 minutes after its very
  last request (the idle timeout is precise to within a minute).
- The cookie is ``HttpOnly``, ``SameSite=Strict``, path ``/console``. Over TLS it is
  also ``Secure`` and named with the ``__Host-`` prefix (path ``/``, no domain). On
  plain HTTP (loopback only: a sign-in over plain HTTP from any other address is
  refused) a ``Secure`` cookie would never come back, so it is sent without it.
- Behind a proxy, ``ServerSettings.public_url`` (or ``TETHER_PUBLIC_URL``) names the
  console's public origin: TLS is its scheme (``https``: ``Secure``, ``__Host-`` and
  Strict-Transport-Security) and a POST's ``Origin`` must be that origin. Unset, TLS is
  the request's own scheme and the Origin its own host. ``TETHER_TRUST_FORWARDED=1``
  takes the client's address from the last ``X-Forwarded-For`` entry (the one the
  nearest proxy added); otherwise the header is ignored.
- CSRF: a token bound to the session is put in every form; a POST whose ``csrf`` field
  is missing or differs is refused (403) before anything else runs. The token is
  HMAC-SHA256 keyed with the raw session id (:func:`csrf_token`), so nothing CSRF-related
  is stored and every node computes the same token without a shared key; only the
  browser holding the cookie knows the raw id, and a reader of the store, which holds
  only the id's hash, cannot derive it. The sign-in form, which has no session yet, is
  protected the same way by a short-lived pre-session token in its own cookie; its hash
  is recorded in the store's proof table when the form is served and again when it is
  used, so it works on any node, once, for :data:`PRE_SECONDS`. A POST whose ``Origin``
  header names another origin is refused too.
- Sign-in attempts are limited per client address and, after :data:`MAX_FAILURES`
  failures in :data:`FAILURE_WINDOW` seconds, a credential id cannot sign in for
  :data:`LOCK_SECONDS`. These counters stay in the memory of each node: behind a
  balancer the limits hold per node (a client spread over ``n`` nodes gets up to ``n``
  times as many attempts) and a restart clears them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from litestar import Request

from tether.audit._rows import CONSOLE_SESSION, RowTags, session_fields
from tether.core._clock import Clock
from tether.store import ConsoleSessionRow, Store

IDLE_SECONDS = 15 * 60.0
MAX_SECONDS = 8 * 3600.0
TOUCH_SECONDS = 60.0
PRE_SECONDS = 10 * 60.0
MAX_SESSIONS = 10_000
COOKIE = "tether_console"
SECURE_COOKIE = "__Host-tether_console"
PRE_COOKIE = "tether_console_signin"
SECURE_PRE_COOKIE = "__Host-tether_console_signin"
MAX_FAILURES = 5
FAILURE_WINDOW = 5 * 60.0
LOCK_SECONDS = 5 * 60.0
HSTS = "max-age=31536000"


@dataclass
class Session:
    """A live session as one request sees it (``session_id`` is the cookie's raw id)."""

    session_id: str
    session_hash: str
    credential_id: str
    role: str
    owner: str
    csrf: str
    created_at: float
    seen_at: float
    #: One line shown on the next page (what the last form did), then cleared.
    flash: str = ""


@dataclass(frozen=True)
class Deployment:
    """Where the console is served: its public origin (None: the request's own) and
    whether ``X-Forwarded-For`` is believed."""

    public_origin: str | None
    trust_forwarded: bool


@functools.lru_cache(maxsize=8)
def _deployment(public_url: str | None, trust_forwarded: str | None) -> Deployment:
    origin = None
    if public_url:
        parts = urlsplit(public_url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(
                f"the public URL must be an origin (https://tether.example): {public_url!r}"
            )
        origin = f"{parts.scheme}://{parts.netloc}".lower()
    return Deployment(origin, (trust_forwarded or "").strip() in ("1", "true", "yes"))


def deployment(request: Request) -> Deployment:  # type: ignore[type-arg]
    """The settings of the app (``public_url``) or the environment."""
    ctx = request.app.state.get("ctx")
    configured = getattr(getattr(ctx, "settings", None), "public_url", None)
    return _deployment(
        configured or os.environ.get("TETHER_PUBLIC_URL") or None,
        os.environ.get("TETHER_TRUST_FORWARDED"),
    )


def is_tls(request: Request) -> bool:  # type: ignore[type-arg]
    origin = deployment(request).public_origin
    if origin is not None:
        return origin.startswith("https://")
    return request.url.scheme == "https"


def expected_origin(request: Request) -> str:  # type: ignore[type-arg]
    """The one ``Origin`` a console form may be posted from."""
    origin = deployment(request).public_origin
    return origin if origin is not None else f"{request.url.scheme}://{request.url.netloc}"


def client_address(request: Request) -> str:  # type: ignore[type-arg]
    if deployment(request).trust_forwarded:
        forwarded = request.headers.get("x-forwarded-for", "")
        last = forwarded.rsplit(",", 1)[-1].strip()
        if last:
            return last
    return request.client.host if request.client else ""


def is_loopback(request: Request) -> bool:  # type: ignore[type-arg]
    try:
        return ipaddress.ip_address(client_address(request)).is_loopback
    except ValueError:
        return False


def cookie_name(request: Request, *, pre: bool = False) -> str:  # type: ignore[type-arg]
    if is_tls(request):
        return SECURE_PRE_COOKIE if pre else SECURE_COOKIE
    return PRE_COOKIE if pre else COOKIE


def cookie_attributes(request: Request) -> dict[str, object]:  # type: ignore[type-arg]
    """Keyword arguments of :meth:`litestar.Response.set_cookie` for console cookies."""
    tls = is_tls(request)
    return {
        "path": "/" if tls else "/console",
        "httponly": True,
        "samesite": "strict",
        "secure": tls,
    }


def same_token(presented: str | None, expected: str) -> bool:
    return bool(presented) and hmac.compare_digest(str(presented).encode(), expected.encode())


def purge_expired(store: Store, clock: Clock) -> int:
    """Delete every expired console session (idle or past its absolute end) and every
    expired single-use token (sign-in forms' among them); the sessions deleted."""
    now = clock.now()
    store.purge_proofs(now)
    return store.purge_console_sessions(now, now - IDLE_SECONDS)


def session_hash(session_id: str) -> str:
    """What the store keeps of a session id: its SHA-256 (hex)."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def csrf_token(session_id: str) -> str:
    """The session's CSRF token: HMAC-SHA256 keyed with the raw session id."""
    mac = hmac.new(session_id.encode(), b"tether console csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


class Sessions:
    """The console sessions, kept in the store (shared by every node over it)."""

    def __init__(self, store: Store, clock: Clock, rows: RowTags) -> None:
        self._store = store
        self._clock = clock
        self._rows = rows

    def create(self, credential_id: str, role: str, owner: str) -> Session:
        """A new session (a fresh id on every sign-in: no fixation). Expired sessions of
        everybody are deleted first."""
        now = self._clock.now()
        self.purge()
        session_id = secrets.token_urlsafe(32)
        row = ConsoleSessionRow(
            session_hash=session_hash(session_id),
            credential_id=credential_id,
            role=role,
            owner=owner,
            created_at=now,
            seen_at=now,
            expires_at=now + MAX_SECONDS,
        )
        with self._store.transaction():
            self._store.add_console_session(row)
            self._rows.tag(CONSOLE_SESSION, row.session_hash, session_fields(row))
        return _session(session_id, row)

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The live session of this id, or None if unknown or expired. Touched (its idle
        time restarts) unless ``touch`` is False: a page reloading itself is no activity.
        The touch is written at most once per :data:`TOUCH_SECONDS`."""
        if not session_id:
            return None
        now = self._clock.now()
        digest = session_hash(session_id)
        row = self._store.get_console_session(digest)
        if row is None or not self._rows.authentic(CONSOLE_SESSION, digest, session_fields(row)):
            return None  # a session row written without the KEK signs nobody in
        if now - row.seen_at >= IDLE_SECONDS or now >= row.expires_at:
            self._store.delete_console_session(digest)
            return None
        session = _session(session_id, row)
        if touch and now - row.seen_at >= TOUCH_SECONDS:
            self._store.touch_console_session(digest, now)
            session.seen_at = now
        return session

    def end(self, session: Session) -> None:
        self._store.delete_console_session(session.session_hash)

    def flash(self, session: Session, text: str) -> None:
        """Set (or, with "", clear) the line the session's next page shows."""
        if session.flash != text:
            self._store.flash_console_session(session.session_hash, text)
            session.flash = text

    def purge(self) -> int:
        """Delete every expired session (idle or past its absolute end)."""
        return purge_expired(self._store, self._clock)

    def pre_token(self) -> str:
        """A sign-in form's CSRF token (also set as its cookie). Its hash is recorded in
        the store's single-use proof table, so any node accepts it."""
        expires = int(self._clock.now() + PRE_SECONDS) + 1
        token = f"{expires}.{secrets.token_urlsafe(32)}"
        self._store.record_proof(_PRE_ISSUED + session_hash(token), float(expires))
        return token

    def take_pre_token(self, cookie: str | None, field: str | None) -> bool:
        """True once for a live sign-in token presented both as cookie and form field."""
        if not cookie or not same_token(field, cookie):
            return False
        expires, _, _ = cookie.partition(".")
        if not (expires.isascii() and expires.isdigit()) or int(expires) <= self._clock.now():
            return False
        digest = session_hash(cookie)
        if not self._store.proof_seen(_PRE_ISSUED + digest):
            return False
        return self._store.record_proof(_PRE_TAKEN + digest, float(expires))


_PRE_ISSUED = "console-sign-in:"
_PRE_TAKEN = "console-sign-in-used:"


def _session(session_id: str, row: ConsoleSessionRow) -> Session:
    return Session(
        session_id=session_id,
        session_hash=row.session_hash,
        credential_id=row.credential_id,
        role=row.role,
        owner=row.owner,
        csrf=csrf_token(session_id),
        created_at=row.created_at,
        seen_at=row.seen_at,
        flash=row.flash,
    )


class SignInFailures:
    """Failed sign-ins per credential id: :data:`MAX_FAILURES` within
    :data:`FAILURE_WINDOW` seconds lock that id's sign-in for :data:`LOCK_SECONDS`."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def locked(self, credential_id: str) -> bool:
        now = self._clock.now()
        with self._lock:
            until = self._locked.get(credential_id)
            if until is None:
                return False
            if until <= now:
                del self._locked[credential_id]
                return False
            return True

    def failed(self, credential_id: str) -> bool:
        """Count one failure; True when it locks the credential id."""
        now = self._clock.now()
        with self._lock:
            if len(self._failures) >= MAX_SESSIONS:
                self._failures = {
                    k: v for k, v in self._failures.items() if v and v[-1] > now - FAILURE_WINDOW
                }
            recent = [t for t in self._failures.get(credential_id, []) if t > now - FAILURE_WINDOW]
            recent.append(now)
            if len(recent) >= MAX_FAILURES:
                self._failures.pop(credential_id, None)
                if len(self._locked) >= MAX_SESSIONS:
                    self._locked = {k: u for k, u in self._locked.items() if u > now}
                self._locked[credential_id] = now + LOCK_SECONDS
                return True
            self._failures[credential_id] = recent
            return False

    def succeeded(self, credential_id: str) -> None:
        with self._lock:
            self._failures.pop(credential_id, None)
