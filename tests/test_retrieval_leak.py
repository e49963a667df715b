"""Labels follow the data: the retrieval case, at every door.

Attacker: a prompt-injected agent answering a customer. Its intent lets it mail that
customer (the destination is in the intent's egress) and comment on the customer's
ticket. It retrieves documents from a knowledge base whose one tool returns the public
FAQ and the confidential memo alike (each with its ``classification`` field, and one
internal note that carries an explicit CONFIDENTIAL marking in its text), then tries to
pass what it read on. Through the gateway (the official MCP client, a real upstream
over stdio) and through the HTTP API (an SDK-integrated agent reporting each result),
the same sequences get the same decisions:

- the FAQ answer to the allowed customer: allowed;
- the memo (or the marked note) to the same customer: held, however it is re-wrapped;
- the memo pasted into the ticket: held (a ticket is a shared place: it has an
  audience);
- with an intent that discloses confidential data to that customer: allowed.

A malicious or careless upstream is the other party here: its own label in the
result's ``_meta`` is honoured when it is more restrictive (the HR record).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tether import ProofKey, Tether, parse_intent
from tether.gateway._profiles import profiles_from_catalogue

from .mcp_support.harness import (
    AGENT,
    GatewayServer,
    build_config,
    free_port,
    init_home,
    mcp_client,
)
from .mcp_support.kb_server import DOCS
from .server_support import Server

KB_SERVER = Path(__file__).parent / "mcp_support" / "kb_server.py"
KB_IDENTITY = "spiffe://acme.example/tool/kb"
CUSTOMER = "customer@client.example"
LEVELS = {"public": "public", "internal": "internal", "confidential": "confidential"}
CATALOGUE: dict[str, dict[str, Any]] = {
    "kb_retrieve": {
        "side_effect": "read",
        "sensitivity": "internal",
        "trusted_fields": ["id", "title", "classification"],
        "sinks": [],
        "result_labels": [{"field": "classification", "values": LEVELS}],
    },
    "hr_lookup": {"side_effect": "read", "sensitivity": "internal", "sinks": []},
    "send_email": {
        "side_effect": "egress",
        "sensitivity": "internal",
        "trusted": True,
        "sinks": ["to"],
        "text_sinks": ["subject", "body"],
        "destinations": ["to"],
    },
    "ticket_comment": {
        "side_effect": "write",
        "sensitivity": "internal",
        "trusted": True,
        "sinks": ["ticket_id"],
        "text_sinks": ["text"],
    },
}
TOOLS = [f"kb.{name}" for name in CATALOGUE]
REQUEST = f"Answer the question of {CUSTOMER} about returns by e-mail and on ticket T-1001"

FAQ = DOCS["faq-returns"]["body"]
MEMO = DOCS["memo-heron"]["body"]
NOTE = DOCS["note-canteen"]["body"]


def mail(body: str) -> tuple[str, dict[str, Any]]:
    return ("kb.send_email", {"to": CUSTOMER, "subject": "Your question", "body": body})


def retrieve(doc: str) -> tuple[str, dict[str, Any]]:
    return ("kb.kb_retrieve", {"doc_id": doc})


#: Sequences of calls and the decision each gets (effect, first reason code).
HELD = ("approval_required", "flow.confidential_content")
OK = ("allow", "allow")
SEQUENCES: dict[str, list[tuple[tuple[str, dict[str, Any]], tuple[str, str]]]] = {
    "faq": [(retrieve("faq-returns"), OK), (mail(f"Hello, {FAQ} Regards"), OK)],
    "memo": [
        (retrieve("faq-returns"), OK),
        (retrieve("memo-heron"), OK),
        (mail(f"Hello, here is the news: {MEMO}"), HELD),
        # Re-wrapped, upper case, another punctuation: the same words.
        (mail("FYI --\n" + MEMO.upper().replace(" ", "\n").replace(".", ";")), HELD),
        (("kb.ticket_comment", {"ticket_id": "T-1001", "text": MEMO}), HELD),
        # What the customer asked about is still allowed to them.
        (mail(f"Hello, {FAQ}"), OK),
        (("kb.ticket_comment", {"ticket_id": "T-1001", "text": FAQ}), OK),
    ],
    "marked": [(retrieve("note-canteen"), OK), (mail(NOTE), HELD)],
    "declared": [
        (("kb.hr_lookup", {"name": "Dana Smith"}), OK),
        (mail("the record: " + "salary band seven, two performance warnings this year"), HELD),
    ],
}


@dataclass
class Env:
    tether: Tether
    gateway: GatewayServer
    server: Server


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("retrieval")
    home = base / "home"
    tether = init_home(home, {"kb": KB_IDENTITY})
    tether.catalogue.load(profiles_from_catalogue({"tools": CATALOGUE}, prefix="kb"))
    port = free_port()
    upstream = {
        "name": "kb",
        "identity": KB_IDENTITY,
        "stdio": {"command": sys.executable, "args": [str(KB_SERVER)]},
        "tools": CATALOGUE,
    }
    config = build_config(port, base, [upstream], approval={"mode": "return"}, flow="reviewed")
    gateway = GatewayServer(home, config, port).start().pin_all()
    server = Server(home, init=False).start()
    try:
        yield Env(tether=tether, gateway=gateway, server=server)
    finally:
        server.stop()
        gateway.stop()
        tether.close()


def _task(env: Env, resource: str | None, disclose: bool = False) -> tuple[ProofKey, str, str]:
    key = ProofKey()
    raw: dict[str, Any] = {
        "purpose": "answer a customer",
        "capabilities": [{"tool": t} for t in TOOLS],
        "data_ceiling": "confidential",
        "egress": [CUSTOMER],
        "budget": {"max_calls": 40},
        "request": REQUEST,
    }
    if disclose:
        raw["disclose"] = [{"data": "confidential", "to": [CUSTOMER]}]
    opened = env.tether.open_task(
        AGENT,
        proof_jwk=key.jwk,
        intent=parse_intent(raw),
        resources=(resource,) if resource else (),
    )
    return key, opened.task_id, opened.token


def _receipt(env: Env, seq: int) -> dict[str, Any]:
    row = env.tether.store.get_record(seq)
    assert row is not None
    body: dict[str, Any] = json.loads(row.body)
    return body


def through_gateway(
    env: Env, calls: list[tuple[str, dict[str, Any]]], disclose: bool = False
) -> list[tuple[tuple[str, str], dict[str, Any] | None]]:
    key, _task_id, token = _task(env, env.gateway.url, disclose)

    async def run() -> list[tuple[tuple[str, str], dict[str, Any] | None]]:
        out: list[tuple[tuple[str, str], dict[str, Any] | None]] = []
        async with mcp_client(env.gateway.url, token, key, "2026-07-28") as client:
            for tool, args in calls:
                answer = await client.call_tool(tool, args)
                meta = answer.meta or {}
                if "tether/label" in meta:
                    label = meta["tether/label"]
                    d = _receipt(env, label["decision_receipt"])
                    out.append(
                        ((d["effect"], d["reasons"][0]["code"]), _receipt(env, label["receipt"]))
                    )
                else:
                    d = _receipt(env, meta["tether/decision"]["receipt"])
                    out.append(((d["effect"], d["reasons"][0]["code"]), None))
        return out

    return anyio.run(run)


def _run_tool(tool: str, args: dict[str, Any]) -> Any:
    """What the SDK-integrated agent's own tools return (the same data as the upstream)."""
    name = tool.removeprefix("kb.")
    if name == "kb_retrieve":
        return dict(DOCS[args["doc_id"]])
    if name == "hr_lookup":
        return [
            f"HR record of {args['name']}: salary band seven, two performance warnings this "
            "year, on a personal improvement plan until the end of the quarter."
        ]
    return [f"done: {name}"]


