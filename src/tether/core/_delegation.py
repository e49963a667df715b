"""Delegation: a child intent must be provably narrower than its parent's.

``check_narrowing`` raises :class:`DelegationRejected` naming the first part of
the child intent that is not covered by the parent: a capability no parent
capability covers, an argument constraint dropped or loosened, a higher data
ceiling, egress the parent did not have, more budget (calls, spend, distinct
tools) than the parent has left, a longer life than the parent has left, another
on-behalf-of user, or a chain deeper than allowed.
"""

from __future__ import annotations

from tether._errors import Rejected
from tether.core._intent import ArgConstraint, Capability, Intent, Scalar, _glob, _same

MAX_DELEGATION_DEPTH = 4
_GLOB_CHARS = frozenset("*?[")


class DelegationRejected(Rejected):
    code = "delegation.widening"


def _pattern_covered(parent: str, child: str) -> bool:
    if parent == child:
        return True
    if not (_GLOB_CHARS & set(child)):
        return _glob(parent).fullmatch(child) is not None
    # A child glob is covered by a parent "prefix*" whose prefix is literal.
    if parent.endswith("*") and not (_GLOB_CHARS & set(parent[:-1])):
        return child.startswith(parent[:-1])
    return False


def _within(values: tuple[Scalar, ...], allowed: tuple[Scalar, ...]) -> bool:
    """Every value is one of ``allowed``, compared as the call check compares them
    (type-strict: ``True`` is not ``1``, ``"1"`` is not ``1``)."""
    return all(any(_same(v, a) for a in allowed) for v in values)


def _constraint_narrower(parent: ArgConstraint, child: ArgConstraint) -> str | None:
    if child.optional and not parent.optional:
        return "is optional in the child but required by the parent"
    if parent.equals is not None and (
        child.equals is None or not _same(child.equals, parent.equals)
    ):
        return f"must still equal {parent.equals!r}"
    if parent.one_of is not None:
        values = (
            child.one_of
            if child.one_of is not None
            else ((child.equals,) if child.equals is not None else None)
        )
        if values is None or not _within(values, parent.one_of):
            return f"must stay within {list(parent.one_of)!r}"
    if parent.pattern is not None and child.pattern != parent.pattern:
        return f"must keep the pattern {parent.pattern!r}"
    if parent.prefix is not None and (
        child.prefix is None or not child.prefix.startswith(parent.prefix)
    ):
        return f"must keep the prefix {parent.prefix!r}"
    if parent.min is not None and (child.min is None or child.min < parent.min):
        return f"minimum may not go below {parent.min}"
    if parent.max is not None and (child.max is None or child.max > parent.max):
        return f"maximum may not exceed {parent.max}"
    if parent.max_length is not None and (
        child.max_length is None or child.max_length > parent.max_length
    ):
        return f"max_length may not exceed {parent.max_length}"
    return None


def _capability_covered(parent: Capability, child: Capability) -> str | None:
    if not _pattern_covered(parent.tool, child.tool):
        return "not covered"
    for name, constraint in parent.args.items():
        if name not in child.args:
            return f"drops the parent's constraint on argument {name!r}"
        problem = _constraint_narrower(constraint, child.args[name])
        if problem:
            return f"argument {name!r} {problem}"
    return None


def check_narrowing(
    parent: Intent,
    child: Intent,
    *,
    parent_calls_left: int,
    parent_seconds_left: float,
    depth: int,
    max_depth: int = MAX_DELEGATION_DEPTH,
    parent_spent: float = 0.0,
    parent_tools_used: int = 0,
) -> None:
    """Raise DelegationRejected unless ``child`` is within ``parent``.

    Budgets are compared with what the parent has *left*: its calls, its spend
    (``parent_spent`` of ``max_spend``) and its distinct tools (``parent_tools_used`` of
    ``max_tools``), so a child cannot be granted what its parent already used."""
    if depth > max_depth:
        raise DelegationRejected(
            f"delegation depth {depth} exceeds the limit of {max_depth}", code="delegation.depth"
        )
    for cap in child.capabilities:
        problems = [_capability_covered(p, cap) for p in parent.capabilities]
        if None not in problems:
            detail = next(
                (p for p in problems if p != "not covered"), "no parent capability covers it"
            )
            raise DelegationRejected(f"capability {cap.tool!r}: {detail}")
    if child.data_ceiling.rank > parent.data_ceiling.rank:
        raise DelegationRejected(
            f"data ceiling {child.data_ceiling} is above the parent's {parent.data_ceiling}"
        )
    extra = set(child.egress) - set(parent.egress)
    if extra:
        raise DelegationRejected(f"egress {sorted(extra)} is not allowed to the parent")
    for grant in child.disclose:
        # Each (class, destination) a child may disclose, its parent may disclose too.
        for pattern in grant.to:
            if not any(
                pattern in theirs.to and theirs.data.rank >= grant.data.rank
                for theirs in parent.disclose
            ):
                raise DelegationRejected(
                    f"disclosing {grant.data} data to {pattern!r} is not allowed to the parent"
                )
    if child.budget.max_calls > parent_calls_left:
        raise DelegationRejected(
            f"budget of {child.budget.max_calls} calls exceeds the parent's remaining "
            f"{parent_calls_left}"
        )
    used = {"max_tools": float(parent_tools_used), "max_spend": float(parent_spent)}
    for field in ("max_tools", "max_spend"):
        limit, wanted = getattr(parent.budget, field), getattr(child.budget, field)
        if limit is None:
            continue
        left = max(limit - used[field], 0)
        if wanted is None or wanted > left:
            raise DelegationRejected(
                f"budget.{field} {wanted} exceeds the parent's remaining {left:g} (of {limit:g})"
            )
    if (parent.request or None) != (child.request or None) and child.request is not None:
        raise DelegationRejected("a child task may not carry another user request")
    if child.ttl_seconds > parent_seconds_left:
        raise DelegationRejected(
            f"lifetime {child.ttl_seconds}s exceeds the parent's remaining "
            f"{int(parent_seconds_left)}s"
        )
    if parent.on_behalf_of is not None and child.on_behalf_of not in (None, parent.on_behalf_of):
        raise DelegationRejected("a child task may not act for another user")
