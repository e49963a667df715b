"""Policy snapshots: Cedar policies, validated, pre-parsed and indexed.

A snapshot is built from policy sources (name → Cedar text) and a Cedar schema.
Building is all-or-nothing: any parse or validation error raises
:class:`InvalidPolicy` naming the file, the line and the reason, so the caller
keeps the previous snapshot live.

Plain Cedar evaluates every policy in the set on every request. The snapshot
indexes policies by their action and resource scope, so one request evaluates
only the policies whose scope can match it (exact action and resource, plus
those with an open scope), each bucket a pre-parsed ``cedarpy.PolicySet``
cached on first use.

A ``forbid`` policy annotated ``@approval("required")`` does not deny: when it
is the only reason a call would be refused, the decision is
``approval_required``.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import cedarpy

from tether._errors import InvalidPolicy
from tether.core._canonical import digest

_ANY = "*"
MAX_POLICY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    id: str
    file: str
    line: int
    effect: str
    approval: bool
    actions: tuple[str, ...]  # exact action ids, or ("*",)
    resource: tuple[str, str] | None  # exact (type, id), or None for an open scope
    est: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CedarOutcome:
    allowed: bool
    approval: bool
    policies: tuple[str, ...]
    errors: tuple[str, ...]


def split_statements(text: str) -> list[tuple[int, str]]:
    """Split Cedar text into top-level statements with their 1-based start lines.

    Strings and ``//`` comments are skipped; a statement ends at ``;``.
    """
    statements: list[tuple[int, str]] = []
    line, start, start_line = 1, None, 1
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
            continue
        elif ch == '"':
            if start is None:
                start, start_line = i, line
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    line += 1
                i += 1
        elif ch == ";":
            if start is not None:
                statements.append((start_line, text[start : i + 1]))
            start = None
        elif not ch.isspace() and start is None:
            start, start_line = i, line
        i += 1
    if start is not None and text[start:].strip():
        statements.append((start_line, text[start:]))
    return statements


_SCOPE_SET = re.compile(r"\b(principal|resource)\s+in\s*\[", re.ASCII)


def _hint(statement: str) -> str:
    """What to write instead, for mistakes Cedar's parser names only by its grammar."""
    found = _SCOPE_SET.search(statement.split(")", 1)[0])
    if found is None:
        return ""
    var = found.group(1)
    return (
        f' (hint: a policy\'s scope takes one entity, `{var} in Group::"…"`, not a set; '
        f'test a set in the condition: `when {{ [Tool::"a", Tool::"b"].contains({var}) }}`)'
    )


def _parse_file(name: str, text: str) -> list[PolicyRecord]:
    statements = split_statements(text)
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except (ValueError, RuntimeError) as exc:
        for line, statement in statements:
            try:
                cedarpy.PolicySet.from_str(statement)
            except (ValueError, RuntimeError) as inner:
                raise InvalidPolicy(f"{name}:{line}: {inner}{_hint(statement)}") from None
        raise InvalidPolicy(f"{name}: {exc}") from None
    if est.get("templates"):
        raise InvalidPolicy(f"{name}: policy templates (?principal/?resource) are not supported")
    records: list[PolicyRecord] = []
    static = est.get("staticPolicies", {})
    for index in range(len(static)):
        policy = static[f"policy{index}"]
        line = statements[index][0] if index < len(statements) else 0
        annotations = policy.get("annotations", {})
        pid = annotations.get("id") or f"{name}:{line}"
        approval = annotations.get("approval") == "required"
        if approval and policy["effect"] != "forbid":
            raise InvalidPolicy(f'{name}:{line}: @approval("required") applies to forbid only')
        records.append(
            PolicyRecord(
                id=pid,
                file=name,
                line=line,
                effect=policy["effect"],
                approval=approval,
                actions=_action_scope(policy["action"]),
                resource=_resource_scope(policy["resource"]),
                est=policy,
            )
        )
    return records


def _action_scope(scope: dict[str, Any]) -> tuple[str, ...]:
    if scope.get("op") == "==":
        return (scope["entity"]["id"],)
    if scope.get("op") == "in" and "entities" in scope:
        return tuple(e["id"] for e in scope["entities"])
    if scope.get("op") == "in" and "entity" in scope:
        return (scope["entity"]["id"],)
    return (_ANY,)


def _resource_scope(scope: dict[str, Any]) -> tuple[str, str] | None:
    if scope.get("op") == "==" and "entity" in scope:
        entity = scope["entity"]
        return (entity["type"], entity["id"])
    return None


# A Cedar string literal: no backslash escapes in a tool name, so none are decoded.
_STRING_LITERAL = re.compile(r'"([^"\\\n]{1,256})"')


