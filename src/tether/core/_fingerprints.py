"""Brokered values found however they are written: encoded, split, reversed or cut.

An agent (or an upstream that was handed a credential) can carry a brokered value out
without writing it as it is: hex, base64 or base64url, base32, percent-encoded, split by
spaces, new lines or dashes, reversed, or cut in pieces spread over several strings.
Decoding every candidate run of the text is work an attacker chooses; instead, each
brokered value is turned, once, into **fingerprints**: the literal strings it becomes
under each encoding, and the windows of its normalised form a piece of it must contain.
The text is then normalised, in linear passes (``str.translate``), into two **views**:

- the *compact* view: white space and zero-width characters removed (base64 and
  base64url fingerprints are looked for here: line-wrapped base64 joins up);
- the *normal* view: white space and separators (``- _ . , : ; | / \\ ' " ` + * = ~``)
  removed and ASCII letters lower-cased (the value's normalised form, its reverse, its
  hex and base32 encodings and its windows are looked for here),

and, when the text holds ``%`` escapes, both views again of the percent-decoded text.
Each view is searched in one RE2 pass for all fingerprints of all values at once
(an alternation of literals: linear in the text, whatever it is).

**Partial matches.** A value whose normalised form has ``m`` characters is found from any
piece of ``max(8, ceil(m / 2))`` characters or more (capped at 48: a long value, a
private key, is found from any 48 characters of it): a value cut in two, wherever the cut
and in whatever order the pieces come, leaves one piece at least half as long. The same
holds for its hex encoding. A value cut in three or more scattered pieces each below that
threshold, or a base64 or base32 encoding cut in pieces, is not recognised (the pieces
in order, once the strings of one call are joined, are).

Base64 and base32 fingerprints are the encoded characters that depend on the value's
bytes alone, for each alignment of the value in the encoded data (three for base64,
five for base32), so the value is found encoded inside longer data too. Percent-decoding
maps each ``%XX`` to the code point ``XX`` (values are compared as their UTF-8 bytes read
as Latin-1 there, exact for ASCII values).

A match in a view is redacted in the original text: the view's positions map back to
the original characters they came from (worked out only when a view matches).
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.core._scanning import Deadline, check, linear

if TYPE_CHECKING:
    from tether.core._scanning import LinearPattern

#: The shortest fingerprint looked for (shorter ones would match ordinary text).
MIN_PRINT = 8
#: A piece of a value at least this long is always found (for values at least twice as long).
MAX_PIECE = 48
#: Window length for long values: pieces of ``MAX_PIECE`` are found by windows this long,
#: taken every ``MAX_PIECE - WINDOW + 1`` characters (fewer literals for long values).
WINDOW = 24
#: How many (value, offset) a window may stand for (a value repeating itself, or many
#: values sharing a piece): past it, the window still matches but fewer extensions are tried.
MAX_OWNERS = 4
REDACTED = "[REDACTED:brokered]"
#: RE2's memory for one view's alternation of fingerprints: a few hundred values make
#: thousands of literals, whose DFA needs more than a single pattern's default (past the
#: budget RE2 stays linear, but an order of magnitude slower).
PRINTS_MEMORY = 64 << 20

#: White space (Python's ``str.isspace``), zero-width characters and NUL: nothing a reader
#: sees between two halves of a value.
SPACES = (
    "\x00\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200E))
    + "\u2028\u2029\u202f\u205f\u2060\u3000\ufeff"
)
SEPARATORS = SPACES + "-_.,:;|/\\'\"`+*=~"

_COMPACT = str.maketrans(dict.fromkeys(SPACES))
_NORMAL = str.maketrans(
    {**dict.fromkeys(SEPARATORS), **{chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}}
)
_COMPACT_DROP = frozenset(SPACES)
_NORMAL_DROP = frozenset(SEPARATORS)


def compact(text: str) -> str:
    """``text`` without white space (the view base64 is looked for in)."""
    return text.translate(_COMPACT)


def normal(text: str) -> str:
    """``text`` without white space or separators, ASCII lower-cased (length per kept
    character is one: positions map back one to one)."""
    return text.translate(_NORMAL)


_ESCAPE = linear(r"%[0-9A-Fa-f]{2}", capture=False)


_HEX = frozenset("0123456789abcdefABCDEF")


def percent_decode(text: str) -> str:
    """``text`` with each ``%XX`` replaced by the code point ``XX`` (the same text as
    :func:`percent_decoded`'s, without the positions); ``text`` itself when it holds no
    escape (one RE2 pass tells)."""
    if _ESCAPE.search(text) is None:
        return text
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(chr(int(part[:2], 16)) + part[2:])
        else:
            out.append("%" + part)
    return "".join(out)


def percent_decoded(text: str) -> tuple[str, list[int]]:
    """``text`` with each ``%XX`` replaced by the code point ``XX``, and for each character
    of the result the position in ``text`` it came from."""
    out: list[str] = []
    starts: list[int] = []
    pos = 0
    n = len(text)
    while True:
        at = text.find("%", pos)
        if at < 0:
            out.append(text[pos:])
            starts.extend(range(pos, n))
            break
        out.append(text[pos:at])
        starts.extend(range(pos, at))
        pair = text[at + 1 : at + 3]
        if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out.append(chr(int(pair, 16)))
            starts.append(at)
            pos = at + 3
        else:
            out.append("%")
            starts.append(at)
            pos = at + 1
    return "".join(out), starts


def _aligned(data: bytes, encoder: str) -> list[str]:
    """The characters of ``data``'s encoding that depend on its bytes alone, for each
    alignment of ``data`` in longer encoded data (base64: 3, base32: 5)."""
    width, per = (3, 6) if encoder == "b64" else (5, 5)
    out: list[str] = []
    for shift in range(width):
        padded = b"\x00" * shift + data
        if encoder == "b64":
            encoded = base64.b64encode(padded).decode("ascii")
        else:
            encoded = base64.b32encode(padded).decode("ascii").lower()
        first = math.ceil(8 * shift / per)
        last = (8 * (shift + len(data))) // per
        core = encoded[first:last]
        if len(core) >= MIN_PRINT:
            out.append(core)
    return out


@dataclass(frozen=True, slots=True)
class _Owner:
    """Whose fingerprint a literal is: the value's label, the form it was cut from, and
    where in that form it starts (a window extends along its form when it matches)."""

    label: str
    form: str
    offset: int


def _windows(form: str) -> list[tuple[str, int]]:
    """The windows of a normalised value that any piece of the threshold length holds."""
    m = len(form)
    piece = min(max(MIN_PRINT, math.ceil(m / 2)), MAX_PIECE)
    if piece >= m:
        return [(form, 0)]
    width = min(piece, WINDOW)
    stride = piece - width + 1
    out = [(form[i : i + width], i) for i in range(0, m - width + 1, stride)]
    if out[-1][1] != m - width:
        out.append((form[m - width :], m - width))
    return out


class _View:
    """One view's fingerprints: literals, their owners, one RE2 alternation."""

    def __init__(self, literals: dict[str, list[_Owner]]) -> None:
        self.owners = literals
        self.pattern: LinearPattern | None = None
        if literals:
            ordered = sorted(literals, key=len, reverse=True)  # leftmost-first: longest first
            self.pattern = linear(
                "|".join(_literal(v) for v in ordered), capture=False, memory=PRINTS_MEMORY
            )

    def first(self, view: str) -> str | None:
        if self.pattern is None:
            return None
        match = self.pattern.search(view)
        return None if match is None else self.owners[match.group(0)][0].label

    def spans(self, view: str, deadline: Deadline | None) -> list[tuple[int, int]]:
        """Where fingerprints match in ``view``, each window extended along its value.

        One pass of the pattern over the view (non-overlapping matches); a match inside
        the extension of the one before is skipped. Each extension is bounded by its
        value's length and never reaches back past the span before it."""
        if self.pattern is None:
            return []
        out: list[tuple[int, int]] = []
        floor = 0
        for count, match in enumerate(self.pattern.finditer(view)):
            start, end = match.span()
            if start < floor:
                continue
            best = (start, end)
            for owner in self.owners[match.group(0)][:MAX_OWNERS]:
                form, offset = owner.form, owner.offset
                a, o = start, offset
                while a > floor and o > 0 and view[a - 1] == form[o - 1]:
                    a, o = a - 1, o - 1
                b, o = end, offset + (end - start)
                while b < len(view) and o < len(form) and view[b] == form[o]:
                    b, o = b + 1, o + 1
                if b - a > best[1] - best[0]:
                    best = (a, b)
            out.append(best)
            floor = best[1]
            if count % 256 == 0:
                check(deadline)
        return out


def _literal(value: str) -> str:
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}" for c in value)


