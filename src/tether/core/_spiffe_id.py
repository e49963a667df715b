"""SPIFFE ID parsing (SPIFFE-ID.md §2), on top of the ``spiffe`` package.

The ``spiffe`` package does the RFC 3986 / charset work. Tether adds what the
standard asks of a control plane and the package leaves open: the 2048-byte and
255-byte limits (§2.3), and a lowercase-only trust domain on input (§2.4 vs
§2.1: Tether emits lowercase and refuses anything else, so one identity has one
spelling everywhere it is stored, compared or signed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spiffe import SpiffeId as _SpiffeId

from tether._errors import IdentityRejected

MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
_SCHEME = "spiffe://"
_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
# The whole ID, anchored with fullmatch: "$" alone would accept a trailing newline.
_SHAPE = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


@dataclass(frozen=True, slots=True)
class SpiffeID:
    """A parsed, validated SPIFFE ID."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    @property
    def is_workload(self) -> bool:
        return bool(self.path)


def parse_trust_domain(name: str) -> str:
    """Validate a bare trust-domain name (``acme.example``)."""
    if not name or len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityRejected(
            f"trust domain must be 1-{MAX_TRUST_DOMAIN_BYTES} bytes", code="spiffe_id.malformed"
        )
    if not set(name) <= _TD_CHARS:
        raise IdentityRejected(
            f"trust domain {name[:64]!r} may use only lowercase a-z, 0-9, '.', '-', '_'",
            code="spiffe_id.malformed",
        )
    return name


def parse_spiffe_id(value: str, *, workload: bool = True) -> SpiffeID:
    """Parse ``value`` or raise :class:`IdentityRejected` (code ``spiffe_id.malformed``).

    ``workload=True`` (the default) also requires a non-root path: trust-domain
    IDs name signing authorities, not workloads.
    """
    if not isinstance(value, str):
        raise IdentityRejected("SPIFFE ID must be a string", code="spiffe_id.malformed")
    if len(value.encode()) > MAX_ID_BYTES:
        raise IdentityRejected(
            f"SPIFFE ID longer than {MAX_ID_BYTES} bytes", code="spiffe_id.malformed"
        )
    if not value.startswith(_SCHEME):
        raise IdentityRejected(
            f"SPIFFE ID {value[:80]!r} must start with 'spiffe://'", code="spiffe_id.malformed"
        )
    authority = value[len(_SCHEME) :].split("/", 1)[0]
    parse_trust_domain(authority)
    try:
        parsed = _SpiffeId(value)
    except Exception as exc:  # the package raises its own error family
        raise IdentityRejected(
            f"malformed SPIFFE ID {value[:80]!r}: {exc}", code="spiffe_id.malformed"
        ) from None
    if _SHAPE.fullmatch(value) is None and parsed.path:
        raise IdentityRejected(
            f"malformed SPIFFE ID {value[:80]!r}",
            code="spiffe_id.malformed",
        )
    if workload and not parsed.path:
        raise IdentityRejected(
            f"SPIFFE ID {value[:80]!r} has no path: a workload ID needs one",
            code="spiffe_id.malformed",
        )
    return SpiffeID(trust_domain=parsed.trust_domain.name, path=parsed.path)
