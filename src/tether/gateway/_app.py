"""The gateway: one MCP server in front of many, deciding every call with Tether.

Agents reach one streamable-HTTP MCP endpoint (the configured resource URI);
behind it each configured upstream's tools appear under the upstream's name
(``git.git_status``). The endpoint speaks both generations the MCP SDK serves:
2026-07-28 (stateless, ``server/discover``, one self-contained POST per
request) and 2025-11-25 (``initialize`` handshake, served statelessly: no
``Mcp-Session-Id``, so no session to hijack; every request stands on its own
token and proof).

Per request: the token and proof are verified before MCP sees the request
(see :mod:`tether.gateway._auth`). ``tools/list`` shows the caller only what its
task may call: tools its intent's capability patterns name, whose output fits
the intent's data ceiling, and that the live Cedar policy permits with no
arguments (and the task's flow summary as ``context.flow``); anything unsure
(a policy error, an exhausted budget) is hidden. A hidden tool is not callable
by accident: every ``tools/call`` is decided again, exactly, with its arguments.

Per ``tools/call``: ``Tether.authorize`` with the upstream and its tool
identity in the receipt, and the task's information-flow state (see
:mod:`tether.core._flow`): the tool's catalogue entry as a ``ToolProfile`` and
the configured ``flow`` profile (``reviewed``: an ungrounded sink argument
after untrusted content waits for a human; ``strict``: it is denied). The
state is kept in the store (``task_flow``), so it survives a restart and is
shared by gateways on one store: an allowed call is added to it, and each
result's labels and values when the upstream answers. ``allow`` forwards the
call (never the agent's token); ``deny`` is a tool error result with the reason
code and message; ``approval_required`` waits for a human or returns the
approval id (``[approval] mode``). The upstream's answer is scrubbed of
secrets, labelled with the tool's sensitivity and trust, recorded in the
task's labels, flow state and a receipt, then returned.

The lean path. An ordinary 2026-07-28 ``tools/call`` (no requestState, no progress
token, approvals not in ``input_required`` mode) is not handed to the MCP SDK's server:
the request passes the SDK's own checks (the same functions: content type, host, origin,
``Accept``, routing headers against the body, the per-request envelope, ``Mcp-Param-*``
headers, the params' shape; anything they reject is served by the SDK, which answers it,
-32020 for a header that disagrees with the body), then the same ``call_tool`` handler
decides it once and forwards it, and its result is shaped by the SDK's serializer and sent
as one JSON response. Calls to a streamable-HTTP upstream on 2026-07-28 are sent directly
over its pooled connection (:meth:`Upstream.call_tool`). ``Gateway.lean_calls`` counts
the calls served so.

Brokered credentials (``[[upstreams.credentials]]``). The agent never holds them.
An upstream that needs one is run **once per task**: at the task's first allowed
call to it, the gateway takes a lease on each configured secret (bound to the task,
living no longer than it) and starts a connection for that task alone, a process
whose environment carries the secret (stdio) or an HTTP connection whose requests
carry it in a header. That connection serves only that task's calls; before each
one the gateway checks the leases are still live, and a housekeeping loop (every
second) stops the connection, killing a stdio process, as soon as a lease ends
(task ended, expired, revoked, its agent offboarded, the kill switch, a rotated
version past its overlap). A per-call downstream token is minted for every call
and set as a header just before it is sent (calls of one task to such an upstream
are then made one at a time). The shared connection that lists an upstream's
tools runs without its credentials. Every argument is checked for credentials
before forwarding (``secret.egress``: a brokered value to any tool, any other
credential to one that writes, sends or destroys), and every answer is scrubbed
of the brokered values (an upstream that echoes what it was given is caught) as
well as of known formats and high-entropy strings.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import anyio.to_thread
import mcp_types as types
import msgspec
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp.server.streamable_http import check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    MCP_PARAM_HEADER_PREFIX,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
    validate_mcp_param_headers,
)
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST, SERVER_INFO_META_KEY
from mcp_types import methods as mcp_methods
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from tether._errors import NotFound
from tether._tether import Tether
from tether.cluster import Node, join
from tether.core import digest
from tether.core._decision import TaskState, call_entities, tree_state
from tether.core._flow import (
    OVERSIZED,
    FlowPolicy,
    FlowState,
    ResultReading,
    SideEffect,
    ToolProfile,
    flow_context,
    merge,
    oversized_reading,
    read_result,
)
from tether.core._labels import declared_in, resource_text
from tether.core._risk import Control, risk_tags
from tether.core._scanning import Deadline, ScanExceeded
from tether.core._verify import PROOF_WINDOW
from tether.enforcement import FlowUnavailable, ObservationRefused, Receipt
from tether.enforcement._unauthenticated import UnauthenticatedTraffic
from tether.gateway._auth import Authenticator, Caller, Refusal, challenge, tool_call
from tether.gateway._catalogue import ToolClass, classify, tool_profile
from tether.gateway._config import APPROVAL_SAFETY_MARGIN, ConfigError, GatewayConfig, load_config
from tether.gateway._pins import PinStatus, ToolPins
from tether.gateway._redact import redact_result, redact_text
from tether.gateway._upstream import AnswerTooLarge, InjectedHeaders, Upstream, UpstreamError
from tether.observability import configure_tracing, traced_tool_call
from tether.secrets import Lease

log = logging.getLogger("tether.gateway")

CALLER_KEY = "tether.caller"
#: The protocol version from which a held call is answered with ``input_required``.
MRTR_VERSION = "2026-07-28"
#: How long one round's requestState of a held call lives.
HELD_STATE_TTL = 600.0
TOOL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
META_DECISION = "tether/decision"
META_LABEL = "tether/label"
META_TOOL = "tether/tool"


def _request_uri(scope: Scope) -> str:
    """``htu``: scheme, authority and path, without query or fragment (RFC 9449 §4.3)."""
    url = Request(scope).url
    return f"{url.scheme}://{url.netloc}{url.path}"


@dataclass(frozen=True, slots=True)
class LeanContext:
    """What a ``tools/call`` on the lean path knows of its request: the few things the
    handler and its span read of the MCP SDK's request context."""

    request: Request
    request_id: str | int
    protocol_version: str
    method: str = "tools/call"


#: ``params`` keys of a ``tools/call`` the lean path takes (anything else: the SDK).
LEAN_PARAMS = frozenset({"name", "arguments", "_meta"})
LEAN_ENVELOPE = frozenset({"jsonrpc", "id", "method", "params"})
_PARAM_HEADER = MCP_PARAM_HEADER_PREFIX.lower()


#: An answer at most this long (JSON) is scanned on the event loop (its scan takes about
#: what the hop to a thread takes, ~0.3 ms; hostile text of this size ~10 ms at worst),
#: a longer one in a thread.
INLINE_SCAN_BYTES = 1024
HOUSEKEEPING_SECONDS = 1.0
REAP_SECONDS = 5.0


