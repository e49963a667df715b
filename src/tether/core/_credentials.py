"""Credentials on the call path: recognised in arguments and results, redacted or refused.

What is recognised:

- **brokered values**: the values of the secrets Tether brokers (every version still
  usable) and of the dynamic credentials it minted, wherever they appear in a string, as
  they are or disguised: hex, base64/base64url, base32, percent-encoded, split by white
  space or separators, reversed, upper-cased, or a piece of half the value or more (see
  :mod:`tether.core._fingerprints`); in arguments, also cut over several strings of one
  call;
- **known formats**: cloud and SaaS API keys (AWS ``AKIA``/``ASIA``, OpenAI- and
  Anthropic-style ``sk-``, GitHub ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` and
  ``github_pat_``, Slack ``xox?-``), PEM private keys, bearer tokens and JWTs, passwords in
  connection strings (``scheme://user:password@host``) and ``password=...``-style pairs;
- **entropy**: a run of 24 or more base64/base64url characters mixing upper case, lower
  case and digits whose Shannon entropy is at least 4.5 bits a character (random keys
  and tokens; hex digests, UUIDs, identifiers and prose stay below it);
- **named credentials**: a JSON member whose name says it holds one (``password``,
  ``api_key``, ``token``, ``secret``...) with a string value of 8 or more characters.

Redaction replaces each match by ``[REDACTED:<kind>]`` and counts the kinds, so the
redaction can be recorded without the value. It is deliberately eager: a false positive
costs a string, a miss leaks a credential into a model's context.

Every pattern is linear-time (RE2, :mod:`tether.core._scanning`): arguments and results
are attacker text. Detection is a sequence of stages, each asked of one string in turn
(:class:`CredentialScanner`): the brokered values, the known formats (all in one pass),
high-entropy runs. A new way of spotting a credential (a decoded view of the text: hex,
base64, a value split across strings) is one more stage; redaction runs the same stages.
On the call path, the strings of one call's arguments are first looked at together: when
no stage finds anything in all of them at once (the common case), nothing is reported,
in one pass per stage; otherwise each string is scanned on its own to say where.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tether.core._fingerprints import Fingerprints
from tether.core._scanning import SPACE, Deadline, check, linear

if TYPE_CHECKING:
    from tether.core._scanning import LinearMatch, LinearPattern

MAX_DEPTH = 32
MIN_KNOWN_LENGTH = 8
ENTROPY_BITS = 4.5
ENTROPY_MIN_LENGTH = 24
#: The shortest text any stage can find something in (a brokered value, ``pwd=xxxxxx``).
MIN_CANDIDATE_LENGTH = min(MIN_KNOWN_LENGTH, 10)
#: Brokered values up to this many are looked for one by one; more, in one RE2 pass.
KNOWN_ONE_BY_ONE = 16
#: Joins the strings of one value for the first, combined look: no pattern matches it,
#: no brokered value holds it, and it is not a word character (``\b`` still holds).
_JOIN = "\x00"

_Replacement = Callable[["LinearMatch"], str]


def _whole(kind: str) -> _Replacement:
    return lambda _match: f"[REDACTED:{kind}]"


def _group(kind: str, group: int) -> _Replacement:
    def replace(match: LinearMatch) -> str:
        start, end = match.span(group)
        offset = match.start()
        text = match.group(0)
        return text[: start - offset] + f"[REDACTED:{kind}]" + text[end - offset :]

    return replace


_S = f"[{SPACE}]"


@dataclass(frozen=True, slots=True)
class Format:
    """A credential format: its kind, its linear pattern and how a match is redacted."""

    kind: str
    source: str
    replace: _Replacement

    @property
    def pattern(self) -> LinearPattern:
        """The pattern with its groups (for redaction)."""
        return _compiled(self.source, capture=True)

    @property
    def detector(self) -> LinearPattern:
        """The pattern without groups (for detection: faster on a long match)."""
        return _compiled(self.source, capture=False)


_COMPILED: dict[tuple[str, bool], LinearPattern] = {}


def _compiled(source: str, *, capture: bool) -> LinearPattern:
    pattern = _COMPILED.get((source, capture))
    if pattern is None:
        pattern = _COMPILED[(source, capture)] = linear(source, capture=capture)
    return pattern


FORMATS: tuple[Format, ...] = (
    Format(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\z)",
        _whole("private_key"),
    ),
    Format(
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
        _whole("jwt"),
    ),
    Format(
        "bearer_token",
        r"(?i)\b(?:bearer|dpop|token)" + _S + r"+([A-Za-z0-9._~+/=-]{16,})",
        _group("bearer_token", 1),
    ),
    Format(
        "aws_access_key",
        # No word boundary on either side: a key glued to other characters (``xAKIA...``,
        # ``AKIA..._old``) is still a key.
        r"(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}",
        _whole("aws_access_key"),
    ),
    Format(
        "aws_secret_key",
        r"(?i)\baws_?secret_?access_?key\b" + _S + r"*[:=]" + _S + r"*[\"']?([A-Za-z0-9/+=]{40})",
        _group("aws_secret_key", 1),
    ),
    # ``sk-`` and a run of 16 or more key characters (``sk-proj-...`` included: a match
    # always ends where the run does, so no inner repetition is needed).
    Format("api_key", r"\bsk-[A-Za-z0-9_-]{16,}", _whole("api_key")),
    Format(
        "github_token",
        r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})",
        _whole("github_token"),
    ),
    Format("slack_token", r"\bxox[abposre]-[A-Za-z0-9-]{10,}", _whole("slack_token")),
    Format(
        "connection_password",
        rf"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^{SPACE}:/@?#]*:([^{SPACE}@/?#]+)@[^{SPACE}/?#]+",
        _group("connection_password", 1),
    ),
    Format(
        "password",
        r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key)\b"
        + _S
        + r"*[:=]"
        + _S
        + rf"*[\"']?([^{SPACE}\"',;]{{6,}})",
        _group("password", 1),
    ),
)

#: Every format in one pattern: one pass tells whether any format occurs (which one is
#: asked of the formats one by one, for the rare string where one does).
_ANY_FORMAT = linear("|".join(f"(?:{f.source})" for f in FORMATS), capture=False)

_ENTROPY_RUN = linear(r"[A-Za-z0-9+/_-]{" + str(ENTROPY_MIN_LENGTH) + r",}={0,2}", capture=False)

#: Member names that say they hold a credential: the whole name, or its last part after
#: ``_`` or ``-`` (``client_secret``, ``x_api_key``, ``db-password``), in any case.
_CREDENTIAL_NAMES = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "client_secret",
        "api_key",
        "apikey",
        "access_key",
        "accesskey",
        "private_key",
        "privatekey",
        "token",
        "access_token",
        "refresh_token",
        "auth_token",
        "credential",
        "credentials",
    }
)
_NAME_SUFFIXES = tuple(_CREDENTIAL_NAMES)


def named_credential(name: str) -> bool:
    """Whether a member name says its value is a credential (``password``, ``x_api_key``)."""
    lower = name.lower()
    if lower in _CREDENTIAL_NAMES:
        return True
    if not lower.endswith(_NAME_SUFFIXES):
        return False
    return any(
        lower.endswith(word) and lower[-len(word) - 1] in "_-"
        for word in _CREDENTIAL_NAMES
        if len(lower) > len(word)
    )


def shannon_entropy(text: str) -> float:
    """Bits per character of ``text``'s own character distribution."""
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _random_looking(run: str) -> bool:
    core = run.rstrip("=")
    if len(core) < ENTROPY_MIN_LENGTH:
        return False
    if not (
        any(c.isupper() for c in core)
        and any(c.islower() for c in core)
        and any(c.isdigit() for c in core)
    ):
        return False
    return shannon_entropy(core) >= ENTROPY_BITS


