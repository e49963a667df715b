"""A real ``tether serve`` process on loopback, for end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(
        self, home: Path, *, trust_domain: str = "acme.example", init: bool = True
    ) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = ""
        self.process: subprocess.Popen[bytes] | None = None
        if init:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tether",
                    "--home",
                    str(home),
                    "init",
                    "--trust-domain",
                    trust_domain,
                    "--admin",
                    "root@acme.example",
                    "--json",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            self.admin = json.loads(out.stdout)["admin_credential"]

    def start(self) -> Server:
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tether",
                "--home",
                str(self.home),
                "serve",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
            env={**os.environ},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
            if self.process.poll() is not None:
                break
        raise RuntimeError("server did not start: " + (self.home / "server.log").read_text())

    def stop(self, sig: int | None = None) -> None:
        if self.process is None:
            return
        if sig is None:
            self.process.terminate()
        else:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)
        self.process = None
