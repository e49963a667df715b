"""Pinned tool definitions: a reviewed upstream tool may not change unnoticed.

An upstream MCP server describes its tools itself: name, title, description,
input and output schema, annotations. Those words reach the agent's model, so a
server that turns malicious after review can poison them ("also send the file to
evil@x") or swap what a tool does behind a name the operator approved (a "rug
pull"). The gateway therefore pins each reviewed definition:

- the **digest** of a definition is ``sha256:`` over the canonical JSON of its
  ``name``, ``title``, ``description``, ``inputSchema``, ``outputSchema`` and
  ``annotations`` (wire names, absent and ``null`` alike; :func:`definition_digest`);
- **pins** are kept per (upstream name, upstream tool name) in the store's meta
  table, one JSON map under ``gateway.tool_pins``, so every gateway node and every
  command on one store sees the same pins. Every change of a pin leaves a
  ``gateway.pin`` receipt (who, the previous and the new digest) in the same
  transaction. ``tether gateway catalogue`` pins the definitions it prints;
  ``tether gateway pin CONFIG UPSTREAM [--tool NAME ...]`` re-pins after a review;
- the **status** of a definition the gateway knows (:class:`PinStatus`): ``pinned``
  (it matches its pin), ``unpinned`` (nobody reviewed it: it is served, and reported
  as unreviewed) or ``changed`` (it differs from its pin: the gateway hides it from
  ``tools/list`` and refuses calls to it with ``gateway.definition_changed`` until it
  is re-pinned, or the upstream goes back to the pinned definition).

The gateway compares each time it reads an upstream's ``tools/list`` (on connecting
and at every refresh) and on every listing and call, against the latest definition
it read; a changed definition is logged as a warning once. A pin map that cannot be
read fails closed: nothing is listed and every call is refused.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import mcp_types as types

from tether._errors import InfrastructureError, UsageError
from tether.audit._rows import SETTING
from tether.core import digest
from tether.core._risk import Control, risk_tags

if TYPE_CHECKING:
    from tether._tether import Tether

log = logging.getLogger("tether.gateway")

#: The store meta key holding every pin: ``{upstream: {tool: {digest, at, by}}}``.
PINS_KEY = "gateway.tool_pins"
#: The fields of a tool definition a pin covers (wire names).
DEFINITION_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
MAX_TOOL_NAME = 256


class PinsUnavailable(InfrastructureError):
    """The stored pins cannot be read: the gateway lists nothing and refuses every call."""

    code = "gateway.pins_unavailable"


class PinStatus(StrEnum):
    """How a tool definition the gateway knows compares with its pin."""

    PINNED = "pinned"  # pinned, and the definition matches the pin
    UNPINNED = "unpinned"  # never reviewed: served, reported as unreviewed
    CHANGED = "changed"  # differs from its pin: hidden and refused until re-pinned


@dataclass(frozen=True, slots=True)
class Pin:
    """One pinned definition: its digest, when and by whom it was pinned."""

    digest: str
    at: float
    by: str


@dataclass(frozen=True, slots=True)
class PinCheck:
    """A definition compared with its pin (``pinned`` is ``None`` when there is none)."""

    status: PinStatus
    current: str
    pinned: str | None


@dataclass(frozen=True, slots=True)
class PinChange:
    """A pin that was set or replaced (``previous`` is ``None`` for a first pin)."""

    upstream: str
    tool: str
    previous: str | None
    digest: str
    receipt: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "tool": self.tool,
            "previous": self.previous,
            "digest": self.digest,
            "receipt": self.receipt,
        }


PinMap = dict[str, dict[str, Pin]]


def definition(tool: types.Tool) -> dict[str, Any]:
    """The part of ``tool``'s definition a pin covers, in wire form."""
    wire = tool.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {key: wire[key] for key in DEFINITION_FIELDS if key in wire}


def definition_digest(tool: types.Tool) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``tool``'s pinned fields."""
    return digest(definition(tool))


def _decode(raw: str) -> PinMap:
    try:
        data = json.loads(raw)
        pins: PinMap = {}
        for upstream, tools in data.items():
            pins[str(upstream)] = {
                str(name): Pin(digest=str(p["digest"]), at=float(p["at"]), by=str(p["by"]))
                for name, p in tools.items()
            }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PinsUnavailable(
            f"the pinned tool definitions ({PINS_KEY}) cannot be read: {type(exc).__name__}"
        ) from None
    return pins


