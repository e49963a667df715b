"""Intents: what a task declares it will do, and the capability match.

An intent is data, not code: purpose text, capabilities (tool-name patterns,
each with optional argument constraints), a data ceiling, the egress it may
reach, a budget, a lifetime and, optionally, the user it acts for. Its digest
(canonical JSON, SHA-256) is carried in the task token and on every receipt,
so what was authorised and what was declared can always be compared.

Capabilities are expressed in the task token as RFC 9396
``authorization_details`` of type ``tether:tool``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import msgspec

from tether._errors import InfrastructureError, InvalidIntent
from tether.core._canonical import digest
from tether.core._scanning import linear

if TYPE_CHECKING:
    from tether.core._scanning import LinearPattern

AUTHORIZATION_DETAILS_TYPE = "tether:tool"
MAX_CAPABILITIES = 256
MAX_PATTERN_LENGTH = 256
MAX_TTL_SECONDS = 24 * 3600
MAX_PURPOSE_LENGTH = 2000
MAX_REQUEST_LENGTH = 8000


class Sensitivity(StrEnum):
    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    SECRET = "secret"  # noqa: S105 - a label, not a credential

    @property
    def rank(self) -> int:
        return _SENSITIVITY_RANK[self]


_SENSITIVITY_RANK = {
    Sensitivity.PUBLIC: 0,
    Sensitivity.INTERNAL: 1,
    Sensitivity.CONFIDENTIAL: 2,
    Sensitivity.SECRET: 3,
}

Scalar = str | int | float | bool


class ArgConstraint(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Constraints on one argument. Every constraint given must hold.

    A constrained argument must be present unless ``optional`` is set: a call
    that omits it cannot be shown to satisfy the constraint.
    """

    equals: Scalar | None = None
    one_of: tuple[Scalar, ...] | None = None
    pattern: str | None = None
    prefix: str | None = None
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    optional: bool = False


