"""Secrets in tool results are redacted before they reach the agent.

What is recognised is described in :mod:`tether.core._credentials`: the values Tether
brokers (so an upstream that echoes the credential it was given is caught), known
credential formats, and high-entropy strings. Brokered values are found encoded, split,
reversed or in pieces too (:mod:`tether.core._fingerprints`). Each match is replaced by
``[REDACTED:<kind>]``; the counts per kind are returned so the redaction can be
recorded. Redaction is deliberately eager: a false positive costs a string, a miss
leaks a credential into a model's context.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import mcp_types as types

from tether.core._credentials import Known, redact_text, redact_value
from tether.core._scanning import Deadline

__all__ = ["Known", "redact_result", "redact_text", "redact_value"]


def _redact_block(
    block: types.ContentBlock,
    counts: Counter[str],
    known: list[Known],
    deadline: Deadline | None = None,
) -> types.ContentBlock:
    if isinstance(block, types.TextContent):
        text = redact_text(block.text, counts, known, deadline=deadline)[0]
        return block.model_copy(update={"text": text, "meta": None})
    if isinstance(block, types.EmbeddedResource) and isinstance(
        block.resource, types.TextResourceContents
    ):
        text = redact_text(block.resource.text, counts, known, deadline=deadline)[0]
        resource = block.resource.model_copy(update={"text": text, "meta": None})
        return block.model_copy(update={"resource": resource, "meta": None})
    if isinstance(block, types.ResourceLink):
        update = {
            field: redact_text(value, counts, known, deadline=deadline)[0]
            for field in ("uri", "name", "description", "title")
            if isinstance(value := getattr(block, field, None), str)
        }
        return block.model_copy(update={**update, "meta": None})
    # Images, audio and blobs are passed as they are (not scanned).
    return block.model_copy(update={"meta": None})


def redact_result(
    result: types.CallToolResult,
    known: Iterable[Known] = (),
    *,
    deadline: Deadline | None = None,
) -> tuple[types.CallToolResult, Counter[str]]:
    """The result with secrets redacted from its text, resources and structured content.

    The upstream's own ``_meta`` is dropped: it is not the agent's to see. Raises
    :class:`~tether.core._scanning.ScanExceeded` once ``deadline`` is past.
    """
    counts: Counter[str] = Counter()
    values = list(known)
    content = [_redact_block(block, counts, values, deadline) for block in result.content]
    structured = (
        None
        if result.structured_content is None
        else redact_value(result.structured_content, counts, known=values, deadline=deadline)
    )
    if structured is None:
        return types.CallToolResult(content=content, is_error=result.is_error), counts
    redacted = types.CallToolResult(
        content=content, structured_content=structured, is_error=result.is_error
    )
    return redacted, counts
