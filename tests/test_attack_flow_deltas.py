"""Attacks on a task's flow state kept as a tagged head row and chained delta rows.

Every attacker here can write the store but lacks the KEK: it cannot forge a head's tag,
only delete, edit, copy or replay rows that Tether wrote. The head's tag binds the task
and the chain digest of its deltas, so a delta that is missing, edited, reordered, taken
from another task, or a head taken from another task is refused. What a tag cannot show
is age: a head and its deltas rolled back together to a point Tether once wrote is as
authentic as it was then (the bypass test below records it).
"""

from __future__ import annotations

from tether import ProofKey, Tether, parse_intent
from tether.audit._rows import FLOW

from .conftest import AGENT
from .test_attack_store_writer import _call, _sql
from .test_attack_store_writer_more import FLOW_CATALOGUE
from .test_flow_state_cache import INJECTED
from .test_flow_state_cache import REQUEST as CACHE_REQUEST
from .test_flow_state_delta import _deltas, _other_node, _pay, _refused, _rows, _states


def _head(t: Tether, task_id: str) -> tuple[bytes, str]:
    raw, tag = t.store.get_task_flow(task_id), t.store.get_row_tag(FLOW, task_id)
    assert raw is not None and tag is not None
    return raw, tag


def _put_head(t: Tether, task_id: str, raw: bytes, tag: str) -> None:
    t.store.put_task_flow(task_id, raw, 1.0)
    t.store.put_row_tag(FLOW, task_id, tag)


def test_every_delta_truncated_is_refused_even_by_the_writer(tether: Tether) -> None:
    """Store writer: truncates the task's deltas (the whole table of them) so the task
    forgets every page it read; a fresh reader and the writer itself (whose remembered
    head still matches the row) refuse or keep the full state, never an empty one."""
    states = _states(6)
    writer = _rows(tether)
    for state in states:
        writer.put_flow_state("task-1", state, 1.0)
    _sql(tether, "DELETE FROM task_flow_deltas WHERE task_id = ?", "task-1")
    _refused(tether)
    # The writer's memory of the row it wrote is still the full state, not the empty one.
    assert writer.flow_state("task-1") == states[-1]
    # Its next write finds the same row and appends a delta on top of the missing ones:
    # a fresh reader still refuses.
    writer.put_flow_state("task-1", states[-1], 2.0)
    _refused(tether)


def test_deltas_replaced_by_a_chain_written_earlier_for_the_same_task_are_refused(
    tether: Tether,
) -> None:
    """Store writer: keeps the newest head but puts back the deltas of an earlier
    generation of the same task (written before the state was rewritten whole): the
    numbers line up, the chain does not; refused."""
    states = _states(6)
    writer = _rows(tether)
    for state in states:
        writer.put_flow_state("task-1", state, 1.0)
    old = _deltas(tether.store, "task-1")
    # A state that loses values is written whole again: a new generation of deltas.
    writer.put_flow_state("task-1", states[1], 2.0)
    writer.put_flow_state("task-1", states[2], 3.0)
    writer.put_flow_state("task-1", states[3], 4.0)
    new = _deltas(tether.store, "task-1")
    assert len(new) <= len(old)
    _sql(tether, "DELETE FROM task_flow_deltas WHERE task_id = ?", "task-1")
    for seq, delta in old[: len(new)]:
        tether.store.put_task_flow_delta("task-1", seq, delta, 1.0)
    assert [s for s, _ in _deltas(tether.store, "task-1")] == [s for s, _ in new]
    assert [d for _, d in new] != [d for _, d in old[: len(new)]]
    _refused(tether)


def test_a_head_and_deltas_swapped_with_another_task_are_refused(tether: Tether) -> None:
    """Store writer: gives a task that read injected pages the head, tag and deltas of
    a task that read nothing of note (all its rows, consistent among themselves): the
    tag binds the task and the chain is seeded with it; refused."""
    states = _states(6)
    writer = _rows(tether)
    for state in states:
        writer.put_flow_state("task-1", state, 1.0)
    writer.put_flow_state("task-2", states[0], 1.0)
    raw, tag = _head(tether, "task-2")
    _sql(tether, "DELETE FROM task_flow_deltas WHERE task_id = ?", "task-1")
    for seq, delta in _deltas(tether.store, "task-2"):
        tether.store.put_task_flow_delta("task-1", seq, delta, 1.0)
    _put_head(tether, "task-1", raw, tag)
    _refused(tether)
    # Only the head swapped, the deltas left as they were: refused as well.
    _sql(tether, "DELETE FROM task_flow_deltas WHERE task_id = ?", "task-1")
    for state in states:
        _rows(tether).put_flow_state("task-3", state, 1.0)
    for seq, delta in _deltas(tether.store, "task-3"):
        tether.store.put_task_flow_delta("task-1", seq, delta, 1.0)
    raw3, tag3 = _head(tether, "task-3")
    _put_head(tether, "task-1", raw3, tag3)  # same values, same deltas, another task's tag
    _refused(tether)


