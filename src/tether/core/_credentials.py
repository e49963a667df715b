"""Credentials on the call path: recognised in arguments and results, redacted or refused.

What is recognised:

- **brokered values**: the exact values of the secrets Tether brokers (every version still
  usable) and of the dynamic credentials it minted, wherever they appear in a string;
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
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32
MIN_KNOWN_LENGTH = 8
ENTROPY_BITS = 4.5
ENTROPY_MIN_LENGTH = 24

_Replacement = Callable[[re.Match[str]], str]


def _whole(kind: str) -> _Replacement:
    return lambda _match: f"[REDACTED:{kind}]"


def _group(kind: str, group: int) -> _Replacement:
    def replace(match: re.Match[str]) -> str:
        start, end = match.span(group)
        offset = match.start()
        text = match.group(0)
        return text[: start - offset] + f"[REDACTED:{kind}]" + text[end - offset :]

    return replace


PATTERNS: tuple[tuple[str, re.Pattern[str], _Replacement], ...] = (
    (
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
        ),
        _whole("private_key"),
    ),
    (
        "jwt",
        re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
        _whole("jwt"),
    ),
    (
        "bearer_token",
        re.compile(r"(?i)\b(?:bearer|dpop|token)\s+([A-Za-z0-9._~+/=-]{16,})"),
        _group("bearer_token", 1),
    ),
    (
        "aws_access_key",
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
        _whole("aws_access_key"),
    ),
    (
        "aws_secret_key",
        re.compile(r"(?i)\baws_?secret_?access_?key\b\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})"),
        _group("aws_secret_key", 1),
    ),
    ("api_key", re.compile(r"\bsk-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{16,}"), _whole("api_key")),
    (
        "github_token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
        _whole("github_token"),
    ),
    ("slack_token", re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}"), _whole("slack_token")),
    (
        "connection_password",
        re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@?#]*:([^\s@/?#]+)@[^\s/?#]+"),
        _group("connection_password", 1),
    ),
    (
        "password",
        re.compile(
            r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key)\b\s*[:=]\s*[\"']?([^\s\"',;]{6,})"
        ),
        _group("password", 1),
    ),
)

_ENTROPY_RUN = re.compile(r"[A-Za-z0-9+/_-]{" + str(ENTROPY_MIN_LENGTH) + r",}={0,2}")
_CREDENTIAL_NAME = re.compile(
    r"(?i)^(?:.*[_-])?(?:password|passwd|passphrase|secret|client_secret|api_?key|apikey|"
    r"access_?key|private_?key|token|access_token|refresh_token|auth_token|credentials?)$"
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


def _known_values(known: Iterable[Known]) -> list[Known]:
    return sorted(
        (k for k in known if len(k.value) >= MIN_KNOWN_LENGTH),
        key=lambda k: len(k.value),
        reverse=True,
    )


def redact_text(
    text: str, counts: Counter[str] | None = None, known: Iterable[Known] = ()
) -> tuple[str, Counter[str]]:
    """``text`` with every recognised credential replaced, and the counts per kind."""
    found: Counter[str] = counts if counts is not None else Counter()
    for item in _known_values(known):
        if item.value in text:
            found["brokered"] += text.count(item.value)
            text = text.replace(item.value, "[REDACTED:brokered]")
    for kind, pattern, replace in PATTERNS:
        text, n = pattern.subn(replace, text)
        if n:
            found[kind] += n

    def entropy(match: re.Match[str]) -> str:
        if not _random_looking(match.group(0)):
            return match.group(0)
        found["high_entropy"] += 1
        return "[REDACTED:high_entropy]"

    return _ENTROPY_RUN.sub(entropy, text), found


def redact_value(
    value: Any, counts: Counter[str], depth: int = 0, known: Iterable[Known] = ()
) -> Any:
    """A JSON value with credentials redacted from every string in it (keys included)."""
    known = list(known)
    if depth > MAX_DEPTH:
        return "[REDACTED:too_deep]"
    if isinstance(value, str):
        return redact_text(value, counts, known)[0]
    if isinstance(value, list):
        return [redact_value(v, counts, depth + 1, known) for v in value]
    if isinstance(value, dict):
        return {
            redact_text(str(k), counts, known)[0]: redact_value(v, counts, depth + 1, known)
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


def _scan_text(text: str, path: str, known: list[Known], out: list[Finding]) -> None:
    for item in known:
        if item.value in text:
            out.append(Finding("brokered", path, item.label))
            return
    for kind, pattern, _ in PATTERNS:
        if pattern.search(text):
            out.append(Finding(kind, path))
            return
    for match in _ENTROPY_RUN.finditer(text):
        if _random_looking(match.group(0)):
            out.append(Finding("high_entropy", path))
            return


def find_credentials(value: Any, known: Iterable[Known] = (), *, path: str = "$") -> list[Finding]:
    """Every credential in a JSON value (at most one finding per string)."""
    values = _known_values(known)
    out: list[Finding] = []
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            out.append(Finding("too_deep", where))
            continue
        if isinstance(item, str):
            _scan_text(item, where, values, out)
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))
        elif isinstance(item, dict):
            for key, member in item.items():
                name = str(key)
                child = f"{where}.{name[:64]}"
                _scan_text(name, f"{where} (a member name)", values, out)
                if (
                    isinstance(member, str)
                    and len(member) >= MIN_KNOWN_LENGTH
                    and _CREDENTIAL_NAME.match(name)
                    and not member.startswith("[REDACTED:")
                ):
                    before = len(out)
                    _scan_text(member, child, values, out)
                    if len(out) == before:
                        out.append(Finding("named_credential", child))
                    continue
                stack.append((member, child, depth + 1))
    # A path is made of member names the caller chose: it must not carry a credential either.
    return sorted(
        (Finding(f.kind, redact_text(f.path[:200], known=values)[0], f.secret) for f in out),
        key=lambda f: f.path,
    )
