"""``tether.Client`` and ``tether.AsyncClient``: the SDK for agents and admins.

Sync and async mirror each other; both build requests with
:mod:`tether.sdk._requests` and differ only in how they send them.

An agent holds its key (:class:`tether.ProofKey`) and its JWT-SVID. A task is a
context manager, so it always ends, on success, on an exception and on
``KeyboardInterrupt``::

    with client.task(template="pay-bill", params={"payee": "DE89..."}) as task:
        task.authorize("bank.read_bills", {})          # -> Verdict
        pay = task.guarded(pay_bill)                   # raises Denied / ApprovalRequired
        pay("DE89...", 120.0)                          # runs, then its result is reported

A guarded tool reports what each allowed call returned (:meth:`Task.report`) before the
caller gets it, so the task's information-flow state covers what the agent read; when the
report fails the result is withheld and :class:`tether.ReportFailed` is raised.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ParamSpec, TypeVar

import httpx

from tether.observability import with_trace_context
from tether.sdk._errors import APIError, ReportFailed
from tether.sdk._requests import (
    FailOver,
    Observation,
    Outgoing,
    Requests,
    Verdict,
    observation,
    parse,
    reportable,
    verdict,
)
from tether.tokens import ProofKey

P = ParamSpec("P")
R = TypeVar("R")


def _call_args(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _task_body(
    template: str | None,
    params: dict[str, Any] | None,
    intent: dict[str, Any] | None,
    parent_task_id: str | None,
    resources: list[str] | None = None,
    request: str | None = None,
) -> dict[str, Any]:
    return {
        "request": request,
        "resources": resources or [],
        "template": template,
        "params": params or {},
        "intent": intent,
        "parent_task_id": parent_task_id,
    }


def _kill_body(
    reason: str,
    agent: str | None,
    owner: str | None,
    template: str | None,
    trust_domain: str | None,
    everything: bool,
) -> dict[str, Any]:
    return {
        "reason": reason,
        "agent": agent,
        "owner": owner,
        "template": template,
        "trust_domain": trust_domain,
        "all": everything,
    }


def _receipt_seq(tool: str, allowed: Verdict) -> int:
    """The receipt seq of an allowed decision (what its result report answers)."""
    seq = allowed.receipt.get("seq")
    if allowed.effect != "allow" or not isinstance(seq, int) or isinstance(seq, bool):
        raise ReportFailed(tool, None, f"the decision is {allowed.effect!r} with no receipt seq")
    return seq


def _report_failed(tool: str, seq: int, exc: Exception) -> ReportFailed:
    status = exc.status if isinstance(exc, APIError) else None
    return ReportFailed(tool, seq, f"{type(exc).__name__}: {exc}", status=status)


def report_allowed(task: Task, tool: str, allowed: Verdict, result: Any) -> Observation:
    """Report what an allowed call of ``tool`` returned, or raise :class:`ReportFailed`.

    What guarded tools and the framework adapters do after every allowed call: any failure
    (no answer, an HTTP error, an answer that does not parse) is a ``ReportFailed``, so the
    caller withholds the result rather than hand over one Tether did not observe."""
    seq = _receipt_seq(tool, allowed)
    try:
        return task.report(tool, seq, result)
    except Exception as exc:
        raise _report_failed(tool, seq, exc) from exc


async def areport_allowed(
    task: Task | AsyncTask, tool: str, allowed: Verdict, result: Any
) -> Observation:
    """The async mirror of :func:`report_allowed`; a sync :class:`Task` reports in a worker
    thread, so the event loop is never blocked."""
    if isinstance(task, Task):
        return await asyncio.to_thread(report_allowed, task, tool, allowed, result)
    seq = _receipt_seq(tool, allowed)
    try:
        return await task.report(tool, seq, result)
    except Exception as exc:
        raise _report_failed(tool, seq, exc) from exc


# -- sync -------------------------------------------------------------------------------------
class Task:
    """One open task: its token, bound to the client's key."""

    def __init__(self, client: Client, task_id: str, token: str, expires_at: float) -> None:
        self.client = client
        self.task_id = task_id
        self.token = token
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"Task({self.task_id!r})"

    def authorize(self, tool: str, args: dict[str, Any] | None = None) -> Verdict:
        """Ask for a decision on one call; never raises for a deny."""
        assert self.client.key is not None
        out = self.client.requests.decision(self.token, self.client.key, tool, args or {})
        return verdict(self.client.send(out))

    def check(self, tool: str, args: dict[str, Any] | None = None) -> Verdict:
        """Like :meth:`authorize`, but raises ``Denied`` or ``ApprovalRequired``."""
        result = self.authorize(tool, args)
        result.raise_for_effect(tool)
        return result

    def report(self, tool: str, receipt: int, result: Any) -> Observation:
        """Tell Tether what ``tool`` returned after the allowed decision ``receipt``
        (``Verdict.receipt["seq"]``), so the task's flow state records what was read: its
        sensitivity, and whether it carried untrusted content that later calls are judged
        against. ``result`` is reported as JSON; a value that is not JSON as ``str(result)``.

        Raises :class:`tether.APIError` when the server refuses it (401 token or proof,
        404 unknown task or receipt, 409 already reported or the task no longer live, 413
        too large) and ``httpx.HTTPError`` when no node answers.
        :meth:`guarded` calls this for you."""
        assert self.client.key is not None
        out = self.client.requests.result(
            self.token, self.client.key, self.task_id, tool, receipt, reportable(result)
        )
        return observation(self.client.send(out))

    def guarded(self, fn: Callable[P, R], *, name: str | None = None) -> Callable[P, R]:
        """Wrap a tool function: every call is authorized first, with its arguments, and
        what an allowed call returns is reported (:meth:`report`) before it is returned.

        A refused call raises :class:`tether.Denied` or :class:`tether.ApprovalRequired`
        and does not run. A call that raises reports nothing; its exception propagates.
        **Fails closed:** when the report fails (no answer, or the server refuses it), the
        call has run but its result is withheld: :class:`ReportFailed` is raised, with the
        reporting error as its ``__cause__``, so the agent never holds a result Tether did
        not observe."""
        tool = name or fn.__name__

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            allowed = self.check(tool, _call_args(fn, args, kwargs))
            result = fn(*args, **kwargs)
            report_allowed(self, tool, allowed, result)
            return result

        return wrapper

    def delegate(
        self,
        actor_svid: str,
        *,
        intent: dict[str, Any] | None = None,
        template: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Hand a narrower sub-task to the agent whose JWT-SVID is ``actor_svid``.

        This task's key proves the parent's consent; the returned ``access_token`` is bound
        to the actor's key (give it, with ``task_id``, to that agent: ``Client.adopt``)."""
        assert self.client.key is not None
        out = self.client.requests.delegation(
            self.token,
            self.client.key,
            actor_svid,
            {"intent": intent} if intent is not None else {"params": params or {}},
            template,
        )
        result: dict[str, Any] = self.client.send(out)
        return result

    def end(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.send(
            self.client.requests.call("POST", f"/v1/tasks/{self.task_id}/end")
        )
        return result

    def renew(self) -> Task:
        """Swap this task's token for a fresh one (a long-running task, before the token
        runs out); the old token is revoked. Raises if the current policy refuses."""
        body = self.client.post(f"/v1/tasks/{self.task_id}/renew")
        self.token, self.expires_at = body["token"], body["expires_at"]
        return self


class Client:
    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        key: ProofKey | None = None,
        svid: str | None = None,
        admin: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.key = key
        self.requests = Requests(base_url, key=key, svid=svid, admin=admin)
        self._http = httpx.Client(transport=transport, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, out: Outgoing) -> Any:
        """Send ``out``; if its node fails, fail over to the next (see :class:`FailOver`).

        A request moves on when its node could not be reached; a decision or a result
        report also when the node gave no answer or a 502/503/504 (a second decision is a
        new one: a fresh proof, its own receipt, one more call of the budget, never an allow
        the store did not record; a resent result report is observed or refused, and
        observing one result twice adds nothing)."""
        plan = FailOver(self.requests, out)
        while True:
            out = plan.out
            try:
                response = self._http.request(
                    out.method,
                    out.url,
                    headers=with_trace_context(out.headers),
                    json=out.json,
                    data=out.data,
                )
            except httpx.TransportError as exc:
                if plan.retry_after(exc):
                    continue
                raise
            if plan.retry_after(response.status_code):
                continue
            plan.answered()
            body = response.json() if response.content else None
            return parse(response.status_code, body)

    def get(self, path: str, **params: str) -> Any:
        return self.send(self.requests.call("GET", path, params=params or None))

    def post(self, path: str, body: Any = None) -> Any:
        return self.send(self.requests.call("POST", path, json=body))

    # -- workloads -------------------------------------------------------------------------
    def attest(self, join_token: str, *, audience: list[str] | None = None) -> dict[str, Any]:
        """Exchange a join token for SVIDs bound to this client's key; keep the JWT-SVID."""
        if self.key is None:
            self.key = ProofKey()
            self.requests.key = self.key
        svids: dict[str, Any] = self.post(
            "/v1/attest", {"join_token": join_token, "jwk": self.key.jwk, "audience": audience}
        )
        self.requests.svid = svids["jwt_svid"]
        return svids

    def open_task(
        self,
        *,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        intent: dict[str, Any] | None = None,
        parent_task_id: str | None = None,
        resources: list[str] | None = None,
        request: str | None = None,
    ) -> Task:
        body = self.post(
            "/v1/tasks", _task_body(template, params, intent, parent_task_id, resources, request)
        )
        return Task(self, body["task_id"], body["token"], body["expires_at"])

    @contextmanager
    def task(
        self,
        *,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        intent: dict[str, Any] | None = None,
        parent_task_id: str | None = None,
        resources: list[str] | None = None,
        request: str | None = None,
    ) -> Iterator[Task]:
        """Open a task and end it on exit, whatever ends the block."""
        task = self.open_task(
            template=template,
            params=params,
            intent=intent,
            parent_task_id=parent_task_id,
            resources=resources,
            request=request,
        )
        try:
            yield task
        finally:
            task.end()

    def adopt(self, task_id: str, token: str, expires_at: float = 0.0) -> Task:
        """A task delegated to this client's agent (its token is bound to this key)."""
        return Task(self, task_id, token, expires_at)

    # -- admin ------------------------------------------------------------------------------
    def register_identity(
        self, spiffe_id: str, *, kind: str, owner: str, description: str = ""
    ) -> Any:
        return self.post(
            "/v1/identities",
            {"spiffe_id": spiffe_id, "kind": kind, "owner": owner, "description": description},
        )

    def join_token(self, spiffe_id: str, *, ttl: float = 600.0) -> str:
        token: str = self.post("/v1/identities/join-token", {"spiffe_id": spiffe_id, "ttl": ttl})[
            "join_token"
        ]
        return token

    def disable_identity(self, spiffe_id: str) -> Any:
        return self.post("/v1/identities/disable", {"spiffe_id": spiffe_id})

    def load_policies(self, files: dict[str, str], schema: str | None = None) -> Any:
        return self.post("/v1/policies", {"files": files, "schema": schema})

    def add_template(self, template: dict[str, Any]) -> Any:
        return self.post("/v1/templates", {"template": template})

    def approvals(self, status: str = "pending") -> list[dict[str, Any]]:
        approvals: list[dict[str, Any]] = self.get("/v1/approvals", status=status)["approvals"]
        return approvals

    def approve(self, approval_id: str, comment: str = "") -> Any:
        """Approve a held call; ``comment`` is kept in the receipt."""
        return self.post(f"/v1/approvals/{approval_id}/approve", {"comment": comment})

    def deny(self, approval_id: str, comment: str = "") -> Any:
        """Deny a held call; ``comment`` is kept in the receipt."""
        return self.post(f"/v1/approvals/{approval_id}/deny", {"comment": comment})

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.get("/v1/audit", limit=str(limit))["records"]
        return records

    def verify_audit(self) -> Any:
        return self.get("/v1/audit/verify")

    def trace(self, task_id: str) -> dict[str, Any]:
        """The whole delegation tree of a task: tasks, receipts, leases."""
        result: dict[str, Any] = self.get("/v1/audit/trace", task_id=task_id)
        return result

    def kill(
        self,
        reason: str,
        *,
        agent: str | None = None,
        owner: str | None = None,
        template: str | None = None,
        trust_domain: str | None = None,
        all: bool = False,
    ) -> dict[str, list[str]]:
        """The kill switch (admin): revoke every open task in scope, now."""
        result: dict[str, list[str]] = self.post(
            "/v1/kill", _kill_body(reason, agent, owner, template, trust_domain, all)
        )
        return result

    def jwks(self) -> Any:
        return self.get("/.well-known/jwks.json")

    def spiffe_bundle(self) -> Any:
        return self.get("/.well-known/spiffe-bundle")


# -- async ------------------------------------------------------------------------------------
class AsyncTask:
    """The async mirror of :class:`Task`."""

    def __init__(self, client: AsyncClient, task_id: str, token: str, expires_at: float) -> None:
        self.client = client
        self.task_id = task_id
        self.token = token
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"AsyncTask({self.task_id!r})"

    async def authorize(self, tool: str, args: dict[str, Any] | None = None) -> Verdict:
        assert self.client.key is not None
        out = self.client.requests.decision(self.token, self.client.key, tool, args or {})
        return verdict(await self.client.send(out))

    async def check(self, tool: str, args: dict[str, Any] | None = None) -> Verdict:
        result = await self.authorize(tool, args)
        result.raise_for_effect(tool)
        return result

    async def report(self, tool: str, receipt: int, result: Any) -> Observation:
        """The async mirror of :meth:`Task.report`."""
        assert self.client.key is not None
        out = self.client.requests.result(
            self.token, self.client.key, self.task_id, tool, receipt, reportable(result)
        )
        return observation(await self.client.send(out))

    def guarded(
        self, fn: Callable[P, Awaitable[R]], *, name: str | None = None
    ) -> Callable[P, Awaitable[R]]:
        """The async mirror of :meth:`Task.guarded`: authorized first, the result reported
        before it is returned; a failed report raises :class:`ReportFailed` (fails
        closed), a call that raises reports nothing."""
        tool = name or fn.__name__

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            allowed = await self.check(tool, _call_args(fn, args, kwargs))
            result = await fn(*args, **kwargs)
            await areport_allowed(self, tool, allowed, result)
            return result

        return wrapper

    async def delegate(
        self,
        actor_svid: str,
        *,
        intent: dict[str, Any] | None = None,
        template: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        assert self.client.key is not None
        out = self.client.requests.delegation(
            self.token,
            self.client.key,
            actor_svid,
            {"intent": intent} if intent is not None else {"params": params or {}},
            template,
        )
        result: dict[str, Any] = await self.client.send(out)
        return result

    async def end(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.send(
            self.client.requests.call("POST", f"/v1/tasks/{self.task_id}/end")
        )
        return result

    async def renew(self) -> AsyncTask:
        """The async mirror of :meth:`Task.renew`."""
        body = await self.client.post(f"/v1/tasks/{self.task_id}/renew")
        self.token, self.expires_at = body["token"], body["expires_at"]
        return self


class AsyncClient:
    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        key: ProofKey | None = None,
        svid: str | None = None,
        admin: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.key = key
        self.requests = Requests(base_url, key=key, svid=svid, admin=admin)
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, out: Outgoing) -> Any:
        """The async mirror of :meth:`Client.send` (fails over the same way)."""
        plan = FailOver(self.requests, out)
        while True:
            out = plan.out
            try:
                response = await self._http.request(
                    out.method,
                    out.url,
                    headers=with_trace_context(out.headers),
                    json=out.json,
                    data=out.data,
                )
            except httpx.TransportError as exc:
                if plan.retry_after(exc):
                    continue
                raise
            if plan.retry_after(response.status_code):
                continue
            plan.answered()
            body = response.json() if response.content else None
            return parse(response.status_code, body)

    async def get(self, path: str, **params: str) -> Any:
        return await self.send(self.requests.call("GET", path, params=params or None))

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.send(self.requests.call("POST", path, json=body))

    def adopt(self, task_id: str, token: str, expires_at: float = 0.0) -> AsyncTask:
        """A task delegated to this client's agent (its token is bound to this key)."""
        return AsyncTask(self, task_id, token, expires_at)

    async def attest(self, join_token: str, *, audience: list[str] | None = None) -> dict[str, Any]:
        if self.key is None:
            self.key = ProofKey()
            self.requests.key = self.key
        svids: dict[str, Any] = await self.post(
            "/v1/attest", {"join_token": join_token, "jwk": self.key.jwk, "audience": audience}
        )
        self.requests.svid = svids["jwt_svid"]
        return svids

    async def open_task(
        self,
        *,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        intent: dict[str, Any] | None = None,
        parent_task_id: str | None = None,
        resources: list[str] | None = None,
        request: str | None = None,
    ) -> AsyncTask:
        body = await self.post(
            "/v1/tasks", _task_body(template, params, intent, parent_task_id, resources, request)
        )
        return AsyncTask(self, body["task_id"], body["token"], body["expires_at"])

    @asynccontextmanager
    async def task(
        self,
        *,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        intent: dict[str, Any] | None = None,
        parent_task_id: str | None = None,
        resources: list[str] | None = None,
        request: str | None = None,
    ) -> AsyncIterator[AsyncTask]:
        task = await self.open_task(
            template=template,
            params=params,
            intent=intent,
            parent_task_id=parent_task_id,
            resources=resources,
            request=request,
        )
        try:
            yield task
        finally:
            await task.end()

    async def trace(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.get("/v1/audit/trace", task_id=task_id)
        return result

    async def kill(
        self,
        reason: str,
        *,
        agent: str | None = None,
        owner: str | None = None,
        template: str | None = None,
        trust_domain: str | None = None,
        all: bool = False,
    ) -> dict[str, list[str]]:
        """The kill switch (admin): revoke every open task in scope, now."""
        result: dict[str, list[str]] = await self.post(
            "/v1/kill", _kill_body(reason, agent, owner, template, trust_domain, all)
        )
        return result
