"""The gateway's configuration: one TOML file, validated at start.

A value of the form ``env:NAME`` in an upstream's ``env`` or ``headers`` is read
from the gateway's environment when the file is loaded, so secrets for the
upstreams need not be written in the file.

Better still, ``[[upstreams.credentials]]`` names a credential the secret broker
leases per task and injects: a stored secret (an API key, a service-account key, or a
``postgres`` secret whose per-task role arrives as a connection string) into an
environment variable of a stdio upstream or a header of an HTTP one, or a
Tether-signed per-call token (``downstream_audience``) into a header::

    [[upstreams.credentials]]
    secret = "billing-api-key"
    env = "BILLING_API_KEY"          # stdio; for HTTP: header = "Authorization"
    format = "{value}"               # e.g. "Bearer {value}"

An upstream with credentials is started once per task (see :mod:`tether.gateway._app`).
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
from tether.core._flow import REVIEWED, STRICT, FlowPolicy
from tether.core._scanning import ScanLimits
from tether.core._verify import PROOF_WINDOW
from tether.gateway._catalogue import CatalogueFile, ToolEntry, validate_entries

UPSTREAM_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
SECRET_REF = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
PROTOCOLS = ("auto", "legacy", *MODERN_PROTOCOL_VERSIONS)
APPROVAL_SAFETY_MARGIN = 5.0
MAX_APPROVAL_WAIT = PROOF_WINDOW - APPROVAL_SAFETY_MARGIN
MAX_TIMEOUT = 600.0


class ConfigError(UsageError):
    """The gateway configuration is invalid; the message names every problem."""

    code = "gateway.config"


class StdioTransport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Launch the upstream as a child process and speak MCP over its stdin/stdout.

    The child gets a minimal environment, never the gateway's own (which may hold
    ``TETHER_KEK`` and every upstream's secrets): the MCP SDK's safe defaults (``HOME``,
    ``LOGNAME``, ``PATH``, ``SHELL``, ``TERM``, ``USER``), plus ``env`` (values, or
    ``env:NAME`` read from the gateway's environment), plus the variables named in
    ``inherit``, passed through by name. Anything else is not there: list it."""

    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    cwd: str | None = None
    inherit: tuple[str, ...] = ()


class HttpTransport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reach the upstream over streamable HTTP."""

    url: str
    headers: dict[str, str] = {}


class CredentialConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A credential the broker leases per task and injects into an upstream's calls.

    Source: ``secret`` (a stored secret: its current version, or for a ``postgres``
    secret a per-task role's connection string) or ``downstream_audience`` (a
    Tether-signed token for that service, minted for every call, at most 60 s).
    Target: ``env`` (an environment variable of a stdio upstream's per-task process)
    or ``header`` (a request header of an HTTP upstream's per-task connection).
    """

    secret: str | None = None
    downstream_audience: str | None = None
    env: str | None = None
    header: str | None = None
    format: str = "{value}"


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
    credentials: tuple[CredentialConfig, ...] = ()

    @property
    def transport(self) -> str:
        return "stdio" if self.stdio is not None else "http"


class ApprovalConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a call that needs a human approval does.

    ``wait``: hold the call open until the approval is decided, then decide the
    call again with the same proof; the wait ends after ``timeout_seconds`` and
    never outlasts the proof's acceptance window. ``return``: answer at once
    with the approval id; the agent repeats the identical call once approved.
    ``input_required``: to a client at MCP 2026-07-28, answer with an
    ``input_required`` result (a URL-mode elicitation pointing at the approval when
    the client takes one, and a sealed, single-use ``requestState``); the client
    retries, each retry waiting up to ``timeout_seconds`` for the human, and the
    approved call is decided again and forwarded. Older clients: as ``wait``.
    """

    mode: Literal["wait", "return", "input_required"] = "return"
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
    # The information-flow profile: "reviewed" holds an untrusted-sink call (or a
    # privileged tool reached after discovery) for a human; "strict" denies it.
    flow: Literal["reviewed", "strict"] = "reviewed"
    # How much untrusted data one call's arguments or one upstream result may make the
    # gateway scan: larger arguments are denied (call.oversized); a larger result, or one
    # whose scan takes longer than scan_seconds, is withheld and labels the task as having
    # read untrusted, oversized content.
    limits: ScanLimits = ScanLimits()

    @property
    def flow_policy(self) -> FlowPolicy:
        """The core's :class:`~tether.core.FlowPolicy` for ``flow``."""
        return STRICT if self.flow == "strict" else REVIEWED

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
        for name in stdio.inherit:
            if not ENV_NAME.fullmatch(name):
                problems.append(f"{where}.stdio.inherit: {name!r} must match {ENV_NAME.pattern}")
            elif name.upper().startswith("TETHER_"):
                problems.append(
                    f"{where}.stdio.inherit: {name!r}: Tether's own settings (the KEK among "
                    "them) are never passed to an upstream"
                )
            elif name not in os.environ:
                problems.append(f"{where}.stdio.inherit: environment variable {name!r} is not set")
            elif name not in env:
                env[name] = os.environ[name]
        stdio = msgspec.structs.replace(stdio, env=env, cwd=cwd, inherit=())
    if http is not None:
        _check_url(http.url, f"{where}.http.url", problems)
        headers = _resolve_env(http.headers, f"{where}.http.headers", problems)
        lowered = {h.lower() for h in headers}
        if "authorization" in lowered and http.url.startswith("http://"):
            problems.append(f"{where}.http.headers: credentials must not be sent over plain http")
        http = msgspec.structs.replace(http, headers=headers)
    _check_credentials(upstream, where, problems)
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


def _check_credentials(upstream: UpstreamConfig, where: str, problems: list[str]) -> None:
    targets: set[str] = set()
    for i, cred in enumerate(upstream.credentials):
        at = f"{where}.credentials[{i}]"
        if (cred.secret is None) == (cred.downstream_audience is None):
            problems.append(f"{at}: give exactly one of secret or downstream_audience")
        if cred.secret is not None and not SECRET_REF.fullmatch(cred.secret):
            problems.append(f"{at}.secret: must match {SECRET_REF.pattern}")
        if cred.downstream_audience is not None and not (0 < len(cred.downstream_audience) <= 2048):
            problems.append(f"{at}.downstream_audience: 1-2048 characters")
        if (cred.env is None) == (cred.header is None):
            problems.append(f"{at}: give exactly one of env or header")
        if cred.env is not None:
            if upstream.stdio is None:
                problems.append(f"{at}.env: only a stdio upstream has an environment")
            if not ENV_NAME.fullmatch(cred.env):
                problems.append(f"{at}.env: must match {ENV_NAME.pattern}")
            if cred.downstream_audience is not None:
                problems.append(
                    f"{at}: a per-call token cannot go into a process environment (use header)"
                )
        if cred.header is not None:
            if upstream.http is None:
                problems.append(f"{at}.header: only an HTTP upstream takes headers")
            elif upstream.http.url.startswith("http://") and not _is_loopback(
                urlsplit(upstream.http.url).hostname or ""
            ):
                problems.append(f"{at}: credentials must not be sent over plain http")
            if not HEADER_NAME.fullmatch(cred.header):
                problems.append(f"{at}.header: not a valid header name")
        if cred.format.count("{value}") != 1 or len(cred.format) > 256:
            problems.append(f"{at}.format: must contain {{value}} exactly once")
        target = (cred.env or cred.header or "").lower()
        if target in targets:
            problems.append(f"{at}: {target} is injected twice")
        targets.add(target)


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
    problems.extend(f"limits.{problem}" for problem in config.limits.problems())
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
