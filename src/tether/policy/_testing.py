"""Policy you can test before it bites: validate, test and format a policy directory.

Nothing here touches a store: a directory of ``*.cedar`` files (and an optional
``schema.cedarschema``) is checked offline, as ``cedar validate``/``opa test`` do.

- :func:`lint` builds the snapshot exactly as a load would (parse, schema
  validation with file and line) and adds the warnings a reviewer wants before a
  set goes live: a ``permit`` that admits everything, a ``permit`` of every tool,
  a policy that duplicates another, a ``permit`` no request can reach because an
  unconditional ``forbid`` covers its whole scope.
- :func:`run_cases` evaluates test cases (a TOML or JSON file) against the set
  with the same Cedar request the decision core builds (principal and owner
  entities, ``call_tool`` context with the intent, the arguments and the flow
  summary; ``open_task`` context with the requested intent), and compares the
  effect with the expected one.
- :func:`format_sources` is Cedar's own formatter.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy

from tether._errors import InvalidPolicy, TetherError, UsageError
from tether.core._decision import (
    admission_context,
    call_context,
    cedar_value,
    principal_entities,
)
from tether.core._flow import FlowState, ToolProfile, flow_context
from tether.core._intent import Intent, parse_intent
from tether.core._policy import PolicyRecord, PolicySnapshot, build_snapshot

SCHEMA_FILE = "schema.cedarschema"
EFFECTS = ("allow", "deny", "approval_required")
MAX_CASES = 10_000


def read_dir(directory: str | Path) -> tuple[dict[str, str], str | None]:
    """The ``*.cedar`` sources of ``directory`` and its schema (``None``: the default)."""
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory")
    sources = {f.name: f.read_text() for f in sorted(path.glob("*.cedar"))}
    schema_path = path / SCHEMA_FILE
    return sources, schema_path.read_text() if schema_path.exists() else None


# -- validate ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Finding:
    """One problem of a policy set: ``error`` refuses the set, ``warning`` is advice."""

    level: str
    code: str
    where: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {
            "level": self.level,
            "code": self.code,
            "where": self.where,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class LintReport:
    snapshot: PolicySnapshot | None
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level == "warning")


def lint(sources: Mapping[str, str], schema: str) -> LintReport:
    """Validate ``sources`` against ``schema`` and review the policies that pass."""
    try:
        snapshot = build_snapshot(dict(sources), schema)
    except InvalidPolicy as exc:
        text = str(exc)
        where, _, message = text.partition(": ")
        return LintReport(None, (Finding("error", exc.code, where, message or text),))
    findings: list[Finding] = []
    seen: dict[str, PolicyRecord] = {}
    forbids = [p for p in snapshot.policies if p.effect == "forbid" and not p.approval]
    for record in snapshot.policies:
        where = f"{record.file}:{record.line} ({record.id})"
        body = _body(record)
        twin = seen.get(body)
        if twin is not None:
            findings.append(
                Finding(
                    "warning",
                    "policy.duplicate",
                    where,
                    f"the same rule as {twin.id} ({twin.file}:{twin.line}): one of them is "
                    "redundant, and editing only one later will not do what it seems",
                )
            )
        else:
            seen[body] = record
        if record.effect != "permit":
            continue
        unconditioned = not record.est.get("conditions")
        scope = record.est
        if unconditioned and all(scope[k].get("op") == "All" for k in _SCOPE):
            findings.append(
                Finding(
                    "warning",
                    "policy.wildcard",
                    where,
                    "permits every principal, action and resource with no condition: every "
                    "call and every task is left to the intents and flow rules alone",
                )
            )
        elif (
            unconditioned
            and record.resource is None
            and scope["resource"].get("op") == "All"
            and ("call_tool" in record.actions or "*" in record.actions)
        ):
            findings.append(
                Finding(
                    "warning",
                    "policy.every_tool",
                    where,
                    "permits call_tool on every tool with no condition: name the tools "
                    '(resource == Tool::"...") or add a when clause',
                )
            )
        for forbid in forbids:
            if _covers(forbid, record):
                findings.append(
                    Finding(
                        "warning",
                        "policy.shadowed",
                        where,
                        f"can never allow anything: {forbid.id} ({forbid.file}:{forbid.line}) "
                        "forbids its whole scope unconditionally",
                    )
                )
                break
    return LintReport(snapshot, tuple(findings))


_SCOPE = ("principal", "action", "resource")


def _body(record: PolicyRecord) -> str:
    est = {k: v for k, v in record.est.items() if k != "annotations"}
    return json.dumps(est, sort_keys=True)


def _covers(forbid: PolicyRecord, permit: PolicyRecord) -> bool:
    """Whether the unconditional ``forbid`` matches every request ``permit``'s scope can."""
    if forbid.est.get("conditions"):
        return False
    for key in _SCOPE:
        outer, inner = forbid.est[key], permit.est[key]
        if outer.get("op") == "All":
            continue
        if outer != inner:
            return False
    return True


