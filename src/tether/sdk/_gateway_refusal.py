"""The gateway's refusal of a connection, as one exception instead of a nested group.

When the MCP gateway refuses a request (no task token, an ended or revoked task, a bad
DPoP proof: HTTP 401 with ``WWW-Authenticate: DPoP ... resource_metadata=...``; a
rate limit: 429), its body is a JSON-RPC error whose ``data`` carries the OAuth error
(``error``, ``error_description``), Tether's reason code and the receipt. The official
``mcp`` client surfaces it as an ``mcp.shared.exceptions.MCPError`` raised inside its
task groups, so ``async with mcp.Client(...)`` ends with that error wrapped in an
``ExceptionGroup`` inside another ``ExceptionGroup``: the nesting is the MCP SDK's.

:func:`gateway_refusal` finds the refusal in such a group, and :func:`refusals_unwrapped`
re-raises it as :class:`GatewayRefused`, one line that says what to do::

    with refusals_unwrapped():
        async with httpx2.AsyncClient(auth=TetherMCPAuth(task.token, key)) as http:
            async with Client(streamable_http_client(url, http_client=http)) as mcp:
                ...
    # tether.sdk.GatewayRefused: 401 invalid_token: the task has ended (token.task_ended)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from tether.sdk._errors import APIError

#: The gateway's refusal message: ``"<status> <error>: <description>"``.
_MESSAGE = re.compile(r"^(\d{3}) ([a-z_]+): (.*)$", re.DOTALL)
_MAX_DEPTH = 16


class GatewayRefused(APIError):
    """The MCP gateway refused the request: ``status`` (401, 403, 429), the OAuth
    ``error``, Tether's ``reason`` code and the ``receipt`` seq (when one was written)."""

    def __init__(
        self, status: int, error: str, description: str, reason: str | None, receipt: int | None
    ) -> None:
        super().__init__(status, error, description + (f" ({reason})" if reason else ""))
        self.error = error
        self.description = description
        self.reason = reason
        self.receipt = receipt


def _refusal_of(exc: BaseException) -> GatewayRefused | None:
    error = getattr(exc, "error", None)
    message = getattr(error, "message", None)
    data = getattr(error, "data", None)
    if not isinstance(message, str) or not isinstance(data, dict):
        return None
    match = _MESSAGE.match(message)
    if match is None or not isinstance(data.get("error"), str):
        return None
    status = int(match.group(1))
    if status < 400:
        return None
    description = data.get("error_description")
    reason = data.get("reason")
    receipt = data.get("receipt")
    return GatewayRefused(
        status,
        str(data["error"]),
        str(description) if isinstance(description, str) else match.group(3),
        reason if isinstance(reason, str) else None,
        receipt if isinstance(receipt, int) and not isinstance(receipt, bool) else None,
    )


def gateway_refusal(exc: BaseException, _depth: int = 0) -> GatewayRefused | None:
    """The gateway's refusal inside ``exc`` (an ``MCPError`` or any nesting of exception
    groups around one), else None."""
    if _depth > _MAX_DEPTH:
        return None
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = gateway_refusal(inner, _depth + 1)
            if found is not None:
                return found
        return None
    return _refusal_of(exc)


@contextlib.contextmanager
def refusals_unwrapped() -> Iterator[None]:
    """Re-raise a gateway refusal raised in the block as :class:`GatewayRefused` (the
    original group is its ``__cause__``); anything else goes through unchanged."""
    try:
        yield
    except BaseException as exc:
        refused = gateway_refusal(exc)
        if refused is None:
            raise
        raise refused from exc
