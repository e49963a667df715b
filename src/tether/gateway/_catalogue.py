"""The tool catalogue: what each upstream tool does, returns and consumes.

Every tool an upstream offers is described by a :class:`ToolEntry`:

- ``side_effect``: ``read`` (changes nothing), ``write`` (changes state the
  task owns), ``egress`` (sends data out of the trust boundary: mail, HTTP,
  chat) or ``destructive`` (deletes or overwrites);
- ``sensitivity``: the most sensitive data its output may hold (``public``,
  ``internal``, ``confidential``, ``secret``);
- ``trusted``: ``false`` when its output is content nobody vouches for (a web
  page, an inbound e-mail, a ticket body): text that may carry injected
  instructions;
- ``sinks``: the parameters whose values leave through the tool (a recipient,
  a URL, a message body). Omitted means every parameter.

A tool nobody described, or a field an entry leaves out, takes the most
restrictive value: destructive, secret, untrusted, every parameter a sink.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from tether.core import Sensitivity

MAX_SINKS = 64


class SideEffect(StrEnum):
    READ = "read"
    WRITE = "write"
    EGRESS = "egress"
    DESTRUCTIVE = "destructive"


class ToolEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One catalogue entry, as written in TOML (missing fields are the most restrictive)."""

    side_effect: SideEffect = SideEffect.DESTRUCTIVE
    sensitivity: Sensitivity = Sensitivity.SECRET
    trusted: bool = False
    sinks: tuple[str, ...] | None = None
    note: str = ""


class CatalogueFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A catalogue file: ``[tools.<upstream tool name>]`` tables."""

    tools: dict[str, ToolEntry] = {}


@dataclass(frozen=True, slots=True)
class ToolClass:
    """The resolved class of one upstream tool."""

    side_effect: SideEffect
    sensitivity: Sensitivity
    trusted: bool
    sinks: frozenset[str] | None  # None: every parameter is a sink
    described: bool

    def sink_arguments(self, args: Mapping[str, Any]) -> list[str]:
        """The arguments of this call that feed a sink (present and not empty)."""
        names = args.keys() if self.sinks is None else self.sinks & args.keys()
        return sorted(n for n in names if args.get(n) not in (None, "", [], {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "side_effect": str(self.side_effect),
            "sensitivity": str(self.sensitivity),
            "trusted": self.trusted,
            "sinks": None if self.sinks is None else sorted(self.sinks),
            "described": self.described,
        }


UNDESCRIBED = ToolClass(
    side_effect=SideEffect.DESTRUCTIVE,
    sensitivity=Sensitivity.SECRET,
    trusted=False,
    sinks=None,
    described=False,
)


def classify(entries: Mapping[str, ToolEntry], tool: str) -> ToolClass:
    """The class of upstream tool ``tool`` (the most restrictive one if undescribed)."""
    entry = entries.get(tool)
    if entry is None:
        return UNDESCRIBED
    return ToolClass(
        side_effect=entry.side_effect,
        sensitivity=entry.sensitivity,
        trusted=entry.trusted,
        sinks=None if entry.sinks is None else frozenset(entry.sinks),
        described=True,
    )


def validate_entries(entries: Mapping[str, ToolEntry], where: str) -> list[str]:
    """Problems in ``entries`` (empty when they are fine)."""
    problems: list[str] = []
    for name, entry in entries.items():
        if not name or len(name) > 128:
            problems.append(f"{where}: tool name {name[:40]!r} must be 1-128 characters")
        if entry.sinks is not None:
            if len(entry.sinks) > MAX_SINKS:
                problems.append(f"{where}: tool {name!r}: at most {MAX_SINKS} sinks")
            if any(not s for s in entry.sinks):
                problems.append(f"{where}: tool {name!r}: a sink name is empty")
    return problems


# -- drafts ---------------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_string(key)


def _comment(text: str, width: int = 96) -> list[str]:
    words = " ".join(text.split()).split(" ")
    lines: list[str] = []
    line = "#"
    for word in words:
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    if line != "#":
        lines.append(line)
    return lines


def draft_entry(
    annotations: Mapping[str, Any] | None, params: Iterable[str]
) -> tuple[SideEffect, tuple[str, ...]]:
    """A side effect and sinks guessed from the upstream's hints (to be reviewed).

    Upstream annotations are hints from a party the gateway does not trust: the
    draft only proposes, and anything unclear is drafted as destructive.
    """
    hints = annotations or {}
    params = tuple(params)
    if hints.get("readOnlyHint") is True:
        return SideEffect.READ, ()
    if hints.get("openWorldHint") is True:
        return SideEffect.EGRESS, params
    if hints.get("destructiveHint") is False:
        return SideEffect.WRITE, params
    return SideEffect.DESTRUCTIVE, params


def render_draft(upstream: str, tools: list[dict[str, Any]], *, source: str) -> str:
    """A draft catalogue (TOML) for ``tools`` (``tools/list`` entries, wire form)."""
    out = [
        f"# Draft tool catalogue for upstream {upstream!r}, read from {source}.",
        "#",
        "# REVIEW EVERY ENTRY before use. Side effects were guessed from the upstream's own",
        "# annotations (hints, not facts); sensitivity is drafted as 'secret' and trust as",
        "# untrusted, the most restrictive values, until you lower them.",
        "#",
        "#   side_effect = read | write | egress | destructive",
        "#   sensitivity = public | internal | confidential | secret   (what its output may hold)",
        "#   trusted     = false for content nobody vouches for (web pages, inbound e-mail)",
        "#   sinks       = parameters whose values leave through the tool (omit: all of them)",
        "",
    ]
    for tool in sorted(tools, key=lambda t: str(t.get("name", ""))):
        name = str(tool.get("name", ""))
        if not name:
            continue
        schema = tool.get("inputSchema") or {}
        props = schema.get("properties") if isinstance(schema, dict) else None
        params = list(props) if isinstance(props, dict) else []
        annotations = tool.get("annotations")
        side_effect, sinks = draft_entry(
            annotations if isinstance(annotations, dict) else None, params
        )
        description = tool.get("description")
        if isinstance(description, str) and description.strip():
            out.extend(_comment(description))
        if params:
            out.append("# parameters: " + ", ".join(params))
        out.append(f"[tools.{_toml_key(name)}]")
        out.append(f"side_effect = {_toml_string(str(side_effect))}")
        out.append('sensitivity = "secret"')
        out.append("trusted = false")
        out.append("sinks = [" + ", ".join(_toml_string(s) for s in sinks) + "]")
        out.append("")
    return "\n".join(out)