@dataclass
class PolicySnapshot:
    """An immutable, validated policy set with its index. Evaluation is pure."""

    digest: str
    sources: dict[str, str]
    schema: str
    policies: tuple[PolicyRecord, ...]
    _exact: dict[tuple[str, str, str], list[PolicyRecord]] = field(default_factory=dict)
    _open: dict[str, list[PolicyRecord]] = field(default_factory=dict)
    _buckets: OrderedDict[
        tuple[str, str, str], tuple[Any, frozenset[str], frozenset[str] | None]
    ] = field(default_factory=OrderedDict)
    _named: frozenset[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for record in self.policies:
            for action in record.actions:
                if record.resource is None:
                    self._open.setdefault(action, []).append(record)
                else:
                    key = (action, *record.resource)
                    self._exact.setdefault(key, []).append(record)

    @property
    def named_strings(self) -> frozenset[str]:
        """Every string the policies write out (``"shell.exec"``, ``Tool::"fs.read"``):
        the tool names an admission policy may ask a task's capabilities about."""
        if self._named is None:
            self._named = frozenset(
                m.group(1) for text in self.sources.values() for m in _STRING_LITERAL.finditer(text)
            )
        return self._named

    @property
    def policy_ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.policies)

    def applicable(self, action: str, resource_type: str, resource_id: str) -> list[PolicyRecord]:
        """The policies whose scope can match this action and resource, in load order."""
        chosen = (
            self._exact.get((action, resource_type, resource_id), [])
            + self._exact.get((_ANY, resource_type, resource_id), [])
            + self._open.get(action, [])
            + self._open.get(_ANY, [])
        )
        if len(chosen) < 2:
            return chosen
        seen: set[int] = set()
        unique = []
        for record in chosen:
            if id(record) not in seen:
                seen.add(id(record))
                unique.append(record)
        return unique

    def _bucket(
        self, action: str, resource_type: str, resource_id: str
    ) -> tuple[Any, frozenset[str], frozenset[str] | None]:
        key = (action, resource_type, resource_id)
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        records = self.applicable(action, resource_type, resource_id)
        # One Cedar evaluation per call: approval forbids join the set as permits and
        # are told apart by id afterwards (see evaluate).
        policies = {p.id: ({**p.est, "effect": "permit"} if p.approval else p.est) for p in records}
        approvals = frozenset(p.id for p in records if p.approval)
        bucket = (_policy_set(policies), approvals, _context_attributes(records))
        self._buckets[key] = bucket
        if len(self._buckets) > 8192:
            self._buckets.popitem(last=False)
        return bucket

    def evaluate(
        self,
        principal: dict[str, str],
        action: str,
        resource: dict[str, str],
        context: dict[str, Any],
        entities: list[dict[str, Any]] | cedarpy.Entities,
    ) -> CedarOutcome:
        """Evaluate one request; raise nothing the caller must not turn into a deny."""
        policy_set, approvals, used = self._bucket(action, resource["type"], resource["id"])
        if used is not None:
            # Only what these policies read: Cedar parses less. A policy reading an attribute
            # left out would error, and an error denies: pruning can never allow more.
            context = {k: v for k, v in context.items() if k in used}
        request = {
            "principal": principal,
            "action": {"type": "Action", "id": action},
            "resource": resource,
            "context": context,
        }
        result = cedarpy.is_authorized(request, policy_set, entities)
        errors = tuple(result.diagnostics.errors)
        reasons = tuple(sorted(result.diagnostics.reasons))  # stable receipts
        if errors or not result.allowed:
            # Deny: the reasons are the forbids that fired (none: nothing permitted).
            return CedarOutcome(False, False, reasons, errors)
        permits = tuple(r for r in reasons if r not in approvals)
        if not permits:  # only approval markers matched: nothing actually permits the call
            return CedarOutcome(False, False, (), ())
        return CedarOutcome(True, len(permits) < len(reasons), reasons, ())


def _context_attributes(records: list[PolicyRecord]) -> frozenset[str] | None:
    """The top-level context attributes ``records`` read, or None if any use of
    ``context`` is not a plain attribute access (then nothing is pruned)."""
    used: set[str] = set()

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            for op in (".", "has"):
                inner = node.get(op)
                if (
                    isinstance(inner, dict)
                    and inner.get("left") == {"Var": "context"}
                    and isinstance(inner.get("attr"), str)
                ):
                    used.add(inner["attr"])
                    return True
            if node.get("Var") == "context":
                return False  # context used as a whole
            return all(walk(v) for v in node.values())
        if isinstance(node, list):
            return all(walk(v) for v in node)
        return True

    for record in records:
        if not walk(record.est.get("conditions", [])):
            return None
    return frozenset(used)


def _policy_set(policies: dict[str, Any]) -> Any:
    document = {"staticPolicies": policies, "templates": {}, "templateLinks": []}
    return cedarpy.PolicySet.from_json_str(json.dumps(document))


def build_snapshot(sources: dict[str, str], schema: str) -> PolicySnapshot:
    """Parse, validate against ``schema`` and index ``sources`` (file name → Cedar text)."""
    try:
        schema_handle = cedarpy.Schema.from_str(schema)
    except (ValueError, RuntimeError) as exc:
        raise InvalidPolicy(f"schema: {exc}") from None
    records: list[PolicyRecord] = []
    seen: dict[str, str] = {}
    for name in sorted(sources):
        text = sources[name]
        if len(text.encode()) > MAX_POLICY_BYTES:
            raise InvalidPolicy(f"{name}: larger than {MAX_POLICY_BYTES} bytes")
        file_records = _parse_file(name, text)
        if file_records:
            result = cedarpy.validate_policies(text, schema_handle)
            if not result.validation_passed:
                first = result.errors[0]
                pid = first.policy_id
                index = int(pid[6:]) if pid.startswith("policy") and pid[6:].isdigit() else -1
                line = file_records[index].line if 0 <= index < len(file_records) else 0
                raise InvalidPolicy(f"{name}:{line}: {first.error}")
        for record in file_records:
            if record.id in seen:
                raise InvalidPolicy(
                    f"{name}:{record.line}: policy id {record.id!r} is also defined "
                    f"in {seen[record.id]}"
                )
            seen[record.id] = f"{record.file}:{record.line}"
            records.append(record)
    return PolicySnapshot(
        digest=digest({"sources": sources, "schema": schema}),
        sources=dict(sources),
        schema=schema,
        policies=tuple(records),
    )


def empty_snapshot(schema: str) -> PolicySnapshot:
    """A snapshot with no policies: Cedar's default deny refuses everything."""
    return build_snapshot({}, schema)
