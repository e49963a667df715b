"""Result labels: the sensitivity and trust of what one call returned, and their origin.

A tool's catalogue entry gives a default sensitivity, but one knowledge-base tool
returns the public FAQ and the acquisition memo alike: the label must follow the
data. A result's label comes from, in order:

1. **what the upstream declares** in the result's ``_meta``: Tether's own
   ``tether.dev/label`` (``{"sensitivity": ..., "trusted": ...}``), FIDES-style
   ``ifc`` labels (``{"confidentiality": ..., "integrity": ...}``) and the MCP
   trust and sensitivity hints (``sensitiveHint`` low/medium/high, ``privateHint``,
   ``secretHint``, ``openWorldHint``). A declaration more restrictive than the
   tool's default always counts; a less restrictive one only where the catalogue
   trusts that upstream's labels (``trust_result_labels``): an upstream cannot
   launder data by calling it public unless an operator said its labels are its
   word;
2. **catalogue rules on result fields** (:class:`FieldLabel`): a field such as a
   document's ``classification`` labels the record that holds it (its whole
   subtree), up or down, as the operator mapped its values;
3. **content classifiers** (:data:`CLASSIFIERS`): credentials, payment card numbers,
   national identifiers and explicit markings (CONFIDENTIAL, INTERNAL ONLY, ...),
   each a linear-time pattern, which only ever raise a label;
4. the **tool's default** (the catalogue's ``sensitivity``).

Each label carries its origin (:class:`Label`), which the result's receipt keeps.
Text labelled confidential or above is handed back with its label so the flow
state can fingerprint it (:mod:`tether.core._winnow`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import msgspec

from tether.core._intent import Sensitivity
from tether.core._scanning import Deadline, ScanExceeded, check, linear, plain

#: The ``_meta`` key under which an upstream (or another Tether) declares a label.
META_LABEL_KEY = "tether.dev/label"
MAX_LABEL_DEPTH = 12


class LabelOrigin(StrEnum):
    UPSTREAM = "upstream"
    CATALOGUE = "catalogue"
    CLASSIFIER = "classifier"
    TOOL = "tool"


class Label(msgspec.Struct, frozen=True):
    """A result's (or a part's) sensitivity and where it came from (``why``: the
    declaration, field or classifier that set it)."""

    sensitivity: Sensitivity
    origin: LabelOrigin = LabelOrigin.TOOL
    why: str = ""

    def to_dict(self) -> dict[str, str]:
        out = {"sensitivity": str(self.sensitivity), "origin": str(self.origin)}
        if self.why:
            out["why"] = self.why
        return out


class FieldLabel(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A catalogue rule on a result field: the record holding ``field`` (a member name,
    or a dotted path such as ``metadata.classification``) is labelled by its value.

    ``values`` maps the field's value (compared without case or surrounding space) to
    a sensitivity; ``otherwise`` labels a value not listed (``None``: the tool's default).
    """

    field: str
    values: dict[str, Sensitivity]
    otherwise: Sensitivity | None = None


class Declared(msgspec.Struct, frozen=True):
    """What an upstream declared of one result: a sensitivity and whether it vouches
    for the content (``None``: nothing said)."""

    sensitivity: Sensitivity | None = None
    trusted: bool | None = None
    why: str = ""


# -- declarations ---------------------------------------------------------------------------

_WORDS: dict[str, Sensitivity] = {
    "public": Sensitivity.PUBLIC,
    "low": Sensitivity.PUBLIC,
    "internal": Sensitivity.INTERNAL,
    "medium": Sensitivity.INTERNAL,
    "private": Sensitivity.CONFIDENTIAL,
    "confidential": Sensitivity.CONFIDENTIAL,
    "high": Sensitivity.CONFIDENTIAL,
    "restricted": Sensitivity.CONFIDENTIAL,
    "secret": Sensitivity.SECRET,
}
_TRUSTED = frozenset({"trusted", "high", "user", "system"})
_UNTRUSTED = frozenset({"untrusted", "low", "external", "open_world", "tool"})


