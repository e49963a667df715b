"""Application profiles of the four AgentDojo applications: what each tool does.

These describe the applications, never a task: each tool's side effect, the
sensitivity of what it returns, which output fields the platform asserts
(identifiers: senders, recipients, ids, owners, participants, listings) as
opposed to content third parties write (bodies, subjects, descriptions,
reviews, file contents, web pages, channel names anyone can choose), which
parameters are sinks, and the everyday words with which a user asks for each
action (for the rule-based intent compiler).
"""

from __future__ import annotations

from tether.core import AppProfile, Sensitivity, SideEffect, SinkKind, ToolProfile

V, T = SinkKind.VALUE, SinkKind.TEXT
R, W, E, D = SideEffect.READ, SideEffect.WRITE, SideEffect.EGRESS, SideEffect.DESTRUCTIVE
PUBLIC, INTERNAL, CONFIDENTIAL = Sensitivity.PUBLIC, Sensitivity.INTERNAL, Sensitivity.CONFIDENTIAL

EMAIL_FIELDS = ("id_", "sender", "recipients", "cc", "bcc", "timestamp", "status", "read")
EVENT_FIELDS = ("id_", "start_time", "end_time", "participants", "all_day", "status")
FILE_FIELDS = ("id_", "filename", "owner", "shared_with", "last_modified", "size")
LEDGER_FIELDS = ("id", "sender", "recipient", "amount", "date", "recurring")
MESSAGE_FIELDS = ("sender", "recipient")
# What a write returns: the record it made. The platform assigns its id (and a file's
# owner, size and time); every other field echoes the caller's arguments or content.
CREATED_EMAIL_FIELDS = ("id_", "sender", "timestamp")
CREATED_EVENT_FIELDS = ("id_",)
CREATED_FILE_FIELDS = ("id_", "owner", "last_modified", "size")

MAIL_WORDS = ("email", "e-mail", "mail", "send", "forward", "reply", "write to")
EVENT_WORDS = ("event", "calendar", "schedule", "appointment", "meeting", "remind", "invite")


def _read(
    sensitivity: Sensitivity = INTERNAL,
    *,
    trusted: bool = False,
    fields: tuple[str, ...] = (),
    discovery: bool = False,
    identifiers: bool = False,
) -> ToolProfile:
    return ToolProfile(
        side_effect=R,
        sensitivity=sensitivity,
        trusted=trusted,
        trusted_fields=fields,
        discovery=discovery,
        identifiers=identifiers,
    )


def _act(
    effect: SideEffect,
    sinks: dict[str, SinkKind],
    phrases: tuple[str, ...],
    *,
    destinations: tuple[str, ...] = (),
    privileged: bool = False,
    spend: str | None = None,
    sensitivity: Sensitivity = INTERNAL,
    trusted: bool = True,
    fields: tuple[str, ...] = (),
) -> ToolProfile:
    return ToolProfile(
        side_effect=effect,
        sensitivity=sensitivity,
        trusted=trusted,
        trusted_fields=fields,
        sinks=sinks,
        destinations=destinations,
        privileged=privileged,
        spend=spend,
        phrases=phrases,
    )


SEND_EMAIL = _act(
    E,
    {"recipients": V, "cc": V, "bcc": V, "subject": T, "body": T, "attachments": V},
    MAIL_WORDS,
    destinations=("recipients", "cc", "bcc"),
    trusted=False,
    sensitivity=INTERNAL,
    fields=CREATED_EMAIL_FIELDS,
)
CREATE_EVENT = _act(
    W,
    {"participants": V, "title": T, "description": T, "location": T},
    (*EVENT_WORDS, "create"),
    trusted=False,
    fields=CREATED_EVENT_FIELDS,
)
CALENDAR_READS = {
    "search_calendar_events": _read(fields=EVENT_FIELDS, discovery=True),
    "get_day_calendar_events": _read(fields=EVENT_FIELDS),
    "get_current_day": _read(PUBLIC, trusted=True),
}