def test_a_delta_planted_past_the_head_is_refused_then_overwritten(tether: Tether) -> None:
    """Store writer: plants a delta numbered after the head's last one (an untrusted
    value the task never read, or a claim that it sent nothing) hoping the next write
    chains over it: a reader refuses the state (a delta past the head is what a head put
    back to an earlier state leaves), and the writer's next write replaces it."""
    states = _states(6)
    writer = _rows(tether)
    for state in states[:-1]:
        writer.put_flow_state("task-1", state, 1.0)
    count = len(_deltas(tether.store, "task-1"))
    planted = b'{"untrusted":{"attacker-chosen":"web.fetch"}}'
    tether.store.put_task_flow_delta("task-1", count + 1, planted, 1.0)
    _refused(tether)
    writer.put_flow_state("task-1", states[-1], 2.0)
    assert _rows(tether).flow_state("task-1") == states[-1]
    assert all(d != planted for _, d in _deltas(tether.store, "task-1"))


def test_a_head_claiming_fewer_deltas_cannot_be_forged(tether: Tether) -> None:
    """Store writer: rewrites the head to count fewer deltas (the chain of a prefix
    computed without the KEK): its tag no longer matches; refused."""
    from tether.audit._rows import _link, _seed

    states = _states(6)
    writer = _rows(tether)
    for state in states:
        writer.put_flow_state("task-1", state, 1.0)
    deltas = _deltas(tether.store, "task-1")
    raw, tag = _head(tether, "task-1")
    chain = _seed("task-1")
    for _, delta in deltas[:1]:
        chain = _link(chain, delta)
    forged = raw.replace(f'"deltas":{len(deltas)}'.encode(), b'"deltas":1')
    forged = forged.split(b'"chain":"')[0] + b'"chain":"' + chain.encode() + b'"}'
    assert forged != raw
    _put_head(tether, "task-1", forged, tag)
    _refused(tether)


def test_a_head_and_deltas_rolled_back_together_are_refused(tether: Tether) -> None:
    """Store writer: copies a task's head and tag after its first page, lets the task
    read injected pages (more deltas), then puts the early head and tag back. A reader
    reads one delta past the head's count (there is one: refused), and the writer itself
    refuses a head counting fewer calls than it saw. What no tag shows: the later deltas
    deleted too, read by a node that never saw them (see docs/security.md)."""
    states = _states(6)
    writer = _rows(tether)
    writer.put_flow_state("task-1", states[0], 1.0)
    early_raw, early_tag = _head(tether, "task-1")
    for state in states[1:]:
        writer.put_flow_state("task-1", state, 2.0)
    assert len(_deltas(tether.store, "task-1")) > 1
    _put_head(tether, "task-1", early_raw, early_tag)
    _refused(tether)


def _open_paying_task(t: Tether) -> tuple[ProofKey, str, str]:
    t.catalogue.load(FLOW_CATALOGUE)
    key = ProofKey()
    intent = parse_intent(
        {
            "purpose": "pay invoice 7",
            "capabilities": [{"tool": "web.fetch"}, {"tool": "bank.pay"}],
            "budget": {"max_calls": 40, "max_spend": 100},
            "request": CACHE_REQUEST,
        }
    )
    task = t.open_task(AGENT, proof_jwk=key.jwk, intent=intent, request=CACHE_REQUEST)
    return key, task.token, task.task_id


def _read_injected_page(t: Tether, key: ProofKey, token: str) -> None:
    fetch = _call(t, key, token, "web.fetch", {"url": "https://news.example/1"})
    assert fetch.decision.effect == "allow"
    proof = key.prove_result(
        token,
        "web.fetch",
        fetch.seq,
        INJECTED,
        now=t.clock.now(),
        htm="POST",
        htu="urn:tether:decide",
    )
    t.observe(token=token, proof=proof, tool="web.fetch", receipt=fetch.seq, result=INJECTED)


def test_a_rolled_back_flow_state_refuses_the_injected_payment_not_only_the_state(
    permissive: Tether,
) -> None:
    """Store writer: the consequence of a refused tamper is a deny. After the task read an
    injected page, the deltas that recorded it are replaced by the (authentic) deltas of
    an earlier point while the newest head stays: the injected payment is denied
    (``store.row_tampered``) on a node that reads the state anew."""
    t = permissive
    key, token, task_id = _open_paying_task(t)
    fetch = _call(t, key, token, "web.fetch", {"url": "https://news.example/0"})
    assert fetch.decision.effect == "allow"
    early = _deltas(t.store, task_id)
    _read_injected_page(t, key, token)
    assert len(_deltas(t.store, task_id)) > len(early)
    _sql(t, "DELETE FROM task_flow_deltas WHERE task_id = ?", task_id)
    for seq, delta in early:
        t.store.put_task_flow_delta(task_id, seq, delta, 1.0)
    receipt = _pay(_other_node(t), key, token)
    assert receipt.decision.effect == "deny"
    assert receipt.decision.reasons[0].code == "store.row_tampered"


def test_a_head_rolled_back_to_before_the_injected_read_denies_the_payment(
    permissive: Tether,
) -> None:
    """Store writer: copies the task's head and tag before it reads an injected page,
    and puts them back after, hoping the task forgets the page: the deltas the page
    added lie past the put-back head, so another node refuses the state and the payment
    to the injected payee is denied (``store.row_tampered``)."""
    t = permissive
    key, token, task_id = _open_paying_task(t)
    fetch = _call(t, key, token, "web.fetch", {"url": "https://news.example/0"})
    assert fetch.decision.effect == "allow"
    raw, tag = _head(t, task_id)
    _read_injected_page(t, key, token)
    assert _head(t, task_id) != (raw, tag)
    _put_head(t, task_id, raw, tag)
    receipt = _pay(_other_node(t), key, token)
    assert receipt.decision.effect != "allow"