def _word(value: Any) -> Sensitivity | None:
    if isinstance(value, str):
        return _WORDS.get(_key(value))
    return None


def declared(meta: Any) -> Declared | None:
    """The label an upstream's result ``_meta`` declares, or ``None``.

    A declaration Tether cannot read (an unknown word, a wrong type) is not ignored: it
    counts as the most restrictive (secret, untrusted), since whoever wrote it meant
    the data to be handled with care."""
    if not isinstance(meta, Mapping):
        return None
    found: list[Sensitivity] = []
    trust: list[bool] = []
    why: list[str] = []
    own = meta.get(META_LABEL_KEY)
    if own is not None:
        why.append(META_LABEL_KEY)
        if isinstance(own, Mapping):
            if "sensitivity" in own:
                found.append(_word(own["sensitivity"]) or Sensitivity.SECRET)
            if "trusted" in own:
                trust.append(own["trusted"] is True)
        else:
            found.append(Sensitivity.SECRET)
            trust.append(False)
    ifc = meta.get("ifc")
    if ifc is not None:
        why.append("ifc")
        if isinstance(ifc, Mapping):
            conf = ifc.get("confidentiality")
            if conf is not None:
                if isinstance(conf, list):  # a reader set: anything narrower than everyone
                    wide = any(str(r).lower() in ("*", "public", "everyone") for r in conf)
                    found.append(Sensitivity.PUBLIC if wide else Sensitivity.CONFIDENTIAL)
                else:
                    found.append(_word(conf) or Sensitivity.SECRET)
            integrity = ifc.get("integrity")
            if integrity is not None:
                word = str(integrity).strip().lower()
                trust.append(word in _TRUSTED and word not in _UNTRUSTED)
        else:
            found.append(Sensitivity.SECRET)
            trust.append(False)
    hints = {k: meta[k] for k in ("sensitiveHint", "privateHint", "secretHint") if k in meta}
    if hints:
        why.append("hints")
    if "sensitiveHint" in hints:
        found.append(_word(hints["sensitiveHint"]) or Sensitivity.SECRET)
    if hints.get("privateHint") is True:
        found.append(Sensitivity.CONFIDENTIAL)
    if hints.get("secretHint") is True:
        found.append(Sensitivity.SECRET)
    if "openWorldHint" in meta:
        why.append("openWorldHint")
        trust.append(meta["openWorldHint"] is False)
    if not why:
        return None
    return Declared(
        sensitivity=max(found, key=lambda s: s.rank) if found else None,
        # Several declarations: trusted only if every one says so.
        trusted=all(trust) if trust else None,
        why=", ".join(why),
    )


def declared_in(result: Any) -> Declared | None:
    """What an upstream declares of an MCP tool result (its JSON form, ``_meta`` keys as
    on the wire): the result's ``_meta`` and each content block's, and each embedded
    resource's, own (a block labelled confidential labels the result). Several: the
    most restrictive sensitivity; trusted only if every one says so."""
    if not isinstance(result, Mapping):
        return None
    metas: list[Any] = [result.get("_meta")]
    content = result.get("content")
    if isinstance(content, list):
        for block in content[:1024]:
            if isinstance(block, Mapping):
                metas.append(block.get("_meta"))
                resource = block.get("resource")
                if isinstance(resource, Mapping):
                    metas.append(resource.get("_meta"))
    found = [d for d in (declared(m) for m in metas if m is not None) if d is not None]
    if not found:
        return None
    levels = [d.sensitivity for d in found if d.sensitivity is not None]
    trust = [d.trusted for d in found if d.trusted is not None]
    return Declared(
        sensitivity=max(levels, key=lambda s: s.rank) if levels else None,
        trusted=all(trust) if trust else None,
        why=", ".join(dict.fromkeys(d.why for d in found)),
    )