class TaskConnection:
    """An upstream connection serving one task, with the leases it was started with."""

    def __init__(
        self,
        upstream: Upstream,
        leases: list[Lease],
        tokens: list[tuple[str, str, str]],
        auth: InjectedHeaders | None,
    ) -> None:
        self.upstream = upstream
        self.leases = leases
        self.tokens = tokens  # (audience, header, format) of per-call downstream tokens
        self.auth = auth
        self.scope = anyio.CancelScope()
        self.lock = anyio.Lock()

    @property
    def lease_ids(self) -> list[str]:
        return [lease.lease_id for lease in self.leases]

    async def run(self) -> None:
        with self.scope:
            await self.upstream.run()


def _error_result(text: str, decision: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=text)], is_error=True, _meta={META_DECISION: decision}
    )


def _definition_text(name: str, tool: types.Tool) -> str:
    """Every text of a tool definition an agent reads: its name, title, description and
    the descriptions and titles anywhere in its input schema."""
    texts = [name, tool.title or "", tool.description or ""]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("description", "title", "default", "examples", "enum", "const"):
                    texts.extend(_strings(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(tool.input_schema)
    return "\n".join(text for text in texts if text)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [str(value)] if value is not None else []


def _observed(result: types.CallToolResult) -> Any:
    """What the flow state records of a result: its structured content and its text, both
    (a model reads the text: an upstream cannot hide an injection behind innocuous
    structured content); a block without text is recorded by kind, so an untrusted
    tool's image counts too."""
    parts: list[Any] = []
    if result.structured_content is not None:
        parts.append(result.structured_content)
    for block in result.content:
        if isinstance(block, types.TextContent):
            if result.structured_content is not None and _same_json(
                block.text, result.structured_content
            ):
                continue  # the structured content as text (MCP's compatibility copy)
            parts.append(block.text)
        elif isinstance(block, types.EmbeddedResource):
            parts.append(resource_text(block.resource.model_dump(by_alias=True, mode="json")))
        elif isinstance(block, types.ResourceLink):
            parts.append(str(block.uri))
            # Its name, title and description are shown to the agent as well.
            parts.extend(
                value
                for field in ("name", "title", "description")
                if isinstance(value := getattr(block, field, None), str)
            )
        else:
            parts.append(f"[{block.type}]")
    return parts


def _same_json(text: str, value: Any) -> bool:
    """Whether ``text`` is JSON for exactly ``value``."""
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return False
    try:
        return bool(json.loads(text) == value)
    except (ValueError, RecursionError):
        return False


class Gateway:
    """The gateway's state: Tether, the configuration, the upstreams, the MCP server."""

    def __init__(self, tether: Tether, config: GatewayConfig) -> None:
        self.tether = tether
        #: This gateway as one node of several over PostgreSQL (set while it runs).
        self.node: Node | None = None
        self.config = config
        self._check_identities()
        self.upstreams = {
            u.name: Upstream(u, known=self._known, max_answer_bytes=config.limits.max_result_bytes)
            for u in config.upstreams
        }
        #: ``tools/call`` requests answered by the lean path (:meth:`_lean_call`).
        self.lean_calls = 0
        #: The pinned tool definitions (tether.gateway._pins), compared at every tools/list read.
        self.pins = ToolPins(tether)
        #: Refusals of callers who proved nothing: counted and sampled, not a receipt each.
        self.unauthenticated = UnauthenticatedTraffic()
        for listed in self.upstreams.values():
            listed.on_tools = self._tools_listed
        self.connections: dict[tuple[str, str], TaskConnection] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.authenticator = Authenticator(tether, config.resource)
        self.server: Server[Any] = Server(
            "tether-gateway",
            version="0.1.0",
            title="Tether MCP gateway",
            instructions=(
                "Tools of several MCP servers, named '<upstream>.<tool>'. Each call is "
                "authorized against your task's intent and policy; a refused call returns "
                "an error result with the reason."
            ),
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            get_tool_input_schema=self.input_schema,
        )
        # A held call is answered, at 2026-07-28, with an ``input_required`` result whose
        # requestState names the approval: sealed and bound (to the call, the task and this
        # gateway) by the SDK under a key derived from the KEK, single-use here.
        self.server.middleware.append(
            RequestStateBoundary(
                RequestStateSecurity(
                    keys=[tether.keys.derived_key("mcp request state v1")],
                    ttl=HELD_STATE_TTL,
                    bind_principal=_task_principal,
                    audience=config.resource,
                ),
                default_audience=config.resource,
            )
        )
        self.security = self._security_settings()
        self._transport_checks = TransportSecurityMiddleware(self.security)
        self.manager = StreamableHTTPSessionManager(
            app=self.server,
            stateless=True,
            json_response=False,
            security_settings=self.security,
            max_request_body_size=config.max_body_bytes,
        )

    # -- start-up checks -------------------------------------------------------------------
    def _check_identities(self) -> None:
        problems: list[str] = []
        for upstream in self.config.upstreams:
            row = self.tether.identities.lookup(upstream.identity)
            where = f"upstream {upstream.name!r}: identity {upstream.identity}"
            if row is None:
                problems.append(
                    f"{where} is not registered (tether identity register ... --kind tool)"
                )
            elif row.kind != "tool":
                problems.append(f"{where} is a {row.kind}, not a tool")
            elif row.status != "active":
                problems.append(f"{where} is {row.status}")
        if problems:
            raise ConfigError("gateway cannot start:\n  - " + "\n  - ".join(problems))

    def host_allowed(self, host: str | None) -> bool:
        """Whether ``host`` (the Host header) names this gateway (DNS-rebinding defence).

        Checked before the proof: ``htu`` is built from the Host header, so only the
        gateway's own names may appear in it.
        """
        if not host:
            return False
        for allowed in self.security.allowed_hosts:
            if host == allowed or (
                allowed.endswith(":*")
                and host.startswith(allowed[:-1])
                and host[len(allowed) - 1 :].isdigit()
            ):
                return True
        return False

    def _security_settings(self) -> TransportSecuritySettings:
        resource = urlsplit(self.config.resource)
        hosts = list(self.config.allowed_hosts) or [
            resource.netloc,
            f"{self.config.host}:{self.config.port}",
        ]
        origins = [f"{resource.scheme}://{resource.netloc}"]
        if self.config.host in ("127.0.0.1", "localhost", "::1"):
            hosts += ["127.0.0.1:*", "localhost:*", "[::1]:*"]
            origins += ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
        )

    # -- tools ----------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[Upstream, str, ToolClass] | None:
        """The upstream, upstream tool name and class of namespaced tool ``name``."""
        prefix, dot, tool = name.partition(".")
        upstream = self.upstreams.get(prefix)
        if not dot or upstream is None or not tool:
            return None
        if tool not in upstream.tools and tool not in upstream.config.tools:
            return None
        return upstream, tool, classify(upstream.config.tools, tool)

    def input_schema(self, name: str) -> Mapping[str, Any] | None:
        resolved = self.resolve(name)
        if resolved is None:
            return None
        tool = resolved[0].tools.get(resolved[1])
        return tool.input_schema if tool is not None else None

    def _visible(
        self, state: TaskState, name: str, klass: ToolClass, snapshot: Any, context: dict[str, Any]
    ) -> bool:
        """Whether the task may plausibly call ``name``; anything unsure is hidden."""
        intent = state.intent
        if not any(fnmatch.fnmatchcase(name, cap.tool) for cap in intent.capabilities):
            return False
        if klass.sensitivity.rank > intent.data_ceiling.rank:
            return False
        try:
            outcome = snapshot.evaluate(
                {"type": "Agent", "id": state.agent_id},
                "call_tool",
                {"type": "Tool", "id": name},
                context,
                call_entities(state.agent_id, state.agent_owner, state.agent_kind, name),
            )
        except Exception:
            return False
        return bool(outcome.allowed and not outcome.errors)

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        caller = _caller(ctx)
        state = caller.state
        tools: list[types.Tool] = []
        if state.status == "open" and state.calls_used < state.intent.budget.max_calls:
            try:
                snapshot = self.tether.policies.snapshot()
            except Exception:
                log.exception("policy snapshot unavailable: listing no tools")
                return types.ListToolsResult(tools=[])
            try:
                flow = self._flow_state(caller)
            except FlowUnavailable:
                log.exception("flow state of task %s unreadable: listing no tools", state.task_id)
                return types.ListToolsResult(tools=[])
            context = {
                "task_id": state.task_id,
                "template": state.template,
                "purpose": state.intent.purpose,
                "data_ceiling": str(state.intent.data_ceiling),
                "on_behalf_of": state.intent.on_behalf_of or "",
                "calls_used": state.calls_used,
                "max_calls": state.intent.budget.max_calls,
                "delegation_depth": len(caller.claims.chain) - 1,
                "chain": list(caller.claims.chain),
                "root": caller.claims.chain[-1],
                "args": {},
            }
            unreviewed: list[str] = []
            try:
                pinned = self.pins.pinned()
            except Exception:
                log.exception("pinned tool definitions unreadable: listing no tools")
                return types.ListToolsResult(tools=[])
            for upstream in self.upstreams.values():
                for tool in upstream.tools.values():
                    name = f"{upstream.name}.{tool.name}"
                    if not TOOL_NAME.fullmatch(name):
                        continue
                    # A definition that changed since it was pinned is not served.
                    definition = self.pins.status(upstream.name, tool, pinned=pinned)
                    if definition is PinStatus.CHANGED:
                        continue
                    klass = classify(upstream.config.tools, tool.name)
                    context["flow"] = flow_context(flow, name, tool_profile(klass), [])
                    if self._visible(state, name, klass, snapshot, context):
                        tools.append(
                            self._present(upstream, name, tool, klass, definition=definition)
                        )
                        if definition is not PinStatus.PINNED:
                            unreviewed.append(_definition_text(name, tool))
            if unreviewed:
                # Descriptions no operator reviewed are content the agent now reads: the
                # task tree counts as having read untrusted content (values they name
                # stay ungrounded), exactly as if a tool had returned them.
                try:
                    self.tether.enforcement.observe_content(
                        caller.verified, source="tools/list", text="\n".join(unreviewed)
                    )
                except Exception:
                    log.exception(
                        "unreviewed tool descriptions could not be observed on task %s: "
                        "listing no tools",
                        state.task_id,
                    )
                    return types.ListToolsResult(tools=[])
        return types.ListToolsResult(tools=tools)

    @staticmethod
    def _present(
        upstream: Upstream,
        name: str,
        tool: types.Tool,
        klass: ToolClass,
        *,
        definition: PinStatus = PinStatus.UNPINNED,
    ) -> types.Tool:
        """The tool as agents see it; ``_meta`` says whether an operator reviewed (pinned)
        the upstream's definition (``definition``: ``pinned`` or ``unpinned``)."""
        title = tool.title or (tool.annotations.title if tool.annotations else None)
        return types.Tool(
            name=name,
            title=title,
            description=tool.description,
            input_schema=tool.input_schema,
            output_schema=tool.output_schema,
            annotations=types.ToolAnnotations(
                title=title,
                read_only_hint=klass.side_effect is SideEffect.READ,
                destructive_hint=klass.side_effect is SideEffect.DESTRUCTIVE,
                open_world_hint=klass.side_effect is SideEffect.EGRESS or not klass.trusted,
            ),
            _meta={
                META_TOOL: {
                    "upstream": upstream.name,
                    "tool_identity": upstream.config.identity,
                    **klass.to_dict(),
                    "definition": str(definition),
                }
            },
        )

    # -- pinned definitions (tether.gateway._pins) -----------------------------------------
    def _tools_listed(self, upstream: Upstream) -> None:
        """After each read of an upstream's ``tools/list`` (on connecting, at every
        refresh): compare every definition with its pin; a changed one is logged once."""
        try:
            self.pins.observe(upstream.name, upstream.tools.values())
        except Exception as exc:
            log.warning(
                "pinned tool definitions unreadable (upstream %s): %s",
                upstream.name,
                type(exc).__name__,
            )

    def unreviewed(self, upstream: str, tool: str) -> bool:
        """Whether the definition of ``upstream``'s tool ``tool`` that agents are served is
        one no operator reviewed: true unless the latest definition read matches its pin
        (true too when the tool is not listed or the pins cannot be read)."""
        found = self.upstreams.get(upstream)
        definition = found.tools.get(tool) if found is not None else None
        if definition is None:
            return True
        try:
            return self.pins.unreviewed(upstream, definition)
        except Exception:
            return True

    def _pin_refusal(
        self,
        caller: Caller,
        upstream: Upstream,
        tool: str,
        name: str,
        args: dict[str, Any],
        detail: dict[str, Any],
    ) -> types.CallToolResult | None:
        """Refuse (with a receipt) a call to a tool whose latest known definition differs
        from its pin, or any call when the pins cannot be read; ``None`` otherwise."""
        definition = upstream.tools.get(tool)
        if definition is None:  # not listed: nothing of it was served to the agent
            return None
        try:
            check = self.pins.check(upstream.name, definition)
        except Exception as exc:
            return self._gateway_deny(
                caller,
                name,
                args,
                "gateway.pins_unavailable",
                f"the pinned tool definitions cannot be read ({type(exc).__name__})",
                detail=detail,
            )
        if check.status is not PinStatus.CHANGED:
            return None
        return self._gateway_deny(
            caller,
            name,
            args,
            "gateway.definition_changed",
            f"upstream {upstream.name!r} changed the definition of {tool!r} since an operator "
            "reviewed it; it is refused until it is reviewed and pinned again "
            f"(tether gateway pin CONFIG {upstream.name} --tool {tool})",
            detail={**detail, "definition": {"pinned": check.pinned, "current": check.current}},
        )

    # -- calls ----------------------------------------------------------------------------
    @traced_tool_call
    async def call_tool(
        self,
        ctx: ServerRequestContext[Any, Any] | LeanContext,
        params: types.CallToolRequestParams,
    ) -> types.CallToolResult | types.InputRequiredResult:
        """Decide one call and forward it if allowed; ``ctx`` is the MCP SDK's request
        context, or the lean path's (never with a requestState nor ``input_required``)."""
        caller = _caller(ctx)
        name, args = params.name, dict(params.arguments or {})
        sdk = ctx if isinstance(ctx, ServerRequestContext) else None
        if params.request_state is not None:
            if sdk is None:  # the lean path never takes one: fail closed
                raise MCPError(INVALID_REQUEST, "requestState outside the MCP session")
            # The retry of a held call: still pending, it is answered without a decision;
            # approved, it is decided again below (the approval grants exactly this call).
            answer = await self._held_retry(sdk, caller, name, args, params.request_state)
            if answer is not None:
                return answer
        resolved = self.resolve(name)
        if resolved is None:
            return self._gateway_deny(
                caller,
                name,
                args,
                "gateway.unknown_tool",
                f"no upstream offers a tool named {name!r}",
                detail={"protocol": ctx.protocol_version},
            )
        upstream, tool, klass = resolved
        detail: dict[str, Any] = {
            "gateway": self.config.resource,
            "upstream": upstream.name,
            "upstream_tool": tool,
            "tool_identity": upstream.config.identity,
            "tool_class": klass.to_dict(),
            "protocol": ctx.protocol_version,
        }
        refused = self._pin_refusal(caller, upstream, tool, name, args, detail)
        if refused is not None:
            return refused
        profile = tool_profile(klass)
        try:
            receipt = self._authorize(caller, name, args, detail, profile)
            approval_status: str | None = None
            mrtr = (
                self.config.approval.mode == "input_required"
                and ctx.protocol_version >= MRTR_VERSION
            )
            if receipt.decision.effect == "approval_required" and not mrtr:
                receipt, approval_status = await self._approval(
                    caller, name, args, detail, profile, receipt
                )
            elif receipt.decision.effect == "approval_required":
                approval_status = "pending"
                if sdk is None:  # not reached: the lean path is never taken in this mode
                    raise MCPError(INTERNAL_ERROR, "a held call outside the MCP session")
        except FlowUnavailable as exc:
            return self._gateway_deny(
                caller, name, args, "flow.state_unavailable", str(exc), detail=detail
            )
        if receipt.decision.effect != "allow":
            self._burn(caller)
            if (
                mrtr
                and receipt.decision.effect == "approval_required"
                and approval_status == "pending"
                and receipt.approval_id is not None
                and sdk is not None
            ):
                return self._input_required(sdk, receipt.approval_id, ask=True)
            return self._refused(receipt, approval_status)
        return await self._forward(caller, upstream, tool, name, args, klass, receipt, detail)

    def _input_required(
        self, ctx: ServerRequestContext[Any, Any], approval_id: str, *, ask: bool
    ) -> types.InputRequiredResult:
        """A held call at 2026-07-28: retry with this requestState once a human decided.
        With ``ask`` and a client that takes URL-mode elicitation, the user is pointed at
        the approval too."""
        state = json.dumps({"approval": approval_id, "nonce": os.urandom(16).hex()})
        requests: dict[str, types.InputRequest] | None = None
        if ask and _takes_url_elicitation(ctx):
            requests = {
                "tether.approval": types.ElicitRequest(
                    params=types.ElicitRequestURLParams(
                        message=f"A human must approve this call (approval {approval_id}).",
                        url=self._approval_url(approval_id),
                    )
                )
            }
        return types.InputRequiredResult(
            input_requests=requests,
            request_state=state,
            _meta={META_DECISION: {"effect": "approval_required", "approval_id": approval_id}},
        )

    def _approval_url(self, approval_id: str) -> str:
        base = self.config.authorization_servers[0].rstrip("/")
        return f"{base}/console/approvals?id={approval_id}"

    async def _held_retry(
        self,
        ctx: ServerRequestContext[Any, Any],
        caller: Caller,
        name: str,
        args: dict[str, Any],
        state: str,
    ) -> types.CallToolResult | types.InputRequiredResult | None:
        """Answer the retry of a held call: ``None`` once its approval is approved (the
        call is then decided again); a fresh ``input_required`` while it is pending; a
        refusal (with a receipt) when it was denied or expired, or the state was used."""
        detail = {"protocol": ctx.protocol_version, "request_state": True}
        try:
            held = json.loads(state)
            approval_id, nonce = str(held["approval"]), str(held["nonce"])
        except (ValueError, KeyError, TypeError):
            return self._gateway_deny(
                caller,
                name,
                args,
                "approval.state_invalid",
                "requestState is not one this gateway minted",
                detail=detail,
            )
        now = self.tether.clock.now()
        if not self.tether.store.record_proof(f"mrtr:{nonce}", now + HELD_STATE_TTL * 2):
            return self._gateway_deny(
                caller,
                name,
                args,
                "approval.state_replayed",
                "this requestState has been used before",
                detail=detail,
            )
        try:
            row = self.tether.approvals.get(approval_id)
        except NotFound:
            row = None
        if row is None or row.task_id != caller.claims.task_id:
            return self._gateway_deny(
                caller,
                name,
                args,
                "approval.unknown",
                f"approval {approval_id} is not one of this task's",
                detail=detail,
            )
        status = row.status
        if status == "pending" and self.config.approval.mode != "return":
            status = await self._await_decision(caller, approval_id)
        if status == "approved":
            return None
        self._burn(caller)
        if status == "pending":
            return self._input_required(ctx, approval_id, ask=False)
        return self._gateway_deny(
            caller,
            name,
            args,
            f"approval.{status}",
            f"approval {approval_id} was {status}: the call was not made",
            detail={**detail, "approval_id": approval_id},
        )

    def _authorize(
        self,
        caller: Caller,
        name: str,
        args: dict[str, Any],
        detail: dict[str, Any],
        profile: ToolProfile,
    ) -> Receipt:
        """Decide the call through the one pipeline, with the token and proof verified
        when the request arrived and the tool's profile from this gateway's catalogue."""
        return self.tether.authorize(
            token=None,
            proof=None,
            verified=caller.verified,
            tool=name,
            args=args,
            detail={**detail, "flow_profile": self.config.flow},
            profile=profile,
            flow_policy=self.config.flow_policy,
            limits=self.config.limits,
        )

    def _flow_state(self, caller: Caller) -> FlowState:
        """What the task's calls are judged against: its flow state joined with its
        ancestors' (:func:`tether.core.merge`)."""
        snapshot = self.tether.enforcement.loader.load(
            caller.claims, proof_jti=None, profile=ToolProfile(), flow_policy=FlowPolicy()
        )
        state = snapshot.task or caller.state
        own, ancestors = tree_state(state, snapshot)
        return merge(own, ancestors)

    def _burn(self, caller: Caller) -> None:
        """Consume the proof of a call that was not allowed: one proof, one call."""
        self.tether.enforcement.burn(caller.verified)

    def _gateway_deny(
        self,
        caller: Caller,
        name: str,
        args: dict[str, Any],
        code: str,
        message: str,
        *,
        detail: dict[str, Any],
    ) -> types.CallToolResult:
        """A refusal decided by the gateway itself: a decision receipt like the core's."""
        claims = caller.claims
        with self.tether.store.transaction():
            record = self.tether.audit.append(
                "decision",
                chain=list(claims.chain),
                task_id=claims.task_id,
                intent_digest=claims.intent_digest,
                tool=name[:256],
                args_digest=digest(args),
                effect="deny",
                reasons=[{"code": code, "message": message}],
                policies=[],
                risk_tags=list(risk_tags(Control.PER_CALL_POLICY, Control.INTENT_BINDING)),
                token_digest=claims.token_digest,
                detail={**detail, "gateway": self.config.resource, "decided_by": "gateway"},
            )
            self._burn(caller)
        return _error_result(
            f"denied [{code}]: {message}",
            {"effect": "deny", "code": code, "message": message, "receipt": record.seq},
        )

    @staticmethod
    def _refused(receipt: Receipt, approval_status: str | None = None) -> types.CallToolResult:
        decision = receipt.decision
        reason = decision.reasons[0]
        info: dict[str, Any] = {
            "effect": str(decision.effect),
            "code": reason.code,
            "message": reason.message,
            "receipt": receipt.seq,
        }
        if decision.effect == "approval_required":
            status = approval_status or "pending"
            info.update(approval_id=receipt.approval_id, approval_status=status)
            if status == "pending":
                text = (
                    f"approval required [{reason.code}]: {reason.message}. Approval id: "
                    f"{receipt.approval_id} (pending). Once a human approves it, repeat the "
                    "identical call (same tool, same arguments)."
                )
            else:
                text = (
                    f"approval {status} [{reason.code}]: {reason.message}. Approval id: "
                    f"{receipt.approval_id}. The call was not made."
                )
        else:
            text = f"denied [{reason.code}]: {reason.message}"
        return _error_result(text, info)

    async def _approval(
        self,
        caller: Caller,
        name: str,
        args: dict[str, Any],
        detail: dict[str, Any],
        profile: ToolProfile,
        receipt: Receipt,
    ) -> tuple[Receipt, str]:
        """Wait for the approval (``wait`` mode), then decide again with the same proof.

        Returns the last receipt and the approval's status. The proof is only
        accepted within ``PROOF_WINDOW`` seconds of its ``iat``, and a call that is
        pending has not consumed it, so the wait ends ``APPROVAL_SAFETY_MARGIN``
        seconds before the proof would go stale, whatever ``timeout_seconds`` says.
        """
        settings = self.config.approval
        approval_id = receipt.approval_id
        if settings.mode == "return" or approval_id is None:
            return receipt, "pending"
        status = await self._await_decision(caller, approval_id)
        if status == "approved":
            again = self._authorize(
                caller, name, args, {**detail, "approval_id": approval_id}, profile
            )
            return again, status
        return receipt, status  # denied, expired, unknown or still pending: not made

    async def _await_decision(self, caller: Caller, approval_id: str) -> str:
        """Poll a pending approval until a human decides it or the wait is over: at most
        ``timeout_seconds``, and never past ``APPROVAL_SAFETY_MARGIN`` seconds before the
        caller's proof goes stale. Its status then (``unknown`` if it is gone)."""
        settings = self.config.approval
        proof_left = (
            caller.proof_iat + PROOF_WINDOW - APPROVAL_SAFETY_MARGIN - self.tether.clock.now()
        )
        end = anyio.current_time() + min(settings.timeout_seconds, proof_left)
        status = "pending"
        while status == "pending" and (left := end - anyio.current_time()) > 0:
            await anyio.sleep(min(settings.poll_interval_seconds, left))
            try:
                status = self.tether.approvals.get(approval_id).status
            except NotFound:
                return "unknown"
        return status

    async def _forward(
        self,
        caller: Caller,
        upstream: Upstream,
        tool: str,
        name: str,
        args: dict[str, Any],
        klass: ToolClass,
        receipt: Receipt,
        detail: dict[str, Any],
    ) -> types.CallToolResult:
        try:
            if upstream.config.credentials:
                answer, leases = await self._call_for_task(
                    caller, upstream, tool, name, args, receipt
                )
                detail = {**detail, "leases": leases}
            else:
                answer = await upstream.call_tool(tool, args)
        except AnswerTooLarge:
            # Read no further than the bound: withheld, the task labelled as having read
            # untrusted content, exactly as an answer too large to scan.
            seq, _ = self._record_result(
                caller,
                name,
                args,
                klass,
                receipt,
                detail,
                "ok",
                Counter(),
                None,
                oversized_reading(tool_profile(klass)),
            )
            return self._withheld(seq, receipt, None)
        except UpstreamError as exc:
            # An upstream's error text may echo what it was given: scrub it too.
            redactions: Counter[str] = Counter()
            message = redact_text(exc.message, redactions, self._known())[0]
            # An error in the upstream's own words is content the agent reads, from a
            # source nobody vouches for: observed as such (an injection can come this way).
            said = [message] if exc.quotes_upstream else None
            reading = (
                await anyio.to_thread.run_sync(self._read_error, message, klass)
                if said is not None
                else None
            )
            seq, _ = self._record_result(
                caller, name, args, klass, receipt, detail, exc.code, redactions, said, reading
            )
            return _error_result(
                f"upstream failure [{exc.code}]: {message}",
                {
                    "effect": "allow",
                    "code": exc.code,
                    "receipt": seq,
                    "decision_receipt": receipt.seq,
                },
            )
        # Scrubbing and reading an upstream's answer is work on attacker text: within the
        # configured size and time (past either, nothing of it is passed on), and off the
        # event loop unless the answer is small (its scan is then shorter than the hop).
        known = self._known()
        size = len(answer.model_dump_json(by_alias=True))
        if size <= INLINE_SCAN_BYTES:
            result, redactions, reading = self._scan(answer, known, klass, size)
        else:
            result, redactions, reading = await anyio.to_thread.run_sync(
                self._scan, answer, known, klass, size
            )
        outcome = "error" if answer.is_error else "ok"
        seq, refused = self._record_result(
            caller,
            name,
            args,
            klass,
            receipt,
            detail,
            outcome,
            redactions,
            _observed(result) if result is not None else None,
            reading,
        )
        if result is None or refused is not None:
            return self._withheld(seq, receipt, refused)
        label = {
            **(
                reading.label.to_dict()
                if reading is not None and reading.label is not None
                else {"sensitivity": str(klass.sensitivity)}
            ),
            "trusted": klass.trusted,
            "upstream": upstream.name,
            "redactions": dict(redactions),
            "receipt": seq,
            "decision_receipt": receipt.seq,
        }
        return result.model_copy(update={"meta": {META_LABEL: label}})

    def _withheld(
        self, seq: int, receipt: Receipt, refused: tuple[str, str] | None
    ) -> types.CallToolResult:
        """The error result for an answer not passed on (too large or slow to scan, or
        its observation refused)."""
        code, message = refused or (
            "result.oversized",
            f"the upstream's answer is larger than {self.config.limits.max_result_bytes} "
            f"bytes, or took longer than {self.config.limits.scan_seconds:g} s to scan; "
            "the task is labelled as having read untrusted content",
        )
        return _error_result(
            f"result withheld [{code}]: {message}",
            {"effect": "allow", "code": code, "receipt": seq, "decision_receipt": receipt.seq},
        )

    def _scan(
        self, answer: types.CallToolResult, known: list[Any], klass: ToolClass, size: int
    ) -> tuple[types.CallToolResult | None, Counter[str], ResultReading]:
        """Scrub an upstream's answer (``size``: its JSON length) and read its values, within
        the configured limits: ``(None, ..., OVERSIZED)`` when it is too large or its scan
        too slow."""
        limits = self.config.limits
        deadline = Deadline(limits.scan_seconds, time.monotonic)
        # What the upstream declares of its answer (its ``_meta``, dropped before the
        # agent sees the result): a label that counts as the catalogue allows.
        said = declared_in(answer.model_dump(by_alias=True, mode="json"))
        profile = tool_profile(klass)
        try:
            if size > limits.max_result_bytes:
                raise ScanExceeded("the answer is too large")
            result, redactions = redact_result(answer, known, deadline=deadline)
            reading = read_result(_observed(result), profile, deadline=deadline, declared=said)
        except ScanExceeded:
            return None, Counter(), oversized_reading(profile, said)
        return result, redactions, reading

    def _read_error(self, message: str, klass: ToolClass) -> ResultReading:
        """An upstream's error text, read as untrusted content within the limits (whatever
        the catalogue says of the tool's results: no field of an error is asserted)."""
        limits = self.config.limits
        profile = msgspec.structs.replace(
            tool_profile(klass),
            trusted=False,
            trusted_fields=(),
            identifier_fields=(),
            identifiers=False,
        )
        if len(message) > limits.max_result_bytes:
            return OVERSIZED
        try:
            return read_result(
                [message], profile, deadline=Deadline(limits.scan_seconds, time.monotonic)
            )
        except ScanExceeded:
            return OVERSIZED

    def _known(self) -> list[Any]:
        """The brokered values to scrub from what upstreams answer (empty if unavailable:
        the format and entropy rules still apply)."""
        try:
            return self.tether.broker.known()
        except Exception:
            log.warning("brokered values unavailable for redaction")
            return []

    # -- per-task connections ----------------------------------------------------------------
    def _connection_live(self, connection: TaskConnection) -> bool:
        for lease_id in connection.lease_ids:
            try:
                self.tether.broker.check(lease_id)
            except Exception:
                return False
        return True

    async def _stop(self, key: tuple[str, str]) -> None:
        connection = self.connections.pop(key, None)
        if connection is not None:
            connection.scope.cancel()
            log.info("stopped the %s connection of task %s (lease ended)", key[1], key[0])

    async def _connection(
        self, caller: Caller, upstream: Upstream, name: str, receipt: Receipt
    ) -> TaskConnection:
        key = (caller.task_id, upstream.name)
        connection = self.connections.get(key)
        if connection is not None and not self._connection_live(connection):
            await self._stop(key)
            connection = None
        if connection is not None:
            return connection
        if self._tg is None:
            raise UpstreamError(
                "upstream.unavailable", f"upstream {upstream.name!r} is not running"
            )
        config = upstream.config
        env: dict[str, str] = {}
        headers: dict[str, str] = {}
        leases: list[Lease] = []
        tokens: list[tuple[str, str, str]] = []
        try:
            for cred in config.credentials:
                if cred.secret is not None:
                    lease = self.tether.lease(
                        caller.task_id, cred.secret, tool=name, receipt=receipt
                    )
                    leases.append(lease)
                    if cred.env is not None:
                        env[cred.env] = lease.render(cred.format)
                    elif cred.header is not None:
                        headers[cred.header] = lease.render(cred.format)
                elif cred.downstream_audience is not None and cred.header is not None:
                    tokens.append((cred.downstream_audience, cred.header, cred.format))
        except Exception as exc:
            for lease in leases:
                self.tether.broker.revoke(lease.lease_id, "connection not started")
            code = str(getattr(exc, "code", "lease.failed"))
            why = getattr(exc, "message", type(exc).__name__)
            raise UpstreamError(code, f"no credential for {upstream.name!r}: {why}") from None
        if config.stdio is not None:
            config = msgspec.structs.replace(
                config, stdio=msgspec.structs.replace(config.stdio, env={**config.stdio.env, **env})
            )
        auth: InjectedHeaders | None = None
        if config.http is not None:
            auth = InjectedHeaders()
            auth.headers.update(headers)
        connection = TaskConnection(
            Upstream(
                config,
                auth=auth,
                label=f"{upstream.name} (task {caller.task_id})",
                known=self._known,
                max_answer_bytes=self.config.limits.max_result_bytes,
            ),
            leases,
            tokens,
            auth,
        )
        self.connections[key] = connection
        self._tg.start_soon(connection.run)
        return connection

    async def _call_for_task(
        self,
        caller: Caller,
        upstream: Upstream,
        tool: str,
        name: str,
        args: dict[str, Any],
        receipt: Receipt,
    ) -> tuple[types.CallToolResult, list[str]]:
        connection = await self._connection(caller, upstream, name, receipt)
        if not connection.tokens:
            return await connection.upstream.call_tool(tool, args), connection.lease_ids
        async with connection.lock:  # the header holds this call's token until it is sent
            assert connection.auth is not None
            minted: list[str] = []
            for audience, header, fmt in connection.tokens:
                try:
                    token = self.tether.downstream_token(
                        caller.task_id,
                        audience=audience,
                        tool=name,
                        receipt=receipt,
                        tool_identity=upstream.config.identity,
                    )
                except Exception as exc:
                    raise UpstreamError(
                        "lease.failed", f"no downstream token: {type(exc).__name__}"
                    ) from None
                connection.auth.headers[header] = token.render(fmt)
                minted.append(token.lease_id)
            answer = await connection.upstream.call_tool(tool, args)
            return answer, [*connection.lease_ids, *minted]

    async def _housekeeping(self) -> None:
        """Stop task connections whose leases ended; reap expired tasks and leases."""
        last_reap = -REAP_SECONDS
        while True:
            await anyio.sleep(HOUSEKEEPING_SECONDS)
            for key, connection in list(self.connections.items()):
                if not self._connection_live(connection):
                    await self._stop(key)
            if anyio.current_time() - last_reap >= REAP_SECONDS:
                last_reap = anyio.current_time()
                try:
                    await anyio.to_thread.run_sync(self.tether.reap)
                except Exception as exc:
                    log.warning("reaper failed: %s", type(exc).__name__)

    def _record_result(
        self,
        caller: Caller,
        name: str,
        args: dict[str, Any],
        klass: ToolClass,
        receipt: Receipt,
        detail: dict[str, Any],
        outcome: str,
        redactions: Counter[str],
        observed: Any,
        reading: ResultReading | None = None,
    ) -> tuple[int, tuple[str, str] | None]:
        """Observe the answer through the one pipeline: the task tree's labels and flow
        state (when the upstream answered: ``observed`` is the scrubbed result, ``reading``
        what scanning it found) and the result's receipt, in one transaction. Returns the
        receipt and, when the observation was refused, its code and message: a result the
        flow state did not take is not passed on."""
        label = {
            "upstream": detail["upstream"],
            "tool_identity": detail["tool_identity"],
            "redactions": dict(redactions),
        }
        try:
            observation = self.tether.enforcement.observe(
                caller.verified,
                tool=name,
                result=observed,
                decision_seq=receipt.seq,
                profile=tool_profile(klass),
                outcome=outcome,
                detail={**detail, "redactions": dict(redactions), "args_digest": digest(args)},
                label=label,
                reading=reading,
                limits=self.config.limits,
            )
        except ObservationRefused as exc:
            return exc.seq or receipt.seq, (exc.code, exc.message)
        return observation.seq, None

    # -- HTTP -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """RFC 9728 protected-resource metadata."""
        return {
            "resource": self.config.resource,
            "authorization_servers": list(self.config.authorization_servers),
            "resource_name": self.config.resource_name,
            "bearer_methods_supported": ["header"],
            "dpop_signing_alg_values_supported": ["ES256"],
            "dpop_bound_access_tokens_required": True,
            "authorization_details_types_supported": ["tether:tool"],
        }

    async def mcp_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, then hand the request to the MCP session manager."""
        headers = Headers(scope=scope)
        if not self.host_allowed(headers.get("host")):
            await Response("Invalid Host header", status_code=421)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > self.config.max_body_bytes:
                await Response("request body too large", status_code=413)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        rpc: Any = None
        if body:
            try:
                rpc = json.loads(body)
            except (ValueError, RecursionError):
                rpc = None
        try:
            if isinstance(rpc, list):
                raise Refusal(
                    400, "invalid_request", "JSON-RPC batches are not accepted", "request.batch"
                )
            caller = self.authenticator.authenticate(
                htm=scope["method"],
                htu=_request_uri(scope),
                authorization=headers.getlist("authorization"),
                dpop=headers.getlist("dpop"),
                rpc=rpc,
            )
        except Refusal as refusal:
            await self._refuse(refusal, scope, rpc, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        inner = dict(scope)
        inner[CALLER_KEY] = caller
        lean = await self._lean_params(inner, headers, rpc)
        if lean is not None:
            await self._lean_call(inner, receive, send, rpc["id"], *lean)
            return
        await self.manager.handle_request(inner, replay, send)

    # -- the lean path ------------------------------------------------------------------------
    async def _lean_params(
        self, scope: Scope, headers: Headers, rpc: Any
    ) -> tuple[str, types.CallToolRequestParams] | None:
        """The protocol version and parsed params of an ordinary 2026-07-28 ``tools/call``
        that the lean path answers, or ``None``: the MCP SDK serves the request (and
        answers anything wrong with it, a header that disagrees with the body, an
        unsupported version, a malformed envelope, in its own words).

        Exactly the SDK's checks of such a request, with its own functions: content type,
        host and origin, ``Accept``, the routing headers, the per-request envelope, the
        ``Mcp-Param-*`` headers against the tool's input schema, the params' shape. Not
        taken: a requestState or input responses (a held call's retry), a progress token,
        ``input_required`` approvals (their requestState is sealed by the SDK)."""
        if scope["method"] != "POST" or self.config.approval.mode == "input_required":
            return None
        if not isinstance(rpc, dict) or rpc.get("method") != "tools/call":
            return None
        params, rpc_id = rpc.get("params"), rpc.get("id")
        if (
            rpc.get("jsonrpc") != "2.0"
            or not rpc.keys() <= LEAN_ENVELOPE
            or isinstance(rpc_id, bool)
            or not isinstance(rpc_id, int | str)
            or not isinstance(params, dict)
            or not params.keys() <= LEAN_PARAMS
        ):
            return None
        meta = params.get("_meta")
        name, args = params.get("name"), params.get("arguments")
        if (
            not isinstance(meta, dict)
            or "progressToken" in meta
            or not isinstance(name, str)
            or not (args is None or isinstance(args, dict))
        ):
            return None
        request = Request(scope)
        if await self._transport_checks.validate_request(request, is_post=True) is not None:
            return None
        has_json, has_sse = check_accept_headers(request)
        if not (has_json and has_sse):
            return None
        if find_duplicated_routing_header(headers.items()) is not None:
            return None
        verdict = classify_inbound_request(rpc, headers=dict(headers))
        if not isinstance(verdict, InboundModernRoute):
            return None
        if args or any(key.startswith(_PARAM_HEADER) for key in headers):
            try:
                schema = self.input_schema(name)
            except Exception:
                schema = None  # as the SDK: validation skipped, the call decided as ever
            if schema is not None and validate_mcp_param_headers(schema, args or {}, headers):
                return None
        try:
            parsed = mcp_methods.parse_client_request(
                "tools/call", verdict.protocol_version, params
            )
        except Exception:  # the SDK serves it, and answers what is wrong with it
            return None
        if not isinstance(parsed, types.CallToolRequest):
            return None
        return verdict.protocol_version, parsed.params

    async def _lean_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rpc_id: str | int,
        version: str,
        params: types.CallToolRequestParams,
    ) -> None:
        """Answer a ``tools/call`` without the MCP SDK's server: the same handler (one
        decision through the pipeline, the upstream called over its pooled connection,
        the answer scrubbed, labelled and recorded), its result shaped by the SDK's own
        serializer and sent as one ``application/json`` JSON-RPC response."""
        self.lean_calls += 1
        ctx = LeanContext(request=Request(scope), request_id=rpc_id, protocol_version=version)
        status = 200
        message: dict[str, Any]
        try:
            result = await self.call_tool(ctx, params)
            dumped = mcp_methods.serialize_server_result(
                "tools/call",
                version,
                result.model_dump(mode="json", by_alias=True, exclude_none=True),
            )
            dumped.setdefault("resultType", "complete")
            meta = dumped.get("_meta")
            dumped["_meta"] = {
                **(meta if isinstance(meta, dict) else {}),
                SERVER_INFO_META_KEY: self.server.server_info_stamp,
            }
            message = {"jsonrpc": "2.0", "id": rpc_id, "result": dumped}
        except MCPError as exc:
            error = exc.error.model_dump(mode="json", by_alias=True, exclude_none=True)
            message = {"jsonrpc": "2.0", "id": rpc_id, "error": error}
            status = 400 if exc.error.code == INVALID_REQUEST else 200
        except Exception:
            log.exception("tools/call failed on the lean path")
            error = {"code": INTERNAL_ERROR, "message": "Internal error"}
            message = {"jsonrpc": "2.0", "id": rpc_id, "error": error}
        await Response(
            msgspec.json.encode(message), status_code=status, media_type="application/json"
        )(scope, receive, send)

    async def _refuse(
        self, refusal: Refusal, scope: Scope, rpc: Any, receive: Receive, send: Send
    ) -> None:
        call = tool_call(rpc)
        rpc_method = rpc.get("method") if isinstance(rpc, dict) else None
        claims = refusal.claims
        if claims is None:
            # Nobody proved anything: counted, one receipt per source address per interval
            # (not per request), 429 past the address's rate, a fixed description.
            await self._refuse_unauthenticated(refusal, scope, rpc, receive, send)
            return
        try:
            record = self.tether.audit.append(
                "gateway.reject",
                chain=list(claims.chain) if claims else None,
                task_id=claims.task_id if claims else None,
                intent_digest=claims.intent_digest if claims else None,
                tool=call[0][:256] if call else None,
                args_digest=digest(call[1]) if call else None,
                effect="deny",
                reasons=[{"code": refusal.code, "message": refusal.message}],
                risk_tags=list(risk_tags(*refusal.controls)),
                token_digest=claims.token_digest if claims else None,
                detail={
                    "gateway": self.config.resource,
                    "http_status": refusal.status,
                    "http_method": scope["method"],
                    "rpc_method": str(rpc_method)[:64] if rpc_method is not None else None,
                },
            )
            seq: int | None = record.seq
        except Exception:  # the refusal stands even if the audit log is unavailable
            log.exception("could not record a refused request")
            seq = None
        rpc_id = rpc.get("id") if isinstance(rpc, dict) else None
        body = {
            "jsonrpc": "2.0",
            "id": rpc_id if isinstance(rpc_id, str | int) else None,
            "error": {
                "code": INVALID_REQUEST,
                "message": f"{refusal.status} {refusal.error or 'unauthorized'}: {refusal.message}",
                "data": {
                    "error": refusal.error or "invalid_request",
                    "error_description": refusal.message,
                    "reason": refusal.code,
                    "receipt": seq,
                },
            },
        }
        response = JSONResponse(
            body,
            status_code=refusal.status,
            headers={
                "WWW-Authenticate": challenge(
                    refusal.error, refusal.message, self.config.metadata_url
                ),
                "Cache-Control": "no-store",
            },
        )
        await response(scope, receive, send)

    async def _refuse_unauthenticated(
        self, refusal: Refusal, scope: Scope, rpc: Any, receive: Receive, send: Send
    ) -> None:
        client = scope.get("client")
        source = str(client[0])[:64] if client else "unknown"
        accounted = self.unauthenticated.refuse(source, refusal.code)
        seq: int | None = None
        if not accounted.limited and accounted.receipt_for:
            try:
                seq = self.tether.audit.append(
                    "gateway.reject",
                    effect="deny",
                    reasons=[{"code": accounted.code, "message": accounted.description}],
                    risk_tags=list(risk_tags(*refusal.controls)),
                    detail={
                        "gateway": self.config.resource,
                        "http_status": refusal.status,
                        "http_method": scope["method"],
                        "source": source,
                        "refused": accounted.receipt_for,
                        "interval_seconds": self.unauthenticated.interval,
                    },
                ).seq
            except Exception:  # the refusal stands even if the audit log is unavailable
                log.exception("could not record refused requests")
        status = 429 if accounted.limited else refusal.status
        message = (
            "too many unauthenticated requests from this address"
            if accounted.limited
            else accounted.description
        )
        rpc_id = rpc.get("id") if isinstance(rpc, dict) else None
        error = "rate_limited" if accounted.limited else refusal.error or "invalid_request"
        body = {
            "jsonrpc": "2.0",
            "id": rpc_id if isinstance(rpc_id, str | int) else None,
            "error": {
                "code": INVALID_REQUEST,
                "message": f"{status} {error}: {message}",
                "data": {
                    "error": error,
                    "error_description": message,
                    "reason": accounted.code,
                    "receipt": seq,
                },
            },
        }
        headers = {"Cache-Control": "no-store"}
        if accounted.limited:
            headers["Retry-After"] = "1"
        else:
            headers["WWW-Authenticate"] = challenge(
                refusal.error, message, self.config.metadata_url
            )
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)

    async def _metadata_endpoint(self, request: Request) -> Response:
        return JSONResponse(self.metadata(), headers={"Cache-Control": "max-age=300"})

    async def _health(self, request: Request) -> Response:
        ready = all(u.state == "ready" for u in self.upstreams.values())
        # Over PostgreSQL: also listening for the other nodes' changes, and in sync.
        ready = ready and (self.node is None or self.node.memory.in_sync())
        return JSONResponse({"status": "ok", "ready": ready})

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # Over PostgreSQL this gateway is one node of several (tether.cluster).
        self.node = await anyio.to_thread.run_sync(join, self.tether)
        try:
            async with self._serve():
                yield
        finally:
            if self.node is not None:
                await anyio.to_thread.run_sync(self.node.stop)
            self.node = None

    @contextlib.asynccontextmanager
    async def _serve(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._housekeeping)
            for upstream in self.upstreams.values():
                tg.start_soon(upstream.run)
            wait = max(u.config.connect_timeout_seconds for u in self.upstreams.values()) + 1
            with anyio.move_on_after(wait):
                for upstream in self.upstreams.values():
                    await upstream.attempted.wait()
            for upstream in self.upstreams.values():
                if upstream.state != "ready":
                    log.warning(
                        "upstream %s not ready at start: %s", upstream.name, upstream.last_error
                    )
            try:
                async with self.manager.run():
                    yield
            finally:
                self._tg = None
                self.connections.clear()
                tg.cancel_scope.cancel()

    def app(self) -> Starlette:
        well_known = "/.well-known/oauth-protected-resource"
        metadata_path = urlsplit(self.config.metadata_url).path
        routes = [Route(metadata_path, self._metadata_endpoint, methods=["GET"])]
        if metadata_path != well_known:
            routes.append(Route(well_known, self._metadata_endpoint, methods=["GET"]))
        routes.append(Route("/healthz", self._health, methods=["GET"]))
        routes.append(Route(self.config.path, endpoint=_ASGIEndpoint(self)))
        app = Starlette(routes=routes, lifespan=self.lifespan)
        app.state.gateway = self
        return app


class _ASGIEndpoint:
    """The MCP path as a raw ASGI app (Starlette passes it every method)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.gateway.mcp_endpoint(scope, receive, send)


def _task_principal(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """Whom a requestState is bound to: the caller's task (fail closed without one)."""
    return f"task:{_caller(ctx).claims.task_id}"


def _takes_url_elicitation(ctx: ServerRequestContext[Any, Any]) -> bool:
    caps = ctx.session.client_capabilities
    elicitation = caps.elicitation if caps is not None else None
    return elicitation is not None and elicitation.url is not None


def _caller(ctx: ServerRequestContext[Any, Any] | LeanContext) -> Caller:
    request = ctx.request
    caller = request.scope.get(CALLER_KEY) if isinstance(request, Request) else None
    if not isinstance(caller, Caller):  # never reached through the endpoint: fail closed
        raise MCPError(INVALID_REQUEST, "request was not authenticated")
    return caller


def create_gateway_app(tether: Tether, config: GatewayConfig) -> Starlette:
    """The gateway as an ASGI app; upstreams connect when its lifespan starts."""
    return Gateway(tether, config).app()


def run_gateway(
    config_path: str | Path,
    home: str | Path | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> None:
    """Load ``config_path``, open the Tether home and serve until interrupted.

    The home is ``home`` if given, else the configuration's ``home``, else
    ``$TETHER_HOME``, else ``./.tether``. ``host``/``port`` override the file's.
    Raises :class:`ConfigError` (a ``UsageError``) for an invalid configuration
    or an upstream identity that is not a registered, active tool.
    """
    config = load_config(config_path)
    if host is not None or port is not None:
        config = msgspec.structs.replace(
            config, host=host or config.host, port=port if port is not None else config.port
        )
    where = home or config.home or os.environ.get("TETHER_HOME") or ".tether"
    tether = Tether.open(where)
    configure_tracing()  # only when the OTEL_* variables ask for export
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("tether gateway: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        app = create_gateway_app(tether, config)
        log.info(
            "serving %s for %s on %s:%d",
            config.resource,
            tether.trust_domain,
            config.host,
            config.port,
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                lifespan="on",
                log_level="warning",
                access_log=False,
                server_header=False,
                # Never take the peer address from X-Forwarded-For: the per-address limits
                # must not be the caller's to choose.
                proxy_headers=False,
            )
        )
        server.run()
    finally:
        tether.close()