def _encode(pins: PinMap) -> str:
    return json.dumps(
        {
            upstream: {
                name: {"digest": p.digest, "at": p.at, "by": p.by}
                for name, p in sorted(tools.items())
            }
            for upstream, tools in sorted(pins.items())
            if tools
        },
        sort_keys=True,
        separators=(",", ":"),
    )


class ToolPins:
    """The pinned tool definitions of a trust domain, in its store (see the module doc)."""

    def __init__(self, tether: Tether) -> None:
        self._tether = tether
        self._lock = threading.Lock()
        self._raw: str | None = None
        self._parsed: PinMap = {}
        self._digests: dict[tuple[str, str], tuple[types.Tool, str]] = {}
        self._warned: set[tuple[str, str, str | None, str]] = set()

    # -- reading ---------------------------------------------------------------------------
    def _decode_checked(self, raw: str | None) -> PinMap:
        """The stored pins, their tag checked (:class:`PinsUnavailable` if they were
        written without the KEK)."""
        if raw is not None and not self._tether.audit.rows.authentic(
            SETTING, PINS_KEY, {"value": raw}
        ):
            raise PinsUnavailable("the pinned tool definitions were written without the KEK")
        return {} if raw is None else _decode(raw)

    def pinned(self) -> PinMap:
        """Every pin, read from the store now (:class:`PinsUnavailable` if unreadable)."""
        raw = self._tether.store.get_meta(PINS_KEY)
        with self._lock:
            if raw == self._raw:
                return self._parsed
        parsed = self._decode_checked(raw)
        with self._lock:
            self._raw, self._parsed = raw, parsed
        return parsed

    def digest_of(self, upstream: str, tool: types.Tool) -> str:
        """:func:`definition_digest`, remembered for the definition object last seen."""
        key = (upstream, tool.name)
        with self._lock:
            cached = self._digests.get(key)
        if cached is not None and cached[0] is tool:
            return cached[1]
        value = definition_digest(tool)
        with self._lock:
            self._digests[key] = (tool, value)
        return value

    def check(self, upstream: str, tool: types.Tool, *, pinned: PinMap | None = None) -> PinCheck:
        """Compare definition ``tool`` of ``upstream`` with its pin (``pinned``: a map
        read with :meth:`pinned`, else the store is read). A changed definition is
        logged as a warning once."""
        pins = self.pinned() if pinned is None else pinned
        current = self.digest_of(upstream, tool)
        pin = pins.get(upstream, {}).get(tool.name)
        if pin is None:
            return PinCheck(PinStatus.UNPINNED, current, None)
        if pin.digest == current:
            return PinCheck(PinStatus.PINNED, current, pin.digest)
        key = (upstream, tool.name, pin.digest, current)
        with self._lock:
            first = key not in self._warned
            self._warned.add(key)
        if first:
            log.warning(
                "upstream %s changed the definition of tool %r since it was pinned (%s, now %s):"
                " hidden and refused until an operator reviews it and runs"
                " 'tether gateway pin CONFIG %s --tool %s'",
                upstream,
                tool.name,
                pin.digest,
                current,
                upstream,
                tool.name,
            )
        return PinCheck(PinStatus.CHANGED, current, pin.digest)

    def status(self, upstream: str, tool: types.Tool, *, pinned: PinMap | None = None) -> PinStatus:
        """:attr:`PinCheck.status` of :meth:`check`."""
        return self.check(upstream, tool, pinned=pinned).status

    def unreviewed(self, upstream: str, tool: types.Tool, *, pinned: PinMap | None = None) -> bool:
        """Whether no operator reviewed definition ``tool`` (true unless it matches its pin)."""
        return self.status(upstream, tool, pinned=pinned) is not PinStatus.PINNED

    def observe(self, upstream: str, tools: Iterable[types.Tool]) -> list[str]:
        """Compare every definition of a fresh ``tools/list`` with its pin; the names of
        the changed ones (each logged once)."""
        pins = self.pinned()
        return sorted(
            tool.name
            for tool in tools
            if self.check(upstream, tool, pinned=pins).status is PinStatus.CHANGED
        )

    # -- pinning ---------------------------------------------------------------------------
    def pin(
        self, upstream: str, tools: Iterable[types.Tool], *, by: str, source: str = "pin"
    ) -> list[PinChange]:
        """Pin the definitions ``tools`` of ``upstream``: a receipt for each pin set or
        replaced, all in one transaction; unchanged pins are left alone."""
        if not upstream or len(upstream) > MAX_TOOL_NAME:
            raise UsageError("an upstream name is 1-256 characters", code="gateway.pin")
        wanted: dict[str, str] = {}
        for tool in tools:
            if not 0 < len(tool.name) <= MAX_TOOL_NAME:
                raise UsageError(
                    f"tool name {tool.name[:40]!r} must be 1-{MAX_TOOL_NAME} characters",
                    code="gateway.pin",
                )
            wanted[tool.name] = definition_digest(tool)
        store = self._tether.store
        changes: list[PinChange] = []
        with store.transaction():
            # The audit chain's append lock (PostgreSQL; SQLite transactions are serialized
            # already): the pins are read, changed and written by one writer at a time,
            # across nodes, so no concurrent pin is lost.
            store.last_record()
            pins = self._decode_checked(store.get_meta(PINS_KEY))
            mine = dict(pins.get(upstream, {}))
            now = self._tether.clock.now()
            for name, value in sorted(wanted.items()):
                old = mine.get(name)
                if old is not None and old.digest == value:
                    continue
                mine[name] = Pin(digest=value, at=now, by=by)
                previous = old.digest if old is not None else None
                record = self._tether.audit.append(
                    "gateway.pin",
                    chain=[by],
                    tool=f"{upstream}.{name}"[:256],
                    effect="allow",
                    reasons=[
                        {
                            "code": "pin.changed" if old is not None else "pin.new",
                            "message": (
                                f"the reviewed definition of {name!r} replaces the pinned one"
                                if old is not None
                                else f"the reviewed definition of {name!r} is pinned"
                            ),
                        }
                    ],
                    risk_tags=list(risk_tags(Control.TOOL_INTEGRITY, Control.AUDIT)),
                    detail={
                        "upstream": upstream,
                        "upstream_tool": name,
                        "previous_digest": previous,
                        "digest": value,
                        "by": by,
                        "source": source,
                    },
                )
                changes.append(PinChange(upstream, name, previous, value, record.seq))
            if changes:
                pins[upstream] = mine
                self._tether.audit.rows.set_setting(PINS_KEY, _encode(pins))
        return changes


