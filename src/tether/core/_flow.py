"""Information flow across the calls of one task: state, labels, provenance, rules.

The enforcement point sees every call a task makes and every result a tool
returns. :class:`FlowState` is what it keeps of them, as an immutable value:

- the call history (tool, side effect, argument digest) and the distinct tools;
- the labels of what was read: the highest sensitivity, and whether content
  nobody vouches for (an inbound message body, a web page, a file's text)
  entered the task, with the tools it came from;
- the values seen, by origin, so an argument can be traced to where it came
  from: the user's request, trusted fields (identifiers a platform asserts: a
  message's sender, a file's id, a ledger entry's recipient) or untrusted
  content only;
- the budget used: calls, distinct tools, spend.

:func:`observe_call` and :func:`observe_result` return the next state; nothing
here performs I/O. The enforcement point persists the state between calls.

:func:`evaluate_flow` applies the flow rules to one proposed call and returns
findings, each naming the rule and the origin of the data. The decision core
turns them into a deny or an approval (see :mod:`tether.core._decision`); the
rules and their effects are declared in a :class:`FlowPolicy`, and the state's
summary is handed to Cedar as ``context.flow`` (:func:`flow_context`) so
operators can write their own flow policies.

Rules (reason codes):

``flow.data_ceiling``
    the tool may return data above the intent's ceiling, or data above it has
    already entered the task: deny.
``flow.untrusted_sink``
    untrusted content has entered the task and a write, egress or destructive
    call has a sink argument (recipient, URL, amount, path, or a link or
    account number inside free text) that the user's request and trusted data
    do not ground: approval or deny, by profile. Every argument is looked at:
    the catalogue's sinks by their kind (however wrapped in lists or mappings),
    any other parameter, and member names, for the addresses, links and account
    numbers they hold.
``flow.confidential_egress``
    confidential (or secret) data has been read and an egress call sends to a
    destination outside the intent's allowed egress (every destination in a
    destination argument, and any address, link or account number in a
    parameter the catalogue does not describe): deny.
``flow.confidential_content``
    an argument of a call whose audience is wider than the task alone (egress, or a
    write to a shared place: a ticket, a channel, a document) carries content the
    task tree read labelled confidential or secret (its data fingerprints,
    :mod:`tether.core._winnow`), even to a destination in the intent's egress,
    unless the intent discloses that data class to that destination: approval or
    deny, by profile.
``flow.discovery_privilege``
    a privileged tool the intent does not name explicitly (only a wildcard
    covers it) is reached after discovery calls: approval.
``budget.tools_exhausted`` / ``budget.spend_exhausted``
    the intent's budget of distinct tools or of spend would be exceeded: deny.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any

import msgspec

from tether.core._canonical import digest
from tether.core._intent import Budget, Intent, Sensitivity
from tether.core._labels import (
    CLASSIFIERS,
    Declared,
    FieldLabel,
    Label,
    LabelOrigin,
    label_result,
)
from tether.core._scanning import SPACE, Deadline, ScanExceeded, check, linear
from tether.core._winnow import (
    MIN_HITS,
    MIN_SHORT_HITS,
    MIN_WORDS,
    K,
    carried,
    fingerprints_of,
    long_hits,
    short_hits,
    words,
)

MAX_TRACKED_VALUES = 20_000
MAX_VALUE_LENGTH = 512
#: The most recent calls a flow state lists (the full history is in the receipts; the
#: rules need counts and the latest tools, and a state that grows with every call costs
#: more to read and write with every call).
MAX_HISTORY = 32
MAX_WALK_DEPTH = 12
#: Data fingerprints a task's flow state keeps (past this, new content is not kept).
MAX_FINGERPRINTS = 20_000


class SideEffect(StrEnum):
    READ = "read"
    WRITE = "write"
    EGRESS = "egress"
    DESTRUCTIVE = "destructive"


class SinkKind(StrEnum):
    """How a sink argument is checked for provenance."""

    VALUE = "value"  # the whole value must be grounded (an address, an IBAN, a path, an id)
    TEXT = "text"  # free text: each link, address or account number inside must be grounded


class Audience(StrEnum):
    """Who can see what a call writes or sends: the task's own principal only (a draft,
    a note to self), the organisation (an internal channel), or anyone (egress, a
    ticket a customer reads). Undescribed: ``external``, the widest."""

    PRIVATE = "private"
    INTERNAL = "internal"
    EXTERNAL = "external"


class Origin(StrEnum):
    USER = "user"
    TRUSTED = "trusted"
    UNTRUSTED = "untrusted"


class RuleEffect(StrEnum):
    OFF = "off"
    DENY = "deny"
    APPROVAL = "approval_required"


class ToolProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What one tool does, returns and consumes. Missing fields are the most restrictive.

    ``trusted_fields`` names the output fields a platform asserts (anywhere in a
    structured result); every other field is content nobody vouches for unless
    ``trusted`` marks the whole output trusted. ``sinks`` maps the parameters
    whose values leave or act through the tool to how they are checked;
    ``destinations`` are the parameters that say where data goes (egress).
    """

    side_effect: SideEffect = SideEffect.DESTRUCTIVE
    sensitivity: Sensitivity = Sensitivity.SECRET
    trusted: bool = False
    trusted_fields: tuple[str, ...] = ()
    sinks: dict[str, SinkKind] | None = None  # None: every parameter, as a value
    destinations: tuple[str, ...] = ()
    # Output fields (or, with ``identifiers``, the whole output) holding names of things
    # that exist (a channel, a user): a whole value grounds a sink as that identifier,
    # but whoever chose the name is not trusted, so what is inside it stays untrusted.
    identifier_fields: tuple[str, ...] = ()
    identifiers: bool = False
    privileged: bool = False
    discovery: bool = False
    spend: str | None = None  # the parameter carrying an amount spent
    description: str = ""
    # Words and phrases of a user request that ask for this tool's action (intent compiler).
    phrases: tuple[str, ...] = ()
    # Per-result labels (tether.core._labels): catalogue rules on result fields; the
    # content classifiers to run (None: all); whether the upstream's declared labels
    # may lower the default (they may always raise it).
    result_labels: tuple[FieldLabel, ...] = ()
    classifiers: tuple[str, ...] | None = None
    trust_result_labels: bool = False
    # Who sees what the call writes or sends (None: by side effect; see ``audience_of``).
    audience: Audience | None = None