class Capability(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A tool-name pattern (shell-style glob) and its argument constraints."""

    tool: str
    args: dict[str, ArgConstraint] = {}


class Budget(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Calls, distinct tools and spend a task may use (``None``: no limit)."""

    max_calls: int = 20
    max_tools: int | None = None
    max_spend: float | None = None


class Disclosure(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Data of class ``data`` (or below) the task may hand to the destinations or tools
    ``to`` names (the egress syntax: addresses, host and link patterns; or tool-name
    globs for a write to a shared place), even though its audience is wider."""

    data: Sensitivity
    to: tuple[str, ...]


class Intent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    purpose: str
    capabilities: tuple[Capability, ...]
    data_ceiling: Sensitivity = Sensitivity.INTERNAL
    egress: tuple[str, ...] = ()
    budget: Budget = Budget()
    # Confidential data the task may disclose, and to whom (flow.confidential_content).
    disclose: tuple[Disclosure, ...] = ()
    ttl_seconds: int = 600
    on_behalf_of: str | None = None
    # The user's request the intent was made from: values it names ground sink arguments.
    request: str | None = None
    # A task token's lifetime when shorter than the task's (None: the task's): a
    # long-running task renews its token (``Tether.renew_task``) before it runs out.
    token_ttl_seconds: int | None = None
    # The task ends when no call has been allowed for this long (None: never idle).
    idle_seconds: int | None = None


def parse_intent(raw: Any) -> Intent:
    """Build and validate an :class:`Intent` from decoded JSON (or raise InvalidIntent)."""
    try:
        intent = msgspec.convert(raw, Intent)
    except msgspec.ValidationError as exc:
        raise InvalidIntent(f"invalid intent: {exc}") from None
    validate_intent(intent)
    return intent


def decode_intent(data: bytes | str) -> Intent:
    try:
        intent = msgspec.json.decode(data, type=Intent)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidIntent(f"invalid intent JSON: {exc}") from None
    validate_intent(intent)
    return intent


def validate_intent(intent: Intent) -> None:
    if not intent.purpose.strip() or len(intent.purpose) > MAX_PURPOSE_LENGTH:
        raise InvalidIntent(f"purpose must be 1-{MAX_PURPOSE_LENGTH} characters")
    if not intent.capabilities:
        raise InvalidIntent("an intent needs at least one capability")
    if len(intent.capabilities) > MAX_CAPABILITIES:
        raise InvalidIntent(f"at most {MAX_CAPABILITIES} capabilities")
    if not 1 <= intent.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidIntent(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS}")
    token_ttl = intent.token_ttl_seconds
    if token_ttl is not None and not 1 <= token_ttl <= MAX_TTL_SECONDS:
        raise InvalidIntent(f"token_ttl_seconds must be between 1 and {MAX_TTL_SECONDS}")
    if intent.idle_seconds is not None and not 1 <= intent.idle_seconds <= MAX_TTL_SECONDS:
        raise InvalidIntent(f"idle_seconds must be between 1 and {MAX_TTL_SECONDS}")
    if intent.budget.max_calls < 0:
        raise InvalidIntent("budget.max_calls must not be negative")
    if intent.budget.max_tools is not None and intent.budget.max_tools < 0:
        raise InvalidIntent("budget.max_tools must not be negative")
    spend = intent.budget.max_spend
    if spend is not None and (not math.isfinite(spend) or spend < 0):
        raise InvalidIntent("budget.max_spend must be a finite, non-negative number")
    if intent.request is not None and len(intent.request) > MAX_REQUEST_LENGTH:
        raise InvalidIntent(f"request must be at most {MAX_REQUEST_LENGTH} characters")
    if len(intent.disclose) > MAX_CAPABILITIES:
        raise InvalidIntent(f"at most {MAX_CAPABILITIES} disclosures")
    for grant in intent.disclose:
        if not grant.to or any(not p or len(p) > MAX_PATTERN_LENGTH for p in grant.to):
            raise InvalidIntent(
                f"disclose: each needs destinations of 1-{MAX_PATTERN_LENGTH} characters"
            )
    for cap in intent.capabilities:
        if not cap.tool or len(cap.tool) > MAX_PATTERN_LENGTH:
            raise InvalidIntent(f"tool pattern must be 1-{MAX_PATTERN_LENGTH} characters")
        for name, constraint in cap.args.items():
            if constraint.pattern is not None:
                try:
                    _regex(constraint.pattern)
                except ValueError as exc:
                    raise InvalidIntent(
                        f"capability {cap.tool!r}: argument {name!r}: bad pattern: {exc} "
                        "(patterns are matched in linear time, RE2 syntax: no look-around "
                        "or back-references)"
                    ) from None


def intent_digest(intent: Intent) -> str:
    return digest(msgspec.to_builtins(intent))


class IntentTampered(InfrastructureError):
    """A stored intent does not hash to the digest its task (and token) were issued with."""

    code = "task.intent_tampered"


def decode_verified_intent(text: str, expected_digest: str, task_id: str = "") -> Intent:
    """Decode a stored intent and check it against the digest signed into the task's
    tokens: an intent widened in the store (more tools, more budget) is refused."""
    intent = decode_intent(text)
    if intent_digest(intent) != expected_digest:
        raise IntentTampered(
            f"the stored intent of task {task_id} does not match the digest it was issued with"
        )
    return intent


def intent_to_builtins(intent: Intent) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(intent)
    return result


def authorization_details(intent: Intent) -> list[dict[str, Any]]:
    """The intent's capabilities as RFC 9396 ``authorization_details``."""
    details: list[dict[str, Any]] = []
    for cap in intent.capabilities:
        entry: dict[str, Any] = {"type": AUTHORIZATION_DETAILS_TYPE, "actions": [cap.tool]}
        if cap.args:
            entry["constraints"] = msgspec.to_builtins(cap.args)
        details.append(entry)
    return details


GLOB_CHARS = frozenset("*?[")


def is_pattern(tool: str) -> bool:
    """Whether a capability's tool is a pattern (shell-style glob) rather than a name."""
    return not GLOB_CHARS.isdisjoint(tool)


def covers(pattern: str, tool: str) -> bool:
    """Whether the capability pattern (or name) ``pattern`` admits calls to ``tool``."""
    return pattern == tool or _glob(pattern).fullmatch(tool) is not None


def covered_tools(intent: Intent, known: Iterable[str]) -> list[str]:
    """The tool names ``intent`` covers: its literal capabilities, and every name in
    ``known`` one of its patterns covers. What an admission policy sees as
    ``context.tools``, so ``contains("shell.exec")`` holds for ``shell.*`` as for
    ``shell.exec`` whenever the name is known (a catalogue entry, a name a policy
    mentions)."""
    names = {c.tool for c in intent.capabilities if not is_pattern(c.tool)}
    patterns = [c.tool for c in intent.capabilities if is_pattern(c.tool)]
    if patterns:
        names.update(t for t in known if not is_pattern(t) and any(covers(p, t) for p in patterns))
    return sorted(names)


@lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> LinearPattern:
    """An argument pattern, matched against agent-supplied values: linear time (RE2)."""
    return linear(pattern)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_argument(name: str, constraint: ArgConstraint, args: dict[str, Any]) -> str | None:
    """``None`` if the argument satisfies ``constraint``, else why not."""
    if name not in args:
        return None if constraint.optional else f"argument {name!r} is required by the intent"
    value = args[name]
    if constraint.equals is not None and not _same(value, constraint.equals):
        return f"argument {name!r} must equal {constraint.equals!r}"
    if constraint.one_of is not None and not any(_same(value, v) for v in constraint.one_of):
        return f"argument {name!r}={_show(value)} is not one of {list(constraint.one_of)!r}"
    if constraint.pattern is not None and (
        not isinstance(value, str) or _regex(constraint.pattern).fullmatch(value) is None
    ):
        return f"argument {name!r}={_show(value)} does not match {constraint.pattern!r}"
    if constraint.prefix is not None and (
        not isinstance(value, str) or not value.startswith(constraint.prefix)
    ):
        return f"argument {name!r}={_show(value)} does not start with {constraint.prefix!r}"
    if constraint.min is not None or constraint.max is not None:
        if not _is_number(value) or not math.isfinite(value):
            return f"argument {name!r} must be a finite number"
        if constraint.min is not None and value < constraint.min:
            return f"argument {name!r}={value} is below the intent's minimum {constraint.min}"
        if constraint.max is not None and value > constraint.max:
            return f"argument {name!r}={value} exceeds the intent's maximum {constraint.max}"
    if constraint.max_length is not None and (
        not isinstance(value, str | list) or len(value) > constraint.max_length
    ):
        return f"argument {name!r} is longer than {constraint.max_length}"
    return None


def _same(value: Any, expected: Scalar) -> bool:
    # bool is an int in Python; never let True satisfy 1.
    if isinstance(value, bool) or isinstance(expected, bool):
        return isinstance(value, bool) and isinstance(expected, bool) and value is expected
    return bool(type(value) is type(expected) and value == expected) or (
        _is_number(value) and _is_number(expected) and value == expected
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CapabilityMatch(msgspec.Struct, frozen=True):
    """Result of matching a call against an intent's capabilities."""

    matched: Capability | None
    reason: str | None  # set when matched is None


def match_capability(intent: Intent, tool: str, args: dict[str, Any]) -> CapabilityMatch:
    """Find the first capability that covers ``tool`` with ``args``."""
    first_failure: str | None = None
    for cap in intent.capabilities:
        if _glob(cap.tool).fullmatch(tool) is None:
            continue
        failure = None
        for name, constraint in cap.args.items():
            failure = check_argument(name, constraint, args)
            if failure is not None:
                break
        if failure is None:
            return CapabilityMatch(matched=cap, reason=None)
        first_failure = first_failure or f"{failure} (capability {cap.tool!r})"
    if first_failure is not None:
        return CapabilityMatch(matched=None, reason=first_failure)
    return CapabilityMatch(
        matched=None, reason=f"tool {tool!r} is not among the capabilities the task declared"
    )
