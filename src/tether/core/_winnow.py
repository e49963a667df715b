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

Runs of :data:`SHORT_K` words are kept too (winnowed, stop words alone skipped), and
add up across calls and sub-tasks: once the task has carried out :data:`MIN_SHORT_HITS`
of them toward a wider audience, the next call carrying one is held, so a text sent five
words per call gets out a few pieces at most, while a reply that shares a phrase or two
with it goes out. A run of strings of one label each too short for a k-gram (tokens,
three-word lines, member names) is also fingerprinted joined, as one text, and what is
encoded in a confidential text is fingerprinted decoded.

Hashes are BLAKE2b, 64 bits; the two lowest bits tell a whole short text (``x1``), a
k-gram (``00``) and a short run (``10``) apart.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import html
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tether.core._fingerprints import percent_decode
from tether.core._intent import Sensitivity
from tether.core._labels import exact_values
from tether.core._scanning import Deadline, check, linear, skeleton

K = 6
WINDOW = 4
MIN_HITS = 2
#: Words in a short gram: the confidential text's word ``SHORT_K``-grams are kept too
#: (winnowed over :data:`SHORT_WINDOW`), so that a text sent a few words per call adds
#: up across calls (:data:`MIN_SHORT_HITS`) though no piece holds a ``K``-gram.
SHORT_K = 3
SHORT_WINDOW = 3
#: Distinct short grams the task's calls have carried out before one more is held.
MIN_SHORT_HITS = 7
#: Words that do not make a short gram alone (three of them in a row are not kept).
STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "has",
        "have",
        "he",
        "her",
        "his",
        "i",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "our",
        "she",
        "that",
        "the",
        "their",
        "them",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "will",
        "with",
        "you",
        "your",
    }
)
#: A text with fewer words than this is not fingerprinted (too short to tell from chance).
MIN_WORDS = 4
#: The words of one text read for fingerprints (past this, the rest is not fingerprinted).
MAX_WORDS = 200_000

_WORD = linear(r"[\p{L}\p{N}]+", capture=False)
# Runs that may be encoded text: base64 (standard or URL-safe, possibly wrapped over
# lines as MIME does) and hex. Each is decoded and read as a text of its own.
_B64_RUN = r"[A-Za-z0-9+/_-]{16,}={0,2}"
_BASE64 = linear(rf"{_B64_RUN}(?:[ \t\r\n]+{_B64_RUN})*", capture=False)
_HEX = linear(r"(?:[0-9A-Fa-f]{2}){12,}", capture=False)
#: Encoded runs decoded per argument (past this, the rest is not decoded).
MAX_DECODED = 64


def words(text: str, deadline: Deadline | None = None, limit: int | None = MAX_WORDS) -> list[str]:
    """The words of ``text`` as a reader sees them (a linear pass): NFKC-normalised,
    without format characters or combining marks, case folded, each look-alike letter
    as the ASCII letter it looks like (:func:`~tether.core._scanning.skeleton`); at most
    ``limit`` of them (``None``: all)."""
    out = _WORD.findall(skeleton(text))
    check(deadline)
    return out if limit is None else out[:limit]


def _hash(items: list[str], short: bool) -> int:
    value = int.from_bytes(
        hashlib.blake2b("\x1f".join(items).encode(), digest_size=8).digest(), "big"
    )
    return (value | 1) if short else (value & ~3)


def _tri(items: list[str]) -> int:
    """The hash of a short gram (its two lowest bits are ``10``)."""
    value = int.from_bytes(
        hashlib.blake2b("\x1e".join(items).encode(), digest_size=8).digest(), "big"
    )
    return (value & ~3) | 2


def _short_grams(tokens: list[str], deadline: Deadline | None) -> list[int]:
    """Hashes of every run of :data:`SHORT_K` words (0 for a run of stop words only)."""
    out: list[int] = []
    for start in range(len(tokens) - SHORT_K + 1):
        items = tokens[start : start + SHORT_K]
        out.append(0 if all(w in STOPWORDS for w in items) else _tri(items))
        if start % 4096 == 4095:
            check(deadline)
    return out


