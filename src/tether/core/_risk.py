"""Risk tags: which risks each control addresses (STANDARDS.md §9).

Tags use the form ``owasp-asi:ASI03``, ``owasp-nhi:NHI7``, ``maestro:L6``,
``nist-ai-rmf:MANAGE-2.4``. Every receipt carries the tags of the controls that
produced it.
"""

from __future__ import annotations

from enum import StrEnum


class Control(StrEnum):
    TASK_TOKEN = "task-token"  # noqa: S105 - a name, not a secret
    PER_CALL_POLICY = "per-call-policy"
    INTENT_BINDING = "intent-binding"
    DELEGATION = "delegation"
    APPROVAL = "approval"
    AUDIT = "audit"
    SECRET_BROKERING = "secret-brokering"  # noqa: S105 - a name, not a secret
    OFFBOARDING = "offboarding"
    KILL_SWITCH = "kill-switch"
    CASCADING_REVOCATION = "cascading-revocation"
    WORKLOAD_IDENTITY = "workload-identity"
    TRUST_DOMAIN = "trust-domain"
    SENDER_CONSTRAINED = "sender-constrained"
    AUDIENCE = "audience"
    INFORMATION_FLOW = "information-flow"
    TOOL_INTEGRITY = "tool-integrity"


_TAGS: dict[Control, tuple[str, ...]] = {
    Control.TASK_TOKEN: (
        "owasp-asi:ASI03",
        "owasp-nhi:NHI7",
        "maestro:L6",
        "nist-ai-rmf:MANAGE-2.4",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    Control.PER_CALL_POLICY: (
        "owasp-asi:ASI02",
        "owasp-asi:ASI05",
        "owasp-nhi:NHI5",
        "maestro:L3",
        "maestro:L6",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    Control.INTENT_BINDING: (
        "owasp-asi:ASI01",
        "owasp-asi:ASI03",
        "maestro:L3",
        "maestro:L6",
        "nist-ai-rmf:MAP-1.1",
        "nist-ai-rmf:MEASURE-2.4",
    ),
    Control.DELEGATION: (
        "owasp-asi:ASI03",
        "owasp-asi:ASI07",
        "owasp-nhi:NHI5",
        "maestro:L7",
        "maestro:L6",
        "nist-ai-rmf:GOVERN-3.2",
    ),
    Control.APPROVAL: (
        "owasp-asi:ASI09",
        "owasp-nhi:NHI10",
        "maestro:L6",
        "nist-ai-rmf:MAP-3.5",
        "nist-ai-rmf:GOVERN-3.2",
    ),
    Control.AUDIT: (
        "owasp-asi:ASI02",
        "owasp-asi:ASI08",
        "owasp-nhi:NHI10",
        "maestro:L5",
        "maestro:L6",
        "nist-ai-rmf:MEASURE-2.4",
        "nist-ai-rmf:MEASURE-2.8",
        "nist-ai-rmf:MANAGE-4.1",
        "nist-ai-rmf:MANAGE-4.3",
    ),
    Control.SECRET_BROKERING: (
        "owasp-asi:ASI03",
        "owasp-asi:ASI10",
        "owasp-nhi:NHI2",
        "owasp-nhi:NHI7",
        "maestro:L4",
        "maestro:L6",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    Control.OFFBOARDING: (
        "owasp-asi:ASI10",
        "owasp-nhi:NHI1",
        "maestro:L6",
        "nist-ai-rmf:GOVERN-1.6",
        "nist-ai-rmf:GOVERN-1.7",
    ),
    Control.KILL_SWITCH: (
        "owasp-asi:ASI10",
        "owasp-nhi:NHI1",
        "maestro:L6",
        "nist-ai-rmf:MANAGE-2.4",
    ),
    Control.CASCADING_REVOCATION: (
        "owasp-asi:ASI08",
        "owasp-nhi:NHI7",
        "maestro:L6",
        "maestro:L7",
        "nist-ai-rmf:MANAGE-2.3",
        "nist-ai-rmf:MANAGE-2.4",
    ),
    Control.WORKLOAD_IDENTITY: (
        "owasp-asi:ASI03",
        "owasp-asi:ASI07",
        "owasp-nhi:NHI4",
        "owasp-nhi:NHI9",
        "maestro:L4",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    Control.TRUST_DOMAIN: (
        "owasp-asi:ASI07",
        "owasp-nhi:NHI8",
        "maestro:L4",
        "nist-ai-rmf:GOVERN-1.6",
    ),
    Control.SENDER_CONSTRAINED: (
        "owasp-asi:ASI03",
        "owasp-nhi:NHI2",
        "maestro:L6",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    Control.AUDIENCE: (
        "owasp-asi:ASI03",
        "owasp-asi:ASI07",
        "owasp-nhi:NHI5",
        "maestro:L7",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    # Not a row of STANDARDS.md §9: flow rules (untrusted content steering sinks, confidential
    # data leaving, discovery-to-privilege chains) address goal hijack, tool misuse and
    # context poisoning, at the data-operations layer.
    Control.INFORMATION_FLOW: (
        "owasp-asi:ASI01",
        "owasp-asi:ASI02",
        "owasp-asi:ASI06",
        "owasp-nhi:NHI5",
        "maestro:L2",
        "maestro:L6",
        "nist-ai-rmf:MEASURE-2.7",
    ),
    # Not a row of STANDARDS.md §9: pinned upstream tool definitions (a reviewed definition
    # that changes upstream, a "rug pull", or a poisoned description) address the agentic
    # supply chain, tool misuse and context poisoning through tool descriptions, third-party
    # tools, at the agent-framework and ecosystem layers, and third-party risk (like the
    # PRM-discovery row: ASI04, NHI3, L7, GOVERN 6.1).
    Control.TOOL_INTEGRITY: (
        "owasp-asi:ASI02",
        "owasp-asi:ASI04",
        "owasp-asi:ASI06",
        "owasp-nhi:NHI3",
        "maestro:L3",
        "maestro:L7",
        "nist-ai-rmf:GOVERN-6.1",
        "nist-ai-rmf:MEASURE-2.7",
    ),
}


def risk_tags(*controls: Control) -> tuple[str, ...]:
    """The sorted union of the tags of ``controls``."""
    tags: set[str] = set()
    for control in controls:
        tags.update(_TAGS[control])
    return tuple(sorted(tags))
