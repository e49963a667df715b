"""The operator's plane, end to end with the real CLI and a running ``tether serve``:
pins made through the API and attributed to the credential, the bootstrap credential
written to a 0600 file and never to a log."""

from __future__ import annotations

import getpass
import json
import os
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
