"""The decision core: pure functions and value types, no I/O.

See :mod:`tether.core._decision` for the invariants every decision keeps.
"""

from tether.core._canonical import canonical_json, digest, sha256_hex
from tether.core._clock import Clock, FrozenClock, SystemClock
from tether.core._decision import (
    DECIDE_HTM,
    DECIDE_HTU,
    Call,
    Decision,
    Effect,
    Reason,
    TaskState,
    TaskView,
    decide,
    principal_entities,
)
from tether.core._intent import (
    ArgConstraint,
    Budget,
    Capability,
    Intent,
    Sensitivity,
    authorization_details,
    decode_intent,
    intent_digest,
    intent_to_builtins,
    match_capability,
    parse_intent,
)
from tether.core._policy import CedarOutcome, PolicySnapshot, build_snapshot, empty_snapshot
from tether.core._risk import Control, risk_tags
from tether.core._spiffe_id import SpiffeID, parse_spiffe_id, parse_trust_domain
from tether.core._verify import (
    ProofClaims,
    ProofVerifier,
    SvidClaims,
    TaskClaims,
    TokenVerifier,
    VerificationKeys,
    call_digest,
    jwk_thumbprint,
    strict_json,
    token_hash,
    verify_jwt_svid,
)

__all__ = [
    "DECIDE_HTM",
    "DECIDE_HTU",
    "ArgConstraint",
    "Budget",
    "Call",
    "Capability",
    "CedarOutcome",
    "Clock",
    "Control",
    "Decision",
    "Effect",
    "FrozenClock",
    "Intent",
    "PolicySnapshot",
    "ProofClaims",
    "ProofVerifier",
    "SvidClaims",
    "Reason",
    "Sensitivity",
    "SpiffeID",
    "SystemClock",
    "TaskClaims",
    "TaskState",
    "TaskView",
    "TokenVerifier",
    "VerificationKeys",
    "authorization_details",
    "build_snapshot",
    "call_digest",
    "canonical_json",
    "decide",
    "decode_intent",
    "digest",
    "empty_snapshot",
    "intent_digest",
    "intent_to_builtins",
    "jwk_thumbprint",
    "match_capability",
    "parse_intent",
    "parse_spiffe_id",
    "parse_trust_domain",
    "principal_entities",
    "risk_tags",
    "sha256_hex",
    "strict_json",
    "token_hash",
    "verify_jwt_svid",
]