class Fingerprints:
    """Every fingerprint of a set of brokered values, ready to look for in a text."""

    __slots__ = ("_compact", "_normal", "labels")

    def __init__(self, known: Iterable[tuple[str, str]]) -> None:
        compact_prints: dict[str, list[_Owner]] = {}
        normal_prints: dict[str, list[_Owner]] = {}
        labels: list[str] = []

        def add(table: dict[str, list[_Owner]], literal: str, owner: _Owner) -> None:
            if len(literal) < MIN_PRINT:
                return
            owners = table.setdefault(literal, [])
            if len(owners) < MAX_OWNERS and owner not in owners:
                owners.append(owner)

        for label, value in known:
            labels.append(label)
            data = value.encode("utf-8")
            for core in _aligned(data, "b64"):
                add(compact_prints, core, _Owner(label, core, 0))
                url = core.replace("+", "-").replace("/", "_")
                add(compact_prints, url, _Owner(label, url, 0))
            form = normal(value)
            latin = normal(data.decode("latin-1"))
            for shape in {form, latin}:
                for literal, offset in _windows(shape):
                    add(normal_prints, literal, _Owner(label, shape, offset))
                backwards = shape[::-1]
                add(normal_prints, backwards, _Owner(label, backwards, 0))
            hexed = data.hex()
            for literal, offset in _windows(hexed):
                add(normal_prints, literal, _Owner(label, hexed, offset))
            for core in _aligned(data, "b32"):
                add(normal_prints, core, _Owner(label, core, 0))
        self._compact = _View(compact_prints)
        self._normal = _View(normal_prints)
        self.labels = tuple(labels)

    def first(self, text: str) -> str | None:
        """The label of a brokered value ``text`` holds in any form, or ``None``."""
        for view in _views(text):
            label = self._compact.first(compact(view)) or self._normal.first(normal(view))
            if label is not None:
                return label
        return None

    def redact(self, text: str, found: Counter[str], deadline: Deadline | None = None) -> str:
        """``text`` with every brokered value found in any view replaced."""
        for decoded in (False, True):
            if decoded and percent_decode(text) == text:
                break
            for kind in (self._compact, self._normal):
                check(deadline)
                source = percent_decode(text) if decoded else text  # text as redacted so far
                drop = _COMPACT_DROP if kind is self._compact else _NORMAL_DROP
                view = compact(source) if kind is self._compact else normal(source)
                if kind.pattern is None or kind.pattern.search(view) is None:
                    continue
                starts: list[int] | None = None
                if decoded:  # where each decoded character came from (only on a match)
                    source, starts = percent_decoded(text)
                kept = [i for i, c in enumerate(source) if c not in drop]
                spans = []
                for a, b in kind.spans(view, deadline):
                    first, last = kept[a], kept[b - 1]
                    if starts is not None:
                        end = starts[last + 1] if last + 1 < len(starts) else len(text)
                        first = starts[first]
                    else:
                        end = last + 1
                    spans.append((first, end))
                text = _replace(text, spans, found)
        return text


def _views(text: str) -> list[str]:
    if "%" not in text:
        return [text]
    decoded = percent_decode(text)
    return [text] if decoded == text else [text, decoded]


def _replace(text: str, spans: list[tuple[int, int]], found: Counter[str]) -> str:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    if not merged:
        return text
    found["brokered"] += len(merged)
    parts: list[str] = []
    pos = 0
    for a, b in merged:
        parts.append(text[pos:a])
        parts.append(REDACTED)
        pos = b
    parts.append(text[pos:])
    return "".join(parts)
