"""Helpers for the console tests: a signed-in test client, Chromium, a live server."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import TestClient
from litestar.types import Receive, Scope, Send

from tether import Tether
from tether.server import ServerSettings, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output" / "console"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
XSS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>')


def require_chromium() -> str:
    """Skip (locally) or fail (``TETHER_REQUIRE_SERVICES=1``) without Debian's Chromium."""
    if os.access(CHROMIUM, os.X_OK) and shutil.which(CHROMIUM):
        return CHROMIUM
    message = f"Chromium not found at {CHROMIUM} (make browser installs it)"
    if os.environ.get("TETHER_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match is not None, "no CSRF token on the page"
    return match.group(1)


def settings(public_url: str | None = None) -> ServerSettings:
    return ServerSettings(log_level="WARNING", reap_interval=0, public_url=public_url)


def from_address(app: Litestar, host: str) -> Litestar:
    """``app`` as reached from ``host`` (Litestar's test client reports "testclient")."""
    inner = app.asgi_handler

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        scope["client"] = (host, 50000)
        await inner(scope, receive, send)

    app.asgi_handler = handler
    return app


@contextmanager
def console_client(
    tether: Tether,
    *,
    base_url: str = "http://127.0.0.1:8000",
    client_host: str = "127.0.0.1",
    public_url: str | None = None,
) -> Iterator[TestClient[Any]]:
    app = from_address(create_app(tether, settings(public_url)), client_host)
    with TestClient(app, base_url=base_url) as client:
        yield client


def sign_in(client: TestClient[Any], secret: str) -> str:
    """Sign in through the form; return the session's CSRF token."""
    form = client.get("/console/sign-in")
    done = client.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "secret": secret, "next": "/console/identities"},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    return csrf_of(client.get("/console/identities").text)


class LiveServer:
    """``create_app`` served by uvicorn on loopback in a thread (as ``tether serve``)."""

    def __init__(self, tether: Tether) -> None:
        config = uvicorn.Config(
            create_app(tether, settings()),
            host="127.0.0.1",
            port=0,
            lifespan="on",
            log_level="warning",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the console server did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
