"""The operator's client of a Tether server: the CLI's way to every store it does not own.

The CLI is an API client. A command that reads or changes the control plane sends
one request to the server named by ``--server`` / ``$TETHER_SERVER`` with an admin
credential (``Authorization: Bearer tadm_...``) taken from ``$TETHER_TOKEN`` or from
a file (``--token-file`` / ``$TETHER_TOKEN_FILE``) no one but its owner can read. The
server authenticates the credential, checks its role and writes the receipt, naming
the credential's owner: what the operator claims about themselves plays no part.

Errors come back as the server's ``{"error": code, "detail": message}`` and are raised
as the :mod:`tether._errors` family they were on the server (400 a usage error, 403 a
rejection, 404 not found, 409 a conflict, 503 an infrastructure failure), so the CLI
reports them as it reports a local error: one line and an exit code.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tether._errors import (
    Conflict,
    InfrastructureError,
    NotFound,
    Rejected,
    TetherError,
    UsageError,
)

SERVER_ENV = "TETHER_SERVER"
TOKEN_ENV = "TETHER_TOKEN"  # noqa: S105 - a variable name
TOKEN_FILE_ENV = "TETHER_TOKEN_FILE"  # noqa: S105 - a variable name
TIMEOUT_SECONDS = 30.0
_CREDENTIAL = re.compile(r"tadm_([0-9a-f]{16})\.[A-Za-z0-9_-]{43}")


class NoServer(UsageError):
    """No server was named and no local mode was asked for."""

    code = "cli.no_server"


def read_token_file(path: Path) -> str:
    """The credential in ``path``, refused unless only its owner may read it (0600 or
    stricter): a credential the group or others can read is one they may have taken."""
    try:
        # No symlink followed: the mode checked is the mode of the file read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"the token file {path} is not a regular file")
        if mode & 0o077:
            raise UsageError(
                f"the token file {path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}): chmod 600 {path}"
            )
        token = handle.read().strip()
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token


def credential_id(token: str) -> str | None:
    """The credential id of an admin credential (``tadm_<id>.<secret>``), else None."""
    match = _CREDENTIAL.fullmatch(token)
    return match.group(1) if match else None


@dataclass(frozen=True)
class Target:
    """Where the CLI sends its requests and what it presents."""

    server: str
    token: str | None


def resolve_target(server: str | None, token_file: Path | None) -> Target | None:
    """The server and credential from the options and the environment (an option wins);
    None when no server is named."""
    url = server or os.environ.get(SERVER_ENV) or None
    if url is None:
        return None
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"the server must be an http:// or https:// URL, not {url!r}")
    file = token_file or (
        Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None
    )
    token = read_token_file(file) if file is not None else os.environ.get(TOKEN_ENV) or None
    return Target(url.rstrip("/"), token.strip() if token else None)


def _error(response: httpx.Response) -> TetherError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error") or f"http.{response.status_code}")
    message = str(body.get("detail") or body.get("error_description") or response.reason_phrase)
    status = response.status_code
    if status == 401:
        return Rejected(f"the server refused the credential: {message}", code=code)
    if status == 403:
        return Rejected(message, code=code)
    if status == 404:
        return NotFound(message, code=code)
    if status == 409:
        return Conflict(message, code=code)
    if status in (400, 405, 413, 422):
        return UsageError(message, code=code)
    if status == 429:
        return Rejected(f"rate limited: {message}", code=code)
    if status >= 500:
        return InfrastructureError(f"the server failed ({status}): {message}", code=code)
    return TetherError(f"unexpected answer {status}: {message}", code=code)


class Client:
    """A synchronous client of one Tether server, authenticated with one credential."""

    def __init__(
        self,
        target: Target,
        *,
        http: httpx.Client | None = None,
        principal_name: str | None = None,
    ) -> None:
        """``http`` replaces the network (the in-process API of break-glass mode), whose
        principal is then ``principal_name``."""
        self.server = target.server
        self.token = target.token
        self.local = http is not None
        headers = {"User-Agent": "tether-cli"}
        if target.token is not None:
            headers["Authorization"] = f"Bearer {target.token}"
        if http is None:
            http = httpx.Client(
                base_url=target.server, timeout=TIMEOUT_SECONDS, follow_redirects=False
            )
        http.headers.update(headers)
        self._http = http
        self._principal: dict[str, Any] | None = (
            {"owner": principal_name, "role": "admin"} if principal_name is not None else None
        )

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        authenticated: bool = True,
    ) -> Any:
        """Send one request; the decoded JSON answer, or the server's error raised."""
        if authenticated and self.token is None and not self.local:
            raise NoServer(
                f"no credential for {self.server}: set {TOKEN_ENV}, or {TOKEN_FILE_ENV} "
                "(or --token-file) to a 0600 file holding an admin credential (tadm_...)"
            )
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method, path, json=json, params=query or None, headers=headers
            )
        except httpx.HTTPError as exc:
            raise InfrastructureError(
                f"cannot reach {self.server}: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code >= 400:
            raise _error(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise InfrastructureError(f"{self.server}{path} did not answer JSON") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=body if body is not None else {}, params=params)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def principal(self) -> dict[str, Any]:
        """The credential the server authenticates this client as (role, owner): the
        name every action of this client is attributed to."""
        if self._principal is None:
            ident = credential_id(self.token or "")
            if ident is None:
                raise UsageError("the credential is not an admin credential (tadm_...)")
            self._principal = self.get(f"/v1/credentials/{ident}")
        return self._principal

    def principal_name(self) -> str:
        return str(self.principal()["owner"])