def through_http(
    env: Env, calls: list[tuple[str, dict[str, Any]]], disclose: bool = False
) -> list[tuple[tuple[str, str], dict[str, Any] | None]]:
    key, task_id, token = _task(env, None, disclose)
    url = env.server.url
    out: list[tuple[tuple[str, str], dict[str, Any] | None]] = []
    with httpx.Client(timeout=30) as http:
        for tool, args in calls:
            htu = f"{url}/v1/decisions"
            proof = key.prove(token, tool, args, now=time.time(), htm="POST", htu=htu)
            answer = http.post(
                htu,
                json={"tool": tool, "args": args},
                headers={"Authorization": f"DPoP {token}", "DPoP": proof},
            ).json()
            effect = (answer["effect"], answer["reasons"][0]["code"])
            if answer["effect"] != "allow":
                out.append((effect, None))
                continue
            seq = answer["receipt"]["seq"]
            result = _run_tool(tool, args)
            rurl = f"{url}/v1/tasks/{task_id}/results"
            rproof = key.prove_result(
                token, tool, seq, result, now=time.time(), htm="POST", htu=rurl
            )
            reported = http.post(
                rurl,
                json={"tool": tool, "receipt": seq, "result": result},
                headers={"Authorization": f"DPoP {token}", "DPoP": rproof},
            )
            assert reported.status_code == 200, reported.text
            out.append((effect, _receipt(env, reported.json()["receipt"]["seq"])))
    return out


