"""Hostile clients against a real ``tether serve`` process on loopback.

1. schemathesis over ``/openapi.json``: every operation, positive and negative data, a
   bounded and derandomized number of examples, unauthenticated and as an admin. No 5xx,
   no undeclared status, no body or content type the schema does not declare.
2. Named hostile inputs over HTTP: a 10 MB body, 10,000-deep JSON, invalid UTF-8, NULs,
   SQL and path strings. Each gets a 4xx, never a 5xx; the server keeps serving and its
   audit chain verifies; a refused request from a known principal leaves a
   ``request.rejected`` receipt, and a refused ``/v1/decisions`` call with a live task
   token a ``decision`` deny (an anonymous one is counted and sampled).

A well-formed decision call whose strings are odd (a tool named ``'; DROP TABLE``) is a
call like any other: ``200`` with ``effect: deny`` and its receipt, not an HTTP error.
"""

from __future__ import annotations

import contextlib
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tether import APIError, Client, ProofKey, Task

from .server_support import Server

AGENT = "spiffe://acme.example/agent/bill-payer"
OWNER = "alice@acme.example"
PAYEE = "DE50526018159083016613"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"

SQL = ("' OR 1=1; --", '"; DROP TABLE tasks; --')
PATHS = ("../../etc/passwd", "/etc/shadow", "%2e%2e%2f")
HOSTILE = SQL + PATHS
DEPTH = 10_000
TEN_MB = 10 * 1024 * 1024
JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TYPE_TXN = "urn:ietf:params:oauth:token-type:txn_token"

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # failures are collected, not raised: no shrink
    suppress_health_check=list(HealthCheck),
)


# -- a served trust domain with one attested agent and one open task ----------------------------
@dataclass
class World:
    server: Server
    http: httpx.Client
    admin: dict[str, str]  # the admin's Authorization header
    agent: Client
    task: Task