@dataclass(frozen=True, slots=True)
class Known:
    """A value Tether brokers, with the label findings name it by (never the value)."""

    label: str
    value: str


class _KnownValues:
    """Brokered values, ready to be found: one by one when few, in one RE2 pass when many."""

    __slots__ = ("_labels", "_pattern", "prints", "values")

    def __init__(self, known: Iterable[Known]) -> None:
        items = sorted(
            (k for k in known if len(k.value) >= MIN_KNOWN_LENGTH),
            key=lambda k: len(k.value),
            reverse=True,
        )
        self._labels: dict[str, str] = {}
        for item in items:
            self._labels.setdefault(item.value, item.label)
        self.values: tuple[str, ...] = tuple(self._labels)
        self._pattern: LinearPattern | None = None
        if len(self.values) > KNOWN_ONE_BY_ONE:
            self._pattern = linear("|".join(_literal(v) for v in self.values), capture=False)
        # Every other form of the same values: encoded, split, reversed, cut in pieces.
        self.prints: Fingerprints | None = (
            Fingerprints((label, value) for value, label in self._labels.items())
            if self.values
            else None
        )

    def first(self, text: str) -> str | None:
        """The label of a brokered value ``text`` holds, as it is or in any form, or
        ``None``."""
        if self._pattern is None:
            for value in self.values:
                if value in text:
                    return self._labels[value]
        else:
            match = self._pattern.search(text)
            if match is not None:
                return self._labels[match.group(0)]
        return None if self.prints is None else self.prints.first(text)

    def redact(self, text: str, found: Counter[str], deadline: Deadline | None = None) -> str:
        if self._pattern is None:
            for value in self.values:
                if value in text:
                    found["brokered"] += text.count(value)
                    text = text.replace(value, "[REDACTED:brokered]")
        else:
            text, n = self._pattern.subn("[REDACTED:brokered]", text)
            if n:
                found["brokered"] += n
        return text if self.prints is None else self.prints.redact(text, found, deadline)


