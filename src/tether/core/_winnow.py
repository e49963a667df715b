"""Data fingerprints: winnowed word k-gram hashes of content labelled confidential.

When a task reads content labelled confidential or secret (:mod:`tether.core._labels`),
its text is fingerprinted the way document-fingerprinting systems do it (Schleimer,
Wilkerson and Aiken, "Winnowing", SIGMOD 2003): the text is cut into words (letters
and digits, case folded: punctuation, spacing, line breaks and markup do not count),
every run of :data:`K` consecutive words is hashed, and of every :data:`WINDOW`
consecutive hashes the smallest is kept. Any passage of at least ``K + WINDOW - 1``
words shared with a fingerprinted text therefore shares at least one kept hash,
however it is re-wrapped or re-punctuated, while a task keeps a few hashes per
hundred words rather than the text.

A text of fewer than ``K`` words (a title, an account reference) is kept whole, as one
hash of all its words (exact data match); one such match counts, whereas a longer
text needs :data:`MIN_HITS` distinct hashes before a sink argument is said to carry it
(a stock phrase shared by chance is one). The hashes a task has already sent out count
towards that (the flow state keeps them), so a text cut into pieces of a few words,
one per call, is caught at its second piece.

Hashes are BLAKE2b, 64 bits; the lowest bit tells a whole short text (1) from a
k-gram (0).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tether.core._fingerprints import percent_decode
from tether.core._scanning import Deadline, check, linear

K = 6
WINDOW = 4
MIN_HITS = 2
#: A text with fewer words than this is not fingerprinted (too short to tell from chance).
MIN_WORDS = 4
#: The words of one text read for fingerprints (past this, the rest is not fingerprinted).
MAX_WORDS = 200_000
MAX_DEPTH = 12

_WORD = linear(r"[\p{L}\p{N}]+", capture=False)
# Runs that may be encoded text: base64 (standard or URL-safe, possibly wrapped over
# lines as MIME does) and hex. Each is decoded and read as a text of its own.
_B64_RUN = r"[A-Za-z0-9+/_-]{16,}={0,2}"
_BASE64 = linear(rf"{_B64_RUN}(?:[ \t\r\n]+{_B64_RUN})*", capture=False)
_HEX = linear(r"(?:[0-9A-Fa-f]{2}){12,}", capture=False)
#: Encoded runs decoded per argument (past this, the rest is not decoded).
MAX_DECODED = 64


def words(text: str, deadline: Deadline | None = None) -> list[str]:
    """The words of ``text``, case folded (a linear pass)."""
    out = [m.group().casefold() for m in _WORD.finditer(text)]
    check(deadline)
    return out[:MAX_WORDS]


def _hash(items: list[str], short: bool) -> int:
    value = int.from_bytes(
        hashlib.blake2b("\x1f".join(items).encode(), digest_size=8).digest(), "big"
    )
    return (value | 1) if short else (value & ~1)


def _grams(tokens: list[str], deadline: Deadline | None) -> list[int]:
    out: list[int] = []
    for start in range(len(tokens) - K + 1):
        out.append(_hash(tokens[start : start + K], False))
        if start % 4096 == 4095:
            check(deadline)
    return out


def fingerprint(text: str, deadline: Deadline | None = None) -> set[int]:
    """The fingerprints kept of ``text`` (empty when it has fewer than
    :data:`MIN_WORDS` words)."""
    tokens = words(text, deadline)
    if len(tokens) < MIN_WORDS:
        return set()
    if len(tokens) < K:
        return {_hash(tokens, True)}
    grams = _grams(tokens, deadline)
    if len(grams) <= WINDOW:
        return {min(grams)}
    kept: set[int] = set()
    for start in range(len(grams) - WINDOW + 1):
        kept.add(min(grams[start : start + WINDOW]))
    check(deadline)
    return kept


def _text(data: bytes) -> str | None:
    """``data`` as text when it is UTF-8 and mostly printable (else not text)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(1 for c in text if c.isprintable() or c.isspace())
    return text if text and printable >= 0.9 * len(text) else None


def decoded(text: str) -> list[str]:
    """The texts encoded inside ``text``: percent-encoding, base64 and hex runs."""
    out: list[str] = []
    if "%" in text:
        plain = percent_decode(text)
        if plain != text:
            out.append(plain)
    for match in _HEX.finditer(text):
        found = _text(bytes.fromhex(match.group()))
        if found:
            out.append(found)
        if len(out) >= MAX_DECODED:
            return out
    for match in _BASE64.finditer(text):
        run = "".join(match.group().split()).rstrip("=")
        run = run.replace("-", "+").replace("_", "/")
        try:
            data = base64.b64decode(run + "=" * (-len(run) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        found = _text(data)
        if found:
            out.append(found)
        if len(out) >= MAX_DECODED:
            break
    return out


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if depth > MAX_DEPTH:
        return
    if isinstance(value, Mapping):
        for name, item in value.items():
            yield str(name)
            yield from _strings(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item, depth + 1)
    elif isinstance(value, str):
        yield value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield str(value)


def carried(value: Any, prints: Mapping[int, str], min_hits: int = MIN_HITS) -> dict[int, str]:
    """The fingerprints in ``prints`` that an argument carries (empty: none, or fewer
    than ``min_hits`` k-gram hashes and no whole short text). Every k-gram of its text
    is hashed (not only the kept ones), and every run of ``MIN_WORDS`` to ``K - 1``
    words for whole short texts; a value split across the strings of one argument is
    read as one text."""
    if not prints:
        return {}
    tokens: list[str] = []
    streams: list[list[str]] = []
    for text in _strings(value):
        tokens.extend(words(text))
        streams.extend(words(inner) for inner in decoded(text))
    hits: dict[int, str] = {}
    for stream in (tokens, *streams):
        _match(stream, prints, hits)
    if long_hits(hits) < min_hits and not any(h & 1 for h in hits):
        return {}
    return hits


def _match(tokens: list[str], prints: Mapping[int, str], hits: dict[int, str]) -> None:
    if len(tokens) < MIN_WORDS:
        return
    for gram in _grams(tokens, None):
        if gram in prints:
            hits[gram] = prints[gram]
    for size in range(MIN_WORDS, K):
        for start in range(len(tokens) - size + 1):
            short = _hash(tokens[start : start + size], True)
            if short in prints:
                hits[short] = prints[short]


def long_hits(hits: Iterable[int]) -> int:
    """How many of ``hits`` are k-gram hashes (not whole short texts)."""
    return sum(1 for h in hits if not h & 1)


def fingerprints_of(texts: Iterable[tuple[str, str]], deadline: Deadline | None) -> dict[int, str]:
    """Fingerprints of several ``(text, tag)``: each kept hash names its text's tag."""
    out: dict[int, str] = {}
    for text, tag in texts:
        for value in fingerprint(text, deadline):
            out.setdefault(value, tag)
    return out
