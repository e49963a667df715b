"""Task lifecycle: admission, expiry, durable revocation, budget, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tether import AdmissionRejected, Effect, FrozenClock, ProofKey, Tether, parse_intent

from .conftest import AGENT, PERMIT_ALL, open_simple_task, quiet


def _call(t: Tether, key: ProofKey, token: str, tool: str = "fs.read", **args: object) -> Effect:
    proof = key.prove(token, tool, dict(args), now=t.clock.now())
    return t.authorize(token=token, proof=proof, tool=tool, args=dict(args)).effect


def test_admission_policy_decides_who_may_open_what(tether: Tether) -> None:
    tether.policies.load(
        {
            "a.cedar": 'permit (principal in Owner::"bob@acme.example", '
            'action == Action::"open_task", resource);'
        }
    )
    with pytest.raises(AdmissionRejected, match="no admission policy"):
        open_simple_task(tether)
    last = tether.audit.tail(1)[0]
    assert last["kind"] == "task.open" and last["effect"] == "deny"
    assert tether.store.list_tasks() == []


def test_admission_sees_the_intent(tether: Tether) -> None:
    tether.policies.load(
        {
            "a.cedar": 'permit (principal, action == Action::"open_task", resource) '
            'unless { context.tools.contains("shell.exec") };'
        }
    )
    open_simple_task(tether, tools=("fs.read",))
    with pytest.raises(AdmissionRejected):
        open_simple_task(tether, tools=("fs.read", "shell.exec"))


def test_task_token_lifetime_follows_the_intent(permissive: Tether) -> None:
    import jwt

    key = ProofKey()
    intent = parse_intent({"purpose": "p", "capabilities": [{"tool": "x"}], "ttl_seconds": 120})
    task = permissive.open_task(AGENT, proof_jwk=key.jwk, intent=intent)
    claims = jwt.decode(task.token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    assert claims["cnf"]["jkt"] == key.thumbprint
    assert claims["txn"] == task.task_id and claims["sub"] == AGENT
    assert claims["authorization_details"] == [{"type": "tether:tool", "actions": ["x"]}]
    assert jwt.get_unverified_header(task.token)["typ"] == "txntoken+jwt"


def test_expiry_revokes_durably_across_restart(tmp_path: Path) -> None:
    clock = FrozenClock(time.time())
    t = Tether.init(tmp_path / "h", "acme.example", clock=clock)
    t.register_identity(AGENT, kind="agent", owner="a@acme.example")
    t.policies.load({"p.cedar": PERMIT_ALL})
    quiet(t)
    key, task_id, token = open_simple_task(t)
    assert _call(t, key, token) is Effect.ALLOW
    clock.advance(601)
    assert _call(t, key, token) is Effect.DENY
    t.show_task(task_id)  # sweeps expired tasks
    row = t.store.get_task(task_id)
    assert row is not None and row.status == "expired"
    assert t.store.token_revoked(row.token_id)
    t.close()
    # Even with the clock wound back, the revocation survives a restart.
    clock.advance(-601)
    reopened = Tether.open(tmp_path / "h", clock=clock)
    receipt = reopened.authorize(
        token=token,
        proof=key.prove(token, "fs.read", {}, now=clock.now()),
        tool="fs.read",
        args={},
    )
    assert receipt.effect is Effect.DENY
    assert receipt.decision.reasons[0].code == "task.expired"


def test_budget_is_never_exceeded_under_concurrency(permissive: Tether) -> None:
    key, task_id, token = open_simple_task(permissive, max_calls=10)
    proofs = [key.prove(token, "fs.read", {"i": i}, now=permissive.clock.now()) for i in range(40)]
    effects: list[Effect] = []
    lock = threading.Lock()

    def worker(indices: range) -> None:
        for i in indices:
            receipt = permissive.authorize(
                token=token, proof=proofs[i], tool="fs.read", args={"i": i}
            )
            with lock:
                effects.append(receipt.effect)

    threads = [threading.Thread(target=worker, args=(range(k, 40, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert effects.count(Effect.ALLOW) == 10
    row = permissive.store.get_task(task_id)
    assert row is not None and row.calls_used == 10


CHILD = """
import json, sys, time
from tether import Tether, ProofKey, parse_intent
t = Tether.open(sys.argv[1])
key = ProofKey()
intent = parse_intent({"purpose": "p", "capabilities": [{"tool": "fs.read"}],
                       "budget": {"max_calls": 100000}})
task = t.open_task("spiffe://acme.example/agent/bot", proof_jwk=key.jwk, intent=intent)
print(json.dumps({"task": task.task_id}), flush=True)
i = 0
while True:
    args = {"i": i}
    r = t.authorize(token=task.token, proof=key.prove(task.token, "fs.read", args,
                    now=time.time()), tool="fs.read", args=args)
    print(json.dumps({"seq": r.seq, "hash": r.hash}), flush=True)
    i += 1
"""


def test_sigkill_loses_no_acknowledged_receipt(tmp_path: Path) -> None:
    home = tmp_path / "h"
    t = Tether.init(home, "acme.example")
    t.register_identity(AGENT, kind="agent", owner="a@acme.example")
    t.policies.load({"p.cedar": PERMIT_ALL})
    quiet(t)
    t.close()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(home)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    assert child.stdout is not None
    task = json.loads(child.stdout.readline())["task"]
    acknowledged = []
    deadline = time.monotonic() + 30
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        acknowledged.append(json.loads(child.stdout.readline()))
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(acknowledged) >= 150
    reopened = Tether.open(home)
    report = reopened.verify_audit()
    assert report.ok, report
    for ack in acknowledged:
        rows = reopened.store.execute_fetch(
            "SELECT hash FROM audit_records WHERE seq = ?", (ack["seq"],)
        )
        assert rows and rows[0][0] == ack["hash"]
    row = reopened.store.get_task(task)
    assert row is not None and row.calls_used >= len(acknowledged)


def test_resource_audience_is_enforced_at_the_enforcement_point(permissive: Tether) -> None:
    import jwt

    key = ProofKey()
    intent = parse_intent({"purpose": "p", "capabilities": [{"tool": "fs.read"}]})
    gateway = "https://gateway.acme.example/mcp"
    task = permissive.open_task(AGENT, proof_jwk=key.jwk, intent=intent, resources=(gateway,))
    assert jwt.decode(task.token, options={"verify_signature": False})["aud"] == [
        "acme.example",
        gateway,
    ]
    now = permissive.clock.now()
    ok = permissive.authorize(
        token=task.token,
        proof=key.prove(task.token, "fs.read", {}, now=now),
        tool="fs.read",
        args={},
        resource=gateway,
    )
    assert ok.effect is Effect.ALLOW
    other = permissive.authorize(
        token=task.token,
        proof=key.prove(task.token, "fs.read", {}, now=now),
        tool="fs.read",
        args={},
        resource="https://other.acme.example/mcp",
    )
    assert other.effect is Effect.DENY
    assert other.decision.reasons[0].code == "token.audience"
