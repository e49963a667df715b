"""The trust domain's tool catalogue: what every tool does, returns and consumes.

The flow rules (:mod:`tether.core._flow`) judge a call by its tool's
:class:`~tether.core.ToolProfile`: side effect, sensitivity of what it returns,
whether its output is trusted, which arguments are sinks. Every door asks the
same catalogue, so a tool is judged alike whether its call comes through the
HTTP API, the SDK or the MCP gateway (whose own per-upstream catalogue files
describe the tools behind it under their namespaced names).

Entries are keyed by tool name or by a glob pattern (``crm.*``); the most
specific entry wins (an exact name, then the pattern with the longest literal
prefix). A tool no entry describes takes the most restrictive profile
(destructive, secret, untrusted, every argument a sink): undescribed tools fail
closed at every door. Loading replaces the whole catalogue, all or nothing, and
leaves a receipt; it is kept in the store, so every node and every process on
one store read the same catalogue.
"""

from __future__ import annotations

import fnmatch
import json
import threading
from collections.abc import Mapping

import msgspec

from tether._errors import UsageError
from tether.audit import Auditor
from tether.core._canonical import digest
from tether.core._clock import Clock
from tether.core._flow import UNDESCRIBED, ToolProfile, check_classifiers
from tether.core._risk import Control, risk_tags
from tether.store import Store

META_BODY = "catalogue"
META_DIGEST = "catalogue.digest"
MAX_ENTRIES = 10_000
_GLOBS = frozenset("*?[")


def _specificity(pattern: str) -> tuple[int, int]:
    literal = len(pattern)
    for i, ch in enumerate(pattern):
        if ch in _GLOBS:
            literal = i
            break
    return (0 if literal == len(pattern) else 1, -literal)


class ToolCatalogue:
    """The stored catalogue; :meth:`profile` is the one lookup every door uses."""

    def __init__(self, store: Store, auditor: Auditor, clock: Clock) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock
        self._lock = threading.Lock()
        self._digest: str | None = None
        self._exact: dict[str, ToolProfile] = {}
        self._patterns: list[tuple[str, ToolProfile]] = []

    def load(self, entries: Mapping[str, ToolProfile], *, origin: str = "api") -> str:
        """Replace the catalogue with ``entries`` (a receipt either way); its digest."""
        if len(entries) > MAX_ENTRIES:
            raise UsageError(f"a catalogue holds at most {MAX_ENTRIES} entries")
        for name in entries:
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise UsageError("catalogue keys are tool names or patterns of 1-256 characters")
            problems = check_classifiers(entries[name].classifiers)
            if problems:
                raise UsageError(f"catalogue entry {name!r}: {problems[0]}")
        body = {name: msgspec.to_builtins(profile) for name, profile in sorted(entries.items())}
        text = json.dumps(body, sort_keys=True)
        value = digest(body)
        with self._store.transaction():
            self._auditor.rows.set_setting(META_BODY, text)
            self._auditor.rows.set_setting(META_DIGEST, value)
            self._auditor.append(
                "catalogue.load",
                effect="allow",
                detail={"origin": origin, "digest": value, "count": len(body)},
                risk_tags=list(risk_tags(Control.INFORMATION_FLOW, Control.AUDIT)),
            )
        return value

    def entries(self) -> dict[str, ToolProfile]:
        """Every entry, by name or pattern."""
        self._refresh()
        with self._lock:
            return {**self._exact, **dict(self._patterns)}

    @property
    def digest(self) -> str | None:
        self._refresh()
        return self._digest

    def names(self, tool: str) -> bool:
        """Whether an entry names ``tool`` exactly (not a pattern), as last read: no store
        read, for the hot path's bounded metric labels (every decision reads the
        catalogue afresh through :meth:`profile`)."""
        with self._lock:
            return tool in self._exact

    def profile(self, tool: str) -> ToolProfile:
        """The profile of ``tool``: its most specific entry, else the most restrictive."""
        self._refresh()
        with self._lock:
            found = self._exact.get(tool)
            if found is not None:
                return found
            for pattern, profile in self._patterns:
                if fnmatch.fnmatchcase(tool, pattern):
                    return profile
        return UNDESCRIBED

    def _refresh(self) -> None:
        current = self._store.get_meta(META_DIGEST)
        if current == self._digest:
            return
        # The body is read only with its tag checked: a catalogue a store writer edited
        # (a sink made harmless, a source made trusted) refuses every decision instead.
        text = self._auditor.rows.setting(META_BODY) if current is not None else None
        exact: dict[str, ToolProfile] = {}
        patterns: list[tuple[str, ToolProfile]] = []
        if text is not None:
            raw = json.loads(text)
            for name, entry in raw.items():
                profile = msgspec.convert(entry, type=ToolProfile)
                if _GLOBS & set(name):
                    patterns.append((name, profile))
                else:
                    exact[name] = profile
        patterns.sort(key=lambda item: _specificity(item[0]))
        with self._lock:
            self._exact, self._patterns, self._digest = exact, patterns, current