def short_prints(text: str, deadline: Deadline | None = None) -> set[int]:
    """The short grams kept of ``text`` (winnowed: any passage of ``SHORT_K +
    SHORT_WINDOW - 1`` words shares one)."""
    grams = _short_grams(words(text, deadline), deadline)
    if len(grams) <= SHORT_WINDOW:
        return {g for g in grams if g}
    kept: set[int] = set()
    for start in range(len(grams) - SHORT_WINDOW + 1):
        window = [g for g in grams[start : start + SHORT_WINDOW] if g]
        if window:
            kept.add(min(window))
    check(deadline)
    return kept


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
    """``data`` as text when it is mostly printable UTF-8 (a stray invalid byte is
    replaced), or UTF-16 with a byte-order mark or many NUL bytes (else not text)."""
    if data[:2] == b"\x1f\x8b":  # gzip: decompressed, at most MAX_INFLATED bytes
        data = _inflated(data)
    text = data.decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")) or (
        len(data) >= 16 and len(data) % 4 == 0 and data.count(0) * 4 >= len(data) * 2.5
    ):
        text = data.decode("utf-32", errors="replace")
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        len(data) >= 8 and data.count(0) * 3 >= len(data)
    ):
        text = data.decode("utf-16", errors="replace")
    printable = sum(1 for c in text if (c.isprintable() or c.isspace()) and c != "\ufffd")
    return text if text and printable >= 0.9 * len(text) else None


_HEX_SPACED = linear(r"(?:[0-9A-Fa-f]{2}[ :,.-]){11,}[0-9A-Fa-f]{2}", capture=False)
_BASE32 = linear(r"[A-Z2-7]{16,}={0,6}", capture=False)
_BASE85 = linear(r"[0-9A-Za-z!#$%&()*+;<=>?@^_`{|}~-]{20,}", capture=False)
_ESCAPES = linear(r"\\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8})", capture=False)
_CAMEL = linear(r"\p{Ll}\p{Lu}", capture=False)
_TAG = linear(r"</?[A-Za-z][^<>]{0,200}>", capture=False)
#: How deep encodings inside encodings are decoded (base64 of base64, ...).
MAX_NESTING = 4


def _unescaped(text: str) -> str | None:
    """``text`` with its ``\\xNN`` / ``\\uNNNN`` escapes decoded (``\\xNN`` as UTF-8
    bytes)."""
    if not text.isascii() or not _ESCAPES.search(text):
        return None
    try:
        out = text.encode("ascii").decode("unicode_escape")
    except UnicodeDecodeError:
        return None
    if "\\x" in text:
        raw = out.encode("latin-1", errors="ignore")
        if len(raw) == len(out):
            out = raw.decode("utf-8", errors="replace")
    return out


#: Bytes a compressed run is inflated to, at most.
MAX_INFLATED = 1 << 20


def _inflated(data: bytes) -> bytes:
    try:
        return zlib.decompressobj(wbits=47).decompress(data, MAX_INFLATED)
    except zlib.error:
        return b""


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _bytes(decode: Callable[[str], bytes], text: str) -> bytes | None:
    try:
        return decode(text)
    except (binascii.Error, ValueError):
        return None


def _decode_runs(text: str, out: list[str]) -> None:
    """Append to ``out`` the texts encoded in ``text`` itself (one level)."""

    def keep(data: bytes | None) -> None:
        found = _text(data) if data else None
        if found and len(out) < MAX_DECODED:
            out.append(found)

    if "%" in text:
        plain_text = percent_decode(text)
        if plain_text != text:
            out.append(plain_text)
    if "&" in text and ";" in text:
        entities = html.unescape(text)
        if entities != text:
            out.append(entities)
    if (escaped := _unescaped(text)) is not None:
        out.append(escaped)
    for match in _HEX.finditer(text):
        keep(bytes.fromhex(match.group()))
        if len(out) >= MAX_DECODED:
            return
    for match in _HEX_SPACED.finditer(text):
        keep(bytes.fromhex("".join(c for c in match.group() if c not in " :,.-")))
        if len(out) >= MAX_DECODED:
            return
    compact = "".join(text.split())
    for source in (text, compact) if compact != text else (text,):
        for match in _BASE64.finditer(source):
            run = "".join(match.group().split()).rstrip("=")
            run = run.replace("-", "+").replace("_", "/")
            padded = run + "=" * (-len(run) % 4)
            keep(_bytes(_b64, padded))
            if len(out) >= MAX_DECODED:
                return
    for match in _BASE32.finditer(compact):
        run = match.group().rstrip("=")
        padded = run + "=" * (-len(run) % 8)
        keep(_bytes(base64.b32decode, padded))
    for match in _BASE85.finditer(compact):
        run = match.group()
        keep(_bytes(base64.b85decode, run))
        if len(out) >= MAX_DECODED:
            return


