"""The gateway's configuration: one TOML file, validated at start.

A value of the form ``env:NAME`` in an upstream's ``env`` or ``headers`` is read
from the gateway's environment when the file is loaded, so secrets for the
upstreams need not be written in the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from tether._errors import IdentityRejected, UsageError
from tether.core import parse_spiffe_id
from tether.core._verify import PROOF_WINDOW
from tether.gateway._catalogue import CatalogueFile, ToolEntry, validate_entries

UPSTREAM_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PROTOCOLS = ("auto", "legacy", *MODERN_PROTOCOL_VERSIONS)
APPROVAL_SAFETY_MARGIN = 5.0
MAX_APPROVAL_WAIT = PROOF_WINDOW - APPROVAL_SAFETY_MARGIN
MAX_TIMEOUT = 600.0


class ConfigError(UsageError):
    """The gateway configuration is invalid; the message names every problem."""

    code = "gateway.config"


class StdioTransport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Launch the upstream as a child process and speak MCP over its stdin/stdout."""

    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    cwd: str | None = None


class HttpTransport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reach the upstream over streamable HTTP."""

    url: str
    headers: dict[str, str] = {}


class UpstreamConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One upstream MCP server."""

    name: str
    identity: str
    stdio: StdioTransport | None = None
    http: HttpTransport | None = None
    protocol: str = "auto"
    connect_timeout_seconds: float = 20.0
    call_timeout_seconds: float = 30.0
    catalogue: str | None = None
    tools: dict[str, ToolEntry] = {}

    @property
    def transport(self) -> str:
        return "stdio" if self.stdio is not None else "http"


class ApprovalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a call that needs a human approval does.

    ``wait``: hold the call open until the approval is decided, then decide the
    call again with the same proof; the wait ends after ``timeout_seconds`` and
    never outlasts the proof's acceptance window. ``return``: answer at once
    with the approval id; the agent repeats the identical call once approved.
    """

    mode: Literal["wait", "return"] = "return"
    timeout_seconds: float = 30.0
    poll_interval_seconds: float = 0.5


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole gateway configuration (see ``examples/gateway/gateway.toml``)."""

    resource: str
    authorization_servers: tuple[str, ...]
    upstreams: tuple[UpstreamConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8765
    home: str | None = None
    resource_name: str = "Tether MCP gateway"
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024
    approval: ApprovalConfig = ApprovalConfig()

    @property
    def path(self) -> str:
        """The MCP endpoint's path: the resource URI's path."""
        return urlsplit(self.resource).path or "/"

    @property
    def metadata_url(self) -> str:
        """Where the protected-resource metadata lives (RFC 9728 §3.1)."""
        parts = urlsplit(self.resource)
        path = "" if parts.path in ("", "/") else parts.path
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{path}"

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        known = ", ".join(u.name for u in self.upstreams)
        raise ConfigError(f"no upstream named {name!r} (configured: {known})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_url(value: str, what: str, problems: list[str], *, resource: bool = False) -> None:
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError as exc:
        problems.append(f"{what}: {value!r} is not a URL ({exc})")
        return
    if parts.scheme not in ("https", "http") or not host:
        problems.append(f"{what}: {value!r} must be an http(s) URL with a host")
        return
    if parts.scheme == "http" and not _is_loopback(host):
        problems.append(f"{what}: {value!r} must use https (plain http only on loopback)")
    if parts.fragment or "#" in value:
        problems.append(f"{what}: {value!r} must not have a fragment")
    if resource:
        if parts.query:
            problems.append(f"{what}: {value!r} must not have a query")
        if value.split("://", 1)[0] != parts.scheme or parts.netloc != parts.netloc.lower():
            problems.append(f"{what}: {value!r} must be canonical (lowercase scheme and host)")
        if parts.path.endswith("/") and parts.path != "/":
            problems.append(f"{what}: {value!r} must not end with '/'")
        if parts.username or parts.password:
            problems.append(f"{what}: {value!r} must not carry user information")


def _resolve_env(values: dict[str, str], what: str, problems: list[str]) -> dict[str, str]:
    resolved: dict[str, str] = {}
    for key, value in values.items():
        if value.startswith("env:"):
            name = value[4:]
            found = os.environ.get(name)
            if found is None:
                problems.append(f"{what}.{key}: environment variable {name!r} is not set")
                continue
            resolved[key] = found
        else:
            resolved[key] = value
    return resolved


def _check_upstream(
    index: int,
    upstream: UpstreamConfig,
    base: Path,
    problems: list[str],
    *,
    resolve_catalogues: bool,
) -> UpstreamConfig:
    where = f"upstreams[{index}]"
    if not UPSTREAM_NAME.fullmatch(upstream.name):
        problems.append(
            f"{where}.name: {upstream.name!r} must match {UPSTREAM_NAME.pattern} "
            "(it prefixes the upstream's tool names)"
        )
    where = f"upstream {upstream.name!r}"
    try:
        parse_spiffe_id(upstream.identity)
    except IdentityRejected as exc:
        problems.append(f"{where}.identity: {exc.message}")
    if (upstream.stdio is None) == (upstream.http is None):
        problems.append(f"{where}: give exactly one transport, [stdio] or [http]")
    if upstream.protocol not in PROTOCOLS:
        problems.append(f"{where}.protocol: {upstream.protocol!r} is not one of {list(PROTOCOLS)}")
    for field in ("connect_timeout_seconds", "call_timeout_seconds"):
        value = getattr(upstream, field)
        if not 0 < value <= MAX_TIMEOUT:
            problems.append(f"{where}.{field}: must be above 0 and at most {MAX_TIMEOUT:g}")
    stdio, http = upstream.stdio, upstream.http
    if stdio is not None:
        if not stdio.command.strip():
            problems.append(f"{where}.stdio.command: must not be empty")
        cwd = stdio.cwd
        if cwd is not None:
            cwd = str((base / cwd).resolve())
            if not Path(cwd).is_dir():
                problems.append(f"{where}.stdio.cwd: {cwd} is not a directory")
        env = _resolve_env(stdio.env, f"{where}.stdio.env", problems)
        stdio = msgspec.structs.replace(stdio, env=env, cwd=cwd)
    if http is not None:
        _check_url(http.url, f"{where}.http.url", problems)
        headers = _resolve_env(http.headers, f"{where}.http.headers", problems)
        lowered = {h.lower() for h in headers}
        if "authorization" in lowered and http.url.startswith("http://"):
            problems.append(f"{where}.http.headers: credentials must not be sent over plain http")
        http = msgspec.structs.replace(http, headers=headers)
    tools = dict(upstream.tools)
    catalogue_path = upstream.catalogue
    if catalogue_path is not None:
        full = (base / catalogue_path).resolve()
        catalogue_path = str(full)
        if resolve_catalogues:
            try:
                data = tomllib.loads(full.read_text(encoding="utf-8"))
                entries = msgspec.convert(data, CatalogueFile).tools
                tools = {**entries, **tools}  # inline entries refine the file's
            except OSError as exc:
                problems.append(f"{where}.catalogue: cannot read {full}: {exc.strerror}")
            except tomllib.TOMLDecodeError as exc:
                problems.append(f"{where}.catalogue: {full} is not valid TOML: {exc}")
            except msgspec.ValidationError as exc:
                problems.append(f"{where}.catalogue: {full}: {exc}")
    problems.extend(validate_entries(tools, f"{where}.tools"))
    return msgspec.structs.replace(
        upstream, stdio=stdio, http=http, tools=tools, catalogue=catalogue_path
    )


def parse_config(
    data: object, *, base: Path, resolve_catalogues: bool = True, source: str = "config"
) -> GatewayConfig:
    """Validate decoded TOML as a :class:`GatewayConfig` (or raise :class:`ConfigError`)."""
    try:
        config = msgspec.convert(data, GatewayConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    problems: list[str] = []
    _check_url(config.resource, "resource", problems, resource=True)
    if not config.authorization_servers:
        problems.append("authorization_servers: list at least one authorization server")
    for i, server in enumerate(config.authorization_servers):
        _check_url(server, f"authorization_servers[{i}]", problems)
    if not config.host:
        problems.append("host: must not be empty")
    if not 0 < config.port < 65536:
        problems.append("port: must be between 1 and 65535")
    if not 1024 <= config.max_body_bytes <= 16 * 1024 * 1024:
        problems.append("max_body_bytes: must be between 1 KiB and 16 MiB")
    approval = config.approval
    if approval.mode == "wait" and not 0 < approval.timeout_seconds <= MAX_APPROVAL_WAIT:
        problems.append(
            f"approval.timeout_seconds: must be above 0 and at most {MAX_APPROVAL_WAIT:g} "
            f"(a proof is accepted for {PROOF_WINDOW:g} s, and the waiting call is decided "
            "again with the same proof)"
        )
    if not 0 < approval.poll_interval_seconds <= 5:
        problems.append("approval.poll_interval_seconds: must be above 0 and at most 5")
    if not config.upstreams:
        problems.append("upstreams: configure at least one [[upstreams]]")
    upstreams = [
        _check_upstream(i, u, base, problems, resolve_catalogues=resolve_catalogues)
        for i, u in enumerate(config.upstreams)
    ]
    names = [u.name for u in upstreams]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"upstreams: duplicate names {duplicates}")
    if problems:
        raise ConfigError(
            f"{source}: invalid gateway configuration:\n  - " + "\n  - ".join(problems)
        )
    home = config.home
    if home is not None:
        home = str((base / home).resolve())
    return msgspec.structs.replace(config, upstreams=tuple(upstreams), home=home)


def load_config(path: str | Path, *, resolve_catalogues: bool = True) -> GatewayConfig:
    """Read and validate the gateway configuration at ``path``.

    Relative paths in it (``home``, each upstream's ``catalogue`` and ``stdio.cwd``)
    are taken relative to the file's directory. ``resolve_catalogues=False`` skips
    reading catalogue files (for drafting one that does not exist yet).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read gateway configuration {file}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_config(
        data, base=file.resolve().parent, resolve_catalogues=resolve_catalogues, source=str(file)
    )
