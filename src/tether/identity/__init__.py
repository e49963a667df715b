"""Workload identities: registry, attestation and SVIDs."""

from tether.identity._attestation import Attestor, SVIDs
from tether.identity._credentials import Credentials, Role
from tether.identity._federation import Federation
from tether.identity._registry import IdentityKind, IdentityRegistry
from tether.identity._svid import issue_jwt_svid, issue_x509_svid, pem_chain

__all__ = [
    "Credentials",
    "Role",
    "Attestor",
    "Federation",
    "IdentityKind",
    "IdentityRegistry",
    "SVIDs",
    "issue_jwt_svid",
    "issue_x509_svid",
    "pem_chain",
]
