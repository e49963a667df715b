"""Dynamic PostgreSQL roles: one login role per lease, made and destroyed by the broker.

A secret of kind ``postgres`` holds an admin connection string (a role allowed to
create roles and grant what the template names) and, beside it, a
:class:`PostgresTemplate` declaring what each per-task role receives, e.g. ``SELECT``
on every table of one schema. For each lease the broker:

1. records the lease (and so the intent to create the role) durably;
2. creates ``<role_prefix><lease hex>`` with ``LOGIN``, ``NOINHERIT``, no other
   attribute, a connection limit, ``VALID UNTIL`` = the lease's expiry and a random
   password sent as a SCRAM-SHA-256 verifier computed here (the plaintext never reaches
   the server, so never its statement log), then ``CONNECT``, ``USAGE`` on each schema
   and the template's grants, all in one transaction;
3. hands the tool ``postgresql://<role>:<password>@<host>:<port>/<database>``.

Dropping (task end, revocation, expiry, reaper): ``NOLOGIN`` first (no new session),
terminate the role's sessions, ``DROP OWNED BY`` (its privileges), ``DROP ROLE``.

``VALID UNTIL`` only bounds *password* authentication: a server whose ``pg_hba.conf``
trusts connections without a password lets any existing login role in, so there the
drop is the only barrier and the reaper must run (it does, at start and periodically).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
from typing import Any
from urllib.parse import quote

import msgspec

from tether._errors import InfrastructureError
from tether.core._credentials import Known, redact_text
from tether.secrets._value import SecretValue

PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"}
)
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
ROLE_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,23}$")
SCRAM_ITERATIONS = 4096
CONNECT_TIMEOUT = 5


class Grant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``privileges`` on ``tables`` of ``schema`` (``["*"]``: every table there now)."""

    schema: str
    privileges: tuple[str, ...] = ("SELECT",)
    tables: tuple[str, ...] = ("*",)


class PostgresTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What every per-task role of one ``postgres`` secret receives."""

    grants: tuple[Grant, ...]
    host: str | None = None  # the host tools connect to (default: the admin DSN's)
    port: int | None = None
    connection_limit: int = 4
    role_prefix: str = "tether_"


def template_problems(template: PostgresTemplate) -> list[str]:
    problems: list[str] = []
    if not template.grants:
        problems.append("postgres template: declare at least one grant")
    for i, grant in enumerate(template.grants):
        where = f"postgres template grants[{i}]"
        if not IDENTIFIER.fullmatch(grant.schema):
            problems.append(f"{where}.schema: must be a plain identifier")
        if not grant.privileges:
            problems.append(f"{where}.privileges: name at least one")
        for privilege in grant.privileges:
            if privilege.upper() not in PRIVILEGES:
                problems.append(f"{where}.privileges: one of {sorted(PRIVILEGES)}")
        if not grant.tables:
            problems.append(f"{where}.tables: name at least one table, or '*'")
        for table in grant.tables:
            if table != "*" and not IDENTIFIER.fullmatch(table):
                problems.append(f"{where}.tables: each must be '*' or a plain identifier")
    if not 1 <= template.connection_limit <= 100:
        problems.append("postgres template connection_limit: between 1 and 100")
    if not ROLE_PREFIX.fullmatch(template.role_prefix):
        problems.append(f"postgres template role_prefix: must match {ROLE_PREFIX.pattern}")
    if template.port is not None and not 0 < template.port < 65536:
        problems.append("postgres template port: between 1 and 65535")
    return problems


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def role_name(template: PostgresTemplate, lease_id: str) -> str:
    return template.role_prefix + lease_id.removeprefix("lease_")[:32]


def safe_error(exc: BaseException, *values: SecretValue) -> str:
    """An exception's text with every credential in it redacted (libpq may echo a
    malformed connection string)."""
    known = [Known("secret", v.reveal()) for v in values]
    return redact_text(f"{type(exc).__name__}: {exc}"[:500], known=known)[0]


class PostgresRoles:
    """Creates and drops per-lease roles through an admin connection string."""

    def __init__(self, *, connect_timeout: int = CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout

    def _connect(self, admin_dsn: SecretValue, *, autocommit: bool) -> Any:
        import psycopg  # noqa: PLC0415 - only brokers of dynamic roles need it

        try:
            return psycopg.connect(
                admin_dsn.reveal(),
                connect_timeout=self.connect_timeout,
                autocommit=autocommit,
                application_name="tether-broker",
            )
        except Exception as exc:
            raise InfrastructureError(
                f"cannot reach PostgreSQL: {safe_error(exc, admin_dsn)}"
            ) from None

    def tool_dsn(
        self, admin_dsn: SecretValue, template: PostgresTemplate, role: str, password: SecretValue
    ) -> SecretValue:
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

        try:
            params = conninfo_to_dict(admin_dsn.reveal())
        except Exception as exc:
            raise InfrastructureError(
                f"admin connection string is malformed: {safe_error(exc, admin_dsn)}"
            ) from None
        host = template.host or str(params.get("host") or "127.0.0.1")
        port = template.port or int(str(params.get("port") or 5432))
        dbname = str(params.get("dbname") or params.get("user") or "postgres")
        netloc = f"[{host}]" if ":" in host else host
        return SecretValue(
            f"postgresql://{quote(role, safe='')}:{quote(password.reveal(), safe='')}"
            f"@{netloc}:{port}/{quote(dbname, safe='')}"
        )

    def create(
        self,
        admin_dsn: SecretValue,
        template: PostgresTemplate,
        role: str,
        password: SecretValue,
        valid_until: float,
    ) -> None:
        from psycopg import sql  # noqa: PLC0415

        until = dt.datetime.fromtimestamp(valid_until, tz=dt.UTC).isoformat()
        conn = self._connect(admin_dsn, autocommit=False)
        try:
            with conn, conn.cursor() as cur:
                ident = sql.Identifier(role)
                cur.execute(
                    sql.SQL(
                        "CREATE ROLE {} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
                        "NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {} PASSWORD {} VALID UNTIL {}"
                    ).format(
                        ident,
                        sql.Literal(template.connection_limit),
                        sql.Literal(scram_verifier(password.reveal())),
                        sql.Literal(until),
                    )
                )
                cur.execute("SELECT current_database()")
                database = cur.fetchone()[0]
                cur.execute(
                    sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                        sql.Identifier(database), ident
                    )
                )
                for grant in template.grants:
                    schema = sql.Identifier(grant.schema)
                    privileges = sql.SQL(", ").join(
                        sql.SQL(p.upper()) for p in grant.privileges if p.upper() in PRIVILEGES
                    )
                    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, ident))
                    if "*" in grant.tables:
                        cur.execute(
                            sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(
                                privileges, schema, ident
                            )
                        )
                    for table in grant.tables:
                        if table != "*":
                            cur.execute(
                                sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                                    privileges, sql.Identifier(grant.schema, table), ident
                                )
                            )
        except InfrastructureError:
            raise
        except Exception as exc:
            raise InfrastructureError(
                f"cannot create role {role}: {safe_error(exc, admin_dsn, password)}"
            ) from None
        finally:
            conn.close()

    def extend(self, admin_dsn: SecretValue, role: str, valid_until: float) -> None:
        from psycopg import sql  # noqa: PLC0415

        until = dt.datetime.fromtimestamp(valid_until, tz=dt.UTC).isoformat()
        conn = self._connect(admin_dsn, autocommit=True)
        try:
            conn.execute(
                sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(
                    sql.Identifier(role), sql.Literal(until)
                )
            )
        except Exception as exc:
            raise InfrastructureError(
                f"cannot extend role {role}: {safe_error(exc, admin_dsn)}"
            ) from None
        finally:
            conn.close()

    def drop(self, admin_dsn: SecretValue, role: str) -> bool:
        """Destroy ``role`` (and its sessions and privileges); False if it did not exist."""
        from psycopg import sql  # noqa: PLC0415

        conn = self._connect(admin_dsn, autocommit=True)
        try:
            ident = sql.Identifier(role)
            if (
                conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                is None
            ):
                return False
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))
            return True
        except Exception as exc:
            raise InfrastructureError(
                f"cannot drop role {role}: {safe_error(exc, admin_dsn)}"
            ) from None
        finally:
            conn.close()
