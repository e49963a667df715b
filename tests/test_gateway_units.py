"""The gateway's parts without a server: configuration, catalogue, redaction, client auth."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import msgspec
import pytest

from tether import ProofKey, Sensitivity
from tether.core import call_digest
from tether.gateway import (
    UNDESCRIBED,
    CatalogueFile,
    ConfigError,
    SideEffect,
    ToolEntry,
    classify,
    import_catalogue,
    load_config,
    parse_config,
    redact_text,
)
from tether.gateway._auth import challenge
from tether.gateway._catalogue import render_draft
from tether.sdk._mcp_auth import TetherHttpxAuth, TetherMCPAuth

from .conftest import quiet
from .mcp_support.harness import EXAMPLES, GIT_IDENTITY, make_git_repo

pytestmark = pytest.mark.store_independent  # no Tether: the same on every store

BASE: dict[str, Any] = {
    "resource": "https://gw.acme.example/mcp",
    "authorization_servers": ["https://tether.acme.example"],
    "upstreams": [
        {
            "name": "git",
            "identity": GIT_IDENTITY,
            "stdio": {"command": "python", "args": ["-m", "mcp_server_git"]},
        }
    ],
}


def _with(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(BASE)), **changes}


def _upstream(**changes: Any) -> dict[str, Any]:
    return _with(upstreams=[{**BASE["upstreams"][0], **changes}])


# -- configuration --------------------------------------------------------------------------


def test_example_configuration_loads() -> None:
    config = load_config(EXAMPLES / "gateway.toml")
    assert config.path == "/mcp"
    assert config.metadata_url == "http://127.0.0.1:8765/.well-known/oauth-protected-resource/mcp"
    assert config.approval.mode == "wait"
    git = config.upstream("git")
    assert git.transport == "stdio"
    assert git.tools["git_status"].side_effect is SideEffect.READ
    assert git.tools["git_reset"].side_effect is SideEffect.DESTRUCTIVE
    assert git.tools["git_commit"].sinks == ("message",)
    with pytest.raises(ConfigError, match="no upstream named 'nope'"):
        config.upstream("nope")


def test_minimal_configuration_defaults(tmp_path: Path) -> None:
    config = parse_config(_with(), base=tmp_path)
    assert (config.host, config.port) == ("127.0.0.1", 8765)
    assert config.approval.mode == "return"
    assert config.upstreams[0].protocol == "auto"
    assert config.upstreams[0].tools == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(resource="http://gw.acme.example/mcp"), "must use https"),
        (_with(resource="https://GW.acme.example/mcp"), "canonical"),
        (_with(resource="https://gw.acme.example/mcp/"), "must not end with '/'"),
        (_with(resource="https://gw.acme.example/mcp#x"), "fragment"),
        (_with(resource="https://gw.acme.example/mcp?a=1"), "query"),
        (_with(authorization_servers=[]), "at least one authorization server"),
        (_with(upstreams=[]), "at least one"),
        (_with(approval={"mode": "wait", "timeout_seconds": 60}), "at most 55"),
        (_with(approval={"mode": "later"}), "approval.mode"),
        (_with(port=0), "port"),
        (_with(colour="blue"), "unknown field `colour`"),
        (_upstream(name="Git.Hub"), "must match"),
        (_upstream(identity="not-a-spiffe-id"), "identity"),
        (_upstream(http={"url": "https://x.acme.example/mcp"}), "exactly one transport"),
        (_upstream(stdio=None), "exactly one transport"),
        (_upstream(protocol="2024-01-01"), "protocol"),
        (_upstream(call_timeout_seconds=0), "call_timeout_seconds"),
        (_upstream(stdio={"command": "x", "env": {"K": "env:TETHER_TEST_UNSET"}}), "not set"),
        (_upstream(stdio={"command": "x", "cwd": "does-not-exist"}), "not a directory"),
        (_upstream(stdio={"command": "x", "inherit": ["TETHER_KEK"]}), "never passed"),
        (_upstream(stdio={"command": "x", "inherit": ["NOT_SET_ANYWHERE_4"]}), "not set"),
        (_upstream(stdio={"command": "x", "inherit": ["BAD-NAME"]}), "must match"),
        (_upstream(catalogue="missing.toml"), "cannot read"),
        (_upstream(tools={"t": {"side_effect": "launch"}}), "side_effect"),
        (_upstream(tools={"t": {"sinks": [""]}}), "sink name is empty"),
        (_with(upstreams=[BASE["upstreams"][0], BASE["upstreams"][0]]), "duplicate names"),
    ],
)
def test_invalid_configurations_are_refused(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, base=tmp_path)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = _with(resource="ftp://x", port=70000)
    data["upstreams"][0]["protocol"] = "bogus"
    with pytest.raises(ConfigError) as raised:
        parse_config(data, base=tmp_path)
    text = raised.value.message
    assert "resource" in text and "port" in text and "protocol" in text


def test_environment_references_are_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_TEST_KEY", "s3cret")
    data = _upstream(
        stdio=None,
        http={
            "url": "https://x.acme.example/mcp",
            "headers": {"Authorization": "env:TETHER_TEST_KEY"},
        },
    )
    config = parse_config(data, base=tmp_path)
    http = config.upstreams[0].http
    assert http is not None and http.headers == {"Authorization": "s3cret"}


def test_a_stdio_upstream_gets_only_the_variables_it_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stdio upstream never gets the gateway's whole environment; what it needs is
    listed (``env``) or passed through by name (``inherit``), and nothing else."""
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Tether Test")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    data = _upstream(stdio={"command": "python", "env": {"A": "1"}, "inherit": ["GIT_AUTHOR_NAME"]})
    stdio = parse_config(data, base=tmp_path).upstreams[0].stdio
    assert stdio is not None
    assert stdio.env == {"A": "1", "GIT_AUTHOR_NAME": "Tether Test"}