def _setup(server: Server) -> World:
    admin = Client(server.url, admin=server.admin)
    admin.register_identity(AGENT, kind="agent", owner=OWNER)
    admin.load_policies({p.name: p.read_text() for p in (EXAMPLES / "policies").glob("*.cedar")})
    admin.add_template(tomllib.loads((EXAMPLES / "templates" / "pay-bill.toml").read_text()))
    agent = Client(server.url, key=ProofKey())
    agent.attest(admin.join_token(AGENT))
    task = agent.open_task(template="pay-bill", params={"payee": PAYEE})
    return World(
        server=server,
        http=httpx.Client(base_url=server.url, timeout=60),
        admin={"Authorization": f"Bearer {server.admin}"},
        agent=agent,
        task=task,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = Server(tmp_path_factory.mktemp("hostile") / "home").start()
    w = _setup(server)
    yield w
    w.http.close()
    w.agent.close()
    server.stop()


def _newest(w: World) -> dict[str, Any]:
    response = w.http.get("/v1/audit", params={"limit": 5}, headers=w.admin)
    assert response.status_code == 200, response.text
    records: list[dict[str, Any]] = response.json()["records"]
    return max(records, key=lambda r: int(r["seq"]))


def _head(w: World) -> int:
    return int(_newest(w)["seq"])


def _refused(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    """A 4xx with the declared error body (``ErrorOut``)."""
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body: dict[str, Any] = response.json()
    assert set(body) == {"status_code", "detail", "error", "error_description"}
    assert body["status_code"] == response.status_code
    return body


def _rejected_receipt(w: World, response: httpx.Response, before: int) -> dict[str, Any]:
    """The newest receipt is the ``request.rejected`` deny for ``response``."""
    record = _newest(w)
    assert record["seq"] > before
    assert record["kind"] == "request.rejected" and record["effect"] == "deny", record
    assert record["detail"]["status"] == response.status_code
    assert record["reasons"][0]["code"] == response.json()["error"]
    return record


def _decision_receipt(w: World, before: int, *codes: str) -> dict[str, Any]:
    """The newest receipt is a ``decision`` deny with one of ``codes``."""
    record = _newest(w)
    assert record["seq"] > before
    assert record["kind"] == "decision" and record["effect"] == "deny", record
    assert record["reasons"][0]["code"] in codes, record
    return record


def _still_serving(w: World) -> None:
    assert w.http.get("/healthz").status_code == 200
    verify = w.http.get("/v1/audit/verify", headers=w.admin)
    assert verify.status_code == 200 and verify.json()["ok"] is True, verify.text
    # No table was dropped or emptied: the identity, the task and its receipts are there.
    identities = w.http.get("/v1/identities", headers=w.admin).json()["identities"]
    assert AGENT in [i["spiffe_id"] for i in identities]
    task = w.http.get(f"/v1/tasks/{w.task.task_id}", headers=w.admin)
    assert task.status_code == 200 and task.json()["status"] == "open", task.text
    receipts = w.http.get(
        "/v1/audit", params={"task_id": w.task.task_id, "limit": 10_000}, headers=w.admin
    ).json()["records"]
    assert any(r["kind"] == "task.open" for r in receipts)


def _dpop(w: World) -> dict[str, str]:
    """The task token in the Authorization header, as a decision call carries it."""
    return {"Authorization": f"DPoP {w.task.token}", "DPoP": "not-a-proof"}


# -- 1. schemathesis ---------------------------------------------------------------------------
def _fuzz(
    operation: Any, mode: GenerationMode, server: Server, headers: dict[str, str] | None
) -> tuple[int, list[str]]:
    """One operation in one generation mode: (calls made, failures)."""
    label = f"{operation.label} [{mode.value}]"
    failures: list[str] = []
    calls = 0

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        nonlocal calls
        calls += 1
        try:
            case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS)
        except Exception as exc:  # collected, so that one run reports every failure
            failures.append(f"{label}: {exc}"[:2000])

    # Negative data for an operation without parameters or body cannot exist.
    with contextlib.suppress(Unsatisfiable):
        run()
    return calls, failures


def _schemathesis(server: Server, headers: dict[str, str] | None) -> tuple[int, list[str]]:
    """Every operation, positive and negative: (calls made, failures)."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            made, failed = _fuzz(result.ok(), mode, server, headers)
            calls += made
            failures += failed
    return calls, failures


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A server of its own: the admin run loads policies and disables identities at will."""
    server = Server(tmp_path_factory.mktemp("fuzzed") / "home").start()
    w = _setup(server)
    yield w
    w.http.close()
    w.agent.close()
    server.stop()


@pytest.mark.parametrize("as_admin", [False, True], ids=["unauthenticated", "admin"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzzed: World, as_admin: bool
) -> None:
    calls, failures = _schemathesis(fuzzed.server, fuzzed.admin if as_admin else None)
    assert calls > 300
    assert not failures, f"{len(failures)} failures:\n" + "\n\n".join(failures[:10])
    assert fuzzed.http.get("/healthz").status_code == 200
    verify = fuzzed.http.get("/v1/audit/verify", headers=fuzzed.admin).json()
    assert verify["ok"] is True


def test_openapi_declares_what_the_server_enforces(world: World) -> None:
    schema = world.http.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("IdentityIn", "TaskOpenIn", "AuthorizeIn", "PoliciesIn"):
        assert components[name]["additionalProperties"] is False, name
    names = components["PoliciesIn"]["properties"]["files"]["propertyNames"]
    assert names["pattern"].startswith("^[A-Za-z0-9_]")
    form = schema["paths"]["/oauth2/token"]["post"]["requestBody"]["content"]
    assert "grant_type" in form["application/x-www-form-urlencoded"]["schema"]["required"]
    wrong_method = world.http.delete("/healthz")
    _refused(wrong_method, 405)
    assert "GET" in wrong_method.headers["allow"]


# -- 2. hostile inputs -------------------------------------------------------------------------
def test_ten_megabyte_body(world: World) -> None:
    big = b'{"tool": "' + b"a" * TEN_MB + b'"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield b'{"tool": "'
        for _ in range(TEN_MB // 65536):
            yield b"a" * 65536
        yield b'"}'

    for body in (big, chunked):
        before = _head(world)
        content = body if isinstance(body, bytes) else body()
        response = world.http.post("/v1/identities", content=content, headers=world.admin | JSON)
        _refused(response, 413)
        _rejected_receipt(world, response, before)

        before = _head(world)
        content = body if isinstance(body, bytes) else body()
        response = world.http.post("/v1/decisions", content=content, headers=_dpop(world) | JSON)
        _refused(response, 413)
        receipt = _decision_receipt(world, before, "call.oversized")
        assert receipt["task_id"] == world.task.task_id  # attributed to the token's task

        response = world.http.post("/oauth2/token", content=big, headers=FORM)
        _refused(response, 413)
    # Unauthenticated, to an authenticated endpoint: 401 before the body is read.
    _refused(world.http.post("/v1/tasks", content=big, headers=JSON), 401)
    _still_serving(world)


def _deep(kind: str) -> bytes:
    if kind == "array":
        return b"[" * DEPTH + b"]" * DEPTH
    return b'{"a":' * DEPTH + b"1" + b"}" * DEPTH


@pytest.mark.parametrize("kind", ["array", "object"])
def test_ten_thousand_deep_json(world: World, kind: str) -> None:
    deep = _deep(kind)
    # As the whole body of a decision call, and as its args.
    for body in (deep, b'{"tool": "bank.read_bills", "args": {"x": ' + deep + b"}}"):
        before = _head(world)
        response = world.http.post("/v1/decisions", content=body, headers=_dpop(world) | JSON)
        assert "nested deeper" in _refused(response, 400)["detail"]
        receipt = _decision_receipt(world, before, "call.malformed")
        assert receipt["task_id"] == world.task.task_id
    # Anonymous: counted, and one receipt per source address per interval stands for
    # them (request.unauthenticated), never one each.
    before = _head(world)
    for _ in range(3):
        _refused(world.http.post("/v1/decisions", content=deep, headers=JSON), 400)
    assert _head(world) <= before + 1
    # Admin bodies: identities, a task's params, a template, a dry run's args.
    for path, body in (
        ("/v1/identities", deep),
        ("/v1/tasks", b'{"template": "pay-bill", "params": ' + deep + b"}"),
        ("/v1/templates", b'{"template": ' + deep + b"}"),
        (
            "/v1/policies/dry-run",
            b'{"files": {}, "agent": "a", "tool": "t", "args": ' + deep + b"}",
        ),
    ):
        before = _head(world)
        response = world.http.post(path, content=body, headers=world.admin | JSON)
        _refused(response, 400)
        _rejected_receipt(world, response, before)
    # A deep request_details in a token exchange that is otherwise sound.
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "actor_token": world.agent.requests.svid or "",
        "actor_token_type": TYPE_JWT,
        "subject_token": world.task.token,
        "subject_token_type": TYPE_TXN,
        "request_details": deep.decode(),
    }
    assert world.agent.key is not None
    parent_proof = world.agent.key.prove_request(
        world.task.token, htm="POST", htu=f"{world.server.url}/oauth2/token", now=time.time()
    )
    response = world.http.post("/oauth2/token", data=form, headers={"DPoP": parent_proof})
    assert _refused(response, 400)["error"] == "invalid_request"
    _still_serving(world)


def test_invalid_utf8(world: World) -> None:
    body = b'{"tool": "\xff\xfe\xc3\x28", "args": {}}'
    before = _head(world)
    response = world.http.post("/v1/decisions", content=body, headers=_dpop(world) | JSON)
    assert "UTF-8" in _refused(response, 400)["detail"]
    _decision_receipt(world, before, "call.malformed")

    before = _head(world)
    bad = b'{"spiffe_id": "\xff", "kind": "agent", "owner": "x"}'
    response = world.http.post("/v1/identities", content=bad, headers=world.admin | JSON)
    _refused(response, 400)
    _rejected_receipt(world, response, before)

    # Form bodies: raw and percent-encoded invalid bytes.
    for raw in (b"token=\xff\xfe", b"token=%ff%fe"):
        before = _head(world)
        response = world.http.post("/oauth2/introspect", content=raw, headers=world.admin | FORM)
        assert "UTF-8" in _refused(response, 400)["detail"]
        _rejected_receipt(world, response, before)
        response = world.http.post("/oauth2/token", content=b"grant_type=" + raw, headers=FORM)
        _refused(response, 400)
    _still_serving(world)


def test_nul_bytes_in_string_fields(world: World) -> None:
    nul = "a\x00b"
    jwk = world.agent.key.jwk if world.agent.key else {}
    bodies: dict[str, list[dict[str, Any]]] = {
        "/v1/identities": [
            {"spiffe_id": f"{AGENT}-{nul}", "kind": "agent", "owner": OWNER},
            {"spiffe_id": f"{AGENT}-x", "kind": "agent", "owner": OWNER, "description": nul},
            {"spiffe_id": f"{AGENT}-x", "kind": "agent", "owner": nul},
        ],
        "/v1/tasks": [
            {"template": nul, "agent": AGENT, "jwk": jwk},
            {"template": "pay-bill", "params": {"payee": nul}, "agent": AGENT, "jwk": jwk},
            {"template": "pay-bill", "params": {nul: PAYEE}, "agent": AGENT, "jwk": jwk},
        ],
        "/v1/policies": [
            {"files": {"a.cedar": nul}},
            {"files": {nul: "permit (principal, action, resource);"}},
            {"files": {}, "schema": nul},
        ],
    }
    for path, cases in bodies.items():
        for body in cases:
            before = _head(world)
            response = world.http.post(path, json=body, headers=world.admin)
            _refused(response, 400)
            _rejected_receipt(world, response, before)
    for body in ({"tool": nul}, {"tool": "bank.read_bills", "args": {"memo": nul}}):
        before = _head(world)
        response = world.http.post("/v1/decisions", json=body, headers=_dpop(world))
        assert "NUL" in _refused(response, 400)["detail"]
        _decision_receipt(world, before, "call.malformed")
    for field in ("grant_type", "actor_token", "subject_token", "scope"):
        form = {"grant_type": TOKEN_EXCHANGE, field: nul}
        _refused(world.http.post("/oauth2/token", data=form), 400)
    before = _head(world)
    response = world.http.post("/oauth2/revoke", data={"token": nul}, headers=world.admin)
    _refused(response, 400)
    _rejected_receipt(world, response, before)
    _still_serving(world)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_sql_and_path_strings_in_every_field(world: World, hostile: str) -> None:
    every_field: dict[str, dict[str, Any]] = {
        "/v1/identities": {
            "spiffe_id": hostile,
            "kind": hostile,
            "owner": hostile,
            "description": hostile,
        },
        "/v1/tasks": {
            "template": hostile,
            "params": {hostile: hostile},
            "parent_task_id": hostile,
            "agent": hostile,
            "jwk": {"kty": hostile, "crv": hostile, "x": hostile, "y": hostile},
        },
        "/v1/policies": {"files": {hostile: hostile}, "schema": hostile},
        "/v1/policies/dry-run": {
            "files": {hostile: hostile},
            "agent": hostile,
            "tool": hostile,
            "args": {hostile: hostile},
        },
        "/v1/identities/join-token": {"spiffe_id": hostile},
    }
    for path, body in every_field.items():
        before = _head(world)
        response = world.http.post(path, json=body, headers=world.admin)
        _refused(response, 400, 403, 404)
        _rejected_receipt(world, response, before)

    # One field at a time, the others sound: refused, or stored verbatim (it is only data).
    for field in ("spiffe_id", "kind", "owner", "description"):
        spiffe_id = f"{AGENT}-{HOSTILE.index(hostile)}-{field}"
        sound = {"spiffe_id": spiffe_id, "kind": "agent", "owner": OWNER, "description": ""}
        response = world.http.post(
            "/v1/identities", json=sound | {field: hostile}, headers=world.admin
        )
        assert response.status_code in (201, 400, 403), (field, response.text)
        if response.status_code == 201:
            assert response.json()[field] == hostile

    # A workload's own request: the receipt names the agent.
    before = _head(world)
    with pytest.raises(APIError) as refused:
        world.agent.open_task(template=hostile, params={"payee": PAYEE})
    assert 400 <= refused.value.status < 500
    receipt = _newest(world)
    assert receipt["seq"] > before and receipt["kind"] == "request.rejected"
    assert receipt["chain"] == [AGENT]

    # A well-formed decision with hostile strings is a decision: 200, deny, a receipt.
    before = _head(world)
    verdict = world.task.authorize(hostile, {hostile: hostile})
    assert verdict.effect == "deny"
    receipt = _decision_receipt(world, before, verdict.reasons[0]["code"])
    assert receipt["task_id"] == world.task.task_id and receipt["tool"] == hostile

    # OAuth forms: every field hostile. No principal is known, so no receipt is owed.
    form = {
        name: hostile
        for name in (
            "grant_type",
            "actor_token",
            "actor_token_type",
            "subject_token",
            "subject_token_type",
            "scope",
            "request_details",
            "audience",
            "requested_token_type",
        )
    }
    _refused(world.http.post("/oauth2/token", data=form), 400, 401)
    _refused(world.http.post("/oauth2/token", data=form | {"grant_type": TOKEN_EXCHANGE}), 400)
    # RFC 7662: an unknown token is inactive, not an error.
    response = world.http.post("/oauth2/introspect", data={"token": hostile}, headers=world.admin)
    assert response.status_code == 200 and response.json() == {"active": False}
    # In the URL, as is and percent-encoded. A "/" (even as %2F) leaves the task route:
    # a plain 404 from the router, before any authentication, so no receipt is owed.
    for segment in (hostile, quote(hostile, safe="")):
        before = _head(world)
        response = world.http.get(f"/v1/tasks/{segment}", headers=world.admin)
        _refused(response, 404)
        if "/" not in hostile:
            _rejected_receipt(world, response, before)
    before = _head(world)
    response = world.http.get("/v1/identity", params={"spiffe_id": hostile}, headers=world.admin)
    _refused(response, 400, 403, 404)
    _rejected_receipt(world, response, before)
    _still_serving(world)


def test_admin_task_with_an_incomplete_key_is_a_400(world: World) -> None:
    """Found by hand: a JWK without ``x`` made ``jwk_thumbprint`` raise a KeyError (500)."""
    for jwk in ({"kty": "EC", "crv": "P-256"}, {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}):
        before = _head(world)
        body = {"template": "pay-bill", "params": {"payee": PAYEE}, "agent": AGENT, "jwk": jwk}
        response = world.http.post("/v1/tasks", json=body, headers=world.admin)
        assert _refused(response, 400)["detail"] == "jwk is not an EC public key"
        _rejected_receipt(world, response, before)
    _still_serving(world)
