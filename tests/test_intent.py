"""Intents and templates: capability matching, argument constraints, parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether import InvalidIntent, parse_intent
from tether.core import match_capability
from tether.tasks import load_template_file, render

pytestmark = pytest.mark.store_independent  # no Tether: the same on every store

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"


def _intent(**constraints: object) -> object:
    return parse_intent(
        {
            "purpose": "pay",
            "capabilities": [
                {"tool": "bank.read_*"},
                {"tool": "bank.send_money", "args": constraints},
            ],
        }
    )


def test_glob_patterns_match_tool_names() -> None:
    intent = _intent()
    assert match_capability(intent, "bank.read_bills", {}).matched is not None  # type: ignore[arg-type]
    assert match_capability(intent, "bank.readx", {}).matched is None  # type: ignore[arg-type]
    assert match_capability(intent, "shell.exec", {}).matched is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("constraint", "value", "ok"),
    [
        ({"equals": "DE1"}, "DE1", True),
        ({"equals": "DE1"}, "DE2", False),
        ({"one_of": ["a", "b"]}, "b", True),
        ({"one_of": ["a", "b"]}, "c", False),
        ({"pattern": "^DE[0-9]+$"}, "DE12", True),
        ({"pattern": "^DE[0-9]+$"}, "DE12\nx", False),
        ({"prefix": "/home/"}, "/home/a", True),
        ({"prefix": "/home/"}, "/etc/a", False),
        ({"max": 100}, 100, True),
        ({"max": 100}, 100.01, False),
        ({"max": 100}, "100", False),
        ({"max": 100}, float("nan"), False),
        ({"max": 100}, True, False),
        ({"min": 1}, 0, False),
        ({"max_length": 3}, "abcd", False),
        ({"equals": 1}, True, False),
    ],
)
def test_argument_constraints(constraint: dict[str, object], value: object, ok: bool) -> None:
    intent = _intent(x=constraint)
    result = match_capability(intent, "bank.send_money", {"x": value})  # type: ignore[arg-type]
    assert (result.matched is not None) is ok, result.reason


def test_constrained_argument_must_be_present_unless_optional() -> None:
    assert (
        match_capability(
            _intent(x={"max": 5}),
            "bank.send_money",  # type: ignore[arg-type]
            {},
        ).matched
        is None
    )
    assert (
        match_capability(
            _intent(x={"max": 5, "optional": True}),  # type: ignore[arg-type]
            "bank.send_money",
            {},
        ).matched
        is not None
    )


@pytest.mark.parametrize(
    "raw",
    [
        {"purpose": "", "capabilities": [{"tool": "a"}]},
        {"purpose": "x", "capabilities": []},
        {"purpose": "x", "capabilities": [{"tool": "a", "args": {"p": {"pattern": "("}}}]},
        {"purpose": "x", "capabilities": [{"tool": "a"}], "ttl_seconds": 0},
        {"purpose": "x", "capabilities": [{"tool": "a"}], "surprise": 1},
        {"purpose": "x", "capabilities": [{"tool": "a"}], "data_ceiling": "topsecret"},
    ],
)
def test_malformed_intents_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(InvalidIntent):
        parse_intent(raw)


def test_template_renders_typed_parameters() -> None:
    template = load_template_file(EXAMPLES / "templates" / "pay-bill.toml")
    intent = render(template, {"payee": "DE50526018159083016613", "max_amount": "750"})
    send = next(c for c in intent.capabilities if c.tool == "bank.send_money")
    assert send.args["recipient"].equals == "DE50526018159083016613"
    assert send.args["amount"].max == 750.0
    assert "DE50526018159083016613" in intent.purpose


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"payee": "not an iban"},
        {"payee": "DE50526018159083016613", "max_amount": "999999"},
        {"payee": "DE50526018159083016613", "max_amount": "lots"},
        {"payee": "DE50526018159083016613", "extra": "1"},
    ],
)
def test_template_parameters_are_validated(params: dict[str, str]) -> None:
    template = load_template_file(EXAMPLES / "templates" / "pay-bill.toml")
    with pytest.raises(InvalidIntent):
        render(template, params)
