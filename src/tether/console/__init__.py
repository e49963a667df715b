"""The web console: ``/console`` on ``tether serve`` (server-rendered, no build step).

Sign-in with an admin credential; the inventory, live tasks, the decision stream,
the approvals queue, the audit explorer and the risk report, in the words of the API
and the CLI. See :mod:`tether.console._pages` for roles, sessions and the content
security policy, :mod:`tether.console._accepted` for accepted risks.
"""

from tether.console._accepted import AcceptedRisks
from tether.console._pages import CSP, console_router

__all__ = ["CSP", "AcceptedRisks", "console_router"]
