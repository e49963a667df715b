"""The Python SDK: clients, tasks, guarded tools, framework adapters."""

from tether.sdk._client import AsyncClient, AsyncTask, Client, Task
from tether.sdk._errors import APIError, ApprovalRequired, Denied
from tether.sdk._mcp_auth import TetherHttpxAuth, TetherMCPAuth
from tether.sdk._requests import Verdict

__all__ = [
    "APIError",
    "ApprovalRequired",
    "AsyncClient",
    "AsyncTask",
    "Client",
    "Denied",
    "Task",
    "TetherHttpxAuth",
    "TetherMCPAuth",
    "Verdict",
]