def resource_text(resource: Any) -> str:
    """What an embedded resource (its JSON form) shows a reader: its text, or its blob
    decoded when that is text (UTF-8, mostly printable: the agent's client can decode it
    as well); otherwise ``[resource] <uri>``."""
    if not isinstance(resource, Mapping):
        return "[resource]"
    text = resource.get("text")
    if isinstance(text, str):
        return text
    blob = resource.get("blob")
    if isinstance(blob, str):
        try:
            data = base64.b64decode(blob, validate=False)
        except (binascii.Error, ValueError):
            data = b""
        decoded = data.decode("utf-8", errors="replace")
        readable = sum(1 for c in decoded if (c.isprintable() or c.isspace()) and c != "\ufffd")
        if decoded and readable >= 0.9 * len(decoded):
            return decoded
    return f"[resource] {resource.get('uri', '')}"


# -- classifiers ----------------------------------------------------------------------------

#: The content classifiers, by name: what each finds and the label it gives.
CLASSIFIERS: dict[str, Sensitivity] = {
    "credentials": Sensitivity.SECRET,
    "payment_cards": Sensitivity.CONFIDENTIAL,
    "national_ids": Sensitivity.CONFIDENTIAL,
    "markings": Sensitivity.CONFIDENTIAL,
}

_CREDENTIALS = linear(
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|-----BEGIN [A-Z ]{0,24}PRIVATE KEY-----"
    r"|gh[pousr]_[0-9A-Za-z]{36,}"
    r"|github_pat_[0-9A-Za-z_]{40,}"
    r"|xox[abposr]-[0-9A-Za-z-]{10,}"
    r"|sk_live_[0-9A-Za-z]{20,}"
    r"|eyJ[0-9A-Za-z_-]{8,}\.eyJ[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]{8,}",
    capture=False,
)
# A card number: 13 to 19 digits, in groups split by single spaces or dashes, with a
# scheme's prefix; counted when its Luhn check holds.
_CARD = linear(r"(?:^|[^0-9])((?:[0-9][ -]?){12,18}[0-9])(?:[^0-9]|$)")
_CARD_PREFIXES = ("4", "34", "37", "51", "52", "53", "54", "55", "2", "6011", "65", "35")
# A US social security number, written with its dashes (area 000, 666 and 9xx do not exist).
_SSN = linear(r"(?:^|[^0-9-])([0-8][0-9]{2})-([0-9]{2})-([0-9]{4})(?:[^0-9-]|$)")
# Explicit markings, as documents carry them: capitals, a whole phrase.
_MARKINGS: dict[str, Sensitivity] = {
    "TOP SECRET": Sensitivity.SECRET,
    "STRICTLY CONFIDENTIAL": Sensitivity.CONFIDENTIAL,
    "CONFIDENTIAL": Sensitivity.CONFIDENTIAL,
    "RESTRICTED": Sensitivity.CONFIDENTIAL,
    "INTERNAL ONLY": Sensitivity.INTERNAL,
    "INTERNAL USE ONLY": Sensitivity.INTERNAL,
    "FOR INTERNAL USE": Sensitivity.INTERNAL,
}
_MARKING = linear(
    r"(?:^|[^A-Za-z])(" + "|".join(sorted(_MARKINGS, key=len, reverse=True)) + r")(?:[^A-Za-z]|$)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _cards(text: str) -> bool:
    if sum(c.isdigit() for c in text) < 13:
        return False
    for match in _CARD.finditer(text):
        digits = "".join(c for c in match.group(1) if c.isdigit())
        if 13 <= len(digits) <= 19 and digits.startswith(_CARD_PREFIXES) and _luhn(digits):
            return True
    return False


def _ssns(text: str) -> bool:
    for match in _SSN.finditer(text):
        area, group, serial = match.group(1), match.group(2), match.group(3)
        if area not in ("000", "666") and group != "00" and serial != "0000":
            return True
    return False


def _markings(text: str) -> Sensitivity | None:
    best: Sensitivity | None = None
    for match in _MARKING.finditer(text):
        found = _MARKINGS[match.group(1)]
        if best is None or found.rank > best.rank:
            best = found
    return best


def classify(
    text: str, enabled: frozenset[str] | None = None, deadline: Deadline | None = None
) -> tuple[Sensitivity, str] | None:
    """The highest label the content classifiers give ``text`` and which one gave it
    (``None``: none fired). ``enabled``: the classifiers to run (``None``: all).

    ``text`` is read as a reader sees it (:func:`~tether.core._scanning.plain`): a
    marking in fullwidth letters or cut by a zero-width space is still a marking."""

    def on(name: str) -> bool:
        return enabled is None or name in enabled

    best: tuple[Sensitivity, str] | None = None

    def take(found: Sensitivity, name: str) -> None:
        nonlocal best
        if best is None or found.rank > best[0].rank:
            best = (found, name)

    text = plain(text)
    if on("credentials") and _CREDENTIALS.search(text):
        take(Sensitivity.SECRET, "credentials")
    check(deadline)
    if on("markings") and (m := _markings(text)):
        take(m, "markings")
    check(deadline)
    if on("payment_cards") and _cards(text):
        take(Sensitivity.CONFIDENTIAL, "payment_cards")
    check(deadline)
    if on("national_ids") and "-" in text and _ssns(text):
        take(Sensitivity.CONFIDENTIAL, "national_ids")
    return best


def exact_values(text: str, enabled: frozenset[str] | None = None) -> list[str]:
    """The values in ``text`` the classifiers find (a credential, a card number, a
    social security number), each in one canonical form (a number's digits only), so
    that the value sent alone, however spaced, is known for what it is."""

    def on(name: str) -> bool:
        return enabled is None or name in enabled

    text = plain(text)
    out: list[str] = []
    if on("credentials"):
        out.extend(m.group() for m in _CREDENTIALS.finditer(text))
    if on("payment_cards") and sum(c.isdigit() for c in text) >= 13:
        for match in _CARD.finditer(text):
            digits = "".join(c for c in match.group(1) if c.isdigit())
            if 13 <= len(digits) <= 19 and digits.startswith(_CARD_PREFIXES) and _luhn(digits):
                out.append(digits)
    if on("national_ids") and "-" in text:
        for match in _SSN.finditer(text):
            area, group, serial = match.group(1), match.group(2), match.group(3)
            if area not in ("000", "666") and group != "00" and serial != "0000":
                out.append(area + group + serial)
    return out


# -- labelling a result ---------------------------------------------------------------------


class Labelled(msgspec.Struct, frozen=True):
    """A result's label, its texts labelled confidential or above (to fingerprint), and
    the exact values its classifiers found in them (a card number, a key)."""

    label: Label
    sensitive_texts: tuple[tuple[str, Sensitivity], ...] = ()
    sensitive_values: tuple[tuple[str, Sensitivity], ...] = ()


def _lookup(mapping: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = mapping
    for part in path:
        if not isinstance(value, Mapping):
            return None
        if part in value:
            value = value[part]
            continue
        # A member named as the field but in other capitals or look-alike letters.
        wanted = _key(part)
        value = next((item for name, item in value.items() if _key(str(name)) == wanted), None)
        if value is None:
            return None
    return value


def _key(value: str) -> str:
    """A field value as it is compared: as a reader sees it, case folded, trimmed."""
    return plain(value).casefold().strip()


def _rule_label(rule: FieldLabel, value: Any) -> Sensitivity:
    """The sensitivity ``rule`` gives a record whose field holds ``value``.

    A value the rule does not list (a word it does not know, a look-alike, a qualified
    or punctuated word, a record) is the rule's ``otherwise`` when the operator set one,
    else the most restrictive sensitivity the rule maps to: the upstream that wrote it
    meant something, and Tether cannot tell it meant less. A list: its most restrictive
    item."""
    if isinstance(value, list | tuple) and value and len(value) <= 64:
        return max((_rule_label(rule, item) for item in value), key=lambda s: s.rank)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        word = _key(str(value))
        for listed, level in rule.values.items():
            if _key(listed) == word:
                return level
    if rule.otherwise is not None:
        return rule.otherwise
    return max(rule.values.values(), key=lambda s: s.rank, default=Sensitivity.SECRET)


def _field_label(mapping: Mapping[str, Any], rules: tuple[FieldLabel, ...]) -> Label | None:
    """The label a catalogue field rule gives the record ``mapping`` (``None``: no rule
    names a field it holds). Several rules: the most restrictive."""
    best: Label | None = None
    for rule in rules:
        value = _lookup(mapping, tuple(rule.field.split(".")))
        if value is None:
            continue
        shown = _key(value) if isinstance(value, str) else type(value).__name__
        label = Label(_rule_label(rule, value), LabelOrigin.CATALOGUE, f"{rule.field}={shown[:40]}")
        if best is None or label.sensitivity.rank > best.sensitivity.rank:
            best = label
    return best


#: JSON inside a string is read as structured content up to this many characters (past
#: it, or when it does not parse, the string is text).
MAX_EMBEDDED_JSON = 256 * 1024


def _embedded(text: str) -> Any:
    """The JSON record or list ``text`` holds, or ``None`` (not JSON, or too long)."""
    stripped = text.strip()
    if len(stripped) < 2 or len(stripped) > MAX_EMBEDDED_JSON:
        return None
    if (stripped[0], stripped[-1]) not in (("{", "}"), ("[", "]")):
        return None
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict | list) else None


_DECODER = json.JSONDecoder()


def _embedded_in(text: str) -> tuple[Any, str] | None:
    """The first JSON record (or list holding records) inside ``text`` after a preamble,
    in a code fence or before a trailer, and the text around it; ``None``: none. At most
    two parses (from the first ``{`` and the first ``[``): linear in the text."""
    starts = sorted(i for i in (text.find("{"), text.find("[")) if i >= 0)
    for start in starts:
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
        ):
            return value, f"{text[:start]} {text[end:]}"
    return None


