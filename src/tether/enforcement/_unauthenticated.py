"""Traffic from callers who proved nothing costs them, not the store.

A request whose credential is missing or does not verify is nobody's act, so it
gets no receipt of its own: a receipt is an append and an fsync, and an
unauthenticated caller must not choose how many the store writes. Instead every
such refusal is

- **counted**: ``tether_unauthenticated_requests{code}``, the code one of a fixed set;
- **sampled**: the first refusal from a source address in each ``interval`` leaves one
  ``request.unauthenticated`` receipt that says how many that address had refused since
  the last one; at most ``max_receipts`` such receipts an interval in all, so rotating
  addresses buys no more writes;
- **rate limited per source address**: past ``rate`` refusals a second (bursts of
  ``burst``), the address is answered 429 before any work;

and the caller is told a reason code and a fixed description of it, never the text
of an exception (which could describe a parser's internals or echo what it sent).

The source address is the peer of the connection (``scope["client"]``): behind a
proxy every caller shares the proxy's, so set the limits for the proxy's traffic.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

#: What a refusal is called and explained to a caller who proved nothing.
DESCRIPTIONS: dict[str, str] = {
    "token.missing": "no task token was presented",
    "token.malformed": "the task token is malformed",
    "token.header": "the task token's header is not allowed",
    "token.alg": "the task token's algorithm is not allowed (ES256 only)",
    "token.typ": "the task token's type is not a task token",
    "token.trust_domain": "the task token is not from this trust domain",
    "token.subject": "the task token's subject is not a valid SPIFFE ID",
    "token.unknown_kid": "the task token's key is not in the trust bundle",
    "token.signature": "the task token's signature does not verify",
    "token.claims": "the task token lacks required claims",
    "token.expired": "the task token has expired",
    "token.not_yet_valid": "the task token is not valid yet",
    "token.scheme": "the authorization scheme is not DPoP",
    "token.audience": "the task token is not addressed to this resource",
    "token.revoked": "the task token is revoked",
    "token.task_mismatch": "the task token belongs to another task",
    "proof.missing": "no DPoP proof was presented",
    "proof.malformed": "the DPoP proof is malformed",
    "proof.header": "the DPoP proof's header is not allowed",
    "proof.alg": "the DPoP proof's algorithm is not allowed (ES256 only)",
    "proof.typ": "the DPoP proof's type is not dpop+jwt",
    "proof.key": "the DPoP proof's key is not usable",
    "proof.key_mismatch": "the DPoP proof's key is not the one the token is bound to",
    "proof.signature": "the DPoP proof's signature does not verify",
    "proof.claims": "the DPoP proof lacks required claims",
    "proof.ath": "the DPoP proof is not bound to this token",
    "proof.call": "the DPoP proof is not bound to this call",
    "proof.target": "the DPoP proof is for another method or URI",
    "proof.stale": "the DPoP proof is too old or from the future",
    "invalid_request": "the request's credentials are malformed",
    "invalid_token": "the credential does not verify",
    "invalid_client": "the client credentials do not verify",
    "svid.malformed": "the JWT-SVID is malformed",
    "svid.signature": "the JWT-SVID's signature does not verify",
    "svid.expired": "the JWT-SVID has expired",
    "svid.unknown_kid": "the JWT-SVID's key is not in the trust bundle",
    "svid.header": "the JWT-SVID's header is not allowed",
    "svid.subject": "the JWT-SVID's subject is not a valid SPIFFE ID",
    "svid.alg": "the JWT-SVID's algorithm is not allowed",
    "federation.unknown_trust_domain": "the SVID's trust domain is not federated",
    "federation.stale": "the SVID's trust domain has no fresh bundle",
    "federation.no_keys": "the SVID's trust domain has no keys of its kind",
    "svid.x509": "the X.509-SVID is not a valid leaf SVID",
    "svid.chain": "the X.509-SVID does not chain to its trust domain's bundle",
    "svid.key": "the X.509-SVID's key is not EC P-256",
    "identity.disabled": "the identity is not active",
    "credential.malformed": "the admin credential is malformed",
    "credential.invalid": "the admin credential is unknown or wrong",
    "proof.replayed": "the proof has been used before",
    "attestation.join_token": "the join token is unknown, used or expired",
    "call.malformed": "the body is not a tool call",
    "call.oversized": "the body is too large",
}
OTHER = "other"
_CODE = re.compile(r"[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,30}){0,2}")


def known_code(code: str) -> str:
    """``code`` if it is one of :data:`DESCRIPTIONS`, else ``other`` (a bounded label)."""
    return code if code in DESCRIPTIONS else OTHER


def describe(code: str) -> str:
    """The fixed description of ``code`` for a caller who proved nothing."""
    return DESCRIPTIONS.get(code, "the request is not authenticated")


def bounded_label(value: str, known: frozenset[str] | set[str]) -> str:
    """A Prometheus label value from a bounded set: ``value`` if known, else ``other``."""
    return value if value in known else OTHER


def bounded_code(code: str) -> str:
    """A reason code as a label: the codes Tether writes have this shape; anything else
    (an exception's code that carries data) is ``other``."""
    return code if _CODE.fullmatch(code) else OTHER


@dataclass(frozen=True, slots=True)
class Refusal:
    """What to do with one unauthenticated refusal."""

    code: str
    description: str
    #: The caller is past its address's rate: answer 429, nothing else.
    limited: bool
    #: A receipt is due for this address; it stands for this many refusals (this one
    #: and those only counted since the address's last receipt). 0: none is due.
    receipt_for: int


class UnauthenticatedTraffic:
    """Per source address: a token bucket of refusals and the sampling of receipts."""

    def __init__(
        self,
        *,
        rate: float = 20.0,
        burst: float = 100.0,
        interval: float = 60.0,
        max_receipts: int = 100,
        max_sources: int = 100_000,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.interval = interval
        self.max_receipts = max_receipts
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        #: address -> (when its last receipt was due, refusals counted since)
        self._sampled: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._window = (0.0, 0)  # (start of the interval, receipts due in it)
        self._lock = threading.Lock()

    def limited(self, source: str) -> bool:
        """Whether ``source`` is past its rate (checked before any work is done)."""
        if self.rate <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(source, (self.burst, now))
            return min(self.burst, tokens + (now - last) * self.rate) < 1

    def refuse(self, source: str, code: str) -> Refusal:
        """Account for one refusal from ``source``: charge its bucket, and say whether it
        is past its rate or a receipt is due."""
        now = time.monotonic()
        label = known_code(code)
        with self._lock:
            if self.rate > 0:
                tokens, last = self._buckets.pop(source, (self.burst, now))
                tokens = min(self.burst, tokens + (now - last) * self.rate)
                # Hammering while limited keeps the address limited, at most burst/rate
                # seconds past its last refusal.
                self._buckets[source] = (max(tokens - 1, -self.burst), now)
                if len(self._buckets) > self.max_sources:
                    self._buckets.popitem(last=False)
                if tokens < 1:
                    return Refusal(label, describe(code), limited=True, receipt_for=0)
            due, counted = self._sampled.pop(source, (-self.interval, 0))
            start, receipts = self._window
            if now - start >= self.interval:
                start, receipts = now, 0
            receipt_for = 0
            if now - due >= self.interval and receipts < self.max_receipts:
                receipt_for, due, counted, receipts = counted + 1, now, 0, receipts + 1
            else:
                counted += 1
            self._sampled[source] = (due, counted)
            if len(self._sampled) > self.max_sources:
                self._sampled.popitem(last=False)
            self._window = (start, receipts)
        return Refusal(label, describe(code), limited=False, receipt_for=receipt_for)