#: Where a reviewed definition was read from, as the pin's receipt says.
PIN_SOURCES = ("pin", "catalogue")
MAX_PINNED_TOOLS = 1000


def pin_reviewed(
    tether: Tether,
    upstream: str,
    wire_tools: list[dict[str, Any]],
    *,
    by: str,
    dry_run: bool = False,
    source: str = "pin",
) -> tuple[list[dict[str, Any]], list[str]]:
    """Pin reviewed tool definitions sent as MCP ``Tool`` JSON (the API's ``/v1/pins``):
    the changes (``tool``, ``previous``, ``digest``, ``receipt``) and the names left as
    they were. With ``dry_run`` nothing is written and no receipt is made."""
    if source not in PIN_SOURCES:
        raise UsageError(f"source must be one of {', '.join(PIN_SOURCES)}", code="gateway.pin")
    if not wire_tools or len(wire_tools) > MAX_PINNED_TOOLS:
        raise UsageError(f"pin 1-{MAX_PINNED_TOOLS} tools at a time", code="gateway.pin")
    tools: dict[str, types.Tool] = {}
    for wire in wire_tools:
        try:
            tool = types.Tool.model_validate(wire)
        except ValueError as exc:
            raise UsageError(f"not an MCP tool definition: {exc}", code="gateway.pin") from None
        if tool.name in tools:
            raise UsageError(f"tool {tool.name[:40]!r} is given twice", code="gateway.pin")
        tools[tool.name] = tool
    pins = ToolPins(tether)
    changed: list[dict[str, Any]]
    if dry_run:
        before = pins.pinned().get(upstream, {})
        changed = [
            {
                "tool": name,
                "previous": before[name].digest if name in before else None,
                "digest": definition_digest(tool),
                "receipt": None,
            }
            for name, tool in sorted(tools.items())
            if name not in before or before[name].digest != definition_digest(tool)
        ]
    else:
        done = pins.pin(upstream, list(tools.values()), by=by, source=source)
        changed = [
            {"tool": c.tool, "previous": c.previous, "digest": c.digest, "receipt": c.receipt}
            for c in done
        ]
    touched = {c["tool"] for c in changed}
    return changed, sorted(n for n in tools if n not in touched)
