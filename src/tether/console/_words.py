"""Plain words for what the console shows: reason codes, effects, times."""

from __future__ import annotations

import json
import time
import unicodedata
from typing import Any

_FAMILIES = {
    "task": "The task itself",
    "token": "The task token",
    "proof": "The proof of possession",
    "svid": "The workload's SVID",
    "intent": "The task's declared intent",
    "policy": "Cedar policy",
    "budget": "The task's budget",
    "flow": "What the task has read so far",
    "approval": "Human approval",
    "secret": "Credential hygiene",
    "identity": "The agent's identity",
    "delegation": "Delegation",
    "renewal": "Token renewal",
    "call": "The request",
    "internal": "Tether itself",
}
_CODES = {
    "allow": "within the task's intent and permitted by policy",
    "intent.no_capability": "the task never declared this tool in its intent",
    "intent.argument": "an argument is outside what the intent allows",
    "policy.forbid": "a policy forbids this call",
    "policy.no_permit": "no policy permits this call (default deny)",
    "policy.approval": "a policy asks a human to approve this call first",
    "policy.error": "a policy could not be evaluated, so the call is refused",
    "approval.granted": "a human approved exactly this call",
    "approval.used": "the approval was already used once",
    "budget.calls_exhausted": "the task has used all the calls its budget allows",
    "budget.spend_exhausted": "the task has spent all the money its budget allows",
    "budget.tools_exhausted": "the task has used as many different tools as it may",
    "flow.data_ceiling": "the task read data above its sensitivity ceiling",
    "flow.untrusted_sink": "untrusted content could be steering where this call writes or sends",
    "flow.confidential_egress": "confidential data could leave to a place the intent never named",
    "flow.discovery_privilege": "a privileged tool reached after undeclared discovery calls",
    "task.ended": "the task has ended; its token died with it",
    "task.expired": "the task's lifetime is over",
    "task.idle": "the task was idle too long",
    "task.unknown": "no such task",
    "secret.egress": "a credential would leave through a tool that writes or sends",
    "secret.brokered": "an agent passed a secret Tether brokers (it never should hold one)",
    "proof.replayed": "the proof was used before (a replay)",
    "token.expired": "the task token has expired",
    "identity.disabled": "the agent's identity is disabled (offboarded)",
    "internal.error": "Tether could not decide, so it refused (fail closed)",
    "call.malformed": "the request was not a well-formed call",
    "call.oversized": "the request was too large",
}
EFFECTS = {
    "allow": "allowed",
    "deny": "denied",
    "approval_required": "held for approval",
}


def plain(code: str) -> str:
    """One sentence on what a reason code means."""
    if code in _CODES:
        return _CODES[code]
    family = _FAMILIES.get(code.split(".", 1)[0])
    return f"{family.lower()} refused it ({code})" if family else code


def when(at: float | None, now: float | None = None) -> str:
    if at is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
    return f"{stamp} UTC"


def ago(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    seconds = now - at
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if future else f"{amount} ago"


def pretty(value: Any) -> str:
    """JSON for a human: letters of every script as they are, but characters that
    reorder or hide text (bidi controls, zero-width and other format characters) shown
    as escapes, so what the approver reads is what the tool gets."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return "".join(
        f"\\u{ord(c):04x}"
        if c not in "\n" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn", "Zl", "Zp")
        else c
        for c in text
    )
