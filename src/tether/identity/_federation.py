"""Federated SPIFFE trust: the bundles of foreign trust domains, and who they may attest.

An operator federates a foreign trust domain (``partner.example``) by naming where its
SPIFFE bundle comes from: a bundle endpoint of the ``https_web`` profile (a JWKS document
fetched over HTTPS, SPIFFE_Trust_Domain_and_Bundle.md §5.2), or a static bundle (a SPIRE
deployment's ``spire-server bundle show -format spiffe``, for instance). A registered
identity of this trust domain is then *linked* to the one foreign SPIFFE ID whose SVIDs may
attest it: a workload presenting a JWT-SVID of ``spiffe://partner.example/agent/x``,
verified with ``partner.example``'s bundle, is attested as the identity linked to it and
gets this trust domain's SVIDs, bound to its key. Identities keep their owner and their
registration here; a foreign SVID attests nothing that is not linked.

Invariants (each refusal is an :class:`AttestationRejected` with its code, and a receipt
written by the attestor):

1. An SVID is verified only with the bundle of its own subject's trust domain (Bundle §3);
   a subject in a trust domain that is not federated is refused
   (``federation.unknown_trust_domain``).
2. The configuration (trust domains, their sources, the links) is one tagged setting of
   the store: every node reads it on every attestation, so a removal holds everywhere at
   once, and a configuration written without the KEK is refused as a whole. Every change
   raises its version (named with its digest in the change's receipt); a node refuses a
   setting older than the newest it has seen (an authentic older value put back).
3. A fetched bundle is kept in this node's memory and refreshed when its refresh interval
   (the operator's, or the bundle's ``spiffe_refresh_hint``, or five minutes) has passed;
   a failed refresh keeps the last bundle, which is refused once it is older than the
   trust domain's ``max_age`` (``federation.stale``): fail closed; it is not tried again
   for min(refresh interval, 30 s). A fetch takes only an uncompressed answer of at most
   1 MiB, whole within ``FETCH_TIMEOUT``.
4. A bundle whose ``spiffe_sequence`` is lower than the one held, or left out when the
   held one has one, is not taken (a rollback to keys since removed); an empty bundle,
   or one with no ``jwt-svid`` key, attests nothing (§4.1.3, JWT-SVID §6.2).
5. Bundles and SVIDs are parsed and validated by the ``spiffe`` package (``JwtBundle``,
   ``X509Bundle``, ``JwtSvid.parse_and_validate``); Tether adds the header allowlist
   (only ``alg``, ``kid``, ``typ``), duplicate-key-free JSON of canonical base64url, a
   numeric ``exp``, the injected clock, and single use keyed on the signing input (so a
   malleated or re-padded signature over the same claims is the same SVID).
6. This trust domain's own name cannot be federated.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, VerificationError
from cryptography.x509.verification import Store as CertificateStore
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle
from spiffe.bundle.jwt_bundle.errors import AuthorityNotFoundError, JwtBundleError
from spiffe.errors import PySpiffeError
from spiffe.svid.errors import InvalidAlgorithmError, InvalidTypeError, TokenExpiredError

# X509-SVID.md §5.2 leaf and chain checks, as the pinned ``spiffe`` package (0.3.2) makes
# them for its own ``X509Svid.parse`` (which also wants the private key, so it cannot
# validate a chain someone presents).
from spiffe.svid.x509_svid import (
    _extract_spiffe_id,
    _validate_chain,
    _validate_leaf_spiffe_id,
)

from tether._errors import (
    AttestationRejected,
    Conflict,
    IdentityRejected,
    NotFound,
    UsageError,
)
from tether.audit import Auditor
from tether.audit._rows import SETTING as SETTING_ROW
from tether.audit._rows import RowTampered
from tether.core._canonical import b64url
from tether.core._clock import Clock
from tether.core._risk import Control, risk_tags
from tether.core._spiffe_id import parse_spiffe_id, parse_trust_domain
from tether.core._verify import DEFAULT_LEEWAY, MAX_TOKEN_BYTES, strict_json
from tether.identity._registry import IdentityRegistry
from tether.store import Store

log = logging.getLogger("tether.federation")

#: The tagged setting that holds every federated trust domain.
SETTING = "federation"
HTTPS_WEB = "https_web"
STATIC = "static"
PROFILES = (HTTPS_WEB, STATIC)
#: When neither the operator nor the bundle says (Bundle §4.1.2: "e.g. every ~5 min").
DEFAULT_REFRESH = 300.0
MIN_REFRESH = 1.0
#: A bundle older than this (since it was last fetched) attests nothing.
DEFAULT_MAX_AGE = 3600.0
MAX_BUNDLE_BYTES = 1024 * 1024
MAX_CHAIN_BYTES = 64 * 1024
#: The whole fetch of a bundle (connect, headers and every byte of the body), not one read.
FETCH_TIMEOUT = 10.0
#: After a failed refresh, no new fetch before min(refresh interval, this): requests that
#: name a domain whose endpoint fails do not each drive an outbound fetch.
RETRY_BACKOFF = 30.0
_HEADERS = frozenset({"alg", "kid", "typ"})
_B64URL_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_KNOWN_KTY = frozenset({"EC", "RSA"})


class BundleError(ValueError):
    """A bundle document that cannot be used."""


@dataclass(frozen=True, slots=True)
class Bundle:
    """One trust domain's parsed bundle, as this node holds it."""

    trust_domain: str
    jwt: JwtBundle
    x509: X509Bundle
    sequence: int | None
    refresh_hint: float | None
    fetched_at: float
    digest: str

    @property
    def jwt_kids(self) -> list[str]:
        return sorted(self.jwt.jwt_authorities)


