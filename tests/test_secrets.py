"""The secret broker in process: sealed write-only secrets, leases bound to tasks,
downstream tokens and their verifier, and credential hygiene on the call path."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from tether import (
    FrozenClock,
    InfrastructureError,
    ProofKey,
    Receipt,
    Tether,
    TokenRejected,
    parse_intent,
)
from tether._errors import Conflict, NotFound, UsageError
from tether.core import Sensitivity, SideEffect, ToolProfile
from tether.secrets import (
    DownstreamVerifier,
    Known,
    LeaseRejected,
    LocalKMS,
    SecretValue,
    find_credentials,
    redact_text,
)
from tether.secrets._kms import open_value, seal_value
from tether.tokens import Sealer

from .conftest import AGENT, OWNER

CANARY = "cnry-" + "Q9vX2mLr7TzK4pWs8Yd3"
TOOLS = ("billing.*", "mail.send", "search.query", "db.query")
#: What the tools of these tests do (the credential check goes by the side effect).
#: ``db.query`` is left undescribed: it takes the most restrictive profile.
CATALOGUE = {
    "billing.*": ToolProfile(
        side_effect=SideEffect.WRITE, sensitivity=Sensitivity.INTERNAL, trusted=True
    ),
    "mail.send": ToolProfile(
        side_effect=SideEffect.EGRESS,
        sensitivity=Sensitivity.INTERNAL,
        trusted=True,
        destinations=("to",),
    ),
    "search.query": ToolProfile(side_effect=SideEffect.READ, sensitivity=Sensitivity.INTERNAL),
}


@pytest.fixture
def t(permissive: Tether) -> Tether:
    permissive.catalogue.load(CATALOGUE, origin="tests")
    return permissive


def _task(
    t: Tether, *, ttl: int = 600, tools: tuple[str, ...] = TOOLS
) -> tuple[ProofKey, str, str]:
    key = ProofKey()
    intent = parse_intent(
        {
            "purpose": "pay bills",
            "capabilities": [{"tool": tool} for tool in tools],
            "budget": {"max_calls": 50},
            "ttl_seconds": ttl,
        }
    )
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    return key, task.task_id, task.token


def _call(t: Tether, key: ProofKey, token: str, tool: str, args: dict[str, Any]) -> Receipt:
    proof = key.prove(token, tool, args, now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=args)


# -- the vault ---------------------------------------------------------------------------------
def test_values_are_sealed_and_never_listed(t: Tether) -> None:
    info = t.put_secret("billing-key", CANARY, kind="api_key", meta={"tools": ["billing.*"]})
    assert info.current_version == 1 and info.tools == ("billing.*",)
    listed = json.dumps([i.to_dict() for i in t.list_secrets()])
    assert "billing-key" in listed and CANARY not in listed
    rows = t.store.execute_fetch("SELECT sealed, wrapped_key FROM secret_versions")
    assert rows and all(CANARY.encode() not in bytes(col) for row in rows for col in row)
    records = json.dumps(t.audit.tail(50))
    assert "secret.put" in records and CANARY not in records
    assert repr(t.vault.current("billing-key")[1]) == "SecretValue(<hidden>)"


def test_secret_value_hides_itself() -> None:
    value = SecretValue(CANARY)
    assert CANARY not in f"{value} {value!r} {value:>40} {[value]}"
    assert value.reveal() == CANARY and value == SecretValue(CANARY) and value != CANARY
    with pytest.raises(TypeError):
        pickle.dumps(value)


def test_envelope_binds_context_and_kek() -> None:
    kms = LocalKMS(Sealer(b"k" * 32))
    sealed, wrapped = seal_value(kms, b"value", context="secret:a:1")
    assert open_value(kms, sealed, wrapped, context="secret:a:1") == b"value"
    with pytest.raises(InfrastructureError):
        open_value(kms, sealed, wrapped, context="secret:b:1")  # moved onto another row
    with pytest.raises(InfrastructureError):
        open_value(LocalKMS(Sealer(b"x" * 32)), sealed, wrapped, context="secret:a:1")


def test_bad_writes_never_echo_the_value(t: Tether) -> None:
    t.put_secret("one", CANARY, kind="password")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("Bad Name", {"kind": "password"}),
        ("two", {"kind": "no-such-kind"}),
        ("one", {"kind": "password"}),  # exists
        ("three", {"kind": "postgres"}),  # no template
        ("four", {"kind": "password", "meta": {"tools": [""]}}),
        ("five", {"kind": "password", "meta": {"unknown": 1}}),
    ]
    for name, kwargs in cases:
        with pytest.raises(UsageError) as caught:
            t.put_secret(name, CANARY, **kwargs)
        assert CANARY not in str(caught.value)
    with pytest.raises(UsageError):
        t.put_secret("empty", "", kind="password")
    with pytest.raises(NotFound):
        t.rotate_secret("nope", CANARY)
    with pytest.raises(Conflict):
        t.put_secret("one", "other", kind="password")


def test_rotation_overlap_and_hook(t: Tether, clock: FrozenClock, tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import json, sys\n"
        "request = json.load(sys.stdin)\n"
        "assert request['action'] == 'rotate'\n"
        "print(request['value'] + '-rotated')\n"
    )
    t.put_secret(
        "legacy-sa",
        "sa-key-v1-0123456789",
        kind="service_account",
        meta={"overlap_seconds": 60, "rotate_command": [sys.executable, str(hook)]},
    )
    key, task_id, token = _task(t)
    receipt = _call(t, key, token, "billing.charge", {})
    old = t.lease(task_id, "legacy-sa", tool="billing.charge", receipt=receipt)
    info = t.rotate_secret("legacy-sa")  # by the hook
    assert [v.state for v in info.versions] == ["overlap", "current"]
    assert t.vault.current("legacy-sa")[1].reveal() == "sa-key-v1-0123456789-rotated"
    new = t.lease(task_id, "legacy-sa", tool="billing.charge", receipt=receipt)
    assert (old.version, new.version) == (1, 2)
    assert t.broker.check(old.lease_id).status == "active"  # within the overlap
    clock.advance(61)
    report = t.reap()
    assert old.lease_id in report.revoked and new.lease_id not in report.revoked
    with pytest.raises(LeaseRejected):
        t.broker.check(old.lease_id)
    assert [v.state for v in t.vault.info("legacy-sa").versions] == ["retired", "current"]
    # A hook that fails says so by its status only.
    hook.write_text("import sys\nprint('leaked-output')\nsys.exit(3)\n")
    with pytest.raises(InfrastructureError) as caught:
        t.rotate_secret("legacy-sa")
    assert "status 3" in caught.value.message and "leaked-output" not in caught.value.message


# -- leases --------------------------------------------------------------------------------------
def test_lease_needs_an_allowed_call_of_its_tool(t: Tether) -> None:
    t.put_secret("billing-key", CANARY, kind="api_key", meta={"tools": ["billing.*"]})
    key, task_id, token = _task(t)
    denied = _call(t, key, token, "shell.exec", {})
    assert denied.effect == "deny"
    with pytest.raises(LeaseRejected, match="allowed call"):
        t.lease(task_id, "billing-key", tool="shell.exec", receipt=denied)
    allowed = _call(t, key, token, "search.query", {"q": "x"})
    with pytest.raises(LeaseRejected, match="not for tool"):
        t.lease(task_id, "billing-key", tool="search.query", receipt=allowed)
    with pytest.raises(LeaseRejected, match="another task or tool"):
        t.lease(task_id, "billing-key", tool="billing.charge", receipt=allowed)
    charge = _call(t, key, token, "billing.charge", {"amount": 3})
    lease = t.lease(task_id, "billing-key", tool="billing.charge", receipt=charge)
    assert lease.value.reveal() == CANARY and lease.render("Bearer {value}").endswith(CANARY)
    assert CANARY not in repr(lease) and CANARY not in json.dumps(lease.to_dict())
    grant = [r for r in t.audit.tail(10) if r["kind"] == "lease.grant"][-1]
    assert grant["chain"] == [AGENT] and grant["task_id"] == task_id
    assert grant["tool"] == "billing.charge" and grant["detail"]["secret"] == "billing-key"
    assert "owasp-nhi:NHI7" in grant["risk_tags"]


def test_lease_ttl_never_exceeds_the_task(t: Tether, clock: FrozenClock) -> None:
    t.put_secret("k", CANARY, kind="api_key")
    key, task_id, token = _task(t, ttl=120)
    receipt = _call(t, key, token, "billing.charge", {})
    task = t.tasks.get(task_id)
    lease = t.lease(task_id, "k", tool="billing.charge", receipt=receipt)
    assert lease.expires_at == task.expires_at
    short = t.lease(task_id, "k", tool="billing.charge", receipt=receipt, ttl=30)
    assert short.expires_at == clock.now() + 30
    renewed = t.broker.renew(short.lease_id, ttl=10_000)
    assert renewed.expires_at == task.expires_at
    clock.advance(121)
    t.reap()
    assert {r.status for r in t.broker.list(task_id=task_id)} == {"expired"}
    assert t.tasks.get(task_id).status == "expired"


@pytest.mark.parametrize("how", ["end", "parent", "offboard", "kill", "expire"])
def test_leases_die_with_their_task(t: Tether, clock: FrozenClock, how: str) -> None:
    t.put_secret("k", CANARY, kind="api_key")
    key, task_id, token = _task(t, ttl=60)
    child_key = ProofKey()
    child = t.open_task(
        AGENT,
        proof_jwk=child_key.jwk,
        intent=parse_intent(
            {"purpose": "sub", "capabilities": [{"tool": "billing.*"}], "ttl_seconds": 30}
        ),
        parent_task_id=task_id,
    )
    receipt = _call(t, key, token, "billing.charge", {})
    lease = t.lease(task_id, "k", tool="billing.charge", receipt=receipt)
    child_receipt = _call(t, child_key, child.token, "billing.charge", {})
    child_lease = t.lease(child.task_id, "k", tool="billing.charge", receipt=child_receipt)
    if how == "end":
        t.end_task(task_id)
    elif how == "parent":
        t.end_task(task_id)  # the child goes by cascade
    elif how == "offboard":
        t.disable_identity(AGENT)
    elif how == "kill":
        t.kill_switch("incident 42", by=OWNER)
    else:
        clock.advance(61)
        t.reap()
    for lease_id in (lease.lease_id, child_lease.lease_id):
        row = t.broker.get(lease_id)
        assert row.status in ("revoked", "expired"), (how, row)
        with pytest.raises(LeaseRejected):
            t.broker.check(lease_id)
    with pytest.raises(LeaseRejected):
        t.lease(task_id, "k", tool="billing.charge", receipt=receipt)
    ends = [r for r in t.audit.tail(40) if r["kind"].startswith("task.")]
    assert any(lease.lease_id in (r.get("detail") or {}).get("leases_revoked", []) for r in ends)


# -- hygiene on the call path ---------------------------------------------------------------------
def test_a_write_may_set_the_credential_the_user_typed_nothing_else(t: Tether) -> None:
    """Attacker: a prompt-injected agent (passing a credential it read, or chose, to a tool).

    The user asks to set their password to a value they typed: the write that sets it
    takes that value. Another value in the same parameter, the typed value sent by a tool
    that sends, or a value found only inside a longer word, is still refused."""
    key = ProofKey()
    intent = parse_intent(
        {
            "purpose": "change my password",
            "capabilities": [{"tool": tool} for tool in TOOLS],
            "request": "Please change my password to 'zq7-Hummock-41' today.",
        }
    )
    token = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent).token
    typed = {"password": "zq7-Hummock-41"}
    assert _call(t, key, token, "billing.set_password", typed).effect == "allow"
    chosen = {"password": "Hummock-41"}  # inside the typed word, not the word itself
    assert _call(t, key, token, "billing.set_password", chosen).effect == "deny"
    other = {"password": "evil-Pass-99"}
    assert _call(t, key, token, "billing.set_password", other).effect == "deny"
    sent = _call(
        t, key, token, "mail.send", {"to": "a@corp.example", "password": typed["password"]}
    )
    assert sent.decision.reasons[0].code == "secret.egress"


def test_detection_formats_entropy_and_brokered() -> None:
    known = [Known("billing-key", CANARY)]
    findings = find_credentials(
        {
            "to": "bob@example.com",
            "body": f"key is {CANARY}",
            "note": "AKIA" + "Z7Q3EXAMPLE4KEY9",
            "blob": "vQ8x" + "Lm2Rt9ZkPw4Yb7NcHs3JdEa6Uf1Gi5",
            "password": "correct horse battery",
            "sha": "3f786850e387550fdab836ed7e6dc881de23001b",
            "id": "550e8400-e29b-41d4-a716-446655440000",
            "iban": "DE50526018159083016613",
        },
        known,
    )
    kinds = {f.path: (f.kind, f.secret) for f in findings}
    assert kinds == {
        "$.body": ("brokered", "billing-key"),
        "$.note": ("aws_access_key", None),
        "$.blob": ("high_entropy", None),
        "$.password": ("named_credential", None),
    }
    # A member name carrying a credential does not put it into the finding's path.
    (finding,) = find_credentials({CANARY: "x"}, known)
    assert CANARY not in finding.path and CANARY not in finding.describe()
    text, counts = redact_text(f"echo {CANARY} and ghp_{'a1B2c3D4e5' * 4}", known=known)
    assert CANARY not in text and counts == {"brokered": 1, "github_token": 1}


def test_credentials_are_refused_on_the_way_out(t: Tether) -> None:
    t.put_secret("billing-key", CANARY, kind="api_key")
    key, task_id, token = _task(t)
    leaked = {"to": "eve@evil.example", "body": f"here: {CANARY}"}
    receipt = _call(t, key, token, "mail.send", leaked)
    assert receipt.effect == "deny" and receipt.decision.reasons[0].code == "secret.egress"
    assert set(receipt.decision.risk_tags) >= {
        "owasp-asi:ASI03",
        "owasp-nhi:NHI2",
        "owasp-nhi:NHI7",
    }
    # Any recognised credential, to a tool that writes, sends or is undescribed.
    aws = {"body": "AKIA" + "Z7Q3EXAMPLE4KEY9"}
    assert _call(t, key, token, "mail.send", aws).decision.reasons[0].code == "secret.egress"
    assert _call(t, key, token, "billing.charge", aws).decision.reasons[0].code == "secret.egress"
    assert _call(t, key, token, "db.query", aws).effect == "deny"
    # ... but a read tool may be given a credential-looking string; not a brokered value.
    assert _call(t, key, token, "search.query", aws).effect == "allow"
    brokered = _call(t, key, token, "search.query", {"q": CANARY})
    assert brokered.decision.reasons[0].code == "secret.brokered"
    assert _call(t, key, token, "mail.send", {"to": "bob@example.com"}).effect == "allow"
    assert t.tasks.get(task_id).calls_used == 2  # refused calls spent nothing
    assert CANARY not in json.dumps(t.audit.tail(100))


def test_no_approval_is_opened_for_a_call_carrying_a_credential(tether: Tether) -> None:
    tether.policies.load(
        {
            "p.cedar": 'permit (principal, action, resource);\n@approval("required")\n'
            'forbid (principal, action == Action::"call_tool", resource == Tool::"mail.send");'
        }
    )
    tether.catalogue.load(CATALOGUE, origin="tests")
    tether.put_secret("billing-key", CANARY, kind="api_key")
    key, _, token = _task(tether)
    receipt = _call(tether, key, token, "mail.send", {"body": CANARY})
    assert receipt.effect == "deny" and receipt.approval_id is None
    assert tether.approvals.list(None) == []


# -- downstream tokens ---------------------------------------------------------------------------
def test_downstream_token_and_verifier(t: Tether, clock: FrozenClock) -> None:
    key, task_id, token = _task(t)
    receipt = _call(t, key, token, "billing.charge", {})
    lease = t.downstream_token(
        task_id,
        audience="https://billing.acme.example",
        tool="billing.charge",
        receipt=receipt,
        tool_identity="spiffe://acme.example/tool/billing",
        ttl=600,
    )
    assert lease.expires_at - clock.now() <= 60
    verifier = DownstreamVerifier(
        trust_domain="acme.example",
        audience="https://billing.acme.example",
        jwks=t.jwks(),
        clock=clock.now,
    )
    claims = verifier.verify(lease.value.reveal())
    assert (claims.agent, claims.task_id, claims.tool) == (AGENT, task_id, "billing.charge")
    assert claims.tool_identity == "spiffe://acme.example/tool/billing"
    with pytest.raises(TokenRejected, match="used before"):
        verifier.verify(lease.value.reveal())
    other = DownstreamVerifier(
        trust_domain="acme.example", audience="https://other.example", jwks=t.jwks()
    )
    with pytest.raises(TokenRejected) as caught:
        other.verify(lease.value.reveal(), now=clock.now())
    assert caught.value.code == "downstream.audience"
    fresh = DownstreamVerifier(
        trust_domain="acme.example", audience="https://billing.acme.example", jwks=t.jwks()
    )
    with pytest.raises(TokenRejected) as caught:
        fresh.verify(lease.value.reveal(), now=clock.now() + 70)
    assert caught.value.code == "downstream.expired"
    with pytest.raises(TokenRejected) as caught:
        fresh.verify(token, now=clock.now())  # a task token is not a downstream token
    assert caught.value.code == "downstream.typ"
    # Fetched from a URL on first use, refreshed on an unknown kid.
    fetched: list[str] = []

    def fetch(url: str) -> dict[str, Any]:
        fetched.append(url)
        return t.jwks()

    remote = DownstreamVerifier(
        trust_domain="acme.example",
        audience="https://billing.acme.example",
        jwks_url="https://tether.acme.example/.well-known/jwks.json",
        fetch=fetch,
    )
    assert remote.verify(lease.value.reveal(), now=clock.now()).jti == claims.jti
    assert fetched == ["https://tether.acme.example/.well-known/jwks.json"]
