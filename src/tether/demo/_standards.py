"""The demo's standards scenes: an AuthZEN decision point, federated SPIFFE trust.

- **AuthZEN**: an enforcement point that is not Tether's (a mesh's ``ext_authz``
  adapter, a custom MCP proxy) asks ``POST /access/v1/evaluation`` in the standard's
  words; the one pipeline decides and leaves the same receipt as ``/v1/decisions``.
- **Federation**: a partner trust domain (a second Tether, serving its bundle at
  ``/.well-known/spiffe-bundle``) is federated; a workload holding the partner's
  JWT-SVID attests as the identity registered and linked here, keeps its owner here, and
  is refused once the partner's bundle is removed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec

from tether._tether import Tether
from tether.demo._timeline import Timeline
from tether.sdk import Client
from tether.server import ServerSettings, create_app
from tether.tokens import ProofKey

PARTNER = "partner.example"
RECONCILER = "spiffe://acme.example/agent/reconciler"
PARTNER_RECONCILER = f"spiffe://{PARTNER}/agent/reconciler"

Serve = Callable[[Any, int, str], "tuple[uvicorn.Server, threading.Thread]"]
Stop = Callable[[uvicorn.Server, threading.Thread], bool]


def authzen(line: Timeline, url: str, agent: Client, agent_id: str, payee: str) -> None:
    """Two calls of one task asked over AuthZEN: the bill read is allowed, a payment to
    an account the intent does not name is denied; each answer carries its receipt."""
    config = httpx.get(f"{url}/.well-known/authzen-configuration").json()
    endpoint = str(config["access_evaluation_endpoint"])
    line.say(f"/.well-known/authzen-configuration: evaluation at {endpoint}")
    key = agent.key
    assert key is not None
    with agent.task(template="pay-bill", params={"payee": payee, "max_amount": 1500}) as task:
        for tool, args in (
            ("bank.read_bills", {}),
            ("bank.send_money", {"recipient": "GB33BUKB20201555555555", "amount": 240.0}),
        ):
            # The agent makes the proof for the decision point's URL; the external
            # enforcement point forwards it with the task token.
            proof = key.prove(task.token, tool, args, now=time.time(), htm="POST", htu=endpoint)
            answer = httpx.post(
                endpoint,
                json={
                    "subject": {"type": "agent", "id": agent_id},
                    "action": {"name": tool},
                    "resource": {"type": "tool", "id": tool},
                    "context": {"arguments": args},
                },
                headers={"Authorization": f"DPoP {task.token}", "DPoP": proof},
            ).json()
            context = answer["context"]
            line.verdict(
                tool,
                args,
                str(context["effect"]),
                list(context["reasons"]),
                context["receipt"],
                list(context.get("policies", [])),
            )
            line.detail(f'AuthZEN answer: "decision": {str(answer["decision"]).lower()}')


def federation(
    line: Timeline, url: str, admin: Client, admin_secret: str, serve: Serve, stop: Stop, port: int
) -> None:
    """A partner trust domain federated by its bundle endpoint; its workload attests here
    as the identity linked to it, then nothing attests once the partner is removed."""
    partner = Tether.ephemeral(PARTNER)
    served = serve(create_app(partner, ServerSettings(log_level="WARNING")), port, "partner")
    try:
        _federation(line, url, admin, admin_secret, partner, port)
    finally:
        stop(*served)
        partner.close()


def _federation(
    line: Timeline, url: str, admin: Client, admin_secret: str, partner: Tether, port: int
) -> None:
    bundle_url = f"http://127.0.0.1:{port}/.well-known/spiffe-bundle"
    admin.post("/v1/federation", {"trust_domain": PARTNER, "endpoint_url": bundle_url})
    admin.register_identity(
        RECONCILER,
        kind="agent",
        owner="alice@acme.example",
        description="Reconciles statements; runs in the partner's cluster",
    )
    admin.post("/v1/federation/links", {"spiffe_id": RECONCILER, "attested_by": PARTNER_RECONCILER})
    line.say(f"{PARTNER} federated ({bundle_url}); {RECONCILER} linked to {PARTNER_RECONCILER}")

    # The partner's own attestation gives its workload a JWT-SVID for acme.example.
    partner.register_identity(PARTNER_RECONCILER, kind="agent", owner="ops@partner.example")
    workload_key = ec.generate_private_key(ec.SECP256R1())
    foreign = partner.attest(
        partner.create_join_token(PARTNER_RECONCILER),
        workload_key.public_key(),
        audience=["spiffe://acme.example"],
    ).jwt_svid
    key = ProofKey()
    attested = httpx.post(
        f"{url}/v1/attest/federated", json={"jwt_svid": foreign, "jwk": key.jwk}
    ).json()
    line.say(
        f"[green]attested[/] with the partner's JWT-SVID as {attested['spiffe_id']} "
        "(its owner and registration are acme.example's; SVIDs bound to its key)"
    )
    httpx.delete(
        f"{url}/v1/federation/{PARTNER}", headers={"Authorization": f"Bearer {admin_secret}"}
    ).raise_for_status()
    again = partner.attest(
        partner.create_join_token(PARTNER_RECONCILER),
        workload_key.public_key(),
        audience=["spiffe://acme.example"],
    ).jwt_svid
    refused = httpx.post(
        f"{url}/v1/attest/federated", json={"jwt_svid": again, "jwk": ProofKey().jwk}
    )
    line.effects.append("deny")
    line.say(
        f"[bold red]{'deny':>17}[/]  partner removed; its next SVID ↳ "
        f"{refused.json().get('error')} (HTTP {refused.status_code})"
    )