@dataclass(frozen=True, slots=True)
class ForeignClaims:
    """A verified foreign JWT-SVID."""

    spiffe_id: str
    trust_domain: str
    expires_at: float
    token_digest: str


def parse_bundle(trust_domain: str, raw: bytes, *, fetched_at: float) -> Bundle:
    """Parse a SPIFFE bundle (SPIFFE_Trust_Domain_and_Bundle.md §4) or raise BundleError.

    Entries with an unknown ``kty`` or ``use`` are ignored (§4.2.1, §4.2.2), as are
    ``jwt-svid`` keys without ``kid`` (JWT-SVID §6.1) and ``x509-svid`` entries without
    ``x5c`` (X509-SVID §6); of ``x5c`` only the first certificate is used."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        doc = strict_json(raw)
    except RecursionError:
        raise BundleError("bundle is JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise BundleError("bundle is not a JWK set with 'keys'")
    sequence = doc.get("spiffe_sequence")
    if sequence is not None and (
        isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0
    ):
        raise BundleError("spiffe_sequence must be a non-negative integer")
    hint = doc.get("spiffe_refresh_hint")
    if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint <= 0):
        raise BundleError("spiffe_refresh_hint must be a positive integer")
    jwt_keys: list[dict[str, Any]] = []
    authorities: set[x509.Certificate] = set()
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in _KNOWN_KTY:
            continue
        use = jwk.get("use")
        if use == "jwt-svid" and isinstance(jwk.get("kid"), str) and jwk["kid"]:
            jwt_keys.append(jwk)
        elif use == "x509-svid":
            chain = jwk.get("x5c")
            if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
                continue
            try:
                der = base64.b64decode(chain[0], validate=True)
                authorities.add(x509.load_der_x509_certificate(der))
            except (binascii.Error, ValueError):
                raise BundleError("an x509-svid entry's x5c is not a certificate") from None
    td = TrustDomain(trust_domain)
    try:
        jwt_bundle = JwtBundle.parse(td, json.dumps({"keys": jwt_keys}).encode())
    except (JwtBundleError, PySpiffeError) as exc:
        raise BundleError(f"bundle's jwt-svid keys do not parse: {str(exc)[:120]}") from None
    return Bundle(
        trust_domain=trust_domain,
        jwt=jwt_bundle,
        x509=X509Bundle(td, authorities),
        sequence=sequence,
        refresh_hint=float(hint) if hint is not None else None,
        fetched_at=fetched_at,
        digest=hashlib.sha256(raw).hexdigest(),
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: str) -> str:
    """An ``https_web`` endpoint is an https URL; plain http only to a loopback address
    (a bundle served on this very host, as in a test or beside a local SPIRE)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UsageError("the bundle endpoint must be an https:// URL")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise UsageError("the bundle endpoint must be https:// (http only to a loopback address)")
    if parts.username or parts.password or parts.fragment:
        raise UsageError("the bundle endpoint URL may carry no credentials or fragment")
    return url


