"""Type confusion in delegation narrowing: ``True == 1`` in Python.

Attacker: a compromised agent. Its task may only call ``db.query`` with
``limit`` equal to ``1`` (or one of ``[1, 2]``); it opens a sub-task whose intent says
``limit`` equals ``True``. Narrowing compared with ``==`` and sets, where
``True == 1`` and ``{True} <= {1}``, so the child was judged narrower; the call
check is type-strict, so the child's capability admits a value its parent's never
did. Narrowing compares the way the call check does.
"""

from __future__ import annotations

from typing import Any

import pytest

from tether import parse_intent
from tether.core._delegation import DelegationRejected, check_narrowing
from tether.core._intent import check_argument


def _intent(constraint: dict[str, Any]) -> Any:
    return parse_intent(
        {"purpose": "query", "capabilities": [{"tool": "db.query", "args": {"limit": constraint}}]}
    )


def _narrow(parent: dict[str, Any], child: dict[str, Any]) -> None:
    check_narrowing(
        _intent(parent), _intent(child), parent_calls_left=20, parent_seconds_left=600, depth=1
    )


@pytest.mark.parametrize(
    ("parent", "child"),
    [
        ({"equals": 1}, {"equals": True}),
        ({"equals": 0}, {"equals": False}),
        ({"equals": True}, {"equals": 1}),
        ({"one_of": [1, 2]}, {"one_of": [True]}),
        ({"one_of": [1, 2]}, {"equals": True}),
        ({"one_of": [0, "x"]}, {"one_of": [False, "x"]}),
        ({"equals": "1"}, {"equals": 1}),
    ],
    ids=[
        "eq-1-true",
        "eq-0-false",
        "eq-true-1",
        "oneof-true",
        "oneof-eq-true",
        "oneof-false",
        "str-int",
    ],
)
def test_a_child_of_another_type_is_not_narrower(
    parent: dict[str, Any], child: dict[str, Any]
) -> None:
    """Compromised agent: a child constraint whose value differs from the parent's only
    in type (bool for int, int for str) is refused as widening."""
    with pytest.raises(DelegationRejected) as caught:
        _narrow(parent, child)
    assert caught.value.code == "delegation.widening"


def test_the_value_the_child_would_admit_is_one_the_parent_refuses() -> None:
    """Why it matters: the call check is type-strict, so ``True`` passes the child's
    constraint and fails the parent's."""
    parent, child = _intent({"equals": 1}), _intent({"equals": True})
    (pc,), (cc,) = parent.capabilities, child.capabilities
    assert check_argument("limit", cc.args["limit"], {"limit": True}) is None
    assert check_argument("limit", pc.args["limit"], {"limit": True}) is not None


@pytest.mark.parametrize(
    ("parent", "child"),
    [
        ({"equals": 1}, {"equals": 1}),
        ({"equals": 1}, {"equals": 1.0}),
        ({"equals": True}, {"equals": True}),
        ({"one_of": [1, 2, True]}, {"one_of": [2, True]}),
        ({"one_of": ["a", "b"]}, {"equals": "a"}),
    ],
)
def test_a_child_of_the_same_values_is_narrower(
    parent: dict[str, Any], child: dict[str, Any]
) -> None:
    """Positive control: equal values of the same kind still narrow."""
    _narrow(parent, child)
