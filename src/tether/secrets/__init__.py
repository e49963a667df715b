"""The secret broker: sealed secrets, leases, dynamic credentials, call-path hygiene.

- :class:`Vault`: write-only sealed secrets (AES-GCM envelope under a :class:`KMS`),
  versions, rotation with an overlap window, rotation hooks;
- :class:`Broker`: leases bound to a task (static secrets, per-task PostgreSQL roles,
  per-call downstream tokens), revoked with the task, reaped after a crash;
- :class:`DownstreamVerifier`: what a service owner runs to accept Tether's
  per-call downstream tokens (against the published JWKS);
- :func:`find_credentials` / :func:`redact_text`: credentials in arguments and results.
"""

from tether.core._credentials import Finding, Known, find_credentials, redact_text, redact_value
from tether.secrets._broker import (
    LEASE_KINDS,
    Broker,
    Lease,
    LeaseRejected,
    ReapReport,
    lease_dict,
)
from tether.secrets._downstream import (
    DOWNSTREAM_TYP,
    MAX_DOWNSTREAM_TTL,
    DownstreamClaims,
    DownstreamVerifier,
    mint_downstream_token,
)
from tether.secrets._kms import KMS, LocalKMS
from tether.secrets._postgres import Grant, PostgresRoles, PostgresTemplate
from tether.secrets._value import SecretValue
from tether.secrets._vault import KINDS, SecretInfo, SecretMeta, Vault, VersionInfo, parse_meta

__all__ = [
    "DOWNSTREAM_TYP",
    "KINDS",
    "KMS",
    "LEASE_KINDS",
    "MAX_DOWNSTREAM_TTL",
    "Broker",
    "DownstreamClaims",
    "DownstreamVerifier",
    "Finding",
    "Grant",
    "Known",
    "Lease",
    "LeaseRejected",
    "LocalKMS",
    "PostgresRoles",
    "PostgresTemplate",
    "ReapReport",
    "SecretInfo",
    "SecretMeta",
    "SecretValue",
    "Vault",
    "VersionInfo",
    "find_credentials",
    "lease_dict",
    "mint_downstream_token",
    "parse_meta",
    "redact_text",
    "redact_value",
]
