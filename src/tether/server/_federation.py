"""Federated SPIFFE trust over HTTP (see :mod:`tether.identity._federation`).

Operators (admins; auditors may list)::

    GET    /v1/federation                        federated trust domains, bundles held
    POST   /v1/federation                        federate a trust domain
    DELETE /v1/federation/{trust_domain}         stop trusting it, now
    POST   /v1/federation/{trust_domain}/refresh fetch its bundle now
    POST   /v1/federation/links                  let a foreign SPIFFE ID attest an identity
    POST   /v1/federation/unlink                 take that back

Workloads::

    POST   /v1/attest/federated                  a foreign JWT-SVID or X.509-SVID -> this
                                                 domain's SVIDs

The foreign JWT-SVID is the credential of ``/v1/attest/federated``: a refusal before its
signature verified (its presenter proved nothing) is counted and sampled like every
unauthenticated refusal; one after (expired, wrong audience, not linked, used before, a
disabled identity) leaves its own receipt.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import Any

from litestar import Request, delete, get, post

from tether._errors import Rejected, UsageError
from tether.identity._attestation import UNVERIFIED
from tether.identity._federation import Federation
from tether.server import _schemas as S
from tether.server._app import (
    _ERRORS,
    _ctx,
    _principal,
    _public_key,
    authenticated,
    refuse_unauthenticated,
)
from tether.server._auth import request_uri, require, single_header


class FederationIn(S.Strict):
    trust_domain: str
    endpoint_url: str | None = None
    profile: str = "https_web"
    bundle: dict[str, Any] | None = None
    refresh_interval: float | None = None
    max_age: float | None = None
    replace: bool = False


class LinkIn(S.Strict):
    spiffe_id: str
    attested_by: str


class UnlinkIn(S.Strict):
    attested_by: str


class FederatedAttestIn(S.Strict):
    jwt_svid: str | None = None
    jwk: dict[str, str] | None = None
    x509_svid: str | None = None
    audience: list[str] | None = None


def _federation(request: Request) -> Federation:  # type: ignore[type-arg]
    return _ctx(request).tether.attestation.federation


def _entry_out(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "bundle"}


@get("/v1/federation", tags=["federation"], responses=_ERRORS, guards=[authenticated])
async def federation_list(request: Request) -> list[dict[str, Any]]:  # type: ignore[type-arg]
    """The federated trust domains, their links and the bundle this node holds of each."""
    require(_principal(request), "auditor")
    return _federation(request).status()


@post(
    "/v1/federation",
    tags=["federation"],
    responses=_ERRORS,
    status_code=201,
    guards=[authenticated],
)
async def federation_add(request: Request, data: FederationIn) -> dict[str, Any]:  # type: ignore[type-arg]
    """Federate a trust domain: its bundle endpoint (``https_web``) or a static bundle."""
    principal = _principal(request)
    require(principal)
    if data.profile not in ("https_web", "static"):
        raise UsageError("profile must be https_web or static")
    if (data.profile == "static") != (data.bundle is not None):
        raise UsageError("profile static takes a bundle; https_web an endpoint_url")
    bundle = json.dumps(data.bundle).encode() if data.bundle is not None else None
    entry = _federation(request).add(
        data.trust_domain,
        endpoint_url=data.endpoint_url,
        bundle=bundle,
        refresh_interval=data.refresh_interval,
        max_age=data.max_age,
        replace=data.replace,
        by=principal.name,
    )
    return _entry_out(entry)


@delete(
    "/v1/federation/{trust_domain:str}",
    tags=["federation"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def federation_remove(request: Request, trust_domain: str) -> dict[str, Any]:  # type: ignore[type-arg]
    """Stop trusting a federated trust domain, on every node from its next attestation."""
    principal = _principal(request)
    require(principal)
    return _entry_out(_federation(request).remove(trust_domain, by=principal.name))


@post(
    "/v1/federation/{trust_domain:str}/refresh",
    tags=["federation"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def federation_refresh(request: Request, trust_domain: str) -> dict[str, Any]:  # type: ignore[type-arg]
    """Fetch a federated trust domain's bundle now (on this node)."""
    require(_principal(request))
    federation = _federation(request)
    federation.refresh(trust_domain)
    return next(s for s in federation.status() if s["trust_domain"] == trust_domain)


@post(
    "/v1/federation/links",
    tags=["federation"],
    responses=_ERRORS,
    status_code=201,
    guards=[authenticated],
)
async def federation_link(request: Request, data: LinkIn) -> dict[str, Any]:  # type: ignore[type-arg]
    """Let SVIDs of a foreign SPIFFE ID attest a registered identity."""
    principal = _principal(request)
    require(principal)
    return _federation(request).link(data.spiffe_id, data.attested_by, by=principal.name)


@post(
    "/v1/federation/unlink",
    tags=["federation"],
    responses=_ERRORS,
    status_code=200,
    guards=[authenticated],
)
async def federation_unlink(request: Request, data: UnlinkIn) -> dict[str, Any]:  # type: ignore[type-arg]
    """A foreign SPIFFE ID attests no identity any more."""
    principal = _principal(request)
    require(principal)
    return _federation(request).unlink(data.attested_by, by=principal.name)


@post("/v1/attest/federated", tags=["identities"], responses=_ERRORS, status_code=200)
async def attest_federated(request: Request, data: FederatedAttestIn) -> S.AttestOut:  # type: ignore[type-arg]
    """Exchange an SVID of a federated trust domain for this trust domain's SVIDs of the
    identity it is linked to: a JWT-SVID (audience ``spiffe://<this domain>``) with the
    ``jwk`` to bind them to, or an X.509-SVID (PEM, leaf first) with a ``DPoP`` proof
    signed by its key for this request (``ath``: SHA-256 of ``x509_svid``)."""
    ctx = _ctx(request)
    attestation = ctx.tether.attestation
    attest: Callable[[], Any]
    if data.jwt_svid is not None and data.x509_svid is None and data.jwk is not None:
        attest = functools.partial(
            attestation.attest_federated,
            data.jwt_svid,
            _public_key(data.jwk),
            audience=data.audience,
            record_unverified=False,
        )
    elif data.x509_svid is not None and data.jwt_svid is None and data.jwk is None:
        attest = functools.partial(
            attestation.attest_federated_x509,
            data.x509_svid,
            single_header(request, "dpop"),
            htm=request.method,
            htu=request_uri(request),
            audience=data.audience,
            record_unverified=False,
        )
    else:
        raise UsageError("send jwt_svid with jwk, or x509_svid with a DPoP proof")
    try:
        # In a worker thread: the attestation may fetch a foreign bundle (up to the fetch
        # timeout), and the event loop keeps answering everyone else meanwhile.
        svids = await asyncio.to_thread(attest)
    except Rejected as exc:
        if exc.code not in UNVERIFIED:
            raise
        refuse_unauthenticated(ctx, request, exc.code, status=403)
    return S.AttestOut(
        spiffe_id=svids.spiffe_id,
        jwt_svid=svids.jwt_svid,
        x509_svid_pem=svids.x509_svid_pem,
        expires_at=svids.expires_at,
    )


def federation_routes() -> list[Any]:
    """The federation endpoints, for the server's app."""
    return [
        federation_list,
        federation_add,
        federation_remove,
        federation_refresh,
        federation_link,
        federation_unlink,
        attest_federated,
    ]


__all__ = ["federation_routes"]