# -- test cases --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Case:
    """One request and the effect it must have."""

    name: str
    expect: str
    action: str
    principal: dict[str, str]
    resource: dict[str, str]
    context: dict[str, Any]
    entities: list[dict[str, Any]] = field(default_factory=list)
    #: ``open_task``: the requested intent, whose patterns are expanded over the set's
    #: names when it is run (as admission expands them over the trust domain's).
    intent: Intent | None = None


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    expect: str
    effect: str
    policies: tuple[str, ...]
    errors: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.effect == self.expect

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expect": self.expect,
            "effect": self.effect,
            "passed": self.passed,
            "policies": list(self.policies),
            "errors": list(self.errors),
        }


def load_cases(path: str | Path) -> list[Case]:
    """Cases from a TOML (``[[case]]`` tables) or JSON (``{"case": [...]}``) file."""
    file = Path(path)
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file}: {exc}") from None
    raw = data.get("case") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{file}: no [[case]] entries")
    if len(raw) > MAX_CASES:
        raise UsageError(f"{file}: more than {MAX_CASES} cases")
    return [_case(entry, f"{file.name}#{i + 1}") for i, entry in enumerate(raw)]


def _case(entry: Any, default_name: str) -> Case:
    if not isinstance(entry, dict):
        raise UsageError(f"{default_name}: a case is a table")
    name = str(entry.get("name") or default_name)
    expect = entry.get("expect")
    if expect not in EFFECTS:
        raise UsageError(f"{name}: expect is one of {', '.join(EFFECTS)}, not {expect!r}")
    agent = entry.get("agent")
    owner = entry.get("owner")
    if not isinstance(agent, str) or not agent.startswith("spiffe://") or agent.count("/") < 3:
        raise UsageError(f"{name}: agent is the agent's SPIFFE ID")
    if not isinstance(owner, str) or not owner:
        raise UsageError(f"{name}: owner is the agent's owner")
    principal, entities = principal_entities(agent, owner, str(entry.get("kind", "agent")))
    action = str(entry.get("action", "call_tool"))
    raw_intent = entry.get("intent") or {"purpose": "policy test"}
    admitted: Intent | None = None
    try:
        if action == "open_task":
            intent = parse_intent(raw_intent)
            template = str(entry.get("template", "adhoc"))
            resource = {"type": "Template", "id": template}
            context: dict[str, Any] = admission_context(intent, ())  # see run_cases
            admitted = intent
        elif action == "call_tool":
            tool = entry.get("tool")
            if not isinstance(tool, str) or not tool:
                raise UsageError(f"{name}: tool names the tool called")
            intent = parse_intent(
                {"capabilities": [{"tool": tool}], **raw_intent}
                if "capabilities" not in raw_intent
                else raw_intent
            )
            args = entry.get("args", {})
            if not isinstance(args, dict):
                raise UsageError(f"{name}: args is a table")
            flow = flow_context(FlowState(), tool, ToolProfile(), [])
            flow.update(entry.get("flow", {}))
            chain = list(entry.get("chain") or [agent])
            context = call_context(
                task_id=str(entry.get("task_id", "task_test")),
                template=str(entry.get("template", "adhoc")),
                intent=intent,
                calls_used=int(entry.get("calls_used", 0)),
                chain=chain,
                args={k: cedar_value(v) for k, v in args.items() if v is not None},
                flow=flow,
            )
            resource = {"type": "Tool", "id": tool}
        else:
            raise UsageError(f"{name}: action is call_tool or open_task, not {action!r}")
    except UsageError:
        raise
    except (TetherError, ValueError, TypeError) as exc:
        raise UsageError(f"{name}: {exc}") from None
    entities.append({"uid": resource, "attrs": {}, "parents": []})
    return Case(
        name,
        str(expect),
        action,
        principal,
        resource,
        context,
        entities,
        admitted,
    )


def run_cases(snapshot: PolicySnapshot, cases: list[Case]) -> list[CaseResult]:
    """Each case's effect under ``snapshot`` (an evaluation error is a deny, as in a
    decision)."""
    results = []
    for case in cases:
        context = case.context
        if case.intent is not None:
            # Offline there is no catalogue: the names the policies write are the known ones.
            context = admission_context(case.intent, snapshot.named_strings)
        outcome = snapshot.evaluate(
            case.principal,
            case.action,
            case.resource,
            context,
            cedarpy.Entities.from_json_str(json.dumps(case.entities)),
        )
        if outcome.errors:
            effect = "deny"
        elif outcome.allowed:
            effect = "approval_required" if outcome.approval else "allow"
        else:
            effect = "deny"
        results.append(CaseResult(case.name, case.expect, effect, outcome.policies, outcome.errors))
    return results


# -- format ------------------------------------------------------------------------------------
def format_sources(sources: Mapping[str, str]) -> dict[str, str]:
    """Every file formatted by Cedar's formatter (comments are kept)."""
    formatted = {}
    for name, text in sources.items():
        try:
            formatted[name] = cedarpy.format_policies(text) if text.strip() else text
        except (ValueError, RuntimeError) as exc:
            raise InvalidPolicy(f"{name}: {exc}") from None
    return formatted
