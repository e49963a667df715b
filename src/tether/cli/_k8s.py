"""The bootstrap credential as a Kubernetes Secret: ``tether init --credential-secret``.

On Kubernetes the first admin credential goes where a platform engineer looks for an
initial credential (as Argo CD's ``argocd-initial-admin-secret``): a Secret in the
namespace of the init Job, never a log. The Job's pod talks to the API server as its
service account (the token, CA and namespace Kubernetes mounts in every pod at
``/var/run/secrets/kubernetes.io/serviceaccount``), with plain HTTPS: no ``kubectl``
image, no Kubernetes client library.

Two requests, each a refusal when it does not find what it expects:

1. before the trust domain is made, ``GET`` the Secret by name: it must not exist (a
   credential is never overwritten) and the service account must be able to reach the
   API server, so nothing is made that could not be delivered;
2. after, ``POST`` the Secret (``create``: it fails rather than replace one made in
   between), with the credential under ``credential`` and its id and expiry as
   annotations.

The Role the Job needs: ``get`` on that Secret's name and ``create`` on secrets
(Kubernetes cannot restrict ``create`` to a name); ``deploy/k8s/tether.yaml`` has it.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tether._errors import InfrastructureError, UsageError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Where the token, ``ca.crt`` and ``namespace`` are when not at the usual place (a
#: projected service-account volume mounted elsewhere).
SERVICE_ACCOUNT_ENV = "TETHER_SERVICE_ACCOUNT_DIR"
#: A Secret's name: an RFC 1123 subdomain.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
TIMEOUT_SECONDS = 10.0
ANNOTATION = "tether.dev"


@dataclass(frozen=True)
class SecretTarget:
    """Where the Secret goes: the API server, as whom, and its namespace and name."""

    api: str
    token: str
    ca_file: Path | None
    namespace: str
    name: str


def parse_secret_name(value: str) -> tuple[str | None, str]:
    """``NAME`` or ``NAMESPACE/NAME`` (default namespace: the pod's own)."""
    namespace, _, name = value.rpartition("/")
    for part in (name, namespace) if namespace else (name,):
        if not _NAME.fullmatch(part) or len(part) > 253:
            raise UsageError(
                f"--credential-secret {value!r}: a Secret is NAME or NAMESPACE/NAME "
                "(lower-case letters, digits, '-' and '.')"
            )
    return namespace or None, name


def in_cluster(value: str, account: Path | None = None) -> SecretTarget:
    """The Secret ``value`` names, written as this pod's service account; a usage error
    outside a pod (no service account mounted, no API server in the environment)."""
    namespace, name = parse_secret_name(value)
    if account is None:
        account = Path(os.environ.get(SERVICE_ACCOUNT_ENV) or SERVICE_ACCOUNT)
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token_file = account / "token"
    if not host or not token_file.is_file():
        raise UsageError(
            "--credential-secret works inside a Kubernetes pod (no KUBERNETES_SERVICE_HOST "
            f"or no service-account token at {token_file}); elsewhere use --credential-file"
        )
    if namespace is None:
        try:
            namespace = (account / "namespace").read_text().strip()
        except OSError:
            raise UsageError("no namespace: give --credential-secret NAMESPACE/NAME") from None
    ca = account / "ca.crt"
    api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return SecretTarget(
        api=api,
        token=token_file.read_text().strip(),
        ca_file=ca if ca.is_file() else None,
        namespace=namespace,
        name=name,
    )


class SecretWriter:
    """Creates one Secret holding a credential, never replacing one."""

    def __init__(self, target: SecretTarget) -> None:
        self.target = target
        self._http = httpx.Client(
            base_url=target.api,
            headers={"Authorization": f"Bearer {target.token}", "Accept": "application/json"},
            verify=str(target.ca_file) if target.ca_file is not None else True,
            timeout=TIMEOUT_SECONDS,
            follow_redirects=False,
        )

    @property
    def where(self) -> str:
        return f"Secret {self.target.namespace}/{self.target.name}"

    def close(self) -> None:
        self._http.close()

    def _path(self, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{self.target.namespace}/secrets"
        return f"{base}/{name}" if name else base

    def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise InfrastructureError(
                f"cannot reach the Kubernetes API at {self.target.api}: {exc}"
            ) from None

    def check_absent(self) -> None:
        """Refuse unless the Secret does not exist yet and the API server answers."""
        response = self._send("GET", self._path(self.target.name))
        if response.status_code == 404:
            return
        if response.status_code == 200:
            raise UsageError(f"{self.where} exists: a credential is never overwritten")
        raise InfrastructureError(_refusal(response, f"cannot read {self.where}"))

    def create(self, credential: str, *, credential_id: str, expires_at: float | None) -> None:
        """Create the Secret; an error (never a retry that could replace it) otherwise."""
        annotations = {f"{ANNOTATION}/credential-id": credential_id}
        if expires_at is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
            annotations[f"{ANNOTATION}/expires-at"] = stamp  # RFC 3339, UTC
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": self.target.name,
                "labels": {"app.kubernetes.io/name": "tether"},
                "annotations": annotations,
            },
            "data": {"credential": base64.b64encode(credential.encode()).decode()},
        }
        response = self._send("POST", self._path(), body)
        if response.status_code == 201:
            return
        if response.status_code == 409:
            raise UsageError(f"{self.where} appeared meanwhile: not overwritten")
        raise InfrastructureError(_refusal(response, f"cannot create {self.where}"))


def _refusal(response: httpx.Response, what: str) -> str:
    """The API server's refusal in one line (its Status message, never a body echo)."""
    try:
        message = str(response.json().get("message", ""))[:300]
    except (ValueError, AttributeError):
        message = ""
    return f"{what}: {response.status_code} {message or response.reason_phrase}".rstrip()