def decoded(text: str) -> list[str]:
    """The texts encoded inside ``text``: percent-encoding, HTML entities, ``\\x`` and
    ``\\u`` escapes, hex (with or without separators), base64 (also cut in groups),
    base32 and base85 runs; and what is encoded inside those, to :data:`MAX_NESTING`
    levels."""
    out: list[str] = []
    level = [text]
    for _ in range(MAX_NESTING):
        found: list[str] = []
        for item in level:
            _decode_runs(item, found)
        found = found[: MAX_DECODED - len(out)]
        out.extend(found)
        if not found or len(out) >= MAX_DECODED:
            break
        level = found
    return out


def views(text: str) -> list[str]:
    """Other ways to read ``text`` that show the same words to a reader or a program: a
    text of words (one separator in a dozen characters or more) ROT13, reversed and, when
    its letters are spaced out, joined; a run of letters without separators cut where a
    CamelCase word starts."""
    if len(text) < 16:
        return []
    out: list[str] = []
    if "<" in text and ">" in text:  # markup, as an HTML mail shows it
        untagged = _TAG.sub("", text)
        if untagged != text:
            out.append(untagged)
            text = untagged
    separators = sum(1 for c in text if not c.isalnum())
    if separators * 12 < len(text):
        letters = sum(1 for c in text if c.isalpha())
        if letters * 20 >= len(text) * 19 and _CAMEL.search(text):
            out.append(_camel(text))
        return out
    out += [
        codecs.encode(text, "rot13"),
        text[::-1],
        " ".join(word[::-1] for word in text.split()),
    ]
    # One separator after every character (a hyphen, a line break, a blank symbol).
    for offset in (1, 0):
        between = text[offset::2]
        if len(set(between)) == 1 and not between.isalnum():
            out.append(text[1 - offset :: 2])
    parts = text.split()
    if parts and sum(1 for p in parts if len(p) == 1) * 2 >= len(parts):
        out.append(" ".join(seg.replace(" ", "") for seg in text.split("  ")))
    return out


def _camel(text: str) -> str:
    out: list[str] = []
    previous = ""
    for char in text:
        if char.isupper() and previous.islower():
            out.append(" ")
        out.append(char)
        previous = char
    return "".join(out)


#: An argument nested deeper than this is not read: it is taken to carry content.
MAX_DEPTH = 256
#: What :func:`carried` reports of an argument nested too deep to read.
UNREAD = 1


