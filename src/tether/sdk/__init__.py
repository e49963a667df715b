"""The Python SDK: clients, tasks, guarded tools, framework adapters."""

from tether.sdk._client import AsyncClient, AsyncTask, Client, Task
from tether.sdk._errors import APIError, ApprovalRequired, Denied, ReportFailed
from tether.sdk._gateway_refusal import GatewayRefused, gateway_refusal, refusals_unwrapped
from tether.sdk._mcp_auth import TetherHttpxAuth, TetherMCPAuth
from tether.sdk._requests import Observation, Verdict

__all__ = [
    "APIError",
    "ApprovalRequired",
    "AsyncClient",
    "AsyncTask",
    "Client",
    "Denied",
    "GatewayRefused",
    "Observation",
    "ReportFailed",
    "Task",
    "TetherHttpxAuth",
    "TetherMCPAuth",
    "Verdict",
    "gateway_refusal",
    "refusals_unwrapped",
]
