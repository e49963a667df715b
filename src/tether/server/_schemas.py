"""Request and response bodies of the HTTP API (msgspec structs, strict)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

#: A policy file's name is a label, never a path: no separators, no leading dot.
POLICY_FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
PolicyFileName = Annotated[str, msgspec.Meta(pattern=POLICY_FILE_NAME, max_length=128)]


MAX_JSON_DEPTH = 32


def json_problem(value: Any) -> str | None:
    """Why a decoded JSON body is refused (nested too deep, a NUL in a string), or None.

    Iterative, so a hostile body cannot exhaust the stack here either."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "strings must not contain NUL characters"
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"JSON is nested deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                for key, member in item.items():
                    if "\x00" in key:
                        return "strings must not contain NUL characters"
                    stack.append((member, depth + 1))
            else:
                stack.extend((member, depth + 1) for member in item)
    return None


class Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    """Refuses unknown fields: a typo in a security request is an error, not a no-op."""


class ErrorOut(msgspec.Struct):
    """Error body: RFC 6749 style ``error``/``error_description`` plus the status."""

    status_code: int
    detail: str
    error: str
    error_description: str


class IdentityIn(Strict):
    spiffe_id: str
    kind: str
    owner: str
    description: str = ""


class IdentityOut(msgspec.Struct):
    spiffe_id: str
    kind: str
    owner: str
    description: str
    status: str
    created_at: float
    disabled_at: float | None = None


class IdentityList(msgspec.Struct):
    identities: list[IdentityOut]


class SpiffeIdIn(Strict):
    spiffe_id: str


class ApprovalDecisionIn(Strict):
    """An approver's words on a decision, kept in its receipt (optional body)."""

    comment: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class DisableOut(msgspec.Struct):
    identity: IdentityOut
    revoked_tasks: list[str]


class JoinTokenIn(Strict):
    spiffe_id: str
    ttl: float = 600.0


class JoinTokenOut(msgspec.Struct):
    spiffe_id: str
    join_token: str
    ttl: float


class AttestIn(Strict):
    join_token: str
    jwk: dict[str, str]
    audience: list[str] | None = None


class AttestOut(msgspec.Struct):
    spiffe_id: str
    jwt_svid: str
    x509_svid_pem: str
    expires_at: float


class TemplateIn(Strict):
    template: dict[str, Any]


class TemplateOut(msgspec.Struct):
    name: str
    description: str
    params: list[str]


class TemplateList(msgspec.Struct):
    templates: list[TemplateOut]


class PoliciesIn(Strict):
    files: dict[PolicyFileName, str]
    schema: str | None = None
    shadow: bool = False


class ReplayIn(Strict):
    """``POST /v1/policies/replay``: a candidate set and the window of receipts (seconds
    since the epoch, inclusive; omitted: unbounded)."""

    files: dict[PolicyFileName, str]
    schema: str | None = None
    since: float | None = msgspec.field(default=None, name="from")
    until: float | None = msgspec.field(default=None, name="to")
    limit: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 1000


class PolicyOut(msgspec.Struct):
    id: str
    effect: str
    file: str
    line: int
    approval: bool


class PoliciesOut(msgspec.Struct):
    digest: str
    policies: list[PolicyOut]


class DryRunIn(Strict):
    """Evaluate one call against a proposed policy set without loading it."""

    files: dict[PolicyFileName, str]
    agent: str
    tool: str
    args: dict[str, Any] = {}
    schema: str | None = None
    calls_used: int = 0


class DryRunOut(msgspec.Struct):
    effect: str
    policies: list[str]
    errors: list[str]


class TaskOpenIn(Strict):
    template: str | None = None
    params: dict[str, Any] = {}
    intent: dict[str, Any] | None = None
    parent_task_id: str | None = None
    agent: str | None = None  # admin only: open for this agent
    jwk: dict[str, str] | None = None  # admin only: the agent's public proof key
    # Resource servers (e.g. an MCP gateway URI) the task token is also addressed to.
    resources: list[Annotated[str, msgspec.Meta(min_length=1, max_length=512)]] = []
    # The user's request the task serves (grounds sink arguments for the flow rules).
    request: Annotated[str, msgspec.Meta(max_length=8000)] | None = None


class TaskOpenOut(msgspec.Struct):
    task_id: str
    token: str
    expires_at: float
    #: When this token runs out (sooner than the task with ``token_ttl_seconds``).
    token_expires_at: float | None = None


class TaskOut(msgspec.Struct):
    task_id: str
    agent: str
    template: str
    status: str
    calls_used: int
    opened_at: float
    expires_at: float
    intent_digest: str
    intent: dict[str, Any]
    chain: list[str]
    parent_task_id: str | None = None
    ended_at: float | None = None
    end_reason: str | None = None


class AuthorizeIn(Strict):
    tool: str
    args: dict[str, Any] = {}


class ReasonOut(msgspec.Struct):
    code: str
    message: str


class ReceiptRef(msgspec.Struct):
    seq: int
    hash: str


class AuthorizeOut(msgspec.Struct):
    effect: str
    reasons: list[ReasonOut]
    policies: list[str]
    risk_tags: list[str]
    receipt: ReceiptRef
    task_id: str | None = None
    approval_id: str | None = None


class CatalogueIn(Strict):
    tools: dict[str, Any]
    prefix: str | None = None


class PinsIn(Strict):
    """Reviewed tool definitions of one upstream (MCP ``Tool`` objects as JSON) to pin."""

    upstream: str
    tools: list[dict[str, Any]]
    dry_run: bool = False
    source: str = "pin"


class PinChangeOut(msgspec.Struct):
    tool: str
    previous: str | None
    digest: str
    receipt: int | None = None


