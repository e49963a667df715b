"""The operator's plane, end to end with the real CLI and a running ``tether serve``:
pins made through the API and attributed to the credential, the bootstrap credential
written to a 0600 file and never to a log."""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .mcp_support.harness import TOOL_CATALOGUE, TOOL_SERVER, TOOLS_IDENTITY
from .server_support import CLI, Server, home_env

ROOT_ADMIN = "root@acme.example"


def _gateway_config(path: Path) -> Path:
    lines = [
        'resource = "http://127.0.0.1:9/mcp"',
        'authorization_servers = ["https://tether.acme.example"]',
        "",
        "[[upstreams]]",
        'name = "tools"',
        f"identity = {json.dumps(TOOLS_IDENTITY)}",
        "",
        "[upstreams.stdio]",
        f"command = {json.dumps(sys.executable)}",
        f"args = {json.dumps([str(TOOL_SERVER)])}",
    ]
    for name, entry in TOOL_CATALOGUE.items():
        lines += ["", f"[upstreams.tools.{name}]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, CLI]]:
    server = Server(tmp_path / "home").start()
    try:
        yield server, CLI(tmp_path / "home", server)
    finally:
        server.stop()


def _receipts(cli: CLI, kind: str) -> list[dict[str, Any]]:
    records = cli.json("audit", "tail", "-n", "200")["records"]
    return [r for r in records if r["kind"] == kind]


def test_a_pin_goes_through_the_server_and_names_the_credential(
    served: tuple[Server, CLI], tmp_path: Path
) -> None:
    """Plays an operator who names someone else with ``--by`` on ``tether gateway pin``
    (the receipt of a pin is the evidence a tool definition was reviewed): refused
    before the upstream is contacted; without it, the pin's receipt names the admin
    credential's owner. Without a server nor --break-glass, nothing is pinned."""
    server, admin = served
    config = _gateway_config(tmp_path / "gateway.toml")

    approver = admin.as_(
        admin.json("admin", "create", "--role", "approver", "--owner", "bob@acme.example")[
            "credential"
        ]
    )
    lesser = approver.run("gateway", "pin", str(config), "tools", ok=False)
    assert lesser.returncode == 1 and "approver" in lesser.stderr  # pins are an admin's
    posing = admin.run(
        "gateway", "pin", str(config), "tools", "--by", "mallory@evil.test", ok=False
    )
    assert posing.returncode == 2
    assert ROOT_ADMIN in posing.stderr and "--by" in posing.stderr
    assert _receipts(admin, "gateway.pin") == []

    preview = admin.json("gateway", "pin", str(config), "tools", "--tool", "echo", "--dry-run")
    assert [c["tool"] for c in preview["changed"]] == ["echo"]
    assert preview["changed"][0]["previous"] is None
    assert _receipts(admin, "gateway.pin") == []  # a dry run writes nothing

    pinned = admin.json("gateway", "pin", str(config), "tools")
    assert pinned["by"] == ROOT_ADMIN and "echo" in {c["tool"] for c in pinned["changed"]}
    receipts = _receipts(admin, "gateway.pin")
    assert len(receipts) == len(pinned["changed"])
    assert {tuple(r["chain"]) for r in receipts} == {(ROOT_ADMIN,)}
    assert {r["detail"]["by"] for r in receipts} == {ROOT_ADMIN}

    again = admin.json("gateway", "pin", str(config), "tools")
    assert again["changed"] == [] and "echo" in again["unchanged"]

    # The draft of a catalogue pins through the server too, and names the credential.
    drafted = admin.run("gateway", "catalogue", "--config", str(config), "--upstream", "tools")
    assert "[tools.echo]" in drafted.stdout and f"by {ROOT_ADMIN}" in drafted.stderr

    local = CLI(server.home)  # no server, no credential, no break-glass
    refused = local.run("gateway", "pin", str(config), "tools", ok=False)
    assert refused.returncode == 2
    assert "TETHER_SERVER" in refused.stderr and "--break-glass" in refused.stderr
    refused = local.run(
        "gateway", "catalogue", "--config", str(config), "--upstream", "tools", ok=False
    )
    assert refused.returncode == 2 and "--no-pin" in refused.stderr
    draft_only = local.run(
        "gateway", "catalogue", "--config", str(config), "--upstream", "tools", "--no-pin"
    )
    assert "[tools.echo]" in draft_only.stdout


def test_a_break_glass_pin_is_receipted_as_break_glass(
    served: tuple[Server, CLI], tmp_path: Path
) -> None:
    """Plays an operator on the store's host with the KEK and no server: the pin is made,
    attributed to break-glass:<OS user>, after a receipt recording the break-glass use."""
    server, admin = served
    config = _gateway_config(tmp_path / "gateway.toml")
    user = getpass.getuser()
    local = CLI(server.home)
    done = json.loads(
        local.run("--break-glass", "gateway", "pin", str(config), "tools", "--json").stdout
    )
    assert done["by"] == f"break-glass:{user}"
    glass = _receipts(admin, "cli.break_glass")
    assert glass[-1]["detail"]["command"] == "tether gateway pin"
    assert {tuple(r["chain"]) for r in _receipts(admin, "gateway.pin")} == {
        (f"break-glass:{user}",)
    }


def test_the_first_admin_credential_goes_to_a_0600_file_never_to_a_log(tmp_path: Path) -> None:
    """Plays whoever reads the bootstrap job's logs (``kubectl logs``, ``docker compose
    logs``): ``tether init --credential-file`` prints the credential's id and path, never
    the credential, and the file is created 0600; run again, it changes nothing."""
    home = tmp_path / "home"
    secret_file = tmp_path / "bootstrap" / "admin-credential"
    secret_file.parent.mkdir()
    env = {**home_env(home), "TETHER_HOME": str(home)}
    env.pop("TETHER_SERVER", None)

    def init(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: PLW1510 - the exit code is asserted
            [
                sys.executable,
                "-m",
                "tether",
                "init",
                "--trust-domain",
                "acme.example",
                "--admin",
                ROOT_ADMIN,
                "--credential-file",
                str(secret_file),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    first = init("--exists-ok")
    assert first.returncode == 0, first.stderr
    secret = secret_file.read_text().strip()
    assert secret.startswith("tadm_")
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    assert secret not in first.stdout and secret not in first.stderr
    assert secret.split(".")[1] not in first.stdout + first.stderr
    assert str(secret_file) in first.stdout

    for extra in ((), ("--json",)):
        again = init("--exists-ok", *extra)
        assert again.returncode == 0, again.stderr
        assert secret_file.read_text().strip() == secret  # never overwritten
        assert secret not in again.stdout + again.stderr
    refused = init()
    assert refused.returncode == 2 and "never overwritten" in refused.stderr

    # The credential in the file is the first admin's: the CLI reads it (0600 only).
    server = Server(home, init=False).start()
    try:
        cli = CLI(home, server, token="")
        cli.env.pop("TETHER_TOKEN", None)
        cli.env["TETHER_TOKEN_FILE"] = str(secret_file)
        assert cli.json("admin", "list")["credentials"][0]["owner"] == ROOT_ADMIN
    finally:
        server.stop()


# -- the bootstrap credential as a Kubernetes Secret -----------------------------------------


class StandInAPIServer:
    """A stand-in for the Kubernetes API server's Secret endpoints (no cluster runs here):
    HTTPS with its own CA, the service account's bearer token required, ``GET`` answers
    404 or the Secret, ``POST`` creates (201) or answers 409, as Kubernetes does."""

    def __init__(self, base: Path, token: str) -> None:
        import datetime
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        now = datetime.datetime.now(datetime.UTC)
        import ipaddress

        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        self.account = base / "serviceaccount"
        self.account.mkdir()
        (self.account / "token").write_text(token)
        (self.account / "namespace").write_text("tether\n")
        (self.account / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = base / "apiserver.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.secrets: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _allowed(self) -> bool:
                server.requests.append(
                    (self.command, self.path, self.headers.get("Authorization", ""))
                )
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self._answer(401, {"kind": "Status", "message": "Unauthorized"})
                    return False
                return True

            def do_GET(self) -> None:
                if not self._allowed():
                    return
                name = self.path.rsplit("/", 1)[-1]
                if name in server.secrets:
                    self._answer(200, server.secrets[name])
                else:
                    self._answer(404, {"kind": "Status", "message": f'"{name}" not found'})

            def do_POST(self) -> None:
                if not self._allowed():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["metadata"]["name"]
                if name in server.secrets:
                    self._answer(409, {"kind": "Status", "message": "already exists"})
                    return
                server.secrets[name] = body
                self._answer(201, body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert_file = base / "apiserver.crt"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(cert_file, key_file)
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.port),
            "TETHER_SERVICE_ACCOUNT_DIR": str(self.account),
        }

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_on_kubernetes_the_first_admin_credential_goes_to_a_secret(tmp_path: Path) -> None:
    """Plays whoever reads the init Job's logs (``kubectl logs job/tether-init``): the
    credential is created as a Secret through the API server, as the pod's service
    account, and appears in no output; a second run of the Job changes nothing; a Secret
    that exists already is never overwritten, and then no trust domain is made."""
    account_token = "sa-" + "x" * 40
    api = StandInAPIServer(tmp_path, account_token)
    home = tmp_path / "home"
    env = {**home_env(home), "TETHER_HOME": str(home), **api.env()}

    def init(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: PLW1510 - the exit code is asserted
            [
                sys.executable,
                "-m",
                "tether",
                "init",
                "--trust-domain",
                "acme.example",
                "--admin",
                ROOT_ADMIN,
                "--exists-ok",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    try:
        # A Secret of that name exists: refused before a trust domain is made.
        api.secrets["taken"] = {"metadata": {"name": "taken"}}
        taken = init("--credential-secret", "taken")
        assert taken.returncode == 2 and "never overwritten" in taken.stderr

        made = init("--credential-secret", "tether-admin-credential", "--json")
        assert made.returncode == 0, made.stderr
        created = api.secrets["tether-admin-credential"]
        secret = base64.b64decode(created["data"]["credential"]).decode()
        assert secret.startswith("tadm_")
        assert secret not in made.stdout + made.stderr
        assert secret.split(".")[1] not in made.stdout + made.stderr
        result = json.loads(made.stdout)
        assert result["credential_secret"] == "Secret tether/tether-admin-credential"
        assert (
            created["metadata"]["annotations"]["tether.dev/credential-id"]
            == (result["credential_id"])
        )
        expires = created["metadata"]["annotations"]["tether.dev/expires-at"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", expires), expires
        assert {m for m, _p, _a in api.requests} == {"GET", "POST"}
        assert {a for _m, _p, a in api.requests} == {f"Bearer {account_token}"}
        assert all(p.startswith("/api/v1/namespaces/tether/secrets") for _m, p, _a in api.requests)

        before = len(api.requests)
        again = init("--credential-secret", "tether-admin-credential")
        assert again.returncode == 0 and "left as it is" in again.stdout
        assert len(api.requests) == before  # the Job run again asks nothing of the API

        # The credential in the Secret is the first admin's.
        server = Server(home, init=False).start()
        try:
            cli = CLI(home, server, token=secret)
            assert cli.json("admin", "list")["credentials"][0]["owner"] == ROOT_ADMIN
        finally:
            server.stop()
    finally:
        api.stop()

    # Outside a pod: a clear usage error, nothing made.
    outside = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        [
            sys.executable,
            "-m",
            "tether",
            "init",
            "--trust-domain",
            "acme.example",
            "--credential-secret",
            "tether-admin-credential",
        ],
        capture_output=True,
        text=True,
        env={**home_env(tmp_path / "other"), "TETHER_HOME": str(tmp_path / "other")},
        timeout=60,
    )
    assert outside.returncode == 2 and "--credential-file" in outside.stderr


# -- a gateway refusal as the MCP client sees it --------------------------------------------


def test_a_gateway_refusal_reaches_the_agent_as_one_clear_error(tmp_path: Path) -> None:
    """Plays an agent whose task has ended, then an unauthenticated network caller: the
    gateway answers 401 with ``WWW-Authenticate: DPoP ... resource_metadata=...`` (the MCP
    authorization spec's discovery) and a JSON-RPC error naming the reason; the official
    ``mcp`` client raises it inside two nested exception groups (its own task groups), and
    ``tether.sdk.refusals_unwrapped`` turns that into one ``GatewayRefused``."""
    import anyio
    import httpx
    from mcp import Client

    from tether.sdk import GatewayRefused, gateway_refusal, refusals_unwrapped

    from .mcp_support.harness import (
        GatewayServer,
        build_config,
        free_port,
        init_home,
        mcp_client,
        open_task,
        tools_upstream,
    )

    home = tmp_path / "home"
    tether = init_home(home, {"tools": TOOLS_IDENTITY})
    port = free_port()
    config = build_config(port, tmp_path, [tools_upstream("tools", TOOLS_IDENTITY)])
    gateway = GatewayServer(home, config, port).start().pin_all()
    try:
        url = gateway.url
        bare = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert bare.status_code == 401
        challenge = bare.headers["www-authenticate"]
        assert challenge.startswith("DPoP ") and "resource_metadata=" in challenge
        metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
        assert httpx.get(metadata_url).json()["resource"] == url

        key, task = open_task(tether, ["tools.echo"], resource=url)
        tether.end_task(task.task_id)

        async def connect_ended() -> None:
            async with mcp_client(url, task.token, key):
                pass

        with pytest.raises(BaseException) as raw:
            anyio.run(connect_ended)
        # What the MCP SDK raises: the refusal two exception groups deep.
        assert isinstance(raw.value, BaseExceptionGroup)
        assert any(isinstance(e, BaseExceptionGroup) for e in raw.value.exceptions)
        found = gateway_refusal(raw.value)
        assert found is not None and found.status == 401 and found.error == "invalid_token"

        with pytest.raises(GatewayRefused) as refused, refusals_unwrapped():
            anyio.run(connect_ended)
        assert refused.value.status == 401 and refused.value.reason
        assert str(refused.value).startswith("401 invalid_token: ")
        assert isinstance(refused.value.receipt, int | None)

        async def connect_bare() -> None:
            async with Client(url, mode="legacy"):
                pass

        with pytest.raises(GatewayRefused) as anonymous, refusals_unwrapped():
            anyio.run(connect_bare)
        assert anonymous.value.status == 401 and anonymous.value.reason == "token.missing"

        # Anything else goes through unchanged.
        with pytest.raises(ZeroDivisionError), refusals_unwrapped():
            _ = 1 / 0
    finally:
        gateway.stop()
        tether.close()
