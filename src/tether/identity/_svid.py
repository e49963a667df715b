"""Issuing SVIDs: JWT-SVIDs and X.509-SVIDs that standard SPIFFE libraries accept."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tether.core._spiffe_id import SpiffeID
from tether.core._verify import jwk_thumbprint, low_s
from tether.tokens._keys import JWT_USE, KeyRing, public_jwk

DEFAULT_SVID_TTL = 3600.0
MAX_SVID_TTL = 24 * 3600.0


def issue_jwt_svid(
    keyring: KeyRing,
    spiffe_id: SpiffeID,
    *,
    audience: list[str],
    now: float,
    ttl: float = DEFAULT_SVID_TTL,
    bound_key: ec.EllipticCurvePublicKey | None = None,
) -> tuple[str, str, float]:
    """Return ``(token, jti, expires_at)``. Header: ``alg``, ``kid``, ``typ`` only (§2)."""
    row, key = keyring.active(JWT_USE)
    expires_at = now + min(ttl, MAX_SVID_TTL)
    jti = str(uuid.uuid4())
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": audience,
        "iat": int(now),
        "exp": int(expires_at),
        "jti": jti,
        "iss": f"spiffe://{keyring.trust_domain}",
    }
    if bound_key is not None:
        claims["cnf"] = {"jkt": jwk_thumbprint(public_jwk(bound_key))}
    token = low_s(
        jwt.encode(claims, key, algorithm="ES256", headers={"kid": row.kid, "typ": "JWT"})
    )
    return token, jti, expires_at


def issue_x509_svid(
    keyring: KeyRing,
    spiffe_id: SpiffeID,
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: float,
    ttl: float = DEFAULT_SVID_TTL,
) -> tuple[x509.Certificate, x509.Certificate]:
    """Return ``(leaf, ca)``: a leaf per X509-SVID.md §4 for ``public_key``."""
    ca_cert, ca_key = keyring.ca()
    start = dt.datetime.fromtimestamp(now - 30, tz=dt.UTC)
    end = dt.datetime.fromtimestamp(now + min(ttl, MAX_SVID_TTL), tz=dt.UTC)
    end = min(end, ca_cert.not_valid_after_utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return leaf, ca_cert


def pem_chain(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
