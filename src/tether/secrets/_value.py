"""A secret value in memory: never printed, logged or serialised by accident."""

from __future__ import annotations

import hmac
from typing import NoReturn


class SecretValue:
    """Holds a credential's bytes. ``repr``/``str``/``format`` show ``<hidden>``; pickling is
    refused, JSON encoders do not know the type, and it never equals a plain string, so a
    value only leaves through :meth:`reveal` (or :meth:`reveal_bytes`), where it is meant to."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        self._value = value.encode() if isinstance(value, str) else bytes(value)

    def reveal(self) -> str:
        return self._value.decode()

    def reveal_bytes(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "SecretValue(<hidden>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretValue):
            return hmac.compare_digest(self._value, other._value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("SecretValue", len(self._value)))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretValue cannot be pickled")
