"""The intent compiler: a user's request and an application profile in, an intent out.

:class:`RuleCompiler` needs no model. From the application profile (the tool
catalogue: side effects, sinks, untrusted outputs, and the phrases with which
users ask for each action) it derives:

- capabilities: every tool that only reads, plus each tool that writes, sends,
  deletes or fetches (fetching a URL is egress) whose action the request asks
  for (one of the tool's phrases appears in it);
- the allowed egress: the destinations the request names (addresses, links,
  account numbers);
- the data ceiling: the profile's default;
- the request itself, so that values it names ground sink arguments.

Anything the request does not ask for stays outside the intent and is refused
by the decision core with ``intent.no_capability``. The compiler is the seam
for a model-based one: :class:`IntentCompiler` is the whole interface, and
:class:`ScoredCompiler` takes any scoring function (an LLM's judgement, an
embedding similarity) for whether a request asks for a tool's action.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol

from tether._errors import InvalidIntent
from tether.core._flow import AppProfile, SideEffect, ToolProfile, normalise, request_atoms
from tether.core._intent import (
    MAX_PURPOSE_LENGTH,
    MAX_REQUEST_LENGTH,
    Budget,
    Capability,
    Intent,
    Sensitivity,
    validate_intent,
)

DEFAULT_MAX_CALLS = 60
DEFAULT_TTL = 900


class IntentCompiler(Protocol):
    """Anything that turns a user's request into an intent for an application."""

    def compile(self, request: str, profile: AppProfile) -> Intent: ...


@lru_cache(maxsize=4096)
def _phrase(phrase: str) -> re.Pattern[str]:
    # A phrase matches at the start of a word: "pay" matches "payment", not "repay".
    return re.compile(r"(?<![\w])" + re.escape(normalise(phrase)))


def asks_for(request: str, tool: ToolProfile) -> bool:
    """Whether a (normalised) request uses one of the phrases that ask for ``tool``."""
    return any(_phrase(p).search(request) is not None for p in tool.phrases)


class RuleCompiler:
    """A rule-based compiler: phrases in the profile, values in the request."""

    def __init__(
        self,
        *,
        max_calls: int = DEFAULT_MAX_CALLS,
        ttl_seconds: int = DEFAULT_TTL,
        ceiling: Sensitivity | None = None,
        on_behalf_of: str | None = None,
    ) -> None:
        self.max_calls = max_calls
        self.ttl_seconds = ttl_seconds
        self.ceiling = ceiling
        self.on_behalf_of = on_behalf_of

    def wants(self, request: str, name: str, tool: ToolProfile) -> bool:
        """Whether the intent should declare ``tool`` for this (normalised) request."""
        if tool.side_effect is SideEffect.READ and not tool.privileged:
            return True
        return asks_for(request, tool)

    def compile(self, request: str, profile: AppProfile) -> Intent:
        if not request.strip():
            raise InvalidIntent("an empty request asks for nothing")
        if len(request) > MAX_REQUEST_LENGTH:
            raise InvalidIntent(f"request longer than {MAX_REQUEST_LENGTH} characters")
        text = normalise(request)
        capabilities = tuple(
            Capability(tool=name)
            for name, tool in sorted(profile.tools.items())
            if self.wants(text, name, tool)
        )
        if not capabilities:
            raise InvalidIntent(f"the request asks for no tool of {profile.name!r}")
        purpose = " ".join(request.split())
        intent = Intent(
            purpose=purpose[:MAX_PURPOSE_LENGTH],
            capabilities=capabilities,
            data_ceiling=self.ceiling or profile.default_ceiling,
            egress=tuple(sorted(request_atoms(request))),
            budget=Budget(max_calls=self.max_calls),
            ttl_seconds=self.ttl_seconds,
            on_behalf_of=self.on_behalf_of,
            request=request,
        )
        validate_intent(intent)
        return intent


Scorer = Callable[[str, str, ToolProfile], float]


class ScoredCompiler(RuleCompiler):
    """A compiler whose "does the request ask for this action?" is a score.

    ``scorer(request, tool_name, profile)`` returns a number in [0, 1], e.g. an
    LLM's yes-probability or the cosine similarity of embeddings; a tool is
    declared when it reaches ``threshold``. Read-only tools are declared as by
    :class:`RuleCompiler`; with ``keep_rules`` the phrase rules still declare
    what they find, so a model can add actions but not lose them.
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        threshold: float = 0.5,
        keep_rules: bool = True,
        max_calls: int = DEFAULT_MAX_CALLS,
        ttl_seconds: int = DEFAULT_TTL,
        ceiling: Sensitivity | None = None,
        on_behalf_of: str | None = None,
    ) -> None:
        super().__init__(
            max_calls=max_calls, ttl_seconds=ttl_seconds, ceiling=ceiling, on_behalf_of=on_behalf_of
        )
        self.scorer = scorer
        self.threshold = threshold
        self.keep_rules = keep_rules

    def wants(self, request: str, name: str, tool: ToolProfile) -> bool:
        if tool.side_effect is SideEffect.READ and not tool.privileged:
            return True
        if self.keep_rules and asks_for(request, tool):
            return True
        return self.scorer(request, name, tool) >= self.threshold