def test_catalogue_files_and_inline_entries_merge(tmp_path: Path) -> None:
    (tmp_path / "cat.toml").write_text(
        '[tools.a]\nside_effect = "read"\nsensitivity = "public"\ntrusted = true\nsinks = []\n'
        '[tools.b]\nside_effect = "write"\n'
    )
    data = _upstream(catalogue="cat.toml", tools={"b": {"side_effect": "egress"}})
    tools = parse_config(data, base=tmp_path).upstreams[0].tools
    assert tools["a"].sensitivity is Sensitivity.PUBLIC
    assert tools["b"].side_effect is SideEffect.EGRESS  # the inline entry wins
    skipped = parse_config(
        _upstream(catalogue="absent.toml"), base=tmp_path, resolve_catalogues=False
    )
    assert skipped.upstreams[0].tools == {}


def test_unreadable_configuration_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("resource = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# -- catalogue ------------------------------------------------------------------------------


def test_undescribed_tools_take_the_most_restrictive_class() -> None:
    klass = classify({}, "anything")
    assert klass == UNDESCRIBED
    assert klass.side_effect is SideEffect.DESTRUCTIVE
    assert klass.sensitivity is Sensitivity.SECRET
    assert klass.trusted is False and klass.sinks is None and not klass.described
    assert klass.sink_arguments({"a": 1, "b": "", "c": "x"}) == ["a", "c"]


def test_partial_entries_default_each_field_restrictively() -> None:
    klass = classify({"t": ToolEntry(side_effect=SideEffect.READ)}, "t")
    assert klass.described and klass.side_effect is SideEffect.READ
    assert klass.sensitivity is Sensitivity.SECRET and klass.trusted is False
    mail = classify({"m": ToolEntry(sinks=("to",))}, "m")
    assert mail.sink_arguments({"to": "x@y", "subject": "hi"}) == ["to"]


def test_draft_catalogue_is_valid_toml_and_conservative() -> None:
    tools = [
        {
            "name": "read",
            "description": "Reads.",
            "inputSchema": {"type": "object", "properties": {"path": {}}},
            "annotations": {"readOnlyHint": True},
        },
        {
            "name": "post",
            "inputSchema": {"type": "object", "properties": {"url": {}, "body": {}}},
            "annotations": {"openWorldHint": True},
        },
        {"name": "odd name", "inputSchema": {"type": "object"}},
    ]
    draft = render_draft("web", tools, source="test")
    entries = msgspec.convert(tomllib.loads(draft), CatalogueFile).tools
    assert entries["read"].side_effect is SideEffect.READ and entries["read"].sinks == ()
    assert entries["post"].side_effect is SideEffect.EGRESS
    assert entries["post"].sinks == ("url", "body")
    assert entries["odd name"].side_effect is SideEffect.DESTRUCTIVE
    assert all(e.sensitivity is Sensitivity.SECRET and not e.trusted for e in entries.values())


def test_import_catalogue_from_mcp_server_git(tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path / "repo")
    data = _upstream(
        stdio={
            "command": sys.executable,
            "args": ["-m", "mcp_server_git", "--repository", str(repo)],
        },
        protocol="legacy",
    )
    upstream = parse_config(data, base=tmp_path).upstreams[0]
    draft = import_catalogue(upstream)
    assert draft.startswith("# Draft tool catalogue for upstream 'git'")
    entries = msgspec.convert(tomllib.loads(draft), CatalogueFile).tools
    assert {"git_status", "git_log", "git_commit", "git_reset"} <= entries.keys()
    assert entries["git_status"].side_effect is SideEffect.READ
    assert entries["git_commit"].side_effect is SideEffect.WRITE
    assert entries["git_reset"].side_effect is SideEffect.DESTRUCTIVE
    assert "repo_path" in (entries["git_commit"].sinks or ())


# -- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "kept"),
    [
        ("key AKIA" + "IOSFODNN7EXAMPLE here", "aws_access_key", "key "),
        ("openai sk-" + "abcdefghijklmnopqrstuv", "api_key", "openai "),
        ("anthropic sk-ant-" + "api03-abcdefghijklmnopqrstuv", "api_key", "anthropic "),
        ("gh ghp_" + "abcdefghijklmnopqrstuvwxyz0123456789", "github_token", "gh "),
        ("pat github_pat_" + "11ABCDEFG0123456789_abcdefghij", "github_token", "pat "),
        ("slack xoxb-" + "1234567890-abcdef", "slack_token", "slack "),
        (
            "Authorization: Bearer " + "abcdefghijklmnop.qrstu",
            "bearer_token",
            "Authorization: Bearer ",
        ),
        ("t=eyJhbGciOiJFUzI1NiJ9" + ".eyJzdWIiOiJ4In0.sig", "jwt", "t="),
        ("mysql://root:" + "hunter22@db:3306/x", "connection_password", "mysql://root:"),
        ("password = " + "correct-horse", "password", "password = "),
        (
            "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----",
            "private_key",
            "",
        ),
    ],
)
def test_secrets_are_redacted(text: str, kind: str, kept: str) -> None:
    redacted, counts = redact_text(text)
    assert counts[kind] >= 1, (redacted, counts)
    assert f"[REDACTED:{kind}]" in redacted
    assert redacted.startswith(kept)