def _looks_like_json(text: str) -> bool:
    stripped = text.lstrip()
    return stripped[:1] in ("{", "[") or "```" in text[:4096] or '{"' in text


class _Part:
    """One string of a result while it is labelled: its label, and whether a field rule
    or a classifier set it (a part nothing labelled takes the result's label)."""

    __slots__ = ("found", "label", "ruled", "text")

    def __init__(self, text: str, label: Label, ruled: bool, found: Label | None) -> None:
        self.text = text
        self.label = label
        self.ruled = ruled
        self.found = found


class _Labeller:
    def __init__(
        self,
        rules: tuple[FieldLabel, ...],
        classifiers: frozenset[str] | None,
        deadline: Deadline | None,
    ) -> None:
        self.rules = rules
        self.classifiers = classifiers
        self.deadline = deadline
        self.parts: list[_Part] = []

    def text(self, text: str, label: Label, ruled: bool, depth: int) -> None:
        inner = _embedded(text) if text[:1] in "{[ \t\r\n" else None
        if inner is not None:
            self.walk(inner, label, ruled, depth + 1)
            return
        if ("{" in text or "[" in text) and len(text) <= MAX_EMBEDDED_JSON:
            # A record after a preamble, in a code fence or before a trailer: the record
            # is read as one, and the text around it as text.
            found = _embedded_in(text)
            if found is not None:
                self.walk(found[0], label, ruled, depth + 1)
                text = found[1]
        elif len(text.strip()) > MAX_EMBEDDED_JSON and self.rules and _looks_like_json(text):
            # Too long to read as a record: labelled as the most restrictive the field
            # rules could label it (what is not read is not let out).
            level = max(
                (lv for rule in self.rules for lv in (*rule.values.values(), rule.otherwise) if lv),
                key=lambda lv: lv.rank,
            )
            if level.rank > label.sensitivity.rank:
                label = Label(level, LabelOrigin.CATALOGUE, "a record too long to read")
                ruled = True
        check(self.deadline)
        found = classify(text, self.classifiers, self.deadline) if text.strip() else None
        hit = Label(found[0], LabelOrigin.CLASSIFIER, found[1]) if found is not None else None
        if hit is not None and hit.sensitivity.rank > label.sensitivity.rank:
            label, ruled = hit, True
        self.parts.append(_Part(text, label, ruled, hit))

    def walk(self, value: Any, label: Label, ruled: bool, depth: int = 0) -> None:
        """Every string (and number, and member name) of ``value`` with the label of the
        record holding it."""
        if depth > MAX_LABEL_DEPTH:
            raise ScanExceeded(f"the result is nested deeper than {MAX_LABEL_DEPTH} levels")
        if isinstance(value, Mapping):
            own = _field_label(value, self.rules) if self.rules else None
            # The outermost record a rule labels is labelled up or down; a record inside
            # it can only raise that label (an attachment cannot call itself public).
            if own is not None and (not ruled or own.sensitivity.rank > label.sensitivity.rank):
                label, ruled = own, True
            start = len(self.parts)
            for name, item in value.items():
                self.text(str(name), label, ruled, depth + 1)
                self.walk(item, label, ruled, depth + 1)
            # A classifier that fires in a record labels the whole record: a marking in
            # a title marks the body it heads.
            self.raise_record(start)
        elif isinstance(value, list | tuple):
            for item in value:
                self.walk(item, label, ruled, depth + 1)
        elif isinstance(value, str):
            self.text(value, label, ruled, depth)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self.text(str(value), label, ruled, depth)

    def raise_record(self, start: int) -> None:
        found: Label | None = None
        for part in self.parts[start:]:
            hit = part.found
            if hit is not None and (found is None or hit.sensitivity.rank > found.sensitivity.rank):
                found = hit
        if found is None:
            return
        for part in self.parts[start:]:
            if found.sensitivity.rank > part.label.sensitivity.rank:
                part.label, part.ruled = found, True