def audience_of(profile: ToolProfile) -> Audience | None:
    """Who sees what a call of this tool writes or sends (``None``: a read, no sink)."""
    if profile.audience is not None:
        return profile.audience
    if profile.side_effect is SideEffect.READ and not profile.destinations:
        return None
    return Audience.EXTERNAL


def check_classifiers(names: tuple[str, ...] | None) -> list[str]:
    """What is wrong with a catalogue's classifier names (empty: nothing)."""
    unknown = sorted(set(names or ()) - set(CLASSIFIERS))
    return [f"unknown classifiers {unknown}; known: {sorted(CLASSIFIERS)}"] if unknown else []


UNDESCRIBED = ToolProfile()


class AppProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """An application's tool catalogue: the facts flow rules and the compiler rely on."""

    name: str
    tools: dict[str, ToolProfile]
    default_ceiling: Sensitivity = Sensitivity.CONFIDENTIAL

    def tool(self, name: str) -> ToolProfile:
        return self.tools.get(name, UNDESCRIBED)


class FlowPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The flow rules in force and what each does when it fires (a deployment's profile)."""

    data_ceiling: RuleEffect = RuleEffect.DENY
    untrusted_sink: RuleEffect = RuleEffect.APPROVAL
    confidential_egress: RuleEffect = RuleEffect.DENY
    discovery_privilege: RuleEffect = RuleEffect.APPROVAL
    budgets: RuleEffect = RuleEffect.DENY
    confidential_content: RuleEffect = RuleEffect.APPROVAL


STRICT = FlowPolicy(
    untrusted_sink=RuleEffect.DENY,
    discovery_privilege=RuleEffect.DENY,
    confidential_content=RuleEffect.DENY,
)
REVIEWED = FlowPolicy()


class CallRecord(msgspec.Struct, frozen=True):
    tool: str
    side_effect: SideEffect
    args_digest: str


class FlowState(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a task has done and read so far. Immutable; see :func:`observe_call`."""

    calls: tuple[CallRecord, ...] = ()  # the latest MAX_HISTORY
    call_count: int = 0
    tools: frozenset[str] = frozenset()
    discovery_calls: int = 0
    max_sensitivity: Sensitivity = Sensitivity.PUBLIC
    sensitive_sources: tuple[str, ...] = ()  # tools that returned confidential or secret data
    untrusted_sources: tuple[str, ...] = ()  # tools that returned untrusted content
    # Tools whose result was too large, or took too long, to scan: untrusted, values unknown.
    oversized_sources: tuple[str, ...] = ()
    request: str = ""  # the user's request, normalised (grounds values it names)
    request_values: frozenset[str] = frozenset()  # links, addresses, accounts it names
    trusted_values: frozenset[str] = frozenset()
    untrusted_values: dict[str, str] = {}  # value -> the tool whose untrusted content held it
    spend: float = 0.0
    # Data fingerprints of content read labelled confidential or above (tether.core._winnow):
    # hash -> "sensitivity:tool".
    fingerprints: dict[int, str] = {}
    # Of those, the ones allowed calls have already carried out (a piece at a time).
    sent: frozenset[int] = frozenset()
    # Tools whose content may be confidential but has no fingerprints kept: the table was
    # full, or the result could not be scanned and was handed to the agent all the same.
    # What cannot be matched is held from every audience wider than private.
    unkept_sources: tuple[str, ...] = ()

    @property
    def calls_made(self) -> int:
        """How many calls the task made (a state written before ``call_count``: its list)."""
        return max(self.call_count, len(self.calls))

    @property
    def untrusted_read(self) -> bool:
        return bool(self.untrusted_sources)


class FlowInput(msgspec.Struct, frozen=True):
    """What :func:`tether.core.decide` needs to apply the flow rules to one call."""

    state: FlowState
    profile: ToolProfile
    policy: FlowPolicy = FlowPolicy()


class Finding(msgspec.Struct, frozen=True):
    """One flow rule that fired for a call."""

    rule: str
    code: str
    effect: RuleEffect
    message: str


def _words(text: str) -> list[str]:
    return text.split()


# -- values ---------------------------------------------------------------------------------

# Linear-time patterns (RE2): results and arguments are attacker text.
_EMAIL = linear(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", capture=False)
_LINK = rf"[^{SPACE}<>\"'()]"
# A link: with a scheme or "www.", anything up to white space; otherwise a host name with a
# top-level domain of any letters (or punycode, ``xn--``), an optional port and path. A
# bare ``name.ext`` whose last part is a usual file extension (and no common top-level
# domain), or is capitalised like a word (``Mr.Smith``), is a file or prose: see
# :func:`_bare_host`.
_URL = linear(
    rf"(?:https?://{_LINK}+)"
    rf"|(?:\bwww\.{_LINK}+)"
    r"|(?:\b[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.(?:xn--[A-Za-z0-9-]{1,59}|[A-Za-z]{2,63})\b"
    rf"(?::[0-9]{{1,5}})?(?:/{_LINK}*)?)",
    ignore_case=True,
    capture=False,
)
_COMMON_TLDS = frozenset(
    _words("com org net io dev ai co info biz app xyz gov edu uk de fr eu ch us")
)
_FILE_EXTENSIONS = frozenset(
    _words(
        """txt pdf doc docx xls xlsx xlsm ppt pptx odt ods odp rtf csv tsv json jsonl xml yaml
        yml toml ini cfg conf log md rst tex html htm css js mjs ts tsx jsx py pyc rb go rs java
        kt cpp hpp cs php pl sh bash zsh bat sql db sqlite jpg jpeg png gif bmp svg webp ico tif
        tiff heic mp3 mp4 m4a wav ogg flac mov avi mkv webm zip tar gz tgz bz2 xz rar iso dmg exe
        dll so bin dat bak tmp lock pem crt cer key pub env ics vcf eml msg ipynb parquet whl apk
        jar war pkl npy pages numbers"""
    )
)
_IBAN = linear(rf"\b[A-Z]{{2}}[0-9]{{2}}(?:[{SPACE}]?[A-Z0-9]){{8,30}}\b", capture=False)
# An account number written in lower or mixed case, as one word: counted when its IBAN
# check digits hold (mod 97), so a word that only looks like one (``ab12cdefghij``) is not.
_IBAN_ANY_CASE = linear(r"\b[A-Za-z]{2}[0-9]{2}[A-Za-z0-9]{8,30}\b", capture=False)
_TRAILING = ".,;:!?)]}'\""


def normalise(value: str) -> str:
    """A value as compared for provenance: case, surrounding space and punctuation dropped."""
    return " ".join(value.strip().strip(_TRAILING).lower().split())


def _url_key(url: str) -> str:
    text = normalise(url).strip("*_`")
    for scheme in ("https://", "http://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    if text.startswith("www."):
        text = text[4:]
    return text.rstrip("/")


def atoms(text: str, deadline: Deadline | None = None) -> set[str]:
    """The sink-like values inside free text: e-mail addresses, links, account numbers.

    Three linear passes (and one more to blank the addresses out before looking for
    links); ``deadline`` is checked between them."""
    found: set[str] = set()
    if "@" in text:
        for match in _EMAIL.finditer(text):
            found.add(normalise(match.group()))
        check(deadline)
        if found:
            text_without = _EMAIL.sub(" ", text)
            check(deadline)
        else:
            text_without = text
    else:
        text_without = text
    if "." in text_without or "://" in text_without:
        for match in _URL.finditer(text_without):
            link = match.group()
            if _bare_host(link) and _not_a_host(link):
                continue
            found.add(_url_key(link))
        check(deadline)
    for match in _IBAN.finditer(text):
        found.add(match.group().replace(" ", "").lower())
    check(deadline)
    for match in _IBAN_ANY_CASE.finditer(text):
        word = match.group()
        if not word.isupper() and _iban_checksum(word):
            found.add(word.lower())
    return found


def _bare_host(link: str) -> bool:
    """Whether a link has no scheme, no ``www.``, no port and no path: a bare host name."""
    lower = link.lower()
    return not lower.startswith(("http://", "https://", "www.")) and not any(
        c in link for c in "/:"
    )


def _not_a_host(name: str) -> bool:
    """Whether a bare ``a.b`` is a file name or prose rather than a host: its last part is
    a usual file extension (and not a common top-level domain), or written like a word
    (``Mr.Smith``, ``done.Then``), neither all lower nor all upper case."""
    last = name.rstrip(".").rsplit(".", 1)[-1]
    if last.startswith(("xn--", "XN--")):
        return False
    lower = last.lower()
    if lower in _COMMON_TLDS:
        return False
    return lower in _FILE_EXTENSIONS or not (last.islower() or last.isupper())


def _iban_checksum(word: str) -> bool:
    """Whether ``word`` passes the IBAN check (ISO 13616: mod 97 of the rearranged digits)."""
    text = (word[4:] + word[:4]).upper()
    digits = "".join(str(int(c, 36)) for c in text)
    return int(digits) % 97 == 1


def _keys(value: str, deadline: Deadline | None = None) -> set[str]:
    """Every key under which a seen value is remembered (the whole value and its atoms)."""
    keys = atoms(value, deadline)
    whole = normalise(value)
    if 0 < len(whole) <= MAX_VALUE_LENGTH:
        keys.add(whole)
        if _URL.fullmatch(whole):
            keys.add(_url_key(whole))
    return keys


TRUSTED, IDENTIFIER, CONTENT = 2, 1, 0
CONTENT_NAME = -1  # a member name in content nobody vouches for


def _scalars(
    value: Any, trust: int, fields: frozenset[str], ids: frozenset[str], depth: int = 0
) -> Iterator[tuple[str | None, int]]:
    """(text, trust) for every scalar and every member name in a result; a field's trust
    covers its subtree, and a mapping's trust its member names (a trusted mapping's keys
    say, e.g., who a file is shared with; an untrusted one's are content its author chose).
    ``true``, ``false`` and ``null`` are content too (as ``None``: no value, but read).

    Raises :class:`~tether.core._scanning.ScanExceeded` past ``MAX_WALK_DEPTH``: what is
    nested deeper is not walked, so the result counts as untrusted and oversized, never
    as content nobody saw."""
    if depth > MAX_WALK_DEPTH:
        raise ScanExceeded(f"the result is nested deeper than {MAX_WALK_DEPTH} levels")
    if isinstance(value, Mapping):
        for key, item in value.items():
            name = str(key)
            # An untrusted member name is looked at for what it holds (CONTENT: its
            # addresses and links), not remembered as a value of its own.
            yield name, TRUSTED if trust == TRUSTED else CONTENT_NAME
            inner = TRUSTED if name in fields else IDENTIFIER if name in ids else CONTENT
            yield from _scalars(item, max(trust, inner), fields, ids, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _scalars(item, trust, fields, ids, depth + 1)
    elif isinstance(value, bool) or value is None:
        yield None, trust
    else:
        yield str(value), trust


# -- pure updates ---------------------------------------------------------------------------


def start(request: str = "") -> FlowState:
    """The state of a task that has done nothing yet; ``request`` is the user's request."""
    return FlowState(request=normalise(request), request_values=frozenset(request_atoms(request)))


def request_atoms(request: str) -> set[str]:
    """The values a request names. A link run into the next sentence without a space
    (``www.example.com.Then``) names the link before it too: a host name's last part is
    never capitalised like a word."""
    found = atoms(request)
    if "." not in request:
        return found
    for match in _URL.finditer(request):
        link = match.group().rstrip(_TRAILING)
        head, dot, last = link.rpartition(".")
        if (
            dot
            and not _bare_host(link)
            and "/" not in last
            and last[:1].isupper()
            and last[1:].islower()
        ):
            found.add(_url_key(head))
    return found


def observe_call(
    state: FlowState, tool: str, args: Mapping[str, Any], profile: ToolProfile
) -> FlowState:
    """The state after an allowed call was made (a refused call changes nothing)."""
    spent = 0.0
    if profile.spend is not None:
        spent = _amount(args, profile.spend) or 0.0
    record = CallRecord(tool=tool, side_effect=profile.side_effect, args_digest=digest(dict(args)))
    sent = state.sent
    audience = audience_of(profile)
    if state.fingerprints and audience is not None and audience is not Audience.PRIVATE:
        out = carried(dict(args), state.fingerprints, min_hits=1, short=True)
        if out and len(sent) < MAX_FINGERPRINTS:
            sent = sent | frozenset(out)
    return msgspec.structs.replace(
        state,
        sent=sent,
        calls=(*state.calls, record)[-MAX_HISTORY:],
        call_count=state.calls_made + 1,
        tools=state.tools | {tool},
        discovery_calls=state.discovery_calls + (1 if profile.discovery else 0),
        spend=state.spend + spent,
    )


class ResultReading(msgspec.Struct, frozen=True):
    """What scanning one result found, before it is applied to any flow state.

    ``trusted``: the keys of values trusted fields assert; ``untrusted``: the keys of
    values in content nobody vouches for; ``untrusted_read``: such content was there.
    ``oversized``: the result was too large, or took too long, to scan: it counts as
    untrusted content whose values are unknown (so none of them is trusted).
    """

    trusted: frozenset[str] = frozenset()
    untrusted: frozenset[str] = frozenset()
    untrusted_read: bool = False
    oversized: bool = False
    #: The result's label and its origin (``None``: not labelled; the tool's default).
    label: Label | None = None
    #: Fingerprints of its content labelled confidential or above.
    fingerprints: dict[int, str] = {}
    #: An oversized result the door withheld from the agent (nothing of it to match).
    withheld: bool = False


#: A result too large or too slow to scan, handed to the agent all the same (the HTTP
#: API's results, which the SDK already holds): its content cannot be matched, so every
#: later call to an audience wider than private is held.
OVERSIZED = ResultReading(untrusted_read=True, oversized=True)
#: The same result withheld from the agent by the door (the gateway does).
WITHHELD = ResultReading(untrusted_read=True, oversized=True, withheld=True)


def oversized_reading(profile: ToolProfile, declared: Declared | None = None) -> ResultReading:
    """What is known of a result too large, or too slow, to scan, which the door withholds
    from the agent: untrusted, values unknown, labelled the most restrictive of the tool's
    default and the upstream's declaration."""
    said = declared.sensitivity if declared is not None else None
    if said is not None and said.rank > profile.sensitivity.rank:
        label = Label(said, LabelOrigin.UPSTREAM, declared.why if declared else "")
        return ResultReading(untrusted_read=True, oversized=True, label=label, withheld=True)
    return WITHHELD


def read_result(
    result: Any,
    profile: ToolProfile,
    *,
    deadline: Deadline | None = None,
    declared: Declared | None = None,
) -> ResultReading:
    """Scan a tool's result (JSON-like) for the values it holds, by trust, and label it.

    ``declared`` is what the upstream said of the result in its ``_meta``
    (:func:`tether.core._labels.declared`): a declaration that it is untrusted makes
    the whole result content nobody vouches for; that it is trusted counts only where
    the catalogue trusts the upstream's labels. Every pattern is linear in the text;
    ``deadline`` is checked between passes and scalars, and raises
    :class:`~tether.core._scanning.ScanExceeded` once it is past (the caller then
    applies :func:`oversized_reading`)."""
    fields = frozenset(profile.trusted_fields)
    ids = frozenset(profile.identifier_fields)
    top = TRUSTED if profile.trusted else IDENTIFIER if profile.identifiers else CONTENT
    if declared is not None and declared.trusted is False:
        fields, ids, top = frozenset(), frozenset(), CONTENT
    elif declared is not None and declared.trusted and profile.trust_result_labels:
        top = TRUSTED
    trusted: set[str] = set()
    untrusted: set[str] = set()
    saw_untrusted = False
    for text, trust in _scalars(result, top, fields, ids):
        check(deadline)
        if text is None:  # a boolean or null: read, with no value to remember
            saw_untrusted = saw_untrusted or trust != TRUSTED
            continue
        if not text.strip():
            continue
        if trust == TRUSTED:
            trusted |= _keys(text, deadline)
            continue
        saw_untrusted = True
        if trust == CONTENT_NAME:
            untrusted |= atoms(text, deadline)
            continue
        if trust == IDENTIFIER:
            inner = atoms(text, deadline)
            whole = normalise(text)
            if 0 < len(whole) <= MAX_VALUE_LENGTH:
                trusted.add(whole)
            inner.discard(whole)
        else:
            inner = _keys(text, deadline)
        untrusted |= inner
    labelled = label_result(
        result,
        default=profile.sensitivity,
        rules=profile.result_labels,
        classifiers=frozenset(profile.classifiers) if profile.classifiers is not None else None,
        declared_label=declared,
        trust_declared=profile.trust_result_labels,
        deadline=deadline,
    )
    prints = fingerprints_of(
        ((text, str(level)) for text, level in labelled.sensitive_texts),
        deadline,
        ((value, str(level)) for value, level in labelled.sensitive_values),
    )
    return ResultReading(
        trusted=frozenset(trusted),
        untrusted=frozenset(untrusted),
        untrusted_read=saw_untrusted,
        label=labelled.label,
        fingerprints=prints,
    )


def observe_result(
    state: FlowState,
    tool: str,
    result: Any,
    profile: ToolProfile,
    *,
    reading: ResultReading | None = None,
) -> FlowState:
    """The state after ``tool`` returned ``result`` (JSON-like): labels and values seen.

    ``reading`` is the result already scanned (:func:`read_result`, or :data:`OVERSIZED`
    for a result too large or too slow to scan); without it, ``result`` is scanned here."""
    if reading is None:
        try:
            reading = read_result(result, profile)
        except ScanExceeded:
            reading = OVERSIZED
    values = state.trusted_values
    if reading.trusted and len(values) < MAX_TRACKED_VALUES:
        values = values | reading.trusted
    seen = state.untrusted_values
    fresh = {k: tool for k in sorted(reading.untrusted) if k not in seen}
    if fresh and len(seen) < MAX_TRACKED_VALUES:
        seen = {**seen, **fresh}
    level = reading.label.sensitivity if reading.label is not None else profile.sensitivity
    sensitive = level.rank >= Sensitivity.CONFIDENTIAL.rank
    prints = state.fingerprints
    unkept = state.unkept_sources
    if reading.oversized and not reading.withheld:
        unkept = _add(unkept, tool)
    fresh_prints = {k: f"{v}:{tool}" for k, v in reading.fingerprints.items() if k not in prints}
    if fresh_prints and len(prints) < MAX_FINGERPRINTS:
        prints = {**prints, **fresh_prints}
    elif fresh_prints:  # the table is full: fail closed rather than forget
        unkept = _add(unkept, tool)
    if sensitive and not reading.fingerprints and not reading.oversized:
        # Content labelled confidential that left no fingerprint (too few words to tell
        # from chance, or in a shape not read): it cannot be matched, so it is not let out.
        unkept = _add(unkept, tool)
    return msgspec.structs.replace(
        state,
        max_sensitivity=max(state.max_sensitivity, level, key=lambda s: s.rank),
        fingerprints=prints,
        sensitive_sources=_add(state.sensitive_sources, tool)
        if sensitive
        else state.sensitive_sources,
        untrusted_sources=_add(state.untrusted_sources, tool)
        if reading.untrusted_read
        else state.untrusted_sources,
        oversized_sources=_add(state.oversized_sources, tool)
        if reading.oversized
        else state.oversized_sources,
        unkept_sources=unkept,
        trusted_values=values,
        untrusted_values=seen,
    )


def _add(items: tuple[str, ...], item: str) -> tuple[str, ...]:
    return items if item in items else (*items, item)


def observe_content(state: FlowState, source: str, text: str) -> FlowState:
    """The state after content nobody vouches for (a tool description an operator has not
    reviewed, say) was shown to the task's agent: ``source`` names where it came from."""
    profile = ToolProfile(side_effect=SideEffect.READ, sensitivity=Sensitivity.PUBLIC)
    return observe_result(state, source, text, profile)


def merge(own: FlowState, tree: Iterable[FlowState]) -> FlowState:
    """What a task's calls are judged against: its own state joined with its ancestors'.

    Every label, every untrusted source and value, every grounded value and the
    discovery count of the delegation tree reach the task (an ancestor's state holds
    what its whole subtree read, so siblings see each other's reads through it). The
    call history, distinct tools and spend stay the task's own: budgets are checked
    per task, on the task and on each ancestor (:func:`evaluate_budgets`).
    """
    merged = own
    for other in tree:
        untrusted = merged.untrusted_values
        fresh = {k: v for k, v in other.untrusted_values.items() if k not in untrusted}
        sensitive, sources = merged.sensitive_sources, merged.untrusted_sources
        for item in other.sensitive_sources:
            sensitive = _add(sensitive, item)
        for item in other.untrusted_sources:
            sources = _add(sources, item)
        oversized = merged.oversized_sources
        for item in other.oversized_sources:
            oversized = _add(oversized, item)
        unkept = merged.unkept_sources
        for item in other.unkept_sources:
            unkept = _add(unkept, item)
        merged = msgspec.structs.replace(
            merged,
            max_sensitivity=max(
                merged.max_sensitivity, other.max_sensitivity, key=lambda s: s.rank
            ),
            sensitive_sources=sensitive,
            untrusted_sources=sources,
            oversized_sources=oversized,
            unkept_sources=unkept,
            trusted_values=merged.trusted_values | other.trusted_values,
            untrusted_values={**untrusted, **fresh} if fresh else untrusted,
            request=merged.request or other.request,
            request_values=merged.request_values | other.request_values,
            discovery_calls=max(merged.discovery_calls, other.discovery_calls),
            fingerprints={**other.fingerprints, **merged.fingerprints}
            if other.fingerprints
            else merged.fingerprints,
            sent=merged.sent | other.sent,
        )
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _amount(args: Mapping[str, Any], name: str) -> float | None:
    """The finite amount in argument ``name``, or ``None``."""
    value = args.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return abs(float(value)) if math.isfinite(value) else None


# -- provenance -----------------------------------------------------------------------------


def _in_request(state: FlowState, key: str) -> bool:
    """Whether the request names ``key`` as a whole: not inside a longer word, address or
    name (no word character, ``@`` or ``.`` just before it; no word character or ``@``
    just after it). A scan by ``str.find``: no pattern is built from the key."""
    request = state.request
    if len(key) < 3 or len(key) > len(request):
        return False
    at = request.find(key)
    while at >= 0:
        end = at + len(key)
        before = request[at - 1] if at > 0 else ""
        after = request[end] if end < len(request) else ""
        if not (before and (_word(before) or before in "@.")) and not (
            after and (_word(after) or after == "@")
        ):
            return True
        at = request.find(key, at + 1)
    return False


def _word(char: str) -> bool:
    """Python's ``\\w`` for one character."""
    return char.isalnum() or char == "_"


def grounded(state: FlowState, key: str) -> bool:
    """Whether a normalised value is named by the user's request or by trusted data."""
    if key in state.trusted_values or key in state.request_values or _in_request(state, key):
        return True
    if "/" in key or "." in key:  # a link: compared without scheme, "www." or a final "/"
        url = _url_key(key)
        if url in state.trusted_values or url in state.request_values:
            return True
    return False


def ungrounded(state: FlowState, value: Any, kind: SinkKind, depth: int = 0) -> list[str]:
    """The parts of a sink argument that nothing trusted grounds (empty: all grounded).

    A value wrapped in lists or mappings is judged leaf by leaf with the sink's own kind
    (wrapping never loosens the check); member names are free text (every address, link
    or account number in them must be grounded). Nesting past ``MAX_WALK_DEPTH`` is not
    walked: it is reported as ungrounded."""
    if depth > MAX_WALK_DEPTH:
        return [f"(nested deeper than {MAX_WALK_DEPTH} levels)"]
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, list | tuple):
        out: list[str] = []
        for item in value:
            out.extend(ungrounded(state, item, kind, depth + 1))
        return out
    if isinstance(value, Mapping):
        out = []
        for name, item in value.items():
            out.extend(ungrounded(state, str(name), SinkKind.TEXT, depth + 1))
            out.extend(ungrounded(state, item, kind, depth + 1))
        return out
    if _is_number(value):
        if kind is SinkKind.TEXT:
            return []
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return [] if grounded(state, text) or grounded(state, str(value)) else [text]
    text = str(value)
    whole = normalise(text)
    if not whole or grounded(state, whole):
        return []
    inner = atoms(text)
    if kind is SinkKind.TEXT:
        return sorted(a for a in inner if not grounded(state, a))
    # Long prose in a value sink: judged by the addresses, links and accounts inside it.
    # A long value without white space is an identifier, path or address: it must be
    # grounded as a whole, whatever grounded values it also holds.
    if inner and len(whole) > 64 and " " in whole and all(grounded(state, a) for a in inner):
        return []
    return [whole[:80]]


def _leaves(value: Any, depth: int = 0) -> Iterator[str | None]:
    """Every string and number in an argument, member names included; ``None`` for
    nesting past ``MAX_WALK_DEPTH`` (not walked: the caller treats it as unknown)."""
    if depth > MAX_WALK_DEPTH:
        yield None
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield str(name)
            yield from _leaves(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item, depth + 1)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def destinations_in(value: Any) -> set[str] | None:
    """The addresses, links and account numbers anywhere in an argument (``None`` when it
    is nested too deep to tell)."""
    found: set[str] = set()
    for leaf in _leaves(value):
        if leaf is None:
            return None
        found |= atoms(leaf)
    return found


def origin_of(state: FlowState, key: str) -> str:
    """Where an ungrounded value was seen: the tool whose untrusted content held it."""
    source = state.untrusted_values.get(key)
    if source is None and ("/" in key or "." in key):
        source = state.untrusted_values.get(_url_key(key))
    if source:
        return f"untrusted content from {source}"
    if state.oversized_sources:
        return (
            "not seen in what was scanned; an oversized result from "
            f"{', '.join(state.oversized_sources[:3])} was not scanned"
        )
    return "no tool output or request (unseen)"


def _egress_allowed(intent: Intent, value: Any) -> bool:
    """Whether every destination in a destination argument is within the intent's egress:
    each string in it (however wrapped in lists or mappings, member names included) as a
    whole, and each address, link or account number inside it."""
    if not intent.egress:
        return False
    for leaf in _leaves(value):
        if leaf is None:
            return False
        if not _allowed(intent, leaf) or not all(_allowed(intent, a) for a in atoms(leaf)):
            return False
    return True


def _allowed(intent: Intent, item: str) -> bool:
    return _matches(intent.egress, item)


def _matches(patterns: Sequence[str], item: str) -> bool:
    """Whether a destination matches one of ``patterns`` (the intent's egress syntax)."""
    key = normalise(item)
    url = _url_key(key)
    # A pattern without a path names hosts (or addresses): it is matched against the
    # host alone, so "*.corp.example" never matches "evil.example/x.corp.example".
    cut = min((i for i in (url.find(c, 1) for c in "/?#\\") if i > 0), default=len(url))
    host = url[:cut]
    return any(
        any(fnmatch.fnmatchcase(k, normalise(pattern)) for k in (key, url))
        if "/" in pattern
        else fnmatch.fnmatchcase(host, normalise(pattern))
        for pattern in patterns
    )


def _disclosed(
    intent: Intent, level: Sensitivity, tool: str, profile: ToolProfile, args: Mapping[str, Any]
) -> bool:
    """Whether the intent discloses data of ``level`` through this call: one of its
    disclosures of that class (or a higher one) names the tool, or every destination in
    the call's destination arguments (at least one)."""
    for grant in intent.disclose:
        if grant.data.rank < level.rank:
            continue
        if any(fnmatch.fnmatchcase(tool, pattern) for pattern in grant.to):
            return True
        found: list[str] = []
        for name in profile.destinations:
            for leaf in _leaves(args.get(name)):
                if leaf is None:
                    return False
                found.append(leaf)
                found.extend(atoms(leaf))
        if found and all(_matches(grant.to, item) for item in found):
            return True
    return False


# -- rules ----------------------------------------------------------------------------------


def _may_carry_text(args: Mapping[str, Any], profile: ToolProfile) -> list[str]:
    """The arguments of a call that could carry a passage of text: neither a destination
    nor a value sink the catalogue names, and of at least ``MIN_WORDS`` words; and the
    arguments' names, when there are many words of them."""
    values = {n for n, kind in (profile.sinks or {}).items() if kind is SinkKind.VALUE}
    out = [
        str(name)
        for name, value in args.items()
        if name not in profile.destinations
        and name not in values
        and len(words(json.dumps(value, default=str))) >= MIN_WORDS
    ]
    if len(words(" ".join(map(str, args)))) > 2 * K:
        out.append("(the arguments' names)")
    return out


def evaluate_flow(
    state: FlowState,
    intent: Intent,
    tool: str,
    args: Mapping[str, Any],
    profile: ToolProfile,
    policy: FlowPolicy,
    *,
    declared: bool,
    budgets: Sequence[tuple[str, Budget, FlowState]] | None = None,
) -> list[Finding]:
    """The flow rules that fire for one proposed call, most severe first.

    ``declared`` tells whether the intent names ``tool`` exactly (not only
    through a wildcard capability). ``budgets`` are the (task id, budget, own state)
    of the task and each ancestor, whose distinct-tool and spend budgets the call
    must fit in; without it, the intent's budget is checked against ``state``.
    """
    findings: list[Finding] = []
    ceiling = intent.data_ceiling

    if policy.data_ceiling is not RuleEffect.OFF:
        if profile.sensitivity.rank > ceiling.rank:
            findings.append(
                Finding(
                    "data_ceiling",
                    "flow.data_ceiling",
                    policy.data_ceiling,
                    f"{tool} may return {profile.sensitivity} data, above the intent's ceiling "
                    f"({ceiling})"
                    + ("" if profile is not UNDESCRIBED else "; the tool is not described"),
                )
            )
        elif state.max_sensitivity.rank > ceiling.rank:
            findings.append(
                Finding(
                    "data_ceiling",
                    "flow.data_ceiling",
                    policy.data_ceiling,
                    f"the task has read {state.max_sensitivity} data (from "
                    f"{', '.join(state.sensitive_sources[:3]) or 'a tool'}), above the intent's "
                    f"ceiling ({ceiling})",
                )
            )

    acts = profile.side_effect is not SideEffect.READ
    outward = profile.side_effect is SideEffect.EGRESS or bool(profile.destinations)

    if (
        policy.confidential_egress is not RuleEffect.OFF
        and outward
        and (state.max_sensitivity.rank >= Sensitivity.CONFIDENTIAL.rank)
    ):
        names = profile.destinations or tuple(profile.sinks or args.keys())
        outside = [
            n
            for n in names
            if args.get(n) not in (None, "", []) and not _egress_allowed(intent, args[n])
        ]
        # A parameter the catalogue does not describe (a mail tool's ``bcc``, say) is a
        # destination when it holds one: every address, link or account number in it
        # must be within the intent's egress too.
        described = set(names) | set(profile.sinks or ())
        for name, value in args.items():
            if name in described:
                continue
            found = destinations_in(value)
            if found is None or any(not _allowed(intent, a) for a in found):
                outside.append(name)
        if outside:
            shown = ", ".join(f"{n}={_show(args[n])}" for n in outside)
            findings.append(
                Finding(
                    "confidential_egress",
                    "flow.confidential_egress",
                    policy.confidential_egress,
                    f"the task has read {state.max_sensitivity} data (from "
                    f"{', '.join(state.sensitive_sources[:3])}); {tool} sends to {shown}, outside "
                    f"the intent's allowed egress",
                )
            )

    if policy.untrusted_sink is not RuleEffect.OFF and acts and state.untrusted_read:
        sinks = profile.sinks if profile.sinks is not None else dict.fromkeys(args, SinkKind.VALUE)
        loose: list[str] = []
        # Every argument: the catalogue's sinks by their kind; any other parameter (one the
        # catalogue does not name: ``bcc``, a nested recipient) as free text, whose
        # addresses, links and account numbers must be grounded all the same.
        for name, value in args.items():
            kind = sinks.get(name, SinkKind.TEXT)
            for part in ungrounded(state, str(name), SinkKind.TEXT):
                loose.append(f"(a parameter name)={part!r} ({origin_of(state, part)})")
            for part in ungrounded(state, value, kind):
                loose.append(f"{name}={part!r} ({origin_of(state, part)})")
        if loose:
            findings.append(
                Finding(
                    "untrusted_sink",
                    "flow.untrusted_sink",
                    policy.untrusted_sink,
                    f"untrusted content entered the task (from "
                    f"{', '.join(state.untrusted_sources[:3])}); {tool} is {profile.side_effect} "
                    f"and its sink arguments are not grounded in the user's request or trusted "
                    f"data: " + "; ".join(loose[:4]),
                )
            )

    audience = audience_of(profile)
    if (
        policy.confidential_content is not RuleEffect.OFF
        and (state.fingerprints or state.unkept_sources)
        and audience is not None
        and audience is not Audience.PRIVATE
    ):
        carriers: dict[str, dict[int, str]] = {}
        # Read together (a text split across arguments), with what allowed calls have
        # carried out already (a text sent a few words at a time).
        # Short grams add up across calls: a text sent a few words per call is held once
        # the task has carried out MIN_SHORT_HITS of them (a reply sharing a phrase or
        # two with it is not).
        together = carried(dict(args), state.fingerprints, min_hits=1, short=True)
        if together and (
            (long_hits(together) and long_hits(set(together) | state.sent) >= MIN_HITS)
            or any(h & 1 for h in together)
            or (short_hits(together) and short_hits(set(together) | state.sent) >= MIN_SHORT_HITS)
        ):
            for name, value in args.items():
                hit = carried(value, state.fingerprints, min_hits=1, short=True)
                if hit:
                    carriers[name] = hit
            if not carriers:
                carriers["(arguments together)"] = together
        tags = {tag for hits in carriers.values() for tag in hits.values()}
        levels = {Sensitivity(tag.split(":", 1)[0]) for tag in tags}
        kept = [lv for lv in levels if not _disclosed(intent, lv, tool, profile, args)]
        if (
            not kept
            and state.unkept_sources
            and _may_carry_text(args, profile)
            and not _disclosed(intent, Sensitivity.SECRET, tool, profile, args)
        ):
            findings.append(
                Finding(
                    "confidential_content",
                    "flow.confidential_content",
                    policy.confidential_content,
                    f"the task read content whose fingerprints are not kept (from "
                    f"{', '.join(state.unkept_sources[:3])}: too large or too deep to scan, "
                    f"or past the fingerprint table's {MAX_FINGERPRINTS}); the text "
                    f"{tool} sends ({', '.join(_may_carry_text(args, profile)[:3])}) cannot "
                    f"be told apart from it, and the call's audience ({audience}) is wider "
                    "than private",
                )
            )
        if kept:
            level = max(kept, key=lambda lv: lv.rank)
            sources = sorted({tag.split(":", 1)[1] for tag in tags})
            findings.append(
                Finding(
                    "confidential_content",
                    "flow.confidential_content",
                    policy.confidential_content,
                    f"{', '.join(sorted(carriers))} of {tool} carr"
                    f"{'ies' if len(carriers) == 1 else 'y'} {level} content the task read "
                    f"(from {', '.join(sources[:3])}); the call's audience ({audience}) is "
                    f"wider than {level} data's, and the intent discloses no {level} data "
                    "to it",
                )
            )

    if (
        policy.discovery_privilege is not RuleEffect.OFF
        and profile.privileged
        and not declared
        and state.discovery_calls > 0
    ):
        findings.append(
            Finding(
                "discovery_privilege",
                "flow.discovery_privilege",
                policy.discovery_privilege,
                f"{tool} is privileged and the intent does not name it; it is reached after "
                f"{state.discovery_calls} discovery call(s) "
                f"({', '.join(sorted({c.tool for c in state.calls if c.tool != tool})[:3])})",
            )
        )

    if policy.budgets is not RuleEffect.OFF and budgets is None:
        findings.extend(evaluate_budgets(tool, args, profile, policy, [("", intent.budget, state)]))
    elif policy.budgets is not RuleEffect.OFF and budgets:
        findings.extend(evaluate_budgets(tool, args, profile, policy, budgets))

    order = {RuleEffect.DENY: 0, RuleEffect.APPROVAL: 1, RuleEffect.OFF: 2}
    return sorted(findings, key=lambda f: order[f.effect])


def evaluate_budgets(
    tool: str,
    args: Mapping[str, Any],
    profile: ToolProfile,
    policy: FlowPolicy,
    tree: Sequence[tuple[str, Budget, FlowState]],
) -> list[Finding]:
    """The distinct-tool and spend budgets of every task in ``tree`` (the task, then its
    ancestors) that the call would exceed: a child cannot multiply its parent's budget."""
    findings: list[Finding] = []
    amount = _amount(args, profile.spend) if profile.spend is not None else None
    for index, (task_id, budget, state) in enumerate(tree):
        whose = "the intent's" if index == 0 else f"ancestor task {task_id}'s"
        if (
            budget.max_tools is not None
            and tool not in state.tools
            and len(state.tools) >= budget.max_tools
        ):
            findings.append(
                Finding(
                    "budget",
                    "budget.tools_exhausted",
                    policy.budgets,
                    f"{tool} would be distinct tool {len(state.tools) + 1}; {whose} budget "
                    f"allows {budget.max_tools}",
                )
            )
        if budget.max_spend is not None and profile.spend is not None:
            if amount is None:
                findings.append(
                    Finding(
                        "budget",
                        "budget.spend_exhausted",
                        policy.budgets,
                        f"{tool}: {profile.spend} must be a finite number",
                    )
                )
            elif state.spend + amount > budget.max_spend:
                findings.append(
                    Finding(
                        "budget",
                        "budget.spend_exhausted",
                        policy.budgets,
                        f"{tool} would spend {amount:g}; {state.spend:g} of {whose} "
                        f"{budget.max_spend:g} is spent",
                    )
                )
    return findings


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flow_context(
    state: FlowState, tool: str, profile: ToolProfile, findings: list[Finding]
) -> dict[str, Any]:
    """The state's summary as Cedar's ``context.flow`` (see the default schema)."""
    return {
        "untrusted_read": state.untrusted_read,
        "max_sensitivity_read": str(state.max_sensitivity),
        "sensitivity_rank": state.max_sensitivity.rank,
        "calls": state.calls_made,
        "distinct_tools": len(state.tools),
        "discovery_calls": state.discovery_calls,
        "spend": int(state.spend),
        "side_effect": str(profile.side_effect),
        "privileged": profile.privileged,
        "first_use": tool not in state.tools,
        "rules": sorted({f.rule for f in findings}),
    }


def empty_flow_context() -> dict[str, Any]:
    """The flow context of a call with no flow state (a fresh copy of a cached value)."""
    return dict(_empty_flow_context())


@functools.lru_cache(maxsize=1)
def _empty_flow_context() -> dict[str, Any]:
    return flow_context(FlowState(), "", UNDESCRIBED, [])