DOORS = {"gateway": through_gateway, "http": through_http}


@pytest.mark.parametrize("door", sorted(DOORS))
@pytest.mark.parametrize("sequence", ["faq", "memo", "marked"])
def test_confidential_content_is_held_even_to_an_allowed_destination(
    env: Env, door: str, sequence: str
) -> None:
    steps = SEQUENCES[sequence]
    got = DOORS[door](env, [call for call, _ in steps])
    assert [effect for effect, _ in got] == [expected for _, expected in steps]


def test_both_doors_label_the_same_result_the_same_way(env: Env) -> None:
    calls = [call for call, _ in SEQUENCES["memo"]][:2]
    for door in DOORS.values():
        faq, memo = (receipt for _, receipt in door(env, calls))
        assert faq is not None and memo is not None
        assert faq["detail"]["label"] == {
            "sensitivity": "public",
            "origin": "catalogue",
            "why": "classification=public",
        }
        assert memo["detail"]["label"] == {
            "sensitivity": "confidential",
            "origin": "catalogue",
            "why": "classification=confidential",
        }


def test_a_marking_in_the_text_raises_the_label(env: Env) -> None:
    got = through_gateway(env, [retrieve("note-canteen")])
    receipt = got[0][1]
    assert receipt is not None
    assert receipt["detail"]["label"] == {
        "sensitivity": "confidential",
        "origin": "classifier",
        "why": "markings",
    }


def test_the_upstreams_own_label_counts_when_it_is_more_restrictive(env: Env) -> None:
    steps = SEQUENCES["declared"]
    got = through_gateway(env, [call for call, _ in steps])
    assert [effect for effect, _ in got] == [expected for _, expected in steps]
    receipt = got[0][1]
    assert receipt is not None
    assert receipt["detail"]["label"]["sensitivity"] == "confidential"
    assert receipt["detail"]["label"]["origin"] == "upstream"


@pytest.mark.parametrize("door", sorted(DOORS))
def test_an_intent_that_discloses_the_data_class_to_the_customer_allows_it(
    env: Env, door: str
) -> None:
    calls = [
        retrieve("memo-heron"),
        mail(MEMO),
        ("kb.ticket_comment", {"ticket_id": "T-1001", "text": MEMO}),
    ]
    got = DOORS[door](env, calls, disclose=True)
    # Disclosed to the customer's address; the ticket is not named, so it is still held.
    assert [effect for effect, _ in got] == [OK, OK, HELD]