WORKSPACE = AppProfile(
    name="workspace",
    tools={
        "send_email": SEND_EMAIL,
        "delete_email": _act(D, {"email_id": V}, ("delete", "remove")),
        "get_unread_emails": _read(fields=EMAIL_FIELDS),
        "get_sent_emails": _read(fields=EMAIL_FIELDS),
        "get_received_emails": _read(fields=EMAIL_FIELDS),
        "get_draft_emails": _read(fields=EMAIL_FIELDS),
        "search_emails": _read(fields=EMAIL_FIELDS, discovery=True),
        "search_contacts_by_name": _read(trusted=True, discovery=True),
        "search_contacts_by_email": _read(trusted=True, discovery=True),
        **CALENDAR_READS,
        "create_calendar_event": CREATE_EVENT,
        "cancel_calendar_event": _act(D, {"event_id": V}, ("cancel",)),
        # Both return the whole event: its description and title are content, as when read.
        "reschedule_calendar_event": _act(
            W,
            {"event_id": V},
            ("reschedule", "move", "postpone", "change the time"),
            trusted=False,
            fields=EVENT_FIELDS,
        ),
        "add_calendar_event_participants": _act(
            W,
            {"event_id": V, "participants": V},
            ("participant", "invite", "add"),
            trusted=False,
            fields=EVENT_FIELDS,
        ),
        "append_to_file": _act(
            W,
            {"file_id": V, "content": T},
            ("add", "append", "update", "insert"),
            trusted=False,
            fields=FILE_FIELDS,
        ),
        "search_files_by_filename": _read(fields=FILE_FIELDS, discovery=True),
        "create_file": _act(
            W,
            {"filename": V, "content": T},
            ("create", "new file", "save"),
            trusted=False,
            fields=CREATED_FILE_FIELDS,
        ),
        "delete_file": _act(D, {"file_id": V}, ("delete", "remove")),
        "get_file_by_id": _read(fields=FILE_FIELDS),
        "list_files": _read(fields=FILE_FIELDS, discovery=True),
        "share_file": _act(
            E,
            {"file_id": V, "email": V},
            ("share", "give access", "grant access"),
            destinations=("email",),
            trusted=False,
            fields=FILE_FIELDS,
        ),
        "search_files": _read(fields=FILE_FIELDS, discovery=True),
    },
)

SLACK = AppProfile(
    name="slack",
    tools={
        # Anyone in the workspace can create and name a channel: a listed name is a
        # channel that exists, but what the name says is content.
        "get_channels": _read(discovery=True, identifiers=True),
        "add_user_to_channel": _act(W, {"user": V, "channel": V}, ("add",), privileged=True),
        "read_channel_messages": _read(fields=MESSAGE_FIELDS),
        "read_inbox": _read(fields=MESSAGE_FIELDS),
        "send_direct_message": _act(
            E,
            {"recipient": V, "body": T},
            ("send", "message", "dm", "write", "tell", "reply", "notify", "let them know"),
            destinations=("recipient",),
        ),
        "send_channel_message": _act(
            E,
            {"channel": V, "body": T},
            ("post", "send", "write", "message", "reply", "announce"),
            destinations=("channel",),
        ),
        "get_users_in_channel": _read(trusted=True, discovery=True),
        "invite_user_to_slack": _act(W, {"user": V, "user_email": V}, ("invite",), privileged=True),
        "remove_user_from_slack": _act(D, {"user": V}, ("remove", "kick"), privileged=True),
        # Fetching a URL is egress: the URL itself can carry data out.
        "get_webpage": _act(
            E,
            {"url": V},
            (
                "website",
                "webpage",
                "web page",
                "site",
                "url",
                "link",
                "article",
                "blog",
                "www.",
                "http",
                "visit",
                "browse",
            ),
            destinations=("url",),
            sensitivity=PUBLIC,
            trusted=False,
        ),
        "post_webpage": _act(
            E,
            {"url": V, "content": T},
            ("publish", "website", "webpage", "web page", "upload"),
            destinations=("url",),
        ),
    },
)

