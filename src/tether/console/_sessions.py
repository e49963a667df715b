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
- CSRF: a synchronizer token bound to the session is put in every form; a POST whose
  ``csrf`` field is missing or differs is refused (403) before anything else runs. The
  sign-in form, which has no session yet, is protected the same way by a short-lived
  pre-session token in its own cookie. A POST whose ``Origin`` header names another
  origin is refused too.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
from dataclasses import dataclass

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


def is_tls(request: Request) -> bool:  # type: ignore[type-arg]
    return request.url.scheme == "https"


def is_loopback(request: Request) -> bool:  # type: ignore[type-arg]
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


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

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id (touched), or None if unknown or expired."""
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
