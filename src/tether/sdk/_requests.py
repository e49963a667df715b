"""Request building shared by the sync and async clients (no I/O here)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tether.core._canonical import canonical_json
from tether.sdk._errors import APIError, ApprovalRequired, Denied
from tether.tokens import ProofKey


@dataclass(frozen=True)
class Outgoing:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    data: dict[str, str] | None = None
    #: The node this request is for.
    base: str = ""
    #: Builds the same request afresh (new DPoP proof, new ``htu``) for another node: how
    #: a client fails over.
    remake: Callable[[str], Outgoing] | None = field(default=None, compare=False, repr=False)
    #: Whether it may go to another node after it may have reached this one (no answer, or
    #: 502/503/504). Only decisions and result reports: a second decision is a new one
    #: (fresh proof, its own receipt, one more call of the budget); a second report of one
    #: result is refused (409) or, observed again, adds nothing (flow state only grows).
    #: Anything else (opening a task, an exchange, an admin change) moves on only when this
    #: node surely never saw it.
    resend_after_send: bool = False


@dataclass(frozen=True)
class Verdict:
    """The answer to one ``authorize``: effect, reasons, policies, receipt, approval."""

    effect: str
    reasons: list[dict[str, str]]
    policies: list[str]
    risk_tags: list[str]
    receipt: dict[str, Any]
    task_id: str | None
    approval_id: str | None

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"

    def raise_for_effect(self, tool: str) -> None:
        if self.effect == "allow":
            return
        if self.effect == "approval_required":
            raise ApprovalRequired(tool, self.approval_id, self.reasons)
        raise Denied(tool, self.reasons, self.receipt)


@dataclass(frozen=True)
class Observation:
    """What Tether recorded of one reported tool result (:meth:`tether.Task.report`).

    ``sensitivity`` is the label the result was given (``public`` ... ``secret``),
    ``untrusted`` whether it carried content nobody vouches for (it now taints the task),
    ``receipt`` (``seq``, ``hash``) where the observation is recorded in the audit chain,
    ``oversized`` whether it was too large or too slow to scan (then it counts as untrusted
    content whose values are unknown)."""

    task_id: str
    tool: str
    sensitivity: str
    untrusted: bool
    receipt: dict[str, Any]
    oversized: bool = False


def reportable(result: Any) -> Any:
    """The JSON value reported for what a tool returned.

    A JSON value is reported as it is (as it reads back from JSON: a tuple becomes a list);
    anything else (an object, a NaN, a cycle) as ``str(result)``. The proof and the body
    carry this same value, so the server's digest of the body it parses matches the
    proof's. Nothing is capped here: the server refuses what is too large."""
    try:
        plain = json.loads(json.dumps(result, allow_nan=False))
        canonical_json(plain)  # what the proof's digest covers must encode
    except (TypeError, ValueError, RecursionError):
        # A lone surrogate cannot be UTF-8: escaped, so the text still reports.
        return str(result).encode("utf-8", "backslashreplace").decode("utf-8")
    return plain


