"""A catalogue file (``[tools.<name>]`` tables) as the trust domain's tool profiles.

The same TOML an upstream's catalogue is written in describes tools for every
door: ``tether catalogue load FILE --prefix git`` (or ``PUT /v1/catalogue``)
stores its entries under namespaced names (``git.git_status``), so the HTTP API
and the SDK judge a tool exactly as the gateway does.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from tether._errors import UsageError
from tether.core._flow import ToolProfile
from tether.gateway._catalogue import CatalogueFile, classify, tool_profile, validate_entries


def profiles_from_catalogue(
    data: Mapping[str, Any], prefix: str | None = None
) -> dict[str, ToolProfile]:
    """The profiles of a parsed catalogue (``{"tools": {...}}``), named ``prefix.name``."""
    try:
        parsed = msgspec.convert(data, type=CatalogueFile)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid catalogue: {exc}") from None
    problems = validate_entries(parsed.tools, "catalogue")
    if problems:
        raise UsageError("invalid catalogue: " + "; ".join(problems[:5]))
    return {
        (f"{prefix}.{name}" if prefix else name): tool_profile(classify(parsed.tools, name))
        for name in parsed.tools
    }


def profiles_from_file(path: Path, prefix: str | None = None) -> dict[str, ToolProfile]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    return profiles_from_catalogue(data, prefix)