def test_ordinary_text_is_left_alone() -> None:
    text = "git status: clean; see https://example.com/docs and ask-me-anything"
    assert redact_text(text) == (text, {})


# -- client authentication ------------------------------------------------------------------


def _claims(proof: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(proof, options={"verify_signature": False})
    return claims


def test_mcp_auth_signs_each_request_and_binds_tool_calls() -> None:
    key = ProofKey()
    auth = TetherMCPAuth("token-value", key, clock=lambda: 1_700_000_000.0)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    body["params"] = {"name": "git.git_status", "arguments": {"repo_path": "/r"}}
    request = httpx2.Request("POST", "http://127.0.0.1:9/mcp?x=1", json=body)
    signed = next(auth.auth_flow(request))
    assert signed.headers["authorization"] == "DPoP token-value"
    claims = _claims(signed.headers["dpop"])
    assert claims["htm"] == "POST" and claims["htu"] == "http://127.0.0.1:9/mcp"
    assert claims["call"] == call_digest("git.git_status", {"repo_path": "/r"})
    assert claims["iat"] == 1_700_000_000
    listing = httpx2.Request("POST", "http://127.0.0.1:9/mcp", json={"method": "tools/list"})
    other = _claims(next(auth.auth_flow(listing)).headers["dpop"])
    assert "call" not in other and other["jti"] != claims["jti"]
    get = _claims(
        next(auth.auth_flow(httpx2.Request("GET", "http://127.0.0.1:9/mcp"))).headers["dpop"]
    )
    assert get["htm"] == "GET"


def test_httpx_auth_is_the_same() -> None:
    auth = TetherHttpxAuth("t", ProofKey())
    body = {"method": "tools/call", "params": {"name": "a.b"}}
    signed = next(auth.auth_flow(httpx.Request("POST", "https://gw.example/mcp", json=body)))
    assert _claims(signed.headers["dpop"])["call"] == call_digest("a.b", {})
    with pytest.raises(ValueError, match="token"):
        TetherMCPAuth("", ProofKey())


def test_challenges() -> None:
    url = "https://gw.example/.well-known/oauth-protected-resource/mcp"
    assert challenge(None, None, url) == f'DPoP algs="ES256", resource_metadata="{url}"'
    value = challenge("invalid_token", 'bad "token"\n', url)
    assert value.startswith('DPoP error="invalid_token", error_description="bad token"')


# -- the gateway object, without a server ---------------------------------------------------


def _gateway(tether: Any, tmp_path: Path) -> Any:
    from tether.gateway import Gateway

    return Gateway(tether, parse_config(_with(), base=tmp_path))


def test_upstream_identities_are_checked_at_start(tmp_path: Path) -> None:
    from tether import Tether

    tether = Tether.ephemeral("acme.example")
    try:
        with pytest.raises(ConfigError, match="is not registered"):
            _gateway(tether, tmp_path)
        tether.register_identity(GIT_IDENTITY, kind="service", owner="a@acme.example")
        with pytest.raises(ConfigError, match="is a service, not a tool"):
            _gateway(tether, tmp_path)
    finally:
        tether.close()


def test_listing_is_conservative_and_calls_are_exact(tmp_path: Path) -> None:
    """A permit that depends on arguments hides the tool; the call itself is decided exactly."""
    from tether import Tether, parse_intent

    tether = Tether.ephemeral("acme.example")
    try:
        tether.register_identity(GIT_IDENTITY, kind="tool", owner="a@acme.example")
        agent = "spiffe://acme.example/agent/a"
        tether.register_identity(agent, kind="agent", owner="a@acme.example")
        tether.policies.load(
            {
                "p.cedar": """
permit (principal, action == Action::"open_task", resource);
permit (principal, action == Action::"open_task_with_patterns", resource);
permit (principal, action == Action::"call_tool", resource == Tool::"git.git_status");
permit (principal, action == Action::"call_tool", resource == Tool::"git.git_show")
when { context.args has path && context.args.path like "/tmp/*" };
"""
            }
        )
        gateway = _gateway(tether, tmp_path)
        key = ProofKey()
        intent = parse_intent(
            {"purpose": "p", "capabilities": [{"tool": "git.*"}], "data_ceiling": "internal"}
        )
        quiet(tether)  # the HTTP door below asks the trust domain's catalogue
        task = tether.open_task(agent, proof_jwk=key.jwk, intent=intent)
        row = tether.store.get_task(task.task_id)
        assert row is not None
        state = tether.enforcement.loader.state(row)
        snapshot = tether.policies.snapshot()
        context = {
            "task_id": state.task_id,
            "template": state.template,
            "purpose": "p",
            "data_ceiling": "internal",
            "on_behalf_of": "",
            "calls_used": 0,
            "max_calls": 20,
            "delegation_depth": 0,
            "args": {},
        }
        klass = classify({"git_status": ToolEntry(sensitivity=Sensitivity.INTERNAL)}, "git_status")
        assert gateway._visible(state, "git.git_status", klass, snapshot, context)
        assert not gateway._visible(state, "git.git_show", klass, snapshot, context)
        assert not gateway._visible(state, "tools.echo", klass, snapshot, context)
        assert not gateway._visible(state, "git.git_status", UNDESCRIBED, snapshot, context)
        now = tether.clock.now()
        proof = key.prove(task.token, "git.git_show", {"path": "/tmp/x"}, now=now)
        allowed = tether.authorize(
            token=task.token, proof=proof, tool="git.git_show", args={"path": "/tmp/x"}
        )
        assert allowed.decision.allowed
    finally:
        tether.close()
