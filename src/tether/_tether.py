"""``Tether``: one trust domain's control plane, in process, over one store."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec

from tether._errors import Conflict, UsageError
from tether.approvals import Approvals
from tether.audit import Auditor, RowTags, VerifyReport
from tether.core._clock import Clock, SystemClock
from tether.core._decision import (
    DECIDE_HTM,
    DECIDE_HTU,
    DEFAULT_MAX_PENDING_APPROVALS,
    Verified,
)
from tether.core._flow import FlowPolicy, ToolProfile
from tether.core._intent import Intent
from tether.core._policy import PolicySnapshot
from tether.core._risk import Control, risk_tags
from tether.core._scanning import ScanLimits
from tether.core._spiffe_id import parse_trust_domain
from tether.core._verify import result_digest
from tether.enforcement import Enforcement, Observation, ObservationRefused, Receipt
from tether.flow._catalogue import ToolCatalogue
from tether.identity import Attestor, Credentials, IdentityRegistry, SVIDs
from tether.policy import PolicyService
from tether.secrets import (
    KMS,
    Broker,
    Lease,
    LocalKMS,
    ReapReport,
    SecretInfo,
    SecretValue,
    Vault,
    lease_dict,
)
from tether.store import (
    ApprovalRow,
    IdentityRow,
    SQLiteStore,
    Store,
    TaskRow,
    database_url,
    new_ephemeral_store,
    open_store,
)
from tether.store._postgres import PostgresStore, redact
from tether.tasks import (
    OpenedTask,
    TaskService,
    Template,
    load_template_file,
    parse_template,
)
from tether.tokens import CA_USE, JWT_USE, KeyRing, Sealer, load_kek
from tether.tokens._seal import KEK_FILE

DB_FILE = "tether.db"
log = logging.getLogger("tether")


def _max_pending_approvals() -> int:
    """``$TETHER_MAX_PENDING_APPROVALS``: approvals one task may have waiting at once."""
    raw = os.environ.get("TETHER_MAX_PENDING_APPROVALS", "").strip()
    if not raw:
        return DEFAULT_MAX_PENDING_APPROVALS
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError("TETHER_MAX_PENDING_APPROVALS must be a whole number of at least 1")
    return int(raw)


def _private_home(path: Path) -> None:
    """A Tether home is 0700 on every init and open (``mkdir`` leaves an existing
    directory's mode as it was): it holds the KEK and the store."""
    if path.is_dir():
        path.chmod(0o700)


def _database_url(explicit: str | None) -> str | None:
    url = database_url(explicit)
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise UsageError("TETHER_DATABASE_URL must be a postgresql:// URL")
    return url


class Tether:
    """The control plane of one trust domain.

    Open it with :meth:`init` (new trust domain), :meth:`open` (existing home)
    or :meth:`ephemeral` (in memory, for tests and benchmarks).
    """

    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        *,
        clock: Clock | None = None,
        checkpoint_every: int = 64,
        kms: KMS | None = None,
        head_every: int | None = None,
        head_interval: float | None = None,
        witness: str | Path | None = None,
    ) -> None:
        trust_domain = store.get_meta("trust_domain")
        if trust_domain is None:
            raise UsageError("this store holds no trust domain: run 'tether init'")
        self.store = store
        self._closed = False
        self.clock: Clock = clock or SystemClock()
        self.trust_domain = trust_domain
        self.keys = KeyRing(store, sealer, trust_domain)
        self.audit = Auditor(
            store,
            self.keys,
            self.clock,
            checkpoint_every=checkpoint_every,
            sealer=sealer,
            head_every=head_every,
            head_interval=head_interval,
            witness=witness,
        )
        self.identities = IdentityRegistry(store, self.audit, self.clock, trust_domain)
        self.attestation = Attestor(store, self.keys, self.identities, self.audit, self.clock)
        self.policies = PolicyService(store, self.audit, self.clock)
        self.kms: KMS = kms or LocalKMS(sealer)
        self.vault = Vault(store, self.kms, self.audit, self.clock)
        self.broker = Broker(store, self.vault, self.keys, self.audit, self.clock)
        self.tasks = TaskService(
            store,
            self.keys,
            self.identities,
            self.policies,
            self.audit,
            self.clock,
            leases=self.broker,
        )
        self.approvals = Approvals(
            store, self.audit, self.clock, max_pending=_max_pending_approvals()
        )
        self.credentials = Credentials(store, self.audit, self.clock)
        self.catalogue = ToolCatalogue(store, self.audit, self.clock)
        self.tasks.known_tools = self.catalogue.entries
        self.enforcement = Enforcement(
            store,
            self.keys,
            self.policies,
            self.audit,
            self.clock,
            self.approvals,
            self.catalogue,
            known_secrets=self.broker.known,
        )

        # A store made before rows carried tags has them added once, here, with the KEK.
        self.audit.rows.adopt()

    def __repr__(self) -> str:
        return f"Tether(trust_domain={self.trust_domain!r})"

    # -- lifecycle ------------------------------------------------------------------
    @staticmethod
    def _bootstrap(store: Store, sealer: Sealer, trust_domain: str, clock: Clock) -> None:
        if store.get_meta("trust_domain") is not None:
            raise Conflict("a trust domain already exists here")
        with store.transaction():
            # Inside the transaction, behind the audit chain's lock (PostgreSQL: an advisory
            # lock), so two nodes initialising one database at once cannot both succeed.
            if store.last_record() is not None or store.get_meta("trust_domain") is not None:
                raise Conflict("a trust domain already exists here")
            store.set_meta("trust_domain", parse_trust_domain(trust_domain))
            RowTags(store, sealer).mark()  # every row of this store is tagged from birth
            keyring = KeyRing(store, sealer, trust_domain)
            jwt_key = keyring.create(JWT_USE, clock.now())
            ca_key = keyring.create(CA_USE, clock.now())
            Auditor(store, keyring, clock, sealer=sealer).append(
                "trust_domain.init",
                effect="allow",
                chain=[f"spiffe://{trust_domain}"],
                detail={"jwt_kid": jwt_key.kid, "ca_kid": ca_key.kid},
                risk_tags=list(risk_tags(Control.TRUST_DOMAIN, Control.AUDIT)),
            )

    @classmethod
    def init(
        cls,
        home: str | Path,
        trust_domain: str,
        *,
        clock: Clock | None = None,
        database_url: str | None = None,
    ) -> Tether:
        """A new trust domain: its KEK under ``home``, its state in the store.

        The store is PostgreSQL when ``database_url`` (else ``$TETHER_DATABASE_URL``)
        names one (migrated beforehand with ``tether migrate``), else ``home/tether.db``.
        Every node sharing a PostgreSQL store needs the same KEK (``home/kek.key`` or
        ``$TETHER_KEK``)."""
        path = Path(home)
        parse_trust_domain(trust_domain)
        url = _database_url(database_url)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private_home(path)
        kek_file = path / KEK_FILE
        kek_existed = kek_file.exists()
        if url is None:
            if (path / DB_FILE).exists():
                raise Conflict(f"{path} already holds a trust domain")
            sealer = Sealer(load_kek(path, create=True))
            store: Store = SQLiteStore(path / DB_FILE)
        else:
            store = open_store(url)
            if store.get_meta("trust_domain") is not None:
                store.close()
                raise Conflict(f"the database at {redact(url)} already holds a trust domain")
            try:
                sealer = Sealer(load_kek(path, create=True))
            except BaseException:
                store.close()
                raise
        try:
            cls._bootstrap(store, sealer, trust_domain, clock or SystemClock())
            return cls(store, sealer, clock=clock)
        except BaseException:
            store.close()
            if url is not None and not kek_existed:  # this init made it, for nothing
                kek_file.unlink(missing_ok=True)
            raise

    @classmethod
    def open(
        cls, home: str | Path, *, clock: Clock | None = None, database_url: str | None = None
    ) -> Tether:
        """An existing trust domain: the KEK from ``home`` (or ``$TETHER_KEK``), the store
        as :meth:`init` chooses it."""
        path = Path(home)
        url = _database_url(database_url)
        if url is None and not (path / DB_FILE).exists():
            raise UsageError(f"no Tether home at {path}: run 'tether init --trust-domain NAME'")
        _private_home(path)
        sealer = Sealer(load_kek(path))
        store = SQLiteStore(path / DB_FILE) if url is None else open_store(url)
        try:
            tether = cls(store, sealer, clock=clock)
        except BaseException:
            store.close()
            raise
        try:
            tether.audit.check_witness_tail()
        except Exception as exc:  # a look only: verification is the judge
            log.warning("witness not checked at start: %s", type(exc).__name__)
        # Leases that expired or were revoked while no Tether process ran: end them and
        # destroy what they left (a database role, say) before anything else happens.
        try:
            if tether.broker.needs_reaping():
                tether.broker.reap()
        except Exception as exc:  # the periodic reaper retries; opening must not fail
            log.warning("lease reaping at start failed: %s", type(exc).__name__)
        return tether

    @classmethod
    def ephemeral(
        cls,
        trust_domain: str,
        *,
        clock: Clock | None = None,
        checkpoint_every: int = 64,
        database_url: str | None = None,
        head_every: int | None = None,
        head_interval: float | None = None,
        witness: str | Path | None = None,
    ) -> Tether:
        """A throwaway trust domain with a random KEK: in memory (SQLite ``:memory:``), or,
        with ``database_url``, in a fresh schema of that PostgreSQL database, dropped on
        :meth:`close` (:data:`tether.store.ephemeral_store_factory` can change the default)."""
        store = (
            new_ephemeral_store() if database_url is None else PostgresStore.throwaway(database_url)
        )
        sealer = Sealer(secrets.token_bytes(32))
        try:
            cls._bootstrap(store, sealer, trust_domain, clock or SystemClock())
            return cls(
                store,
                sealer,
                clock=clock,
                checkpoint_every=checkpoint_every,
                head_every=head_every,
                head_interval=head_interval,
                witness=witness,
            )
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Sign a tree head over the receipts not yet covered (a clean shutdown), then
        close the store. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            self.audit.sign_head()
        except Exception as exc:  # a tampered log or a closed store: nothing to sign
            log.error("no signed head at close: %s: %s", type(exc).__name__, exc)
        self.store.close()

    # -- identities ---------------------------------------------------------------------
    def register_identity(
        self, spiffe_id: str, *, kind: str, owner: str, description: str = ""
    ) -> IdentityRow:
        return self.identities.register(spiffe_id, kind=kind, owner=owner, description=description)

    def disable_identity(
        self, spiffe_id: str, *, by: str | None = None
    ) -> tuple[IdentityRow, list[str]]:
        """Offboard: disable the identity and revoke every task and token it holds; ``by``
        (the authenticated principal) is named in the receipt."""
        with self.store.transaction():
            for task in self.store.list_tasks(agent_id=spiffe_id, status="open"):
                self.store.lock_task(task.task_id)  # every tree first, then the receipts
            row = self.identities.mark_disabled(spiffe_id)
            revoked = self.tasks.revoke_for_agent(spiffe_id, reason="identity disabled")
            self.audit.append(
                "identity.disable",
                chain=[spiffe_id],
                effect="allow",
                detail={"revoked_tasks": revoked, **({"by": by} if by else {})},
                risk_tags=list(risk_tags(Control.OFFBOARDING, Control.CASCADING_REVOCATION)),
            )
        return row, revoked

    def create_join_token(self, spiffe_id: str, *, ttl: float = 600.0) -> str:
        return self.attestation.create_join_token(spiffe_id, ttl=ttl)

    def attest(
        self,
        join_token: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        audience: list[str] | None = None,
        record_refusal: bool = True,
    ) -> SVIDs:
        return self.attestation.attest(
            join_token, public_key, audience=audience, record_refusal=record_refusal
        )

    # -- templates and policies ------------------------------------------------------------
    def add_template(self, source: str | Path | dict[str, Any]) -> Template:
        template = (
            parse_template(source) if isinstance(source, dict) else load_template_file(source)
        )
        body = json.dumps(
            {
                "name": template.name,
                "description": template.description,
                "params": msgspec.to_builtins(template.params),
                "intent": template.intent,
                "max_ttl_seconds": template.max_ttl_seconds,
            },
            sort_keys=True,
        )
        with self.store.transaction():
            self.audit.rows.put_template(template.name, body, self.clock.now())
            self.audit.append(
                "template.add",
                effect="allow",
                detail={"name": template.name},
                risk_tags=list(risk_tags(Control.INTENT_BINDING, Control.AUDIT)),
            )
        return template

    def list_templates(self) -> list[Template]:
        return [parse_template(json.loads(body)) for _, body in self.store.list_templates()]

    def load_policies(self, directory: str | Path) -> PolicySnapshot:
        return self.policies.load_dir(directory)

    # -- tasks and decisions -------------------------------------------------------------
    def open_task(
        self,
        agent_id: str,
        *,
        proof_jwk: dict[str, Any] | None = None,
        jkt: str | None = None,
        template: str | None = None,
        params: dict[str, Any] | None = None,
        intent: Intent | None = None,
        on_behalf_of: str | None = None,
        parent_task_id: str | None = None,
        resources: tuple[str, ...] = (),
        request: str | None = None,
    ) -> OpenedTask:
        """Open a task (a delegated one when ``parent_task_id`` is given).

        ``request`` is the user's request the task serves: values it names ground the
        sink arguments of later calls (the information-flow rules).

        ``resources`` lists the resource servers (e.g. an MCP gateway URI) the task
        token is also addressed to, besides the trust domain.
        """
        self.tasks.expire()
        parent = self.tasks.get(parent_task_id) if parent_task_id is not None else None
        return self.tasks.open(
            agent_id,
            proof_jwk=proof_jwk,
            jkt=jkt,
            template=template,
            params=params,
            intent=intent,
            on_behalf_of=on_behalf_of,
            parent=parent,
            resources=resources,
            request=request,
        )

    def end_task(self, task_id: str) -> TaskRow:
        return self.tasks.end(task_id)

    def renew_task(self, task_id: str) -> OpenedTask:
        """A fresh token for a long-running task (the old one is revoked durably).

        Refused (:class:`tether.tasks.RenewalRejected`, with a receipt) when the task,
        an ancestor or an identity of its chain is no longer live, or the current
        policy no longer admits the task or permits a capability it holds."""
        self.tasks.expire()
        return self.tasks.renew(task_id)

    def show_task(self, task_id: str) -> TaskRow:
        self.tasks.expire()
        return self.tasks.get(task_id)

    def authorize(
        self,
        *,
        token: str | None,
        proof: str | None,
        tool: str,
        args: dict[str, Any],
        task_id: str | None = None,
        htm: str = DECIDE_HTM,
        htu: str = DECIDE_HTU,
        resource: str | None = None,
        detail: dict[str, Any] | None = None,
        verified: Verified | None = None,
        profile: ToolProfile | None = None,
        flow_policy: FlowPolicy | None = None,
        limits: ScanLimits | None = None,
    ) -> Receipt:
        """Decide one call and leave its receipt, through the one enforcement pipeline
        (:class:`tether.enforcement.Enforcement`).

        The tool's profile comes from the trust domain's catalogue (:attr:`catalogue`)
        unless the door knows it (``profile``: the gateway's upstream catalogue); the flow
        rules always run, against the flow state of the task's whole delegation tree."""
        return self.enforcement.decide(
            token=token,
            proof=proof,
            tool=tool,
            args=args,
            task_id=task_id,
            htm=htm,
            htu=htu,
            resource=resource,
            detail=detail,
            verified=verified,
            profile=profile,
            flow_policy=flow_policy,
            limits=limits,
        )

    def observe(
        self,
        *,
        token: str | None,
        proof: str | None,
        tool: str,
        receipt: int,
        result: Any,
        task_id: str | None = None,
        htm: str = DECIDE_HTM,
        htu: str = DECIDE_HTU,
    ) -> Observation:
        """Report what ``tool`` returned after the allowed decision ``receipt``: its labels
        and values join the flow state of the task and its ancestors. The proof binds the
        result (:meth:`tether.ProofKey.prove_result`). Raises
        :class:`tether.enforcement.ObservationRefused` (with a receipt) when refused."""
        try:
            verified = self.enforcement.verify(
                token=token,
                proof=proof,
                binding=result_digest(tool, receipt, result),
                htm=htm,
                htu=htu,
                task_hint=task_id,
            )
            self.enforcement.consume(verified)
        except Exception as exc:
            raise ObservationRefused(
                str(getattr(exc, "code", "token.invalid")),
                getattr(exc, "message", None) or type(exc).__name__,
            ) from None
        return self.enforcement.observe(verified, tool=tool, result=result, decision_seq=receipt)

    # -- secrets and leases -------------------------------------------------------------------
    def put_secret(
        self,
        name: str,
        value: SecretValue | bytes | str,
        *,
        kind: str,
        by: str = "operator",
        description: str = "",
        meta: dict[str, Any] | None = None,
    ) -> SecretInfo:
        """Seal a new secret (write-only: nothing ever returns its value)."""
        return self.vault.put(name, value, kind=kind, by=by, description=description, meta=meta)

    def rotate_secret(
        self,
        name: str,
        value: SecretValue | bytes | str | None = None,
        *,
        by: str = "operator",
        overlap: float | None = None,
    ) -> SecretInfo:
        """A new version (``value``, else the secret's rotation hook's answer)."""
        return self.vault.rotate(name, value, by=by, overlap=overlap)

    def list_secrets(self) -> list[SecretInfo]:
        return self.vault.list()

    def lease(
        self,
        task_id: str,
        secret: str,
        *,
        tool: str,
        receipt: Receipt,
        ttl: float | None = None,
    ) -> Lease:
        """For the enforcement point: a lease on ``secret`` for the call ``receipt`` allowed.

        The lease lives no longer than the task and is revoked with it; inject
        ``lease.value`` into the upstream call and never hand it to the agent."""
        return self.broker.lease(task_id, secret, tool=tool, receipt=receipt, ttl=ttl)

    def downstream_token(
        self,
        task_id: str,
        *,
        audience: str,
        tool: str,
        receipt: Receipt,
        tool_identity: str | None = None,
        ttl: float = 60.0,
    ) -> Lease:
        """A Tether-signed token (at most 60 s) for one allowed call to ``audience``."""
        return self.broker.downstream_token(
            task_id,
            audience=audience,
            tool=tool,
            receipt=receipt,
            tool_identity=tool_identity,
            ttl=ttl,
        )

    def reap(self) -> ReapReport:
        """End tasks past their TTL, then expire, revoke and clean up leases."""
        self.tasks.expire()
        try:
            self.audit.tick()
        except Exception as exc:  # alarmed; the reaper's other work goes on
            log.error("signed tree head not made: %s: %s", type(exc).__name__, exc)
        return self.broker.reap()

    def kill_switch(
        self, reason: str, *, by: str = "operator", agent: str | None = None
    ) -> dict[str, list[str]]:
        """Revoke every open task (of ``agent``, or of everyone) and, with no agent named,
        every lease; dynamic credentials are destroyed right after."""
        return self.kill(reason, by=by, agent=agent, everything=agent is None)

    def kill(
        self,
        reason: str,
        *,
        by: str = "operator",
        agent: str | None = None,
        owner: str | None = None,
        template: str | None = None,
        trust_domain: str | None = None,
        everything: bool = False,
    ) -> dict[str, list[str]]:
        """The kill switch: revoke, now and durably, every open task in scope.

        The scope is the tasks matching every filter given (an agent, an owner's agents,
        a template, a trust domain), or all of them with ``everything``. Ending a task
        revokes its token, its leases and its whole delegation subtree, so the next call
        of any of them is refused everywhere. Killing everything (or this whole trust
        domain) also revokes every lease. One receipt records the scope and the result.
        """
        if not (everything or agent or owner or template or trust_domain):
            raise UsageError("name a scope (agent, owner, template, trust domain) or everything")
        if not reason.strip():
            raise UsageError("a kill needs a reason")
        scope = {
            "agent": agent,
            "owner": owner,
            "template": template,
            "trust_domain": trust_domain,
            "everything": everything,
        }
        owners: dict[str, str] = {}

        def in_scope(row: TaskRow) -> bool:
            if agent is not None and row.agent_id != agent:
                return False
            if template is not None and row.template != template:
                return False
            if trust_domain is not None and row.agent_id.split("/")[2] != trust_domain:
                return False
            if owner is not None:
                if row.agent_id not in owners:
                    identity = self.store.get_identity(row.agent_id)
                    owners[row.agent_id] = identity.owner if identity else ""
                if owners[row.agent_id] != owner:
                    return False
            return True

        why = f"kill switch: {reason}"
        with self.store.transaction():
            targets = [
                r for r in self.store.list_tasks(agent_id=agent, status="open") if in_scope(r)
            ]
            for row in targets:  # lock every tree first, then end them with their receipts
                self.store.lock_task(row.task_id)
            tasks = []
            for row in targets:
                current = self.store.get_task(row.task_id)
                if current is not None and current.status == "open":  # not ended by cascade
                    self.tasks.end(row.task_id, reason=why, status="revoked")
                    tasks.append(row.task_id)
            whole = everything or (
                trust_domain == self.trust_domain and not (agent or owner or template)
            )
            leases = self.broker.revoke_all(why, by=by) if whole else []
            self.audit.append(
                "kill_switch",
                chain=[by],
                effect="allow",
                detail={"reason": reason, **scope, "tasks": tasks, "leases": leases},
                risk_tags=list(risk_tags(Control.KILL_SWITCH, Control.CASCADING_REVOCATION)),
            )
        return {"tasks": tasks, "leases": leases}

    def trace(self, task_id: str) -> dict[str, Any]:
        """The whole delegation tree ``task_id`` belongs to: who delegated what to whom,
        every receipt of its tasks (opening, decisions, renewals, ends) and every lease."""
        rows = self.tasks.tree(task_id)
        ids = {r.task_id for r in rows}
        receipts = []
        for record in self.store.iter_records():
            body: dict[str, Any] = json.loads(record.body)
            detail = body.get("detail")
            parent = detail.get("parent_task_id") if isinstance(detail, dict) else None
            if body.get("task_id") in ids or parent in ids:
                body["hash"] = record.hash
                receipts.append(body)
        leases = [lease_dict(lease) for tid in ids for lease in self.store.list_leases(task_id=tid)]
        tasks = [
            {
                "task_id": r.task_id,
                "parent_task_id": r.parent_task_id,
                "agent": r.agent_id,
                "chain": json.loads(r.chain_json),
                "delegated_by": json.loads(r.chain_json)[1] if r.parent_task_id else None,
                "template": r.template,
                "status": r.status,
                "end_reason": r.end_reason,
                "calls_used": r.calls_used,
                "opened_at": r.opened_at,
                "expires_at": r.expires_at,
                "ended_at": r.ended_at,
                "intent_digest": r.intent_digest,
                "intent": json.loads(r.intent_json),
                "children": [c.task_id for c in rows if c.parent_task_id == r.task_id],
            }
            for r in rows
        ]
        return {
            "task_id": task_id,
            "root_task_id": rows[0].task_id,
            "tasks": tasks,
            "receipts": receipts,
            "leases": sorted(leases, key=lambda lease: lease["created_at"]),
        }

    def decide_approval(
        self, approval_id: str, *, approve: bool, by: str, comment: str = ""
    ) -> ApprovalRow:
        """Approve or deny one pending approval; ``by`` names the human, ``comment`` (their
        words) goes into the decision's receipt."""
        return self.approvals.decide(approval_id, approve=approve, by=by, comment=comment)

    # -- trusted user-token issuers (for token exchange) ---------------------------------------
    def add_user_issuer(self, issuer: str, *, audience: str, jwks: dict[str, Any]) -> None:
        """Trust ``issuer``'s user tokens (verified with ``jwks``) as token-exchange subjects."""
        if not issuer or not audience or not isinstance(jwks.get("keys"), list):
            raise UsageError("an issuer needs a name, an audience and a JWKS with keys")
        issuers = self.user_issuers()
        issuers[issuer] = {"issuer": issuer, "audience": audience, "jwks": jwks}
        with self.store.transaction():
            self.audit.rows.set_setting("user_issuers", json.dumps(issuers, sort_keys=True))
            self.audit.append(
                "issuer.add",
                effect="allow",
                detail={"issuer": issuer, "audience": audience},
                risk_tags=list(risk_tags(Control.TRUST_DOMAIN, Control.AUDIT)),
            )

    def user_issuers(self) -> dict[str, dict[str, Any]]:
        # Tagged: an issuer a store writer added (their own JWKS, to mint user tokens for
        # token exchange) is refused with everything else in the setting.
        raw = self.audit.rows.setting("user_issuers")
        issuers: dict[str, dict[str, Any]] = json.loads(raw) if raw else {}
        return issuers

    # -- keys, bundles, audit ---------------------------------------------------------------
    def rotate_keys(self, use: str = JWT_USE) -> str:
        with self.store.transaction():
            row = self.keys.rotate(use, self.clock.now())
            self.audit.append(
                "keys.rotate",
                effect="allow",
                detail={"use": use, "kid": row.kid},
                risk_tags=list(risk_tags(Control.TRUST_DOMAIN, Control.AUDIT)),
            )
        return row.kid

    def jwks(self) -> dict[str, Any]:
        return self.keys.jwks(self.clock.now())

    def spiffe_bundle(self) -> dict[str, Any]:
        return self.keys.spiffe_bundle(self.clock.now())

    def revoke_key(self, kid: str, *, by: str = "operator") -> dict[str, Any]:
        """Revoke a signing key now (an emergency: it verifies nothing more, on every node
        from its next call); a key still signing is replaced first."""
        with self.store.transaction():
            row, successor = self.keys.revoke(kid, self.clock.now())
            self.audit.append(
                "keys.revoke",
                chain=[by],
                effect="allow",
                detail={"kid": kid, "use": row.use, "successor": successor and successor.kid},
                risk_tags=list(risk_tags(Control.TRUST_DOMAIN, Control.AUDIT)),
            )
        return {
            "kid": row.kid,
            "use": row.use,
            "revoked_at": row.revoked_at,
            "successor": successor.kid if successor else None,
        }

    def verify_audit(self, *, sign: bool = True) -> VerifyReport:
        """Verify the whole log (see :meth:`tether.audit.Auditor.verify`)."""
        return self.audit.verify(sign=sign)

    def export_audit(self, first: int = 1, last: int | None = None) -> dict[str, Any]:
        """An offline-verifiable bundle of receipts ``first..last`` (see
        :meth:`tether.audit.Auditor.export`)."""
        return self.audit.export(first, last)