class _Reading:
    """The strings of an argument, in order, and other orders they may be read in: the
    member names alone, the values alone, values by their keys' numbers, lists of
    character codes as text."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self.names: list[str] = []
        self.values: list[str] = []
        self.extra: list[str] = []
        self.too_deep = False

    def walk(self, value: Any, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            self.too_deep = True
            return
        if isinstance(value, Mapping):
            for name, item in value.items():
                self.strings.append(str(name))
                self.names.append(str(name))
                self.walk(item, depth + 1)
            if len(value) > K and all(isinstance(v, str) for v in value.values()):
                ordered = sorted(value.items(), key=lambda kv: _natural(str(kv[0])))
                self.extra.append(" ".join(v for _, v in ordered))
        elif isinstance(value, list | tuple):
            if len(value) >= 8 and all(
                type(v) is int and 9 <= v <= 0x10FFFF and not 0xD800 <= v <= 0xDFFF for v in value
            ):
                self.extra.append("".join(chr(v) for v in value))
            for item in value:
                self.walk(item, depth + 1)
        elif isinstance(value, str):
            self.strings.append(value)
            self.values.append(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self.strings.append(str(value))
            self.values.append(str(value))


def _natural(key: str) -> tuple[str, int]:
    digits = "".join(c for c in key if c.isdigit())
    return ("".join(c for c in key if not c.isdigit()), int(digits[:18]) if digits else -1)


def carried(
    value: Any, prints: Mapping[int, str], min_hits: int = MIN_HITS, short: bool = False
) -> dict[int, str]:
    """The fingerprints in ``prints`` that an argument carries (empty: none, or fewer
    than ``min_hits`` k-gram hashes and no whole short text). Every k-gram of its text
    is hashed (not only the kept ones), and every run of ``MIN_WORDS`` to ``K - 1``
    words for whole short texts; a value split across the strings of one argument is
    read as one text, and so are its member names alone, its values alone, and what is
    encoded in it (:func:`decoded`, :func:`views`). An exact value a classifier found
    (a card number, a key) counts alone. An argument nested deeper than
    :data:`MAX_DEPTH` is not read: it carries :data:`UNREAD`, tagged with the most
    restrictive content read (what is not read is not let out)."""
    if not prints:
        return {}
    reading = _Reading()
    reading.walk(value)
    if reading.too_deep:
        return {UNREAD: max(prints.values(), key=_rank)}
    tokens: list[str] = []
    streams: list[list[str]] = []  # read for k-grams and whole short texts
    orders: list[list[str]] = []  # other orders of the same words: read for k-grams
    hits: dict[int, str] = {}
    for text in reading.strings:
        tokens.extend(words(text, limit=None))  # what is sent is read whole
        for inner in decoded(text):
            inner_words = words(inner)
            streams.append(inner_words)
            _exact(inner, prints, hits)
            # Transforms applied before the encoding (reversed, ROT13, ...) are undone too.
            orders.extend(words(view) for view in views(inner))
            orders.extend((inner_words[::-1], inner_words[::2], inner_words[1::2]))
        orders.extend(words(inner) for inner in views(text))
        _exact(text, prints, hits)
    streams.extend(words(text) for text in reading.extra)
    names = [w for name in reading.names for w in words(name)]
    if len(names) >= MIN_WORDS:
        streams.append(names)
        streams.append([w for text in reading.values for w in words(text)])
    orders.extend((tokens[::-1], tokens[::2], tokens[1::2], tokens[::3], tokens[1::3]))
    orders.append(tokens[2::3])
    for stream in (tokens, *streams):
        _match(stream, prints, hits, grams=short)
    for stream in orders:
        _match(stream, prints, hits, short=False)
    strong = long_hits(hits) >= min_hits or any(h & 1 for h in hits)
    if not strong and not (short and min_hits <= 1 and hits):
        return {}
    return hits


def _rank(tag: str) -> int:
    level = tag.split(":", 1)[0]
    try:
        return Sensitivity(level).rank
    except ValueError:
        return Sensitivity.SECRET.rank


def value_print(value: str) -> int:
    """The fingerprint of an exact value a classifier found (in its canonical form)."""
    return _hash(["\x00value", value], True)


def _exact(text: str, prints: Mapping[int, str], hits: dict[int, str]) -> None:
    for value in exact_values(text):
        found = value_print(value)
        if found in prints:
            hits[found] = prints[found]


def _match(
    tokens: list[str],
    prints: Mapping[int, str],
    hits: dict[int, str],
    short: bool = True,
    grams: bool = False,
) -> None:
    if len(tokens) < MIN_WORDS:
        return
    for gram in _grams(tokens, None):
        if gram in prints:
            hits[gram] = prints[gram]
    if not short:
        return
    if grams:
        for gram in _short_grams(tokens, None):
            if gram in prints:
                hits[gram] = prints[gram]
    for size in range(MIN_WORDS, K):
        for start in range(len(tokens) - size + 1):
            whole = _hash(tokens[start : start + size], True)
            if whole in prints:
                hits[whole] = prints[whole]


def long_hits(hits: Iterable[int]) -> int:
    """How many of ``hits`` are k-gram hashes (not whole short texts nor short grams)."""
    return sum(1 for h in hits if not h & 3)


def short_hits(hits: Iterable[int]) -> int:
    """How many of ``hits`` are short-gram hashes."""
    return sum(1 for h in hits if h & 3 == 2)


def fingerprints_of(
    texts: Iterable[tuple[str, str]],
    deadline: Deadline | None,
    values: Iterable[tuple[str, str]] = (),
) -> dict[int, str]:
    """Fingerprints of several ``(text, tag)``, and of exact ``(value, tag)`` a
    classifier found: each kept hash names its text's tag."""
    out: dict[int, str] = {}

    def keep(text: str, tag: str) -> None:
        for value in fingerprint(text, deadline) | short_prints(text, deadline):
            out.setdefault(value, tag)

    # A run of texts too short to hold a k-gram (tokens, three-word lines, member names)
    # is also one document, joined in order.
    run: list[str] = []
    run_tag = ""
    for text, tag in texts:
        # What is encoded in the text (the agent decodes it as well) is read as text too.
        for item in (text, *decoded(text)):
            keep(item, tag)
        short = len(words(text, deadline)) < K
        if run and (not short or tag != run_tag):
            if len(run) > 1:
                keep(" ".join(run), run_tag)
            run = []
        if short:
            run.append(text)
            run_tag = tag
    if len(run) > 1:
        keep(" ".join(run), run_tag)
    for exact, tag in values:
        out.setdefault(value_print(exact), tag)
    return out
