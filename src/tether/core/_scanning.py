"""Bounded work on untrusted text: linear-time patterns, size limits, a time budget.

Tool results come from upstream servers nobody vouches for, and arguments from
an agent that may be compromised. Every pattern Tether runs on either is
compiled here, by RE2 (``google-re2``): matching takes time linear in the
text, whatever the text; there is no backtracking for an attacker to exploit
(a pattern RE2 cannot run, with look-around or back-references, is refused
when it is compiled, not at match time).

On top of linear matching, the work spent on one piece of untrusted data is
bounded twice:

- by size (:class:`ScanLimits`): arguments above ``max_argument_bytes`` are
  refused (``call.oversized``); a result above ``max_result_bytes`` is not
  scanned at all, and counts as untrusted content the task has read, oversized;
- by time (:class:`Deadline`): a scan checks its deadline between passes, and
  a scan that runs out of time raises :class:`ScanExceeded`; the caller treats
  the content as untrusted and oversized, never as content nobody saw.

Nothing here reads a clock of its own: a :class:`Deadline` is handed the
clock it checks.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import msgspec
import re2
from confusable_homoglyphs import confusables

#: RE2's memory for one compiled pattern (its DFA cache); past it RE2 falls back to a
#: slower linear engine (never to backtracking).
PATTERN_MEMORY = 32 << 20

#: Python's ``\s`` (Unicode white space), for use inside a character class: RE2's ``\s``
#: is ASCII only.
SPACE = r"\s\x0b\x1c-\x1f\x85\p{Z}"

MAX_ARGUMENT_BYTES = 64 * 1024
MAX_RESULT_BYTES = 1024 * 1024
SCAN_SECONDS = 2.0

if TYPE_CHECKING:
    LinearPattern: TypeAlias = re2._Regexp[str]
    LinearMatch: TypeAlias = re2._Match[str]


def linear(
    pattern: str,
    *,
    ignore_case: bool = False,
    capture: bool = True,
    memory: int = PATTERN_MEMORY,
) -> LinearPattern:
    """``pattern`` compiled for linear-time matching (raises ``ValueError`` when RE2
    cannot run it: look-around, back-references, possessive quantifiers).

    ``capture=False`` for a pattern only asked whether and where it matches: RE2 then
    never works out groups (its fastest engine, even on a long match). ``memory``: RE2's
    budget for the pattern (a large alternation of literals needs more to keep its DFA)."""
    options = re2.Options()
    options.max_mem = memory
    options.log_errors = False
    if not capture:
        options.never_capture = True
    if ignore_case:
        options.case_sensitive = False
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raise ValueError(f"pattern {pattern[:80]!r} is not supported: {exc}") from None


class ScanLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How much untrusted data one call or one result may make Tether scan.

    ``max_argument_bytes``: a call's arguments, JSON-encoded (above: ``call.oversized``).
    ``max_result_bytes``: a result, JSON-encoded (above: labelled untrusted and
    oversized, unscanned). ``scan_seconds``: the time one result's scanning may take
    (past it: the same label).
    """

    max_argument_bytes: int = MAX_ARGUMENT_BYTES
    max_result_bytes: int = MAX_RESULT_BYTES
    scan_seconds: float = SCAN_SECONDS

    def problems(self) -> list[str]:
        """What is wrong with these limits (empty: nothing)."""
        out: list[str] = []
        if not 1024 <= self.max_argument_bytes <= 16 << 20:
            out.append("max_argument_bytes: must be between 1 KiB and 16 MiB")
        if not 1024 <= self.max_result_bytes <= 64 << 20:
            out.append("max_result_bytes: must be between 1 KiB and 64 MiB")
        if not 0 < self.scan_seconds <= 60:
            out.append("scan_seconds: must be above 0 and at most 60")
        return out


class ScanExceeded(Exception):
    """Scanning untrusted data stopped: it is larger, or took longer, than allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Deadline:
    """The time a scan may take, checked between passes (each pass is linear)."""

    __slots__ = ("_clock", "_end", "seconds")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds

    def check(self) -> None:
        """Raise :class:`ScanExceeded` once the time is up."""
        if self._clock() > self._end:
            raise ScanExceeded(f"scanning took longer than {self.seconds:g} s")


def check(deadline: Deadline | None) -> None:
    """:meth:`Deadline.check`, for a scan that may have no deadline."""
    if deadline is not None:
        deadline.check()


# -- what a reader sees -------------------------------------------------------------------------

# Format characters (zero-width spaces, soft hyphens, direction marks) and combining marks:
# invisible, or drawn over the letter before them, so they change no word a reader sees.
_INVISIBLE = linear(r"[\p{Cf}\p{Mn}]+", capture=False)


def _confusables() -> dict[int, str]:
    """Unicode's confusables (UTS #39, as ``confusable_homoglyphs`` ships them): each
    character that looks like one ASCII letter or digit, to it."""
    table: dict[int, str] = {}
    for char, glyphs in confusables.confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        for glyph in glyphs:
            found = glyph.get("c", "")
            if len(found) == 1 and found.isascii() and found.isalnum():
                table[ord(char)] = found.lower()
                break
    return table


_SKELETON: dict[int, str] = {}
# Letters read as Latin ones that the confusables do not list: small capitals, regional
# indicator symbols (boxed letters) and the Greek vowels.
_LETTER_LIKE: dict[int, str] = {
    **{
        ord(c): latin
        for c, latin in zip("ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘǫʀꜱᴛᴜᴠᴡʏᴢ", "abcdefghijklmnopqrstuvwyz", strict=True)
    },
    **{0x1F1E6 + i: chr(ord("a") + i) for i in range(26)},
    **{ord(c): latin for c, latin in zip("αειου", "aeiou", strict=True)},
}


# Letters and symbols drawn blank: Hangul fillers (letters that show nothing) are removed,
# the Braille blank (a symbol drawn as a space) is a space.
_BLANKS = {0x115F: None, 0x1160: None, 0x3164: None, 0xFFA0: None, 0x2800: " "}


def plain(text: str) -> str:
    """``text`` as a reader sees it: NFKC-normalised (fullwidth and other compatibility
    forms to their plain letters), format characters, combining marks and blank letters
    removed."""
    if text.isascii():
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_BLANKS)


def skeleton(text: str) -> str:
    """``text`` plain, case folded, with each letter that looks like an ASCII letter or
    digit replaced by it (a Cyrillic o by a Latin o): what two texts that look alike share."""
    folded = plain(text).casefold()
    if folded.isascii():
        return folded
    if not _SKELETON:
        _SKELETON.update(_confusables())
        _SKELETON.update(_LETTER_LIKE)
    return folded.translate(_SKELETON)
