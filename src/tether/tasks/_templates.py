"""Intent templates: admin-defined, parameterised intents agents open tasks from.

A template declares typed parameters and an intent in which ``{name}``
placeholders stand for them. A string that is exactly one placeholder takes the
parameter's typed value; elsewhere the value is substituted as text. Parameter
values are validated (type, pattern, bounds, choices) before substitution, and
the rendered intent is validated like any other.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from tether._errors import InvalidIntent, UsageError
from tether.core._intent import MAX_TTL_SECONDS, Intent, parse_intent
from tether.core._scanning import linear

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_PARAM_LENGTH = 1024


class ParamSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["string", "integer", "number", "boolean"] = "string"
    description: str = ""
    pattern: str | None = None
    one_of: tuple[str | int | float | bool, ...] | None = None
    min: float | None = None
    max: float | None = None
    max_length: int = 256
    default: str | int | float | bool | None = None
    required: bool = True


class Template(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    intent: dict[str, Any]
    description: str = ""
    params: dict[str, ParamSpec] = {}
    max_ttl_seconds: int = 900


def parse_template(raw: Any) -> Template:
    try:
        template = msgspec.convert(raw, Template)
    except msgspec.ValidationError as exc:
        raise InvalidIntent(f"invalid template: {exc}") from None
    if not _NAME.match(template.name):
        raise InvalidIntent(f"template name {template.name!r} must match {_NAME.pattern}")
    if not 1 <= template.max_ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidIntent("max_ttl_seconds out of range")
    for name, spec in template.params.items():
        if spec.pattern is not None:
            try:
                linear(spec.pattern)
            except ValueError as exc:
                raise InvalidIntent(
                    f"parameter {name!r}: bad pattern: {exc} (patterns are matched in linear "
                    "time, RE2 syntax: no look-around or back-references)"
                ) from None
    used = set(_PLACEHOLDER.findall(json.dumps(template.intent)))
    unknown = used - set(template.params)
    if unknown:
        raise InvalidIntent(f"template uses undeclared parameters: {sorted(unknown)}")
    # A dry render with defaults/samples catches a malformed intent at load time.
    return template


def load_template_file(path: str | Path) -> Template:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise InvalidIntent(f"{file}: {exc}") from None
    return parse_template(raw)


def _coerce(name: str, spec: ParamSpec, value: Any) -> Any:
    if isinstance(value, str) and spec.type != "string":
        try:
            value = {"integer": int, "number": float}.get(spec.type, _boolean)(value)
        except ValueError:
            raise InvalidIntent(f"parameter {name!r} must be a {spec.type}") from None
    expected = {"string": str, "integer": int, "number": int | float, "boolean": bool}[spec.type]
    if not isinstance(value, expected) or (spec.type != "boolean" and isinstance(value, bool)):
        raise InvalidIntent(f"parameter {name!r} must be a {spec.type}")
    if isinstance(value, str):
        if len(value) > min(spec.max_length, MAX_PARAM_LENGTH):
            raise InvalidIntent(f"parameter {name!r} is too long")
        if spec.pattern is not None and linear(spec.pattern).fullmatch(value) is None:
            raise InvalidIntent(f"parameter {name!r}={value!r} does not match {spec.pattern!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InvalidIntent(f"parameter {name!r} must be finite")
        if spec.min is not None and value < spec.min:
            raise InvalidIntent(f"parameter {name!r}={value} is below {spec.min}")
        if spec.max is not None and value > spec.max:
            raise InvalidIntent(f"parameter {name!r}={value} is above {spec.max}")
    if spec.one_of is not None and value not in spec.one_of:
        raise InvalidIntent(f"parameter {name!r}={value!r} is not one of {list(spec.one_of)}")
    return value


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _substitute(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    return node


def render(template: Template, params: dict[str, Any]) -> Intent:
    """The intent ``template`` declares for ``params`` (validated)."""
    unknown = set(params) - set(template.params)
    if unknown:
        raise InvalidIntent(f"unknown parameters for template {template.name!r}: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, spec in template.params.items():
        if name in params:
            values[name] = _coerce(name, spec, params[name])
        elif spec.default is not None:
            values[name] = _coerce(name, spec, spec.default)
        elif spec.required:
            raise InvalidIntent(f"template {template.name!r} needs parameter {name!r}")
        else:
            values[name] = ""
    intent = parse_intent(_substitute(template.intent, values))
    if intent.ttl_seconds > template.max_ttl_seconds:
        raise InvalidIntent(
            f"intent ttl {intent.ttl_seconds}s exceeds the template's {template.max_ttl_seconds}s"
        )
    return intent
