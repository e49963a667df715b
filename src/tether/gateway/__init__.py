"""The MCP gateway: one authorizing MCP endpoint in front of many MCP servers.

- :func:`load_config` reads and validates the gateway's TOML configuration;
- :func:`create_gateway_app` builds the ASGI app over a :class:`tether.Tether`;
- :func:`run_gateway` serves it (what ``tether gateway --config FILE`` runs);
- :func:`import_catalogue` drafts an upstream's tool catalogue from its ``tools/list``;
- :class:`ToolPins` pins the reviewed upstream tool definitions (a changed one is
  hidden and refused until re-pinned; see :mod:`tether.gateway._pins`).

Agents authenticate with their task token and a DPoP proof on every request
(``tether.sdk._mcp_auth.TetherMCPAuth`` does it for the MCP SDK's client).
"""

from tether.core._flow import SideEffect
from tether.gateway._app import Gateway, create_gateway_app, run_gateway
from tether.gateway._catalogue import (
    UNDESCRIBED,
    CatalogueFile,
    ToolClass,
    ToolEntry,
    classify,
    tool_profile,
)
from tether.gateway._config import (
    ApprovalConfig,
    ConfigError,
    CredentialConfig,
    GatewayConfig,
    HttpTransport,
    StdioTransport,
    UpstreamConfig,
    load_config,
    parse_config,
)
from tether.gateway._import import import_catalogue, import_catalogue_async
from tether.gateway._pins import PinStatus, ToolPins, definition_digest
from tether.gateway._redact import redact_text

__all__ = [
    "UNDESCRIBED",
    "ApprovalConfig",
    "CatalogueFile",
    "ConfigError",
    "CredentialConfig",
    "Gateway",
    "GatewayConfig",
    "HttpTransport",
    "PinStatus",
    "SideEffect",
    "StdioTransport",
    "ToolClass",
    "ToolEntry",
    "ToolPins",
    "UpstreamConfig",
    "classify",
    "create_gateway_app",
    "definition_digest",
    "import_catalogue",
    "import_catalogue_async",
    "load_config",
    "parse_config",
    "redact_text",
    "run_gateway",
    "tool_profile",
]
