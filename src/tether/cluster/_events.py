"""Node events: what one node's change tells every other node.

Events are raised by the database itself (triggers installed by the PostgreSQL
migrations), inside the transaction that makes the change, and delivered by
``NOTIFY`` when it commits. So every writer fans out: a ``tether serve`` node, a
``tether gateway`` node, the CLI, an operator's repair. A rolled-back change sends
nothing.

Kinds:

``task``
    a task's status changed (ended, revoked, expired, killed): ``id`` is the task,
    ``token`` its current token, ``status`` the new status;
``revoke``
    a token was revoked (renewal, RFC 7009, cascade): ``id`` is the token;
``identity``
    an identity changed (disabled, re-enabled): ``id`` is its SPIFFE ID;
``policy``
    a policy snapshot was loaded: ``id`` is the snapshot's row id;
``keys``
    a signing key was added or retired: ``id`` is its kid;
``secrets``
    a brokered secret was added, rotated or disabled: ``id`` is the new generation.
"""

from __future__ import annotations

import msgspec

#: The one ``LISTEN`` channel of a trust domain's database.
CHANNEL = "tether_events"


class Event(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    kind: str
    id: str
    #: The database clock when the change was made (seconds since the epoch).
    at: float = 0.0
    token: str | None = None
    status: str | None = None
    #: The schema of the changed table: nodes of other trust domains in the same
    #: database (one schema each) ignore the event.
    schema: str = ""


_decoder = msgspec.json.Decoder(Event)


def decode_event(payload: str) -> Event | None:
    """The event in a notification's payload, or ``None`` for one this node cannot read."""
    try:
        return _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


#: PostgreSQL triggers that raise the events above; the migrations install them.
TRIGGERS_SQL = f"""
CREATE OR REPLACE FUNCTION tether_notify_task() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'task', 'id', NEW.task_id, 'token', NEW.token_id, 'status', NEW.status,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_task_status ON tasks;
CREATE TRIGGER tether_task_status AFTER UPDATE OF status, token_id ON tasks
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                     OR OLD.token_id IS DISTINCT FROM NEW.token_id)
  EXECUTE FUNCTION tether_notify_task();

CREATE OR REPLACE FUNCTION tether_notify_revoke() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'revoke', 'id', NEW.token_id,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_revocation ON revocations;
CREATE TRIGGER tether_revocation AFTER INSERT ON revocations
  FOR EACH ROW EXECUTE FUNCTION tether_notify_revoke();

CREATE OR REPLACE FUNCTION tether_notify_identity() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'identity', 'id', NEW.spiffe_id, 'status', NEW.status,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_identity ON identities;
CREATE TRIGGER tether_identity AFTER UPDATE ON identities
  FOR EACH ROW EXECUTE FUNCTION tether_notify_identity();

CREATE OR REPLACE FUNCTION tether_notify_policy() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'policy', 'id', NEW.id::text,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_policy ON policy_snapshots;
CREATE TRIGGER tether_policy AFTER INSERT ON policy_snapshots
  FOR EACH ROW EXECUTE FUNCTION tether_notify_policy();
"""

_KEYS_SQL = f"""
CREATE OR REPLACE FUNCTION tether_notify_keys() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'keys', 'id', NEW.kid,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_keys ON signing_keys;
CREATE TRIGGER tether_keys AFTER INSERT OR UPDATE ON signing_keys
  FOR EACH ROW EXECUTE FUNCTION tether_notify_keys();
"""
TRIGGERS_SQL += _KEYS_SQL

_SECRETS_SQL = f"""
CREATE OR REPLACE FUNCTION tether_notify_secrets() RETURNS trigger AS $$
BEGIN
  IF NEW.key = 'secrets_generation' THEN
    PERFORM pg_notify('{CHANNEL}', json_build_object(
      'schema', TG_TABLE_SCHEMA,
      'kind', 'secrets', 'id', NEW.value,
      'at', extract(epoch from clock_timestamp()))::text);
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_secrets ON meta;
CREATE TRIGGER tether_secrets AFTER INSERT OR UPDATE ON meta
  FOR EACH ROW EXECUTE FUNCTION tether_notify_secrets();
"""
TRIGGERS_SQL += _SECRETS_SQL

DROP_TRIGGERS_SQL = """
DROP TRIGGER IF EXISTS tether_secrets ON meta;
DROP FUNCTION IF EXISTS tether_notify_secrets();
DROP TRIGGER IF EXISTS tether_keys ON signing_keys;
DROP FUNCTION IF EXISTS tether_notify_keys();
DROP TRIGGER IF EXISTS tether_task_status ON tasks;
DROP TRIGGER IF EXISTS tether_revocation ON revocations;
DROP TRIGGER IF EXISTS tether_identity ON identities;
DROP TRIGGER IF EXISTS tether_policy ON policy_snapshots;
DROP FUNCTION IF EXISTS tether_notify_task();
DROP FUNCTION IF EXISTS tether_notify_revoke();
DROP FUNCTION IF EXISTS tether_notify_identity();
DROP FUNCTION IF EXISTS tether_notify_policy();
"""
