"""Envelope encryption of secret values under a key-encryption key held by a KMS.

Each secret version gets its own random 256-bit data key. The value is sealed
with AES-256-GCM under that data key, with ``secret:<name>:<version>`` as
associated data (so a sealed value cannot be moved onto another row), and the
data key is wrapped by the :class:`KMS` under its key-encryption key with the
same context. Only the wrapped data key ever reaches the KMS; a KMS backed by
a cloud service or an HSM implements :meth:`KMS.wrap`/:meth:`KMS.unwrap`.

:class:`LocalKMS` is the embedded implementation: the trust domain's KEK
(``$TETHER_KEK`` or the 0600 ``kek.key`` file, see :mod:`tether.tokens._seal`),
through the same :class:`~tether.tokens.Sealer` that seals signing keys.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tether._errors import InfrastructureError
from tether.tokens import Sealer, load_kek

_MAGIC = b"ts1"


class KMS(Protocol):
    """Wraps and unwraps data keys under a key-encryption key it never reveals."""

    @property
    def key_id(self) -> str: ...

    def wrap(self, data_key: bytes, *, context: str) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, context: str) -> bytes: ...


class LocalKMS:
    """The KEK from ``$TETHER_KEK`` or the home's ``kek.key`` (via :class:`Sealer`)."""

    def __init__(self, sealer: Sealer, *, key_id: str = "local") -> None:
        self._sealer = sealer
        self._key_id = key_id

    @classmethod
    def from_home(cls, home: str | Path) -> LocalKMS:
        return cls(Sealer(load_kek(Path(home))))

    def __repr__(self) -> str:
        return f"LocalKMS({self._key_id!r}, <kek hidden>)"

    @property
    def key_id(self) -> str:
        return self._key_id

    def wrap(self, data_key: bytes, *, context: str) -> bytes:
        return self._sealer.seal(data_key, context=f"data-key:{context}")

    def unwrap(self, wrapped: bytes, *, context: str) -> bytes:
        return self._sealer.unseal(wrapped, context=f"data-key:{context}")


def seal_value(kms: KMS, value: bytes, *, context: str) -> tuple[bytes, bytes]:
    """``(sealed value, wrapped data key)`` for ``value``."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = secrets.token_bytes(12)
    sealed = _MAGIC + nonce + AESGCM(data_key).encrypt(nonce, value, context.encode())
    return sealed, kms.wrap(data_key, context=context)


def open_value(kms: KMS, sealed: bytes, wrapped: bytes, *, context: str) -> bytes:
    """The plaintext of a sealed value, or :class:`InfrastructureError` (never the bytes)."""
    data_key = kms.unwrap(wrapped, context=context)
    if not sealed.startswith(_MAGIC) or len(sealed) < len(_MAGIC) + 12 + 16:
        raise InfrastructureError(f"sealed value of {context} is malformed")
    nonce, body = sealed[3:15], sealed[15:]
    try:
        return AESGCM(data_key).decrypt(nonce, body, context.encode())
    except InvalidTag:
        raise InfrastructureError(
            f"cannot unseal {context}: wrong data key or tampered value"
        ) from None
