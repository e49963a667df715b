"""Secrets in tool results are redacted before they reach the agent.

What is recognised: cloud and SaaS API keys (AWS ``AKIA``/``ASIA``, OpenAI- and
Anthropic-style ``sk-``, GitHub ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` and
``github_pat_``, Slack ``xox?-``), PEM private keys, bearer tokens and JWTs,
and passwords in connection strings (``scheme://user:password@host``). Each
match is replaced by ``[REDACTED:<kind>]``; the counts per kind are returned
so the redaction can be recorded. Redaction is deliberately eager: a false
positive costs a string, a miss leaks a credential into a model's context.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import mcp_types as types

MAX_DEPTH = 32

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


_PATTERNS: tuple[tuple[str, re.Pattern[str], _Replacement], ...] = (
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


def redact_text(text: str, counts: Counter[str] | None = None) -> tuple[str, Counter[str]]:
    """``text`` with every recognised secret replaced, and the counts per kind."""
    found: Counter[str] = counts if counts is not None else Counter()
    for kind, pattern, replace in _PATTERNS:
        text, n = pattern.subn(replace, text)
        if n:
            found[kind] += n
    return text, found


def redact_value(value: Any, counts: Counter[str], depth: int = 0) -> Any:
    """A JSON value with secrets redacted from every string in it (keys included)."""
    if depth > MAX_DEPTH:
        return "[REDACTED:too_deep]"
    if isinstance(value, str):
        return redact_text(value, counts)[0]
    if isinstance(value, list):
        return [redact_value(v, counts, depth + 1) for v in value]
    if isinstance(value, dict):
        return {
            redact_text(str(k), counts)[0]: redact_value(v, counts, depth + 1)
            for k, v in value.items()
        }
    return value


def _redact_block(block: types.ContentBlock, counts: Counter[str]) -> types.ContentBlock:
    if isinstance(block, types.TextContent):
        return block.model_copy(update={"text": redact_text(block.text, counts)[0], "meta": None})
    if isinstance(block, types.EmbeddedResource) and isinstance(
        block.resource, types.TextResourceContents
    ):
        resource = block.resource.model_copy(
            update={"text": redact_text(block.resource.text, counts)[0], "meta": None}
        )
        return block.model_copy(update={"resource": resource, "meta": None})
    if isinstance(block, types.ResourceLink):
        update = {
            field: redact_text(value, counts)[0]
            for field in ("uri", "name", "description", "title")
            if isinstance(value := getattr(block, field, None), str)
        }
        return block.model_copy(update={**update, "meta": None})
    # Images, audio and blobs are passed as they are (not scanned).
    return block.model_copy(update={"meta": None})


def redact_result(result: types.CallToolResult) -> tuple[types.CallToolResult, Counter[str]]:
    """The result with secrets redacted from its text, resources and structured content.

    The upstream's own ``_meta`` is dropped: it is not the agent's to see.
    """
    counts: Counter[str] = Counter()
    content = [_redact_block(block, counts) for block in result.content]
    structured = (
        None
        if result.structured_content is None
        else redact_value(result.structured_content, counts)
    )
    if structured is None:
        return types.CallToolResult(content=content, is_error=result.is_error), counts
    redacted = types.CallToolResult(
        content=content, structured_content=structured, is_error=result.is_error
    )
    return redacted, counts
