"""The trust domain's signing keys: JWT signing keys and the X.509 CA.

Private keys are sealed at rest (:mod:`tether.tokens._seal`) and unsealed only
in memory. Rotation: the new key signs from the moment it exists; the old key
stays in the bundle, verifying what it signed, until everything it could have
signed has expired (``verify_until``). Revocation (:meth:`KeyRing.revoke`): the key
verifies nothing from that moment on.

The key set is authenticated under the KEK: each row's public key and metadata (kid,
use, certificate, creation, retirement, ``verify_until``, revocation) carry an HMAC
under a key derived from the KEK (:meth:`tether.tokens.Sealer.mac`). A row whose tag
is missing or wrong (one added or edited by someone who can write the store but does
not hold the KEK) is ignored: it never signs nor verifies anything, it is logged at
error level once per process and ``tether keys list`` shows it as unauthenticated.
Revocations this process has seen stay in force in its memory even if the row is
later put back to an older authenticated state.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from tether._errors import InfrastructureError, NotFound, UsageError
from tether.core._canonical import canonical_json
from tether.core._verify import VerificationKeys, jwk_thumbprint
from tether.store import KeyRow, Store
from tether.tokens._seal import Sealer

JWT_USE = "jwt-svid"
CA_USE = "x509-ca"
MAX_SIGNED_LIFETIME = 24 * 3600.0
CA_LIFETIME = 365 * 24 * 3600.0
REFRESH_HINT = 300
#: The purpose of the KEK-derived key that authenticates key rows.
KEY_SET_MAC = "signing-key-set v1"

log = logging.getLogger("tether.keys")


def key_material(row: KeyRow, trust_domain: str) -> bytes:
    """What a key row's tag covers: everything but the tag itself (the sealed private
    key by its digest; it is also bound to its kid by the seal)."""
    return canonical_json(
        {
            "td": trust_domain,
            "kid": row.kid,
            "use": row.use,
            "sealed": hashlib.sha256(row.sealed).hexdigest(),
            "public_jwk": row.public_jwk,
            "cert_pem": row.cert_pem,
            "created_at": row.created_at,
            "retired_at": row.retired_at,
            "verify_until": row.verify_until,
            "revoked_at": row.revoked_at,
        }
    )


def key_status(row: KeyRow, now: float) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.retired_at is None:
        return "active"
    return "retired" if (row.verify_until or 0) > now else "expired"


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key))
    return {k: jwk[k] for k in ("kty", "crv", "x", "y")}


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, trust_domain: str, now: float
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} CA"),
        ]
    )
    start = dt.datetime.fromtimestamp(now - 60, tz=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=CA_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


class KeyRing:
    """Loads, creates and rotates the trust domain's keys."""

    def __init__(self, store: Store, sealer: Sealer, trust_domain: str) -> None:
        self._store = store
        self._sealer = sealer
        self.trust_domain = trust_domain
        self._private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._public: dict[str, ec.EllipticCurvePublicKey] = {}
        #: Keep the key rows between calls (a node told of key changes by events, see
        #: :mod:`tether.cluster`); a lone process reads them on every call.
        self.cached = False
        #: When set (a node's :meth:`tether.cluster.NodeMemory.in_sync`), the cached rows
        #: stand only while it answers True; otherwise every call reads the store, as for
        #: token revocations.
        self.fresh: Callable[[], bool] | None = None
        self._rows: list[KeyRow] | None = None
        self._generation = 0
        #: Rows that failed authentication: kid -> why (shown by ``tether keys list``).
        self.rejected: dict[str, str] = {}
        self._revoked: set[str] = set()

    def derived_key(self, purpose: str) -> bytes:
        """A key derived from the KEK for ``purpose`` (see :meth:`Sealer.derive`)."""
        return self._sealer.derive(purpose)

    def invalidate(self) -> None:
        """Read the key rows from the store again on the next use."""
        self._generation += 1
        self._rows = None

    # -- authentication of the key set ---------------------------------------------------
    def seal_row(self, row: KeyRow) -> KeyRow:
        """``row`` with its tag under the KEK."""
        mac = self._sealer.mac(KEY_SET_MAC, key_material(row, self.trust_domain))
        return msgspec.structs.replace(row, mac=mac)

    def authentic(self, row: KeyRow) -> bool:
        return self._sealer.mac_ok(KEY_SET_MAC, key_material(row, self.trust_domain), row.mac)

    def _authenticated(self, rows: list[KeyRow]) -> list[KeyRow]:
        good: list[KeyRow] = []
        for row in rows:
            if self.authentic(row):
                if row.revoked_at is not None:
                    self._revoked.add(row.kid)
                good.append(row)
                continue
            why = "no authentication tag" if row.mac is None else "authentication tag is wrong"
            if self.rejected.get(row.kid) != why:
                self.rejected[row.kid] = why
                log.error("signing key row %s ignored: %s (written without the KEK?)", row.kid, why)
        return good

    def all_keys(self) -> list[tuple[KeyRow, bool]]:
        """Every key row of the store, each with whether it is authentic."""
        rows = self._store.list_keys()
        authentic = {r.kid for r in self._authenticated(rows)}
        return [(r, r.kid in authentic) for r in rows]

    def history(self, use: str = JWT_USE) -> list[KeyRow]:
        """Every authentic key of ``use``, retired and revoked ones too (for the audit log,
        whose old heads they signed)."""
        return [r for r in self._authenticated(self._store.list_keys()) if r.use == use]

    def adopt(self, now: float) -> list[str]:
        """Authenticate the key rows of a store made before rows carried a tag: only when
        no row is authentic yet (the first open after the upgrade), and only rows with no
        tag at all. Returns the kids adopted."""
        rows = self._store.list_keys()
        if any(self.authentic(r) for r in rows):
            raise UsageError("the key set is authenticated already: nothing to adopt")
        # A store whose receipts already carry tags was made (or adopted) by this version:
        # its key rows were tagged too, so untagged rows now are a store writer's doing,
        # not an upgrade (adopting them would bless the writer's keys).
        if next(iter(self._store.iter_record_macs()), None) is not None:
            raise UsageError(
                "the receipts are authenticated already, so untagged key rows were not left "
                "by an upgrade: the store has been written without the KEK; restore it from "
                "a backup instead of adopting its keys"
            )
        adopted = []
        with self._store.transaction():
            for row in rows:
                if row.mac is None:
                    self._store.update_key(self.seal_row(row))
                    adopted.append(row.kid)
        self.rejected.clear()
        self.invalidate()
        return adopted

    def _revoked_now(self, row: KeyRow) -> bool:
        return row.revoked_at is not None or row.kid in self._revoked

    def _key_rows(self) -> list[KeyRow]:
        fresh = self.fresh
        rows = self._rows if self.cached and (fresh is None or fresh()) else None
        if rows is None:
            generation = self._generation
            rows = self._authenticated(self._store.list_keys())
            # Cached only if no change was announced while they were read.
            if self.cached and generation == self._generation:
                self._rows = rows
        return rows

    def __repr__(self) -> str:
        return f"KeyRing({self.trust_domain!r}, <private keys hidden>)"

    def create(self, use: str, now: float) -> KeyRow:
        key = new_ec_key()
        jwk = public_jwk(key.public_key())
        kid = jwk_thumbprint(jwk)
        cert_pem = None
        if use == CA_USE:
            cert = _ca_certificate(key, self.trust_domain, now)
            cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        row = self.seal_row(
            KeyRow(
                kid=kid,
                use=use,
                sealed=self._sealer.seal(_pem(key), context=f"signing-key:{kid}"),
                public_jwk=json.dumps(jwk),
                cert_pem=cert_pem,
                created_at=now,
            )
        )
        self._store.add_key(row)
        self.invalidate()
        self._private[kid] = key
        return row

    def rotate(self, use: str, now: float, *, overlap: float = MAX_SIGNED_LIFETIME) -> KeyRow:
        with self._store.transaction():
            for row in self._authenticated(self._store.list_keys()):
                if row.use == use and row.retired_at is None:
                    retired = msgspec.structs.replace(
                        row, retired_at=now, verify_until=now + overlap
                    )
                    self._store.update_key(self.seal_row(retired))
                    self.invalidate()
            return self.create(use, now)

    def revoke(self, kid: str, now: float) -> tuple[KeyRow, KeyRow | None]:
        """Revoke ``kid`` now: it verifies nothing more (tokens, SVIDs, heads signed after
        this moment). A key still signing is first replaced by a new one (returned)."""
        with self._store.transaction():
            row = next((r for r in self.history(use=JWT_USE) if r.kid == kid), None)
            row = row or next((r for r in self.history(use=CA_USE) if r.kid == kid), None)
            if row is None:
                raise NotFound(f"no authentic signing key {kid}")
            if row.revoked_at is not None:
                return row, None
            successor = None
            if row.retired_at is None:
                successor = self.rotate(row.use, now, overlap=0.0)
                row = next(r for r in self.history(use=row.use) if r.kid == kid)
            revoked = self.seal_row(
                msgspec.structs.replace(
                    row,
                    revoked_at=now,
                    retired_at=row.retired_at or now,
                    verify_until=min(row.verify_until or now, now),
                )
            )
            self._store.update_key(revoked)
            self._revoked.add(kid)
            self._private.pop(kid, None)
            self._public.pop(kid, None)
            self.invalidate()
            return revoked, successor

    def active(self, use: str) -> tuple[KeyRow, ec.EllipticCurvePrivateKey]:
        live = [
            r
            for r in self._authenticated(self._store.list_keys())
            if r.use == use and r.retired_at is None and not self._revoked_now(r)
        ]
        if (
            not live
            and self.rejected
            and not any(self.authentic(r) for r in self._store.list_keys())
        ):
            raise InfrastructureError(
                "no key row is authentic: wrong key-encryption key (it can neither unseal "
                "nor authenticate the key set), or a store made before keys were "
                "authenticated ('tether keys adopt')"
            )
        if not live:
            raise InfrastructureError(
                f"no active authentic {use} key: run 'tether init' (or 'tether keys adopt' "
                "once after upgrading a store made before keys were authenticated)"
            )
        row = live[-1]
        key = self._private.get(row.kid)
        if key is None:
            pem = self._sealer.unseal(row.sealed, context=f"signing-key:{row.kid}")
            loaded = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise InfrastructureError(f"key {row.kid} is not an EC key")
            key = self._private[row.kid] = loaded
        return row, key

    def ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        row, key = self.active(CA_USE)
        assert row.cert_pem is not None
        return x509.load_pem_x509_certificate(row.cert_pem.encode()), key

    def trusted(self, use: str, now: float) -> list[KeyRow]:
        """Keys of ``use`` that may still verify: active, or retired within their overlap."""
        return [
            r
            for r in self._key_rows()
            if r.use == use
            and not self._revoked_now(r)
            and (r.retired_at is None or (r.verify_until or 0) > now)
        ]

    def verification_keys(self, now: float) -> VerificationKeys:
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for row in self.trusted(JWT_USE, now):
            public = self._public.get(row.kid)
            if public is None:
                loaded = ECAlgorithm.from_jwk(row.public_jwk)
                assert isinstance(loaded, ec.EllipticCurvePublicKey)
                public = self._public[row.kid] = loaded
            keys[row.kid] = public
        return VerificationKeys(trust_domain=self.trust_domain, keys=keys)

    def jwks(self, now: float) -> dict[str, Any]:
        """JWKS of the JWT signing keys (for OAuth-style verifiers)."""
        return {
            "keys": [
                {**json.loads(r.public_jwk), "kid": r.kid, "use": "sig", "alg": "ES256"}
                for r in self.trusted(JWT_USE, now)
            ]
        }

    def spiffe_bundle(self, now: float) -> dict[str, Any]:
        """The SPIFFE trust bundle (SPIFFE_Trust_Domain_and_Bundle.md §4)."""
        keys: list[dict[str, Any]] = []
        for r in self.trusted(CA_USE, now):
            assert r.cert_pem is not None
            der = x509.load_pem_x509_certificate(r.cert_pem.encode()).public_bytes(
                serialization.Encoding.DER
            )
            keys.append(
                {
                    **json.loads(r.public_jwk),
                    "use": "x509-svid",
                    "x5c": [base64.b64encode(der).decode()],
                }
            )
        for r in self.trusted(JWT_USE, now):
            keys.append({**json.loads(r.public_jwk), "kid": r.kid, "use": "jwt-svid"})
        # §4.1.1: it changes on every change of the content and never goes back. A key
        # enters the bundle when its row is made and leaves it when revoked or past its
        # verify_until; rows are never deleted and each of these steps happens once.
        sequence = sum(
            1
            + (r.retired_at is not None)
            + self._revoked_now(r)
            + (r.retired_at is not None and (r.verify_until or 0) <= now)
            for r in self._key_rows()
        )
        return {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": REFRESH_HINT}
