"""Sealing private keys at rest: AES-256-GCM under a key-encryption key (KEK).

The KEK comes from ``TETHER_KEK`` (base64url, 32 bytes) or from a key file
created with mode 0600 under the Tether home. Sealed blobs are
``b"tk1" || nonce(12) || ciphertext+tag`` with the key id as associated data,
so a blob cannot be swapped onto another key's row.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tether._errors import InfrastructureError, UsageError
from tether.core._canonical import b64url, b64url_decode

KEK_ENV = "TETHER_KEK"
KEK_FILE = "kek.key"
_MAGIC = b"tk1"


class Sealer:
    """Seals and unseals secrets under one KEK. Never exposes the KEK."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise UsageError("the key-encryption key must be 32 bytes")
        self._aead = AESGCM(kek)
        self._mac_keys: dict[str, hmac.HMAC] = {}
        self._mac_root = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"tether mac root v1"
        ).derive(kek)

    def __repr__(self) -> str:
        return "Sealer(<kek hidden>)"

    def seal(self, plaintext: bytes, *, context: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return _MAGIC + nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def mac(self, purpose: str, data: bytes) -> str:
        """HMAC-SHA256 (hex) of ``data`` under a key derived from the KEK for ``purpose``
        (each purpose its own key): whoever can write the store but not read the KEK
        can neither forge nor move a tag."""
        keyed = self._mac_keys.get(purpose)
        if keyed is None:
            key = hmac.new(self._mac_root, purpose.encode(), hashlib.sha256).digest()
            keyed = self._mac_keys[purpose] = hmac.new(key, digestmod=hashlib.sha256)
        tag = keyed.copy()
        tag.update(data)
        return tag.hexdigest()

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key derived from the KEK for ``purpose`` (one key per purpose), for
        state Tether hands out and must recognise again (an MCP ``requestState``): every
        node under the same KEK derives the same key."""
        return hmac.new(self._mac_root, b"derive\n" + purpose.encode(), hashlib.sha256).digest()

    def mac_ok(self, purpose: str, data: bytes, tag: str | None) -> bool:
        """Whether ``tag`` is :meth:`mac` of ``data`` (constant-time)."""
        return tag is not None and hmac.compare_digest(self.mac(purpose, data), tag)

    def unseal(self, blob: bytes, *, context: str) -> bytes:
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 12 + 16:
            raise InfrastructureError(f"sealed blob for {context} is malformed")
        nonce, body = blob[3:15], blob[15:]
        try:
            return self._aead.decrypt(nonce, body, context.encode())
        except InvalidTag:
            raise InfrastructureError(
                f"cannot unseal {context}: wrong key-encryption key or tampered blob"
            ) from None


def load_kek(home: Path, *, create: bool = False) -> bytes:
    """The KEK from the environment, else from ``home/kek.key`` (created if asked)."""
    env = os.environ.get(KEK_ENV)
    if env:
        try:
            kek = b64url_decode(env.strip())
        except ValueError:
            raise UsageError(f"{KEK_ENV} must be base64url (no padding) of 32 bytes") from None
        if len(kek) != 32:
            raise UsageError(f"{KEK_ENV} must decode to 32 bytes")
        return kek
    path = home / KEK_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise UsageError(f"{path} must not be readable by group or others (mode {mode:o})")
        data = path.read_text().strip()
        try:
            return b64url_decode(data)
        except ValueError:
            raise InfrastructureError(f"{path} is corrupt") from None
    if not create:
        raise UsageError(f"no key-encryption key: set {KEK_ENV} or run 'tether init'")
    kek = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(b64url(kek) + "\n")
    return kek