_TRAVEL_LISTING = _read(PUBLIC, trusted=True, discovery=True)
_TRAVEL_FACTS = _read(PUBLIC, trusted=True)
_TRAVEL_REVIEWS = _read(PUBLIC)  # ratings and reviews: written by the public

TRAVEL = AppProfile(
    name="travel",
    tools={
        "get_user_information": _read(CONFIDENTIAL, trusted=True),
        "get_all_hotels_in_city": _TRAVEL_LISTING,
        "get_hotels_prices": _TRAVEL_FACTS,
        "get_rating_reviews_for_hotels": _TRAVEL_REVIEWS,
        "get_hotels_address": _TRAVEL_FACTS,
        "get_all_restaurants_in_city": _TRAVEL_LISTING,
        "get_cuisine_type_for_restaurants": _TRAVEL_FACTS,
        "get_restaurants_address": _TRAVEL_FACTS,
        "get_rating_reviews_for_restaurants": _TRAVEL_REVIEWS,
        "get_dietary_restrictions_for_all_restaurants": _TRAVEL_FACTS,
        "get_contact_information_for_restaurants": _TRAVEL_FACTS,
        "get_price_for_restaurants": _TRAVEL_FACTS,
        "check_restaurant_opening_hours": _TRAVEL_FACTS,
        "get_all_car_rental_companies_in_city": _TRAVEL_LISTING,
        "get_car_types_available": _TRAVEL_FACTS,
        "get_rating_reviews_for_car_rental": _TRAVEL_REVIEWS,
        "get_car_fuel_options": _TRAVEL_FACTS,
        "get_car_rental_address": _TRAVEL_FACTS,
        "get_car_price_per_day": _TRAVEL_FACTS,
        "get_flight_information": _TRAVEL_FACTS,
        **CALENDAR_READS,
        "create_calendar_event": CREATE_EVENT,
        "cancel_calendar_event": _act(D, {"event_id": V}, ("cancel",)),
        "reserve_hotel": _act(W, {"hotel": V}, ("book", "reserv")),
        "reserve_car_rental": _act(W, {"company": V}, ("book", "reserv", "rent")),
        "reserve_restaurant": _act(W, {"restaurant": V}, ("book", "reserv", "table")),
        "send_email": SEND_EMAIL,
    },
)

BANKING = AppProfile(
    name="banking",
    tools={
        "get_iban": _read(trusted=True),
        "send_money": _act(
            E,
            {"recipient": V, "subject": T},
            ("pay", "send", "transfer", "refund", "wire", "reimburse"),
            destinations=("recipient",),
            spend="amount",
        ),
        "schedule_transaction": _act(
            E,
            {"recipient": V, "subject": T},
            ("schedule", "recurring", "standing order", "set up"),
            destinations=("recipient",),
            spend="amount",
        ),
        "update_scheduled_transaction": _act(
            W,
            {"id": V, "recipient": V, "subject": T},
            ("update", "adjust", "change", "modify", "scheduled", "standing order", "recurring"),
        ),
        "get_balance": _read(trusted=True),
        "get_most_recent_transactions": _read(fields=LEDGER_FIELDS),
        "get_scheduled_transactions": _read(fields=LEDGER_FIELDS),
        "read_file": _read(),
        "get_user_info": _read(trusted=True),
        "update_password": _act(W, {"password": V}, ("password",), privileged=True),
        "update_user_info": _act(
            W,
            {},
            ("address", "account information", "user information", "personal details", "profile"),
            privileged=True,
        ),
    },
)

PROFILES = {p.name: p for p in (WORKSPACE, SLACK, TRAVEL, BANKING)}
