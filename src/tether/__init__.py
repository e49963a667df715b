"""Tether: identity and authorization control plane for autonomous AI agents.

Authority is bound to the intent of one task, lives minutes, and is checked
again on every tool call. This namespace is the whole public API; everything
else is private and may change.
"""

from tether._errors import (
    AdmissionRejected,
    AttestationRejected,
    Conflict,
    IdentityRejected,
    InfrastructureError,
    InvalidIntent,
    InvalidPolicy,
    NotFound,
    ProofRejected,
    Rejected,
    TetherError,
    TokenRejected,
    UsageError,
)
from tether._tether import Tether
from tether.audit import VerifyReport
from tether.core import (
    ArgConstraint,
    Budget,
    Call,
    Capability,
    Decision,
    Effect,
    FrozenClock,
    Intent,
    Reason,
    Sensitivity,
    SpiffeID,
    SystemClock,
    decide,
    parse_intent,
    parse_spiffe_id,
)
from tether.enforcement import Receipt
from tether.identity import SVIDs
from tether.sdk import (
    APIError,
    ApprovalRequired,
    AsyncClient,
    AsyncTask,
    Client,
    Denied,
    Observation,
    ReportFailed,
    Task,
    TetherHttpxAuth,
    TetherMCPAuth,
    Verdict,
)
from tether.tasks import OpenedTask, Template
from tether.tokens import ProofKey

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "ApprovalRequired",
    "AsyncClient",
    "AsyncTask",
    "Client",
    "Denied",
    "Observation",
    "ReportFailed",
    "Task",
    "TetherHttpxAuth",
    "TetherMCPAuth",
    "Verdict",
    "AdmissionRejected",
    "ArgConstraint",
    "AttestationRejected",
    "Budget",
    "Call",
    "Capability",
    "Conflict",
    "Decision",
    "Effect",
    "FrozenClock",
    "IdentityRejected",
    "InfrastructureError",
    "Intent",
    "InvalidIntent",
    "InvalidPolicy",
    "NotFound",
    "OpenedTask",
    "ProofKey",
    "ProofRejected",
    "Reason",
    "Receipt",
    "Rejected",
    "SVIDs",
    "Sensitivity",
    "SpiffeID",
    "SystemClock",
    "Template",
    "Tether",
    "TetherError",
    "TokenRejected",
    "UsageError",
    "VerifyReport",
    "__version__",
    "decide",
    "parse_intent",
    "parse_spiffe_id",
]
