"""What an SDK call raises when a tool call is not allowed."""

from __future__ import annotations

from tether._errors import Rejected, TetherError


class Denied(Rejected):
    """The decision was ``deny``; ``reasons`` says why, ``receipt`` where it is recorded."""

    code = "denied"

    def __init__(self, tool: str, reasons: list[dict[str, str]], receipt: dict[str, object]):
        first = reasons[0]["message"] if reasons else "denied"
        super().__init__(f"{tool}: {first}", code=reasons[0]["code"] if reasons else "denied")
        self.tool = tool
        self.reasons = reasons
        self.receipt = receipt


class ApprovalRequired(Rejected):
    """The call waits for a human; ``approval_id`` names the pending approval."""

    code = "approval_required"

    def __init__(self, tool: str, approval_id: str | None, reasons: list[dict[str, str]]):
        super().__init__(f"{tool}: approval required ({approval_id})")
        self.tool = tool
        self.approval_id = approval_id
        self.reasons = reasons


class APIError(TetherError):
    """The server refused the request (status and RFC 6749-style error code)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}", code=error)
        self.status = status


class ReportFailed(TetherError):
    """An allowed call ran, but what it returned could not be reported to Tether.

    A guarded tool (:meth:`tether.Task.guarded`, the framework adapters) reports every
    allowed call's result before handing it over, so the task's information-flow state
    records what the agent read. When that report fails (no answer, or the server refused
    it: an ended or revoked task, a result already reported, one too large) the result is
    withheld and this is raised instead: the agent never holds a result Tether did not
    observe. The tool *did* run; ``__cause__`` is the underlying error, ``status`` its HTTP
    status when the server answered, ``receipt`` the seq of the allowed decision.

    Neither a security rejection nor an infrastructure failure as such: the cause says
    which."""

    code = "report.failed"

    def __init__(
        self, tool: str, receipt: int | None, reason: str, *, status: int | None = None
    ) -> None:
        super().__init__(
            f"{tool}: the call ran but its result could not be reported, so it is withheld "
            f"({reason})"
        )
        self.tool = tool
        self.receipt = receipt
        self.reason = reason
        self.status = status
