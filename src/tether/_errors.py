"""Exceptions raised by Tether.

The hierarchy separates *security rejections* (the request was refused: a bad
token, a replayed proof, a disabled identity) from *infrastructure failures*
(the store is unreachable, a file is unreadable) and from *usage errors* (the
operator asked for something that does not exist or is malformed)::

    TetherError
    ├── Rejected                  security rejection; carries a reason code
    │   ├── TokenRejected         task token or SVID failed verification
    │   ├── ProofRejected         proof of possession missing, wrong or replayed
    │   ├── IdentityRejected      unknown, disabled or malformed identity
    │   ├── AttestationRejected   join token unknown, used or expired
    │   └── AdmissionRejected     the admission policy refused to open a task
    ├── InfrastructureError       the store or the filesystem failed
    └── UsageError                bad operator input
        ├── NotFound
        ├── Conflict
        ├── InvalidIntent
        └── InvalidPolicy         a policy or schema failed to load

Verifiers raise; they never return a boolean. On the decision path every
exception becomes a deny with a reason (see ``tether.core``).
"""

from __future__ import annotations


class TetherError(Exception):
    """Base class of every error Tether raises on purpose."""

    code: str = "tether.error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class Rejected(TetherError):
    """A security check refused the request."""

    code = "rejected"


class TokenRejected(Rejected):
    code = "token.invalid"


class ProofRejected(Rejected):
    code = "proof.invalid"


class IdentityRejected(Rejected):
    code = "identity.invalid"


class AttestationRejected(Rejected):
    code = "attestation.invalid"


class AdmissionRejected(Rejected):
    code = "admission.denied"


class InfrastructureError(TetherError):
    """Storage, filesystem or other infrastructure failure (never a security verdict)."""

    code = "infrastructure.error"


class UsageError(TetherError):
    """The operator's request is malformed or refers to something that does not exist."""

    code = "usage.error"


class NotFound(UsageError):
    code = "not_found"


class Conflict(UsageError):
    code = "conflict"


class InvalidIntent(UsageError):
    code = "intent.invalid"


class InvalidPolicy(UsageError):
    code = "policy.invalid"
