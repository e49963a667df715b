"""What an approver must see before approving a held call.

A held call is approved by a human reading its arguments. Text can lie to that
human: a recipient whose letters come from two scripts ("paypal" spelt with a
Cyrillic a), characters that reorder what is shown (bidirectional controls,
the "Trojan Source" trick) or that are not shown at all (zero-width and other
invisible format characters). :func:`text_flags` names each such trick found in
the arguments, by JSON path, so the approval view can mark them.

Mixed-script look-alikes are found with ``confusable_homoglyphs`` (Unicode's
confusables data); the control and invisible characters are Unicode's own
categories.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from confusable_homoglyphs import confusables

#: Explicit bidirectional formatting characters (Unicode UAX #9) and marks.
BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
#: Characters that take no visible space.
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad\u2061\u2062\u2063\u2064")
MAX_FLAGS = 50


def text_flags(value: Any, path: str = "$") -> list[dict[str, str]]:
    """Every deceptive text found in ``value`` (JSON-like): ``{"path", "flag", "detail"}``
    with flag ``bidi``, ``zero_width``, ``invisible`` or ``mixed_script``."""
    found: list[dict[str, str]] = []
    _walk(value, path, found, 0)
    return found[:MAX_FLAGS]


def _walk(value: Any, path: str, found: list[dict[str, str]], depth: int) -> None:
    if depth > 16 or len(found) >= MAX_FLAGS:
        return
    if isinstance(value, str):
        found.extend(_flags(value, path))
    elif isinstance(value, dict):
        for key, item in value.items():
            found.extend(_flags(str(key), f"{path}[key]"))
            _walk(item, f"{path}.{key}", found, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", found, depth + 1)


def _flags(text: str, path: str) -> list[dict[str, str]]:
    flags: list[dict[str, str]] = []
    bidi = sorted({f"U+{ord(c):04X}" for c in text if c in BIDI})
    if bidi:
        flags.append({"path": path, "flag": "bidi", "detail": ", ".join(bidi)})
    zero = sorted({f"U+{ord(c):04X}" for c in text if c in ZERO_WIDTH})
    if zero:
        flags.append({"path": path, "flag": "zero_width", "detail": ", ".join(zero)})
    hidden = sorted(
        {
            f"U+{ord(c):04X}"
            for c in text
            if c not in BIDI
            and c not in ZERO_WIDTH
            and c not in "\n\r\t"
            and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn")
        }
    )
    if hidden:
        flags.append({"path": path, "flag": "invisible", "detail": ", ".join(hidden[:10])})
    for word in text.split():
        dangerous = confusables.is_dangerous(word)
        if dangerous:
            scripts = sorted({unicodedata.name(c, "?").split(" ")[0] for c in word if c.isalpha()})
            flags.append(
                {
                    "path": path,
                    "flag": "mixed_script",
                    "detail": f"{word!r} mixes {' and '.join(scripts)} letters that look alike",
                }
            )
            break
    return flags
