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
- ``sinks``: the parameters whose values leave or act through the tool (a
  recipient, a URL, an amount, a path), each checked as a whole value.
  Omitted means every parameter;
- ``text_sinks``: free-text parameters (a message body) whose links, e-mail
  addresses and account numbers are checked one by one (give ``sinks`` too,
  ``[]`` if nothing else is a sink).

What the information-flow rules also use (:mod:`tether.core._flow`; all optional):

- ``trusted_fields``: output fields a platform asserts (a message's sender, a
  file's id) in an otherwise untrusted result; ``identifier_fields``: output
  fields naming things that exist (a channel), which ground a sink as a whole
  value while what is inside them stays untrusted (``identifiers``: the whole
  output is such names);
- ``destinations``: the parameters that say where data goes (egress);
- ``privileged``: a tool an intent should name explicitly (not only through a
  wildcard) when it is reached after ``discovery`` tools (listing, searching);
- ``spend``: the parameter carrying an amount spent (the intent's spend budget);
- ``phrases``: words of a user request that ask for this tool (intent compiler);
- ``result_labels``: per-result labels from result fields (``[[tools.X.result_labels]]``
  with ``field`` and a ``values`` table mapping the field's values to sensitivities,
  and ``otherwise``): a knowledge base's ``classification``, say; ``classifiers``: the
  content classifiers to run on its results (default: all of ``credentials``,
  ``payment_cards``, ``national_ids``, ``markings``); ``trust_result_labels``: the
  upstream's own labels in a result's ``_meta`` may lower the default (they always
  may raise it); see :mod:`tether.core._labels`;
- ``audience``: who sees what the tool writes or sends: ``private`` (the task's own
  principal: a draft), ``internal`` or ``external`` (the default for anything not a
  read): content labelled confidential may only reach ``private`` sinks unless the
  intent discloses it (``flow.confidential_content``).

A tool nobody described, or a field an entry leaves out, takes the most
restrictive value: destructive, secret, untrusted, every parameter a sink.
:func:`tool_profile` gives the core :class:`~tether.core.ToolProfile` of a class.

The catalogue describes what a tool does; the upstream's own words about it (its
name, title, description, schemas and annotations, which reach the agent's model)
are reviewed as well, and pinned (:mod:`tether.gateway._pins`). ``tether gateway
catalogue`` drafts a catalogue from an upstream's ``tools/list`` and pins the
digest of each definition it printed, with a receipt. A definition that later
changes upstream (a poisoned description, a "rug pull") is hidden from agents and
its calls are refused (``gateway.definition_changed``) until an operator reviews
it and runs ``tether gateway pin CONFIG UPSTREAM [--tool NAME ...]``. A tool
nobody pinned is served, marked as unreviewed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from tether.core import Sensitivity
from tether.core._flow import UNDESCRIBED as UNDESCRIBED_PROFILE
from tether.core._flow import Audience, SideEffect, SinkKind, ToolProfile, check_classifiers
from tether.core._labels import FieldLabel

MAX_SINKS = 64
MAX_FIELDS = 64
MAX_PHRASES = 64
MAX_NAME = 128


class ToolEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One catalogue entry, as written in TOML (missing fields are the most restrictive)."""

    side_effect: SideEffect = SideEffect.DESTRUCTIVE
    sensitivity: Sensitivity = Sensitivity.SECRET
    trusted: bool = False
    sinks: tuple[str, ...] | None = None
    text_sinks: tuple[str, ...] = ()
    trusted_fields: tuple[str, ...] = ()
    identifier_fields: tuple[str, ...] = ()
    identifiers: bool = False
    destinations: tuple[str, ...] = ()
    privileged: bool = False
    discovery: bool = False
    spend: str | None = None
    phrases: tuple[str, ...] = ()
    result_labels: tuple[FieldLabel, ...] = ()
    classifiers: tuple[str, ...] | None = None
    trust_result_labels: bool = False
    audience: Audience | None = None
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
    text_sinks: frozenset[str] = frozenset()
    trusted_fields: tuple[str, ...] = ()
    identifier_fields: tuple[str, ...] = ()
    identifiers: bool = False
    destinations: tuple[str, ...] = ()
    privileged: bool = False
    discovery: bool = False
    spend: str | None = None
    phrases: tuple[str, ...] = ()
    description: str = ""
    result_labels: tuple[FieldLabel, ...] = ()
    classifiers: tuple[str, ...] | None = None
    trust_result_labels: bool = False
    audience: Audience | None = None

    def sink_arguments(self, args: Mapping[str, Any]) -> list[str]:
        """The arguments of this call that feed a sink (present and not empty)."""
        names = args.keys() if self.sinks is None else (self.sinks | self.text_sinks) & args.keys()
        return sorted(n for n in names if args.get(n) not in (None, "", [], {}))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "side_effect": str(self.side_effect),
            "sensitivity": str(self.sensitivity),
            "trusted": self.trusted,
            "sinks": None if self.sinks is None else sorted(self.sinks),
            "described": self.described,
        }
        # The flow facts, when the catalogue gives them (receipts stay small otherwise).
        if self.text_sinks:
            out["text_sinks"] = sorted(self.text_sinks)
        for name in ("trusted_fields", "identifier_fields", "destinations"):
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        for name in ("identifiers", "privileged", "discovery"):
            if getattr(self, name):
                out[name] = True
        if self.spend is not None:
            out["spend"] = self.spend
        if self.audience is not None:
            out["audience"] = str(self.audience)
        if self.result_labels:
            out["result_labels"] = [rule.field for rule in self.result_labels]
        return out


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
        text_sinks=frozenset(entry.text_sinks),
        trusted_fields=entry.trusted_fields,
        identifier_fields=entry.identifier_fields,
        identifiers=entry.identifiers,
        destinations=entry.destinations,
        privileged=entry.privileged,
        discovery=entry.discovery,
        spend=entry.spend,
        phrases=entry.phrases,
        description=entry.note,
        result_labels=entry.result_labels,
        classifiers=entry.classifiers,
        trust_result_labels=entry.trust_result_labels,
        audience=entry.audience,
    )


def tool_profile(klass: ToolClass) -> ToolProfile:
    """The core's :class:`~tether.core.ToolProfile` of a tool class (flow rules, compiler).

    An undescribed tool is the core's most restrictive profile. ``sinks`` are
    checked as whole values and ``text_sinks`` atom by atom; with ``sinks``
    omitted every parameter is a whole-value sink.
    """
    if not klass.described:
        return UNDESCRIBED_PROFILE
    sinks: dict[str, SinkKind] | None = None
    if klass.sinks is not None:
        sinks = {name: SinkKind.VALUE for name in sorted(klass.sinks)}
        for name in sorted(klass.text_sinks - klass.sinks):
            sinks[name] = SinkKind.TEXT
    return ToolProfile(
        side_effect=klass.side_effect,
        sensitivity=klass.sensitivity,
        trusted=klass.trusted,
        trusted_fields=klass.trusted_fields,
        sinks=sinks,
        destinations=klass.destinations,
        identifier_fields=klass.identifier_fields,
        identifiers=klass.identifiers,
        privileged=klass.privileged,
        discovery=klass.discovery,
        spend=klass.spend,
        description=klass.description,
        phrases=klass.phrases,
        result_labels=klass.result_labels,
        classifiers=klass.classifiers,
        trust_result_labels=klass.trust_result_labels,
        audience=klass.audience,
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
        if entry.text_sinks:
            if entry.sinks is None:
                problems.append(
                    f"{where}: tool {name!r}: text_sinks needs sinks too (the other sink "
                    "parameters; [] if none): without sinks every parameter is a sink"
                )
            else:
                both = sorted(set(entry.sinks) & set(entry.text_sinks))
                if both:
                    problems.append(
                        f"{where}: tool {name!r}: {both} are in both sinks and text_sinks"
                    )
        for field, limit in (
            ("text_sinks", MAX_SINKS),
            ("trusted_fields", MAX_FIELDS),
            ("identifier_fields", MAX_FIELDS),
            ("destinations", MAX_SINKS),
            ("phrases", MAX_PHRASES),
        ):
            values: tuple[str, ...] = getattr(entry, field)
            if len(values) > limit:
                problems.append(f"{where}: tool {name!r}: at most {limit} {field}")
            if any(not v or len(v) > MAX_NAME for v in values):
                problems.append(
                    f"{where}: tool {name!r}: each of {field} must be 1-{MAX_NAME} characters"
                )
        for problem in check_classifiers(entry.classifiers):
            problems.append(f"{where}: tool {name!r}: {problem}")
        if len(entry.result_labels) > MAX_FIELDS:
            problems.append(f"{where}: tool {name!r}: at most {MAX_FIELDS} result_labels")
        for rule in entry.result_labels:
            if not rule.field or len(rule.field) > MAX_NAME or not rule.values:
                problems.append(
                    f"{where}: tool {name!r}: each result label needs a field of 1-{MAX_NAME} "
                    "characters and at least one value"
                )
        if entry.spend is not None and not 0 < len(entry.spend) <= MAX_NAME:
            problems.append(f"{where}: tool {name!r}: spend must be 1-{MAX_NAME} characters")
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
        "#   text_sinks  = free-text parameters whose links and addresses are checked (optional)",
        "#   (optional: trusted_fields, identifier_fields, destinations, privileged, discovery,",
        "#    spend, phrases; see tether.gateway._catalogue)",
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