def _literal(value: str) -> str:
    """``value`` as an RE2 pattern that matches it exactly."""
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}" for c in value)


class _LastKnown:
    """The brokered values last looked for, ready to be found: built again only when they
    change (the broker hands out the same values, as the same objects, call after call,
    so comparing them is a pass over pointers)."""

    def __init__(self) -> None:
        self._entry: tuple[tuple[Known, ...], _KnownValues] = ((), _KnownValues(()))

    def get(self, known: Iterable[Known]) -> _KnownValues:
        items = known if isinstance(known, tuple) else tuple(known)
        entry = self._entry
        if items == entry[0]:
            return entry[1]
        built = _KnownValues(items)
        self._entry = (items, built)  # one assignment: a concurrent reader sees old or new
        return built


_known_values = _LastKnown().get


class CredentialScanner:
    """The detection stages, in order, over one string: brokered values, known formats,
    high-entropy runs. The first stage that finds something names the kind."""

    def __init__(self, known: Iterable[Known] = ()) -> None:
        self.known = _known_values(known)

    def detect(self, text: str) -> tuple[str, str | None] | None:
        """``(kind, brokered label)`` of the first credential in ``text``, or ``None``."""
        if len(text) < MIN_CANDIDATE_LENGTH:
            return None
        label = self.known.first(text)
        if label is not None:
            return "brokered", label
        if _ANY_FORMAT.search(text) is not None:
            for fmt in FORMATS:
                if fmt.detector.search(text) is not None:
                    return fmt.kind, None
        if len(text) >= ENTROPY_MIN_LENGTH and _has_random_run(text):
            return "high_entropy", None
        return None

    def redact(self, text: str, found: Counter[str], deadline: Deadline | None = None) -> str:
        """``text`` with every credential replaced by ``[REDACTED:<kind>]``."""
        if len(text) < MIN_CANDIDATE_LENGTH:
            return text
        text = self.known.redact(text, found, deadline)
        check(deadline)
        if _ANY_FORMAT.search(text) is not None:
            for fmt in FORMATS:
                check(deadline)
                text, n = fmt.pattern.subn(fmt.replace, text)
                if n:
                    found[fmt.kind] += n
        check(deadline)
        if len(text) < ENTROPY_MIN_LENGTH:
            return text

        def entropy(match: LinearMatch) -> str:
            if not _random_looking(match.group(0)):
                return match.group(0)
            found["high_entropy"] += 1
            return "[REDACTED:high_entropy]"

        return _ENTROPY_RUN.sub(entropy, text)


def _has_random_run(text: str) -> bool:
    return any(_random_looking(m.group(0)) for m in _ENTROPY_RUN.finditer(text))


def redact_text(
    text: str,
    counts: Counter[str] | None = None,
    known: Iterable[Known] = (),
    *,
    deadline: Deadline | None = None,
) -> tuple[str, Counter[str]]:
    """``text`` with every recognised credential replaced, and the counts per kind
    (raises :class:`~tether.core._scanning.ScanExceeded` past ``deadline``)."""
    found: Counter[str] = counts if counts is not None else Counter()
    return CredentialScanner(known).redact(text, found, deadline), found


def redact_value(
    value: Any,
    counts: Counter[str],
    depth: int = 0,
    known: Iterable[Known] = (),
    *,
    deadline: Deadline | None = None,
) -> Any:
    """A JSON value with credentials redacted from every string in it (keys included)."""
    return _redact(value, counts, depth, CredentialScanner(known), deadline)


