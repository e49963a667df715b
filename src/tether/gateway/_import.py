"""Drafting a tool catalogue from an upstream's own ``tools/list``.

``tether gateway catalogue`` prints the draft and pins the definitions it was drafted
from (:mod:`tether.gateway._pins`): what the operator reviews is what gets pinned.
"""

from __future__ import annotations

import anyio
import mcp_types as types

from tether.gateway._catalogue import render_draft
from tether.gateway._config import UpstreamConfig
from tether.gateway._upstream import read_tools


def draft_catalogue(upstream: UpstreamConfig, tools: list[types.Tool]) -> str:
    """A draft catalogue (TOML) of ``tools``, read from ``upstream``."""
    wire = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools]
    where = (
        f"'{upstream.stdio.command}' over stdio"
        if upstream.stdio is not None
        else f"{upstream.http.url if upstream.http else '?'}"
    )
    return render_draft(upstream.name, wire, source=where)


async def import_catalogue_async(upstream: UpstreamConfig) -> str:
    """Connect to ``upstream``, read its tools and return a draft catalogue (TOML)."""
    return draft_catalogue(upstream, await read_tools(upstream))


def import_catalogue(upstream: UpstreamConfig) -> str:
    """Synchronous :func:`import_catalogue_async`, for the command line."""
    return anyio.run(import_catalogue_async, upstream)


def read_upstream_tools(upstream: UpstreamConfig) -> list[types.Tool]:
    """Connect once to ``upstream`` and read its tool definitions (synchronous)."""
    return anyio.run(read_tools, upstream)
