"""Drafting a tool catalogue from an upstream's own ``tools/list``."""

from __future__ import annotations

import anyio

from tether.gateway._catalogue import render_draft
from tether.gateway._config import UpstreamConfig
from tether.gateway._upstream import read_tools


async def import_catalogue_async(upstream: UpstreamConfig) -> str:
    """Connect to ``upstream``, read its tools and return a draft catalogue (TOML)."""
    tools = await read_tools(upstream)
    wire = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools]
    where = (
        f"'{upstream.stdio.command}' over stdio"
        if upstream.stdio is not None
        else f"{upstream.http.url if upstream.http else '?'}"
    )
    return render_draft(upstream.name, wire, source=where)


def import_catalogue(upstream: UpstreamConfig) -> str:
    """Synchronous :func:`import_catalogue_async`, for the command line."""
    return anyio.run(import_catalogue_async, upstream)