def _redact(
    value: Any,
    counts: Counter[str],
    depth: int,
    scanner: CredentialScanner,
    deadline: Deadline | None,
) -> Any:
    if depth > MAX_DEPTH:
        return "[REDACTED:too_deep]"
    if isinstance(value, str):
        return scanner.redact(value, counts, deadline)
    if isinstance(value, list):
        return [_redact(v, counts, depth + 1, scanner, deadline) for v in value]
    if isinstance(value, dict):
        return {
            scanner.redact(str(k), counts, deadline): _redact(
                v, counts, depth + 1, scanner, deadline
            )
            for k, v in value.items()
        }
    return value


@dataclass(frozen=True, slots=True)
class Finding:
    """A credential found in a value: its kind and where (a JSON path), never the value."""

    kind: str
    path: str
    secret: str | None = None  # the brokered secret's label, for brokered values

    def describe(self) -> str:
        what = f"the brokered secret {self.secret!r}" if self.secret else f"a {self.kind}"
        return f"{self.path} carries {what}"


def _strings(value: Any, depth: int = 0, *, keys: bool = True) -> Iterator[str]:
    """Every string in a JSON value, member names included unless ``keys`` is false (down
    to ``MAX_DEPTH``)."""
    if isinstance(value, str):
        yield value
    elif depth > MAX_DEPTH:
        return
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1, keys=keys)
    elif isinstance(value, dict):
        for key, member in value.items():
            if keys:
                yield str(key)
            yield from _strings(member, depth + 1, keys=keys)


def _nothing_to_find(value: Any, scanner: CredentialScanner) -> bool:
    """Whether a quick look at all of ``value``'s strings at once proves no stage can
    find anything in any of them (no false "nothing": a stage that finds something in
    one string finds it in the strings joined by a separator no stage matches)."""
    strings = [s for s in _strings(value) if len(s) >= MIN_CANDIDATE_LENGTH]
    if not strings:
        return True
    if any(_JOIN in s for s in strings):
        return False
    joined = _JOIN.join(strings)
    return scanner.detect(joined) is None


def find_credentials(value: Any, known: Iterable[Known] = (), *, path: str = "$") -> list[Finding]:
    """Every credential in a JSON value (at most one finding per string)."""
    scanner = CredentialScanner(known)
    out: list[Finding] = []
    # A brokered value cut in pieces over several strings: the strings joined in order
    # show it (or one piece, at least half of it, does, in any order).
    split = scanner.known.first(_JOIN.join(_strings(value, keys=False))) if known else None
    if split is None and not _has_named_member(value) and _nothing_to_find(value, scanner):
        return out
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            out.append(Finding("too_deep", where))
            continue
        if isinstance(item, str):
            _scan_text(scanner, item, where, out)
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))
        elif isinstance(item, dict):
            for key, member in item.items():
                name = str(key)
                child = f"{where}.{name[:64]}"
                _scan_text(scanner, name, f"{where} (a member name)", out)
                if (
                    isinstance(member, str)
                    and len(member) >= MIN_KNOWN_LENGTH
                    and named_credential(name)
                    and not member.startswith("[REDACTED:")
                ):
                    before = len(out)
                    _scan_text(scanner, member, child, out)
                    if len(out) == before:
                        out.append(Finding("named_credential", child))
                    continue
                stack.append((member, child, depth + 1))
    if split is not None and not any(f.secret is not None for f in out):
        out.append(Finding("brokered", f"{path} (split across strings)", split))
    # A path is made of member names the caller chose: it must not carry a credential either.
    return sorted(
        (Finding(f.kind, scanner.redact(f.path[:200], Counter()), f.secret) for f in out),
        key=lambda f: f.path,
    )


def _has_named_member(value: Any, depth: int = 0) -> bool:
    """Whether a member named like a credential holds a string, or nesting goes past
    ``MAX_DEPTH`` (both are findings without any stage finding anything)."""
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, list):
        return any(_has_named_member(v, depth + 1) for v in value)
    if isinstance(value, dict):
        for key, member in value.items():
            if isinstance(member, str) and len(member) >= MIN_KNOWN_LENGTH:
                if named_credential(str(key)):
                    return True
            elif _has_named_member(member, depth + 1):
                return True
    return False


def _scan_text(scanner: CredentialScanner, text: str, path: str, out: list[Finding]) -> None:
    found = scanner.detect(text)
    if found is not None:
        out.append(Finding(found[0], path, found[1]))
