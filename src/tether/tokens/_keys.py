"""The trust domain's signing keys: JWT signing keys and the X.509 CA.

Private keys are sealed at rest (:mod:`tether.tokens._seal`) and unsealed only
in memory. Rotation: the new key signs from the moment it exists; the old key
stays in the bundle, verifying what it signed, until everything it could have
signed has expired (``verify_until``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from tether._errors import InfrastructureError
from tether.core._verify import VerificationKeys, jwk_thumbprint
from tether.store import KeyRow, Store
from tether.tokens._seal import Sealer

JWT_USE = "jwt-svid"
CA_USE = "x509-ca"
MAX_SIGNED_LIFETIME = 24 * 3600.0
CA_LIFETIME = 365 * 24 * 3600.0
REFRESH_HINT = 300


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
        self._rows: list[KeyRow] | None = None
        self._generation = 0

    def invalidate(self) -> None:
        """Read the key rows from the store again on the next use."""
        self._generation += 1
        self._rows = None

    def _key_rows(self) -> list[KeyRow]:
        rows = self._rows if self.cached else None
        if rows is None:
            generation = self._generation
            rows = self._store.list_keys()
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
        row = KeyRow(
            kid=kid,
            use=use,
            sealed=self._sealer.seal(_pem(key), context=f"signing-key:{kid}"),
            public_jwk=json.dumps(jwk),
            cert_pem=cert_pem,
            created_at=now,
        )
        self._store.add_key(row)
        self.invalidate()
        self._private[kid] = key
        return row

    def rotate(self, use: str, now: float, *, overlap: float = MAX_SIGNED_LIFETIME) -> KeyRow:
        with self._store.transaction():
            for row in self._store.list_keys():
                if row.use == use and row.retired_at is None:
                    self._store.retire_key(row.kid, now, now + overlap)
                    self.invalidate()
            return self.create(use, now)

    def active(self, use: str) -> tuple[KeyRow, ec.EllipticCurvePrivateKey]:
        live = [r for r in self._store.list_keys() if r.use == use and r.retired_at is None]
        if not live:
            raise InfrastructureError(f"no active {use} key: run 'tether init'")
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
            if r.use == use and (r.retired_at is None or (r.verify_until or 0) > now)
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
        sequence = len(self._store.list_keys())
        return {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": REFRESH_HINT}
