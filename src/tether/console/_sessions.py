"""Console sessions and CSRF protection.

- Server-side sessions: the cookie carries only a random 256-bit id; the session (the
  admin credential's id, role and owner, and its CSRF token) stays in this process. A
  restart of ``tether serve`` signs everybody out. Sessions end after
  :data:`IDLE_SECONDS` without a request and :data:`MAX_SECONDS` after sign-in, and at
  once when their admin credential is disabled (checked on every request).
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
- CSRF: a synchronizer token bound to the session is put in every form; a POST whose
  ``csrf`` field is missing or differs is refused (403) before anything else runs. The
  sign-in form, which has no session yet, is protected the same way by a short-lived
  pre-session token in its own cookie. A POST whose ``Origin`` header names another
  origin is refused too.
- Sign-in attempts are limited per client address and, after :data:`MAX_FAILURES`
  failures in :data:`FAILURE_WINDOW` seconds, a credential id cannot sign in for
  :data:`LOCK_SECONDS`.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import os
import secrets
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from litestar import Request

from tether.core._clock import Clock

IDLE_SECONDS = 15 * 60.0
MAX_SECONDS = 8 * 3600.0
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
    session_id: str
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


class Sessions:
    """The live console sessions of this process."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._pre: dict[str, float] = {}
        self._lock = threading.Lock()

    def create(self, credential_id: str, role: str, owner: str) -> Session:
        """A new session (a fresh id on every sign-in: no fixation)."""
        now = self._clock.now()
        session = Session(
            session_id=secrets.token_urlsafe(32),
            credential_id=credential_id,
            role=role,
            owner=owner,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            seen_at=now,
        )
        with self._lock:
            self._prune(now)
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The live session of this id, or None if unknown or expired. Touched (its idle
        time restarts) unless ``touch`` is False: a page reloading itself is no activity."""
        if not session_id:
            return None
        now = self._clock.now()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.seen_at >= IDLE_SECONDS or now - session.created_at >= MAX_SECONDS:
                del self._sessions[session_id]
                return None
            if touch:
                session.seen_at = now
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def end_for_credential(self, credential_id: str) -> None:
        with self._lock:
            for sid in [s for s, v in self._sessions.items() if v.credential_id == credential_id]:
                del self._sessions[sid]

    def pre_token(self) -> str:
        """A sign-in form's CSRF token (also set as its cookie)."""
        now = self._clock.now()
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._prune(now)
            self._pre[token] = now + PRE_SECONDS
        return token

    def take_pre_token(self, cookie: str | None, field: str | None) -> bool:
        """True once for a live sign-in token presented both as cookie and form field."""
        if not cookie or not same_token(field, cookie):
            return False
        with self._lock:
            expires = self._pre.pop(cookie, None)
        return expires is not None and expires > self._clock.now()

    def _prune(self, now: float) -> None:
        if len(self._sessions) >= MAX_SESSIONS:
            for sid in [
                s
                for s, v in self._sessions.items()
                if now - v.seen_at >= IDLE_SECONDS or now - v.created_at >= MAX_SECONDS
            ]:
                del self._sessions[sid]
            if len(self._sessions) >= MAX_SESSIONS:  # still full: the oldest go first
                oldest = sorted(self._sessions.values(), key=lambda v: v.seen_at)
                for v in oldest[: len(oldest) // 10 + 1]:
                    del self._sessions[v.session_id]
        if len(self._pre) >= MAX_SESSIONS:
            self._pre = {t: e for t, e in self._pre.items() if e > now}
            if len(self._pre) >= MAX_SESSIONS:
                self._pre.clear()


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