def label_result(
    result: Any,
    *,
    default: Sensitivity,
    rules: tuple[FieldLabel, ...] = (),
    classifiers: frozenset[str] | None = None,
    declared_label: Declared | None = None,
    trust_declared: bool = False,
    deadline: Deadline | None = None,
) -> Labelled:
    """Label ``result`` (JSON-like): see the module's docstring for the order.

    JSON inside a string (a record as text) is read as the record it is. A classifier
    that fires in a record labels the whole record; the result's label is the most
    restrictive of its parts'; and a part no field rule nor classifier labelled (a
    passage beside the record that says it is confidential) takes the result's label.

    Raises :class:`~tether.core._scanning.ScanExceeded` when the deadline passes or the
    result is nested too deep (the caller treats it as unscanned: its label is the most
    restrictive of the tool's default and the upstream's declaration)."""
    base = Label(default, LabelOrigin.TOOL)
    if declared_label is not None and declared_label.sensitivity is not None:
        said = declared_label.sensitivity
        if said.rank > default.rank or (trust_declared and said != default):
            base = Label(said, LabelOrigin.UPSTREAM, declared_label.why)
    labeller = _Labeller(rules, classifiers, deadline)
    labeller.walk(result, base, False)
    parts = labeller.parts
    # The result's label is the most restrictive of its parts' (a record a field rule
    # labels public counts as public, whatever the tool's default); nothing in it: the base.
    top: Label | None = None
    for part in parts:
        if top is None or part.label.sensitivity.rank > top.sensitivity.rank:
            top = part.label
    top = top or base
    sensitive: list[tuple[str, Sensitivity]] = []
    values: list[tuple[str, Sensitivity]] = []
    for part in parts:
        level = part.label.sensitivity if part.ruled else top.sensitivity
        if level.rank >= Sensitivity.CONFIDENTIAL.rank:
            sensitive.append((part.text, level))
            if part.found is not None:
                values.extend((v, level) for v in exact_values(part.text, classifiers))
    return Labelled(label=top, sensitive_texts=tuple(sensitive), sensitive_values=tuple(values))