def fetch_bundle(url: str) -> bytes:
    """GET an ``https_web`` bundle endpoint (certificate checked by the system's roots; no
    redirects followed). The answer must not be compressed (``Accept-Encoding: identity``;
    any other ``Content-Encoding`` is refused, so the size limit counts the bytes held) and
    must arrive whole within ``FETCH_TIMEOUT`` seconds (an endpoint dripping its answer is
    cut off)."""
    deadline = time.monotonic() + FETCH_TIMEOUT
    with (
        httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False) as client,
        client.stream(
            "GET", url, headers={"accept": "application/json", "accept-encoding": "identity"}
        ) as response,
    ):
        if response.status_code != 200:
            raise BundleError(f"bundle endpoint answered {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise BundleError(f"bundle endpoint answered a {encoding[:40]!r}-encoded body")
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > MAX_BUNDLE_BYTES:
                raise BundleError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
            if time.monotonic() > deadline:
                raise BundleError(f"bundle endpoint took longer than {FETCH_TIMEOUT:g} s")
        return bytes(body)


def _number(value: float | None, name: str, *, low: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
        raise UsageError(f"{name} must be a number of seconds of at least {low:g}")
    return float(value)


class Federation:
    """The federated trust domains of this trust domain (see the module's text)."""

    def __init__(
        self,
        store: Store,
        auditor: Auditor,
        clock: Clock,
        registry: IdentityRegistry,
        *,
        fetch: Callable[[str], bytes] = fetch_bundle,
    ) -> None:
        self._store = store
        self._auditor = auditor
        self._clock = clock
        self._registry = registry
        self._fetch = fetch
        self._bundles: dict[str, Bundle] = {}
        #: trust domain -> the digest of the configuration its cached bundle came from.
        self._sources: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        #: trust domain -> when this node last tried to fetch its bundle and failed.
        self._failed_at: dict[str, float] = {}
        #: The highest version of the setting this node has seen (a lower one is refused).
        self._version = 0
        self._lock = threading.Lock()

    # -- configuration (one tagged setting) --------------------------------------------------
    def config(self) -> dict[str, dict[str, Any]]:
        """Every federated trust domain's entry (raises RowTampered when the setting was
        written without the KEK, or is older than one this node has seen: no foreign SVID
        attests anything then)."""
        return self._read()[1]

    def _read(self) -> tuple[int, dict[str, dict[str, Any]]]:
        raw = self._auditor.rows.setting(SETTING)
        if raw is None:
            version, domains = 0, {}
        else:
            doc = json.loads(raw)
            if (
                isinstance(doc, dict)
                and set(doc) == {"version", "trust_domains"}
                and isinstance(doc["version"], int)
                and isinstance(doc["trust_domains"], dict)
            ):
                version, domains = doc["version"], doc["trust_domains"]
            else:  # written before the setting had a version
                version, domains = 0, doc
        with self._lock:
            if version < self._version:
                seen = self._version
            else:
                self._version, seen = version, version
        if version < seen:
            log.error(
                "the federation setting went back from version %d to %d: refused", seen, version
            )
            raise RowTampered(SETTING_ROW, SETTING)
        return version, domains

    def _save(self, domains: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Write the setting with the next version; its version and digest, for the
        change's receipt."""
        version = self._read()[0] + 1
        value = json.dumps({"trust_domains": domains, "version": version}, sort_keys=True)
        self._auditor.rows.set_setting(SETTING, value)
        return {
            "setting_version": version,
            "setting_digest": hashlib.sha256(value.encode()).hexdigest(),
        }

    def entry(self, trust_domain: str) -> dict[str, Any]:
        entry = self.config().get(trust_domain)
        if entry is None:
            raise NotFound(f"trust domain {trust_domain} is not federated")
        return entry

    def add(
        self,
        trust_domain: str,
        *,
        endpoint_url: str | None = None,
        bundle: bytes | None = None,
        refresh_interval: float | None = None,
        max_age: float | None = None,
        replace: bool = False,
        by: str = "operator",
    ) -> dict[str, Any]:
        """Federate ``trust_domain``: its bundle comes from ``endpoint_url`` (profile
        ``https_web``, fetched now: an endpoint that does not answer with a usable bundle
        is refused) or is the static ``bundle`` given. Links to identities survive a
        ``replace``."""
        try:
            parse_trust_domain(trust_domain)
        except IdentityRejected as exc:
            raise UsageError(exc.message) from None
        if trust_domain == self._registry.trust_domain:
            raise UsageError(
                f"{trust_domain} is this trust domain: it cannot be federated (a foreign "
                "bundle would then verify this trust domain's own IDs)"
            )
        if (endpoint_url is None) == (bundle is None):
            raise UsageError("give either a bundle endpoint URL or a static bundle")
        refresh = _number(refresh_interval, "refresh interval", low=MIN_REFRESH)
        age = _number(max_age, "max age", low=MIN_REFRESH) or DEFAULT_MAX_AGE
        if refresh is not None and refresh > age:
            raise UsageError("the refresh interval must not exceed the max age")
        now = self._clock.now()
        try:
            if endpoint_url is not None:
                check_endpoint_url(endpoint_url)
                raw = self._fetch(endpoint_url)
            else:
                assert bundle is not None
                raw = bundle
            parsed = parse_bundle(trust_domain, raw, fetched_at=now)
        except (BundleError, httpx.HTTPError) as exc:
            raise UsageError(f"no usable bundle for {trust_domain}: {exc}") from None
        entry: dict[str, Any] = {
            "trust_domain": trust_domain,
            "profile": HTTPS_WEB if endpoint_url is not None else STATIC,
            "endpoint_url": endpoint_url,
            "bundle": raw.decode() if endpoint_url is None else None,
            "refresh_interval": refresh,
            "max_age": age,
            "links": {},
            "added_at": now,
            "added_by": by,
        }
        with self._store.transaction():
            self._store.last_record()  # PostgreSQL: behind the log's lock, one change at a time
            domains = self.config()
            old = domains.get(trust_domain)
            if old is not None and not replace:
                raise Conflict(f"trust domain {trust_domain} is federated already")
            if old is not None:
                entry["links"] = old.get("links", {})
            domains[trust_domain] = entry
            saved = self._save(domains)
            self._auditor.append(
                "federation.add",
                chain=[by],
                effect="allow",
                detail={
                    "trust_domain": trust_domain,
                    "profile": entry["profile"],
                    "endpoint_url": endpoint_url,
                    "bundle_digest": parsed.digest,
                    "replaced": old is not None,
                    **saved,
                },
                risk_tags=list(risk_tags(Control.TRUST_DOMAIN, Control.AUDIT)),
            )
        self._read()  # this node has now seen the new version
        with self._lock:
            self._bundles[trust_domain] = parsed
            self._sources[trust_domain] = self._source_digest(entry)
            self._errors.pop(trust_domain, None)
            self._failed_at.pop(trust_domain, None)
        return entry

    def remove(self, trust_domain: str, *, by: str = "operator") -> dict[str, Any]:
        """Stop trusting ``trust_domain`` now, on every node (its links go with it)."""
        with self._store.transaction():
            self._store.last_record()  # PostgreSQL: behind the log's lock, one change at a time
            domains = self.config()
            entry = domains.pop(trust_domain, None)
            if entry is None:
                raise NotFound(f"trust domain {trust_domain} is not federated")
            saved = self._save(domains)
            self._auditor.append(
                "federation.remove",
                chain=[by],
                effect="allow",
                detail={
                    "trust_domain": trust_domain,
                    "links": sorted(entry.get("links", {})),
                    **saved,
                },
                risk_tags=list(risk_tags(Control.TRUST_DOMAIN, Control.OFFBOARDING)),
            )
        self._read()  # this node has now seen the new version
        self._forget(trust_domain)
        return entry

    def link(self, spiffe_id: str, foreign_id: str, *, by: str = "operator") -> dict[str, Any]:
        """Let SVIDs of ``foreign_id`` (in a federated trust domain) attest the registered
        identity ``spiffe_id``. One foreign ID attests at most one identity."""
        local = str(parse_spiffe_id(spiffe_id))
        foreign = parse_spiffe_id(foreign_id)
        with self._store.transaction():
            self._store.last_record()  # PostgreSQL: behind the log's lock, one change at a time
            identity = self._registry.get(local)
            domains = self.config()
            entry = domains.get(foreign.trust_domain)
            if entry is None:
                raise NotFound(f"trust domain {foreign.trust_domain} is not federated")
            links: dict[str, str] = entry.setdefault("links", {})
            if str(foreign) in links:
                raise Conflict(f"{foreign} attests {links[str(foreign)]} already")
            links[str(foreign)] = identity.spiffe_id
            saved = self._save(domains)
            self._auditor.append(
                "federation.link",
                chain=[by, identity.spiffe_id],
                effect="allow",
                detail={"spiffe_id": identity.spiffe_id, "attested_by": str(foreign), **saved},
                risk_tags=list(risk_tags(Control.WORKLOAD_IDENTITY, Control.TRUST_DOMAIN)),
            )
        self._read()  # this node has now seen the new version
        return {"spiffe_id": identity.spiffe_id, "attested_by": str(foreign)}

    def unlink(self, foreign_id: str, *, by: str = "operator") -> dict[str, Any]:
        foreign = parse_spiffe_id(foreign_id)
        with self._store.transaction():
            self._store.last_record()  # PostgreSQL: behind the log's lock, one change at a time
            domains = self.config()
            links = domains.get(foreign.trust_domain, {}).get("links", {})
            local = links.pop(str(foreign), None)
            if local is None:
                raise NotFound(f"{foreign} attests no identity")
            saved = self._save(domains)
            self._auditor.append(
                "federation.unlink",
                chain=[by, local],
                effect="allow",
                detail={"spiffe_id": local, "attested_by": str(foreign), **saved},
                risk_tags=list(risk_tags(Control.WORKLOAD_IDENTITY, Control.OFFBOARDING)),
            )
        self._read()  # this node has now seen the new version
        return {"spiffe_id": local, "attested_by": str(foreign)}

    def status(self) -> list[dict[str, Any]]:
        """Each federated trust domain with what this node holds of its bundle."""
        now = self._clock.now()
        out = []
        for name, entry in sorted(self.config().items()):
            with self._lock:
                held = self._bundles.get(name)
                error = self._errors.get(name)
            out.append(
                {
                    "trust_domain": name,
                    "profile": entry["profile"],
                    "endpoint_url": entry.get("endpoint_url"),
                    "refresh_interval": entry.get("refresh_interval"),
                    "max_age": entry["max_age"],
                    "links": dict(sorted(entry.get("links", {}).items())),
                    "bundle": None
                    if held is None
                    else {
                        "sequence": held.sequence,
                        "refresh_hint": held.refresh_hint,
                        "fetched_at": held.fetched_at,
                        "age": now - held.fetched_at,
                        "jwt_kids": held.jwt_kids,
                        "x509_authorities": len(held.x509.x509_authorities),
                        "digest": held.digest,
                    },
                    "last_error": error,
                }
            )
        return out

    # -- bundles (this node's memory) --------------------------------------------------------
    @staticmethod
    def _source_digest(entry: dict[str, Any]) -> str:
        source = {k: entry.get(k) for k in ("profile", "endpoint_url", "bundle", "added_at")}
        return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()

    def _forget(self, trust_domain: str) -> None:
        with self._lock:
            self._bundles.pop(trust_domain, None)
            self._sources.pop(trust_domain, None)
            self._errors.pop(trust_domain, None)
            self._failed_at.pop(trust_domain, None)

    def bundle(self, trust_domain: str) -> Bundle:
        """The bundle of a federated trust domain, refreshed when due; raises
        AttestationRejected when the domain is not federated or its bundle is stale."""
        entry = self.config().get(trust_domain)
        if entry is None:
            self._forget(trust_domain)
            raise AttestationRejected(
                f"trust domain {trust_domain} is not federated",
                code="federation.unknown_trust_domain",
            )
        now = self._clock.now()
        source = self._source_digest(entry)
        with self._lock:
            held = self._bundles.get(trust_domain)
            if held is not None and self._sources.get(trust_domain) != source:
                held = None  # the entry was replaced: its old bundle is no longer trusted
        if entry["profile"] == STATIC:
            if held is None:
                held = self._take(trust_domain, source, entry["bundle"].encode(), now, None)
            return held
        if (held is None or now >= held.fetched_at + self._interval(entry, held)) and (
            not self._backing_off(trust_domain, entry, held, now)
        ):
            held = self._refresh(trust_domain, entry, source, held, now)
        if held is None or now >= held.fetched_at + float(entry["max_age"]):
            raise AttestationRejected(
                f"the bundle of {trust_domain} is stale (no fresh bundle for "
                f"{float(entry['max_age']):g} s)",
                code="federation.stale",
            )
        return held

    @staticmethod
    def _interval(entry: dict[str, Any], held: Bundle | None) -> float:
        hint = held.refresh_hint if held is not None else None
        interval = entry.get("refresh_interval") or hint or DEFAULT_REFRESH
        return max(float(interval), MIN_REFRESH)

    def _backing_off(
        self, trust_domain: str, entry: dict[str, Any], held: Bundle | None, now: float
    ) -> bool:
        """Whether a fetch failed too recently to try again (min(refresh interval, 30 s))."""
        with self._lock:
            failed_at = self._failed_at.get(trust_domain)
        wait = min(self._interval(entry, held), RETRY_BACKOFF)
        return failed_at is not None and now < failed_at + wait

    def refresh(self, trust_domain: str) -> Bundle | None:
        """Fetch ``trust_domain``'s bundle now (``https_web``); the bundle held after it."""
        entry = self.config().get(trust_domain)
        if entry is None:
            raise NotFound(f"trust domain {trust_domain} is not federated")
        source = self._source_digest(entry)
        with self._lock:
            held = self._bundles.get(trust_domain)
        now = self._clock.now()
        if entry["profile"] == STATIC:
            return self._take(trust_domain, source, entry["bundle"].encode(), now, None)
        return self._refresh(trust_domain, entry, source, held, now)

    def _refresh(
        self,
        trust_domain: str,
        entry: dict[str, Any],
        source: str,
        held: Bundle | None,
        now: float,
    ) -> Bundle | None:
        try:
            raw = self._fetch(str(entry["endpoint_url"]))
            return self._take(trust_domain, source, raw, now, held)
        except (BundleError, httpx.HTTPError, OSError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("bundle of %s not refreshed: %s", trust_domain, why)
            with self._lock:
                self._errors[trust_domain] = why
                self._failed_at[trust_domain] = now
            return held

    def _take(
        self, trust_domain: str, source: str, raw: bytes, now: float, held: Bundle | None
    ) -> Bundle:
        bundle = parse_bundle(trust_domain, raw, fetched_at=now)
        if held is not None and held.sequence is not None:
            if bundle.sequence is None:
                raise BundleError(
                    f"spiffe_sequence went back from {held.sequence} to none (left out)"
                )
            if bundle.sequence < held.sequence:
                raise BundleError(
                    f"spiffe_sequence went back from {held.sequence} to {bundle.sequence}"
                )
        with self._lock:
            self._bundles[trust_domain] = bundle
            self._sources[trust_domain] = source
            self._errors.pop(trust_domain, None)
            self._failed_at.pop(trust_domain, None)
        return bundle

    # -- SVIDs ---------------------------------------------------------------------------
    def verify_jwt_svid(
        self, token: str, *, audience: str, leeway: float = DEFAULT_LEEWAY
    ) -> ForeignClaims:
        """Verify a JWT-SVID of a federated trust domain with that domain's bundle, or
        raise AttestationRejected with the reason's code."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise AttestationRejected("JWT-SVID is missing or too large", code="svid.malformed")
        header, unverified, signing_input = _unverified_parts(token)
        try:  # PyJWT's own checks of the header (crit, kid) before any key is looked up
            jwt.get_unverified_header(token)
            jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AttestationRejected("JWT-SVID is malformed", code="svid.malformed") from None
        if not isinstance(header, dict) or not set(header) <= _HEADERS:
            raise AttestationRejected(
                "JWT-SVID header may carry only alg, kid, typ", code="svid.header"
            )
        try:
            subject = parse_spiffe_id(str(unverified.get("sub", "")))
        except IdentityRejected as exc:
            raise AttestationRejected(
                f"JWT-SVID subject: {exc.message}", code="svid.subject"
            ) from None
        exp = unverified.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise AttestationRejected(
                "JWT-SVID has no exp, or one that is not a number (JWT-SVID §3)",
                code="svid.invalid",
            )
        bundle = self.bundle(subject.trust_domain)
        if not bundle.jwt.jwt_authorities:
            raise AttestationRejected(
                f"the bundle of {subject.trust_domain} holds no jwt-svid key: it attests nothing",
                code="federation.no_keys",
            )
        try:
            svid = JwtSvid.parse_and_validate(token, bundle.jwt, {audience})
        except AuthorityNotFoundError:
            raise AttestationRejected(
                f"JWT-SVID key id is not in the bundle of {subject.trust_domain}",
                code="svid.unknown_kid",
            ) from None
        except (InvalidAlgorithmError, InvalidTypeError):
            raise AttestationRejected(
                "JWT-SVID algorithm or typ is not allowed", code="svid.alg"
            ) from None
        except TokenExpiredError:
            raise AttestationRejected("JWT-SVID has expired", code="svid.expired") from None
        except PySpiffeError as exc:
            message, code = _library_reason(exc)
            raise AttestationRejected(message, code=code) from None
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise AttestationRejected(
                f"JWT-SVID is not valid: {type(exc).__name__}", code="svid.invalid"
            ) from None
        now = self._clock.now()
        if now >= svid.expiry + leeway:
            raise AttestationRejected("JWT-SVID has expired", code="svid.expired")
        return ForeignClaims(
            spiffe_id=str(subject),
            trust_domain=subject.trust_domain,
            expires_at=float(svid.expiry),
            # The signing input as signed, not the token's text: a re-encoded or malleated
            # signature ((r, n - s), padding) over the same claims is the same SVID.
            token_digest=b64url(hashlib.sha256(signing_input).digest()),
        )

    def verify_x509_svid(self, chain_pem: str) -> tuple[ForeignClaims, ec.EllipticCurvePublicKey]:
        """Verify an X.509-SVID of a federated trust domain (leaf first, then any
        intermediates, PEM) against that domain's X.509 authorities (RFC 5280 path
        validation by ``cryptography``, X509-SVID §5) or raise AttestationRejected.
        Returns the claims and the leaf's public key (EC P-256: the key this trust
        domain's SVIDs will be bound to)."""
        if not isinstance(chain_pem, str) or not chain_pem or len(chain_pem) > MAX_CHAIN_BYTES:
            raise AttestationRejected("X.509-SVID is missing or too large", code="svid.malformed")
        try:
            certs = x509.load_pem_x509_certificates(chain_pem.encode())
        except ValueError:
            raise AttestationRejected(
                "X.509-SVID is not a PEM certificate chain", code="svid.malformed"
            ) from None
        leaf = certs[0]
        try:
            _validate_chain(certs)
            named = _extract_spiffe_id(leaf)
            _validate_leaf_spiffe_id(named)
        except PySpiffeError as exc:
            raise AttestationRejected(
                f"X.509-SVID is not a valid leaf SVID: {str(exc)[:160]}", code="svid.x509"
            ) from None
        try:
            subject = parse_spiffe_id(str(named))
        except IdentityRejected as exc:
            raise AttestationRejected(
                f"X.509-SVID subject: {exc.message}", code="svid.subject"
            ) from None
        bundle = self.bundle(subject.trust_domain)
        authorities = list(bundle.x509.x509_authorities)
        if not authorities:
            raise AttestationRejected(
                f"the bundle of {subject.trust_domain} holds no X.509 authority: it attests "
                "nothing",
                code="federation.no_keys",
            )
        at = dt.datetime.fromtimestamp(self._clock.now(), tz=dt.UTC)
        verifier = (
            PolicyBuilder().store(CertificateStore(authorities)).time(at).build_client_verifier()
        )
        try:
            verifier.verify(leaf, certs[1:])
        except VerificationError as exc:
            raise AttestationRejected(
                f"X.509-SVID does not chain to the bundle of {subject.trust_domain}: "
                f"{str(exc)[:160]}",
                code="svid.chain",
            ) from None
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise AttestationRejected(
                "X.509-SVID key must be EC P-256 (the key this trust domain's SVIDs bind)",
                code="svid.key",
            )
        der = leaf.public_bytes(serialization.Encoding.DER)
        return (
            ForeignClaims(
                spiffe_id=str(subject),
                trust_domain=subject.trust_domain,
                expires_at=leaf.not_valid_after_utc.timestamp(),
                token_digest=hashlib.sha256(der).hexdigest(),
            ),
            key,
        )

    def linked_identity(self, foreign_id: str) -> str:
        """The registered identity ``foreign_id`` attests, or AttestationRejected."""
        parsed = parse_spiffe_id(foreign_id)
        links = self.config().get(parsed.trust_domain, {}).get("links", {})
        local = links.get(str(parsed))
        if not isinstance(local, str):
            raise AttestationRejected(
                f"{parsed} attests no identity registered here", code="federation.not_linked"
            )
        return local


def _segment(segment: str) -> bytes:
    """A base64url segment, decoded strictly (no padding, no other characters, no
    unused bits set)."""
    if _B64URL_SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if b64url(data) != segment:
        raise ValueError("not canonical base64url")
    return data


def _unverified_parts(token: str) -> tuple[Any, dict[str, Any], bytes]:
    """A compact JWS's header and payload, parsed with duplicate-free JSON, and its
    signing input (the bytes the signature covers); AttestationRejected when malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AttestationRejected("JWT-SVID is malformed", code="svid.malformed")
    try:
        header = strict_json(_segment(parts[0]))
        payload = strict_json(_segment(parts[1]))
    except RecursionError:
        raise AttestationRejected(
            "JWT-SVID is JSON nested too deep", code="svid.malformed"
        ) from None
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise AttestationRejected(
            f"JWT-SVID is malformed: {str(exc)[:80]}", code="svid.malformed"
        ) from None
    if not isinstance(payload, dict):
        raise AttestationRejected("JWT-SVID payload is not an object", code="svid.malformed")
    return header, payload, f"{parts[0]}.{parts[1]}".encode("ascii")


def _library_reason(exc: Exception) -> tuple[str, str]:
    """The reason of a refusal the ``spiffe`` package raised (it keeps PyJWT's error as
    the cause)."""
    cause = exc.__cause__
    if isinstance(cause, jwt.InvalidSignatureError):
        return "JWT-SVID signature does not verify", "svid.signature"
    if isinstance(cause, jwt.ExpiredSignatureError):
        return "JWT-SVID has expired", "svid.expired"
    if isinstance(cause, jwt.InvalidAudienceError | jwt.MissingRequiredClaimError):
        return "JWT-SVID audience is not this trust domain", "svid.audience"
    if isinstance(cause, jwt.InvalidAlgorithmError):
        return "JWT-SVID algorithm does not fit the key", "svid.alg"
    return f"JWT-SVID is not valid: {str(exc)[:120]}", "svid.invalid"
