"""Request building shared by the sync and async clients (no I/O here)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from tether.sdk._errors import APIError, ApprovalRequired, Denied
from tether.tokens import ProofKey


@dataclass(frozen=True)
class Outgoing:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    data: dict[str, str] | None = None


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


class Requests:
    """Builds authenticated requests for one base URL and one set of credentials."""

    def __init__(
        self, base_url: str, *, key: ProofKey | None, svid: str | None, admin: str | None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.svid = svid
        self.admin = admin

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _auth(self, method: str, url: str) -> dict[str, str]:
        if self.svid is not None and self.key is not None:
            proof = self.key.prove_request(self.svid, htm=method, htu=url, now=time.time())
            return {"Authorization": f"DPoP {self.svid}", "DPoP": proof}
        if self.admin is not None:
            return {"Authorization": f"Bearer {self.admin}"}
        return {}

    def call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> Outgoing:
        url = self.url(path)
        if params:
            from urllib.parse import urlencode  # noqa: PLC0415 - rarely used

            target = f"{url}?{urlencode(params)}"
        else:
            target = url
        return Outgoing(method, target, self._auth(method, url), json)

    def delegation(
        self,
        parent_token: str,
        key: ProofKey,
        actor_svid: str,
        details: dict[str, Any],
        scope: str | None,
    ) -> Outgoing:
        """RFC 8693 exchange: the parent token, proven with its key, for the actor's task."""
        url = self.url("/oauth2/token")
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
        return Outgoing("POST", url, {"DPoP": proof}, None, form)

    def decision(self, token: str, key: ProofKey, tool: str, args: dict[str, Any]) -> Outgoing:
        url = self.url("/v1/decisions")
        proof = key.prove(token, tool, args, now=time.time(), htm="POST", htu=url)
        return Outgoing(
            "POST",
            url,
            {"Authorization": f"DPoP {token}", "DPoP": proof},
            {"tool": tool, "args": args},
        )


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