def base_urls(base_url: str | Sequence[str]) -> list[str]:
    """One node's URL, or several nodes of one trust domain (tried in turn)."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ValueError("at least one base URL is needed")
    return [u.rstrip("/") for u in urls]


class Requests:
    """Builds authenticated requests for the current node and one set of credentials.

    With several nodes, :meth:`fail_over` moves to the next; every request carries
    ``remake`` so the client can send it again there, with a fresh proof."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        key: ProofKey | None,
        svid: str | None,
        admin: str | None,
    ) -> None:
        self.bases = base_urls(base_url)
        self.base_url = self.bases[0]
        self.key = key
        self.svid = svid
        self.admin = admin

    def fail_over(self) -> str:
        """Move to the next node (round robin); return its URL."""
        index = self.bases.index(self.base_url) if self.base_url in self.bases else -1
        self.base_url = self.bases[(index + 1) % len(self.bases)]
        return self.base_url

    def url(self, path: str, base: str | None = None) -> str:
        return f"{base or self.base_url}{path}"

    def _auth(self, method: str, url: str) -> dict[str, str]:
        if self.svid is not None and self.key is not None:
            proof = self.key.prove_request(self.svid, htm=method, htu=url, now=time.time())
            return {"Authorization": f"DPoP {self.svid}", "DPoP": proof}
        if self.admin is not None:
            return {"Authorization": f"Bearer {self.admin}"}
        return {}

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        base: str | None = None,
    ) -> Outgoing:
        base = base or self.base_url
        url = self.url(path, base)
        if params:
            from urllib.parse import urlencode  # noqa: PLC0415 - rarely used

            target = f"{url}?{urlencode(params)}"
        else:
            target = url
        return Outgoing(
            method,
            target,
            self._auth(method, url),
            json,
            base=base,
            remake=lambda other: self.call(method, path, json=json, params=params, base=other),
        )

    def delegation(
        self,
        parent_token: str,
        key: ProofKey,
        actor_svid: str,
        details: dict[str, Any],
        scope: str | None,
        base: str | None = None,
    ) -> Outgoing:
        """RFC 8693 exchange: the parent token, proven with its key, for the actor's task."""
        base = base or self.base_url
        url = self.url("/oauth2/token", base)
        proof = key.prove_request(parent_token, htm="POST", htu=url, now=time.time())
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": parent_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "actor_token": actor_svid,
            "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "request_details": json.dumps(details),
        }
        if scope is not None:
            form["scope"] = scope
        return Outgoing(
            "POST",
            url,
            {"DPoP": proof},
            None,
            form,
            base=base,
            remake=lambda other: self.delegation(
                parent_token, key, actor_svid, details, scope, other
            ),
        )

    def decision(
        self,
        token: str,
        key: ProofKey,
        tool: str,
        args: dict[str, Any],
        base: str | None = None,
    ) -> Outgoing:
        base = base or self.base_url
        url = self.url("/v1/decisions", base)
        proof = key.prove(token, tool, args, now=time.time(), htm="POST", htu=url)
        return Outgoing(
            "POST",
            url,
            {"Authorization": f"DPoP {token}", "DPoP": proof},
            {"tool": tool, "args": args},
            base=base,
            remake=lambda other: self.decision(token, key, tool, args, other),
            resend_after_send=True,
        )

    def result(
        self,
        token: str,
        key: ProofKey,
        task_id: str,
        tool: str,
        receipt: int,
        result: Any,
        base: str | None = None,
    ) -> Outgoing:
        """Report what ``tool`` returned after the allowed decision ``receipt`` (its seq).

        ``result`` must already be a JSON value (:func:`reportable`): the proof binds its
        digest with the tool and the receipt, so it cannot be replayed for another result.
        Like a decision it may be resent to another node after a failure that may have
        reached this one: a resend is either refused as already reported (409, so the
        caller fails closed) or observed; observing one result twice adds nothing."""
        base = base or self.base_url
        url = self.url(f"/v1/tasks/{task_id}/results", base)
        proof = key.prove_result(token, tool, receipt, result, now=time.time(), htm="POST", htu=url)
        return Outgoing(
            "POST",
            url,
            {"Authorization": f"DPoP {token}", "DPoP": proof},
            {"tool": tool, "receipt": receipt, "result": result},
            base=base,
            remake=lambda other: self.result(token, key, task_id, tool, receipt, result, other),
            resend_after_send=True,
        )


#: Answers after which a decision may go to another node: the node (or the balancer in
#: front of it) is going away or cannot reach the store.
RETRY_STATUS = frozenset({502, 503, 504})


class FailOver:
    """Where one request goes next when its node fails: the other nodes in turn, each once.

    Per request, so concurrent requests on one client never skip a healthy node for each
    other; the node that answers becomes the client's current one."""

    def __init__(self, requests: Requests, out: Outgoing) -> None:
        self.requests = requests
        self.out = out
        bases = requests.bases
        start = bases.index(out.base) if out.base in bases else -1
        self._rest = bases[start + 1 :] + bases[: max(start, 0)]

    def retry_after(self, failure: httpx.TransportError | int) -> bool:
        """After ``failure`` (no answer, or an HTTP status), whether to send again:
        ``True`` with :attr:`out` rebuilt for the next node. A node that could not be
        reached never saw the request; any other failure (no answer, 502/503/504) may
        have reached it."""
        if isinstance(failure, int) and failure not in RETRY_STATUS:
            return False
        sent = not isinstance(failure, httpx.ConnectError | httpx.ConnectTimeout)
        if self.out.remake is None or not self._rest:
            return False
        if sent and not self.out.resend_after_send:
            return False
        self.out = self.out.remake(self._rest.pop(0))
        return True

    def answered(self) -> None:
        if self.out.base:
            self.requests.base_url = self.out.base


def parse(status: int, body: Any) -> Any:
    if status >= 400:
        if isinstance(body, dict):
            raise APIError(
                status,
                str(body.get("error", "error")),
                str(body.get("error_description", body.get("detail", ""))),
            )
        raise APIError(status, "error", str(body)[:200])
    return body


def verdict(body: dict[str, Any]) -> Verdict:
    return Verdict(
        effect=body["effect"],
        reasons=body["reasons"],
        policies=body["policies"],
        risk_tags=body["risk_tags"],
        receipt=body["receipt"],
        task_id=body.get("task_id"),
        approval_id=body.get("approval_id"),
    )


def observation(body: dict[str, Any]) -> Observation:
    return Observation(
        task_id=body["task_id"],
        tool=body["tool"],
        sensitivity=body["sensitivity"],
        untrusted=body["untrusted"],
        receipt=body["receipt"],
        oversized=bool(body.get("oversized", False)),
    )