class PinsOut(msgspec.Struct):
    upstream: str
    dry_run: bool
    changed: list[PinChangeOut]
    unchanged: list[str]
    by: str


class CatalogueEntryOut(msgspec.Struct):
    """How every door judges one tool: what calling it does, what it returns."""

    tool: str
    side_effect: str
    sensitivity: str
    trusted: bool


class CatalogueOut(msgspec.Struct):
    digest: str
    tools: list[str]
    entries: list[CatalogueEntryOut] = []


class ResultIn(Strict):
    """A tool's result, reported for the allowed decision whose receipt it names."""

    tool: str
    receipt: int
    result: Any = None


class ObservationOut(msgspec.Struct):
    task_id: str
    tool: str
    sensitivity: str
    untrusted: bool
    receipt: ReceiptRef
    #: Too large, or too slow, to scan: observed as untrusted content of unknown values.
    oversized: bool = False


class ApprovalOut(msgspec.Struct):
    approval_id: str
    task_id: str
    agent: str
    tool: str
    args: dict[str, Any]
    args_digest: str
    status: str
    reasons: list[ReasonOut]
    created_at: float
    expires_at: float
    decided_by: str | None = None
    owner: str = ""
    chain: list[str] = []
    flags: list[dict[str, str]] = []
    conflict: str | None = None


class ApprovalList(msgspec.Struct):
    approvals: list[ApprovalOut]


class AuditOut(msgspec.Struct):
    records: list[dict[str, Any]]


class VerifyOut(msgspec.Struct):
    ok: bool
    records: int
    checkpoints: int
    first_bad: int | None = None
    problem: str | None = None
    heads: int = 0
    witnessed: int = 0
    size: int | None = None
    root: str | None = None


class TokenOut(msgspec.Struct):
    """RFC 8693 §2.2.1 response."""

    access_token: str
    issued_token_type: str
    token_type: str
    expires_in: int
    task_id: str


class HealthOut(msgspec.Struct):
    status: str
    trust_domain: str


# -- secrets and leases: values go in, never out ------------------------------------------
SECRET_NAME_PATTERN = r"^[a-z][a-z0-9._-]{0,63}$"
MAX_SECRET_BYTES = 64 * 1024


class SecretIn(Strict):
    """A new secret. ``value`` is sealed at once and never returned by any endpoint."""

    name: Annotated[str, msgspec.Meta(pattern=SECRET_NAME_PATTERN, max_length=64)]
    value: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SECRET_BYTES)]
    kind: str = "generic"
    description: Annotated[str, msgspec.Meta(max_length=512)] = ""
    tools: list[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]] = []
    overlap_seconds: float | None = None
    postgres: dict[str, Any] | None = None


class SecretRotateIn(Strict):
    """A new version: ``value``, or (when omitted) the secret's rotation hook's answer."""

    value: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SECRET_BYTES)] | None = None
    overlap_seconds: float | None = None


class SecretVersionOut(msgspec.Struct):
    version: int
    state: str
    created_at: float
    created_by: str
    retired_at: float | None = None
    usable_until: float | None = None


class SecretOut(msgspec.Struct):
    """A secret without its value: name, kind, versions, who may use it."""

    name: str
    kind: str
    description: str
    created_at: float
    created_by: str
    tools: list[str]
    overlap_seconds: float
    rotation_hook: bool
    current_version: int
    versions: list[SecretVersionOut]
    postgres: dict[str, Any] | None = None


class SecretList(msgspec.Struct):
    secrets: list[SecretOut]


class LeaseOut(msgspec.Struct):
    """A lease without its credential."""

    lease_id: str
    task_id: str
    agent_id: str
    kind: str
    status: str
    cleanup: str
    created_at: float
    expires_at: float
    detail: dict[str, Any]
    secret: str | None = None
    version: int | None = None
    tool: str | None = None
    revoked_at: float | None = None
    revoke_reason: str | None = None


class LeaseList(msgspec.Struct):
    leases: list[LeaseOut]


class LeaseRevokeIn(Strict):
    reason: Annotated[str, msgspec.Meta(max_length=256)] = "revoked by an admin"


class KillSwitchIn(Strict):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    agent: str | None = None
    owner: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    template: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    trust_domain: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class KillIn(Strict):
    """``POST /v1/kill``: the scope (every filter given must match) or ``all``."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    agent: str | None = None
    owner: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    template: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    trust_domain: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    all: bool = False


class TraceOut(msgspec.Struct):
    task_id: str
    root_task_id: str
    tasks: list[dict[str, Any]]
    receipts: list[dict[str, Any]]
    leases: list[dict[str, Any]]


class KillSwitchOut(msgspec.Struct):
    tasks: list[str]
    leases: list[str]


class CredentialIn(Strict):
    """``POST /v1/credentials``: a new admin credential (admin only)."""

    role: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    owner: Annotated[str, msgspec.Meta(min_length=3, max_length=320)]
    #: How long it lives, in seconds (the default: ``$TETHER_CREDENTIAL_TTL``, 30 days).
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=366 * 86400)] | None = None


class CredentialRotateIn(Strict):
    ttl_seconds: Annotated[float, msgspec.Meta(gt=0, le=366 * 86400)] | None = None


class CredentialDisableIn(Strict):
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class CredentialOut(msgspec.Struct):
    """A credential as it may be shown: never its hash."""

    credential_id: str
    role: str
    owner: str
    status: str  # enabled | disabled | expired
    created_at: float
    expires_at: float | None
    disabled_at: float | None


class CredentialIssuedOut(msgspec.Struct):
    """A new credential: ``credential`` is the only copy of its secret."""

    credential: str
    info: CredentialOut
