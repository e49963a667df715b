"""Node events: triggers that ``NOTIFY`` every node of revocations, task status
changes, identity changes, new policy snapshots, signing key and secret changes
(see :mod:`tether.cluster`; the SQL is frozen here as this revision made it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TRIGGERS = """CREATE OR REPLACE FUNCTION tether_notify_task() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('tether_events', json_build_object(
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
  PERFORM pg_notify('tether_events', json_build_object(
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
  PERFORM pg_notify('tether_events', json_build_object(
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
  PERFORM pg_notify('tether_events', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'policy', 'id', NEW.id::text,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_policy ON policy_snapshots;
CREATE TRIGGER tether_policy AFTER INSERT ON policy_snapshots
  FOR EACH ROW EXECUTE FUNCTION tether_notify_policy();

CREATE OR REPLACE FUNCTION tether_notify_keys() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('tether_events', json_build_object(
    'schema', TG_TABLE_SCHEMA,
    'kind', 'keys', 'id', NEW.kid,
    'at', extract(epoch from clock_timestamp()))::text);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tether_keys ON signing_keys;
CREATE TRIGGER tether_keys AFTER INSERT OR UPDATE ON signing_keys
  FOR EACH ROW EXECUTE FUNCTION tether_notify_keys();

CREATE OR REPLACE FUNCTION tether_notify_secrets() RETURNS trigger AS $$
BEGIN
  IF NEW.key = 'secrets_generation' THEN
    PERFORM pg_notify('tether_events', json_build_object(
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

DROP = """DROP TRIGGER IF EXISTS tether_secrets ON meta;
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


def upgrade() -> None:
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute(DROP)
