"""Human approvals bound to exact calls."""

from tether.approvals._service import DEFAULT_APPROVAL_TTL, Approvals

__all__ = ["DEFAULT_APPROVAL_TTL", "Approvals"]
