"""Per-tenant gateway: every session of a tenant uses the one key a gateway minted for that tenant.

The key is minted on first use with the configured budget, sealed in the secret store (kind ``gateway``, one
record per backend) and reused. Minting, rotating and revoking hold a Redis lock per tenant and backend, and
minting looks at the cache again once it holds the lock, so two workers racing for a new tenant mint once.
The sandbox gets the tenant key and the gateway's endpoint; the management key stays in the worker.
Rotating replaces the key and then deletes the old one at the gateway (sessions still using it lose access).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from worker.credentials.agents import KeyAuth, session_provider, token_grant
from worker.credentials.base import CredentialGrant
from worker.credentials.gateway_clients import GatewayClient, Spend, TenantKey
from worker.errors import CredentialError
from worker.models import GatewayBackend, SessionRequest, Strategy
from worker.secret_store import SecretStore, check_tenant

KIND = "gateway"


class GatewayKeys:
    """The tenant keys of every configured gateway backend."""

    def __init__(
        self, secrets: SecretStore, clients: Mapping[GatewayBackend, GatewayClient], *, lock_seconds: float = 60.0
    ) -> None:
        self.secrets = secrets
        self.clients = dict(clients)
        self.lock_seconds = lock_seconds

    def client(self, backend: GatewayBackend) -> GatewayClient:
        try:
            return self.clients[backend]
        except KeyError:
            raise CredentialError(
                f"gateway backend {backend.value} is not configured on this worker", field="credentials.gateway"
            ) from None

    def cached(self, tenant: str, backend: GatewayBackend) -> TenantKey | None:
        return self.secrets.unseal(KIND, tenant, backend.value, TenantKey)

    def backends_of(self, tenant: str) -> list[GatewayBackend]:
        """The backends holding a key for ``tenant``."""
        return [GatewayBackend(name) for name in self.secrets.sealed_names(KIND, tenant)]

    def ensure(self, tenant: str, backend: GatewayBackend) -> TenantKey:
        """The tenant's key, minted (once, across workers) when it has none yet."""
        key = self.cached(tenant, backend)
        if key is not None:
            return key
        client = self.client(backend)
        with self._locked(tenant, backend):
            key = self.cached(tenant, backend)  # another worker may have minted while we waited
            if key is None:
                key = self._mint(client, tenant, None)
        return key

    def rotate(self, tenant: str, backend: GatewayBackend) -> TenantKey:
        """A new key for the tenant; the previous one is deleted at the gateway."""
        client = self.client(backend)
        with self._locked(tenant, backend):
            previous = self.cached(tenant, backend)
            key = self._mint(client, tenant, previous)
            if previous is not None:
                client.revoke(previous)
        return key

    def revoke(self, tenant: str, backend: GatewayBackend) -> bool:
        """Delete the tenant's key (and its LiteLLM team) at the gateway and forget it. False when none."""
        client = self.client(backend)
        with self._locked(tenant, backend):
            key = self.cached(tenant, backend)
            if key is None:
                return False
            client.revoke(key, tenant_removed=True)
            self.secrets.drop(KIND, tenant, backend.value)
        return True

    def spend(self, tenant: str, backend: GatewayBackend) -> Spend:
        key = self.cached(tenant, backend)
        if key is None:
            raise CredentialError(f"tenant {tenant} has no {backend.value} key yet", field="tenant_id")
        return self.client(backend).spend(key)

    def _locked(self, tenant: str, backend: GatewayBackend) -> contextlib.AbstractContextManager[None]:
        return self.secrets.locked(f"{KIND}:{backend.value}:{check_tenant(tenant)}", self.lock_seconds)

    def _mint(self, client: GatewayClient, tenant: str, previous: TenantKey | None) -> TenantKey:
        key = client.mint(tenant, previous)
        try:
            self.secrets.seal(KIND, tenant, client.backend.value, key)
        except Exception:
            client.revoke(key)  # a key we cannot keep must not stay alive at the gateway
            raise
        return key


class PerTenantGateway:
    name = Strategy.gateway

    def __init__(self, keys: GatewayKeys, default: GatewayBackend | None) -> None:
        self.keys = keys
        self.default = default

    def backend_for(self, request: SessionRequest) -> GatewayBackend:
        backend = request.credentials.gateway or self.default
        if backend is None:
            configured = ", ".join(sorted(b.value for b in self.keys.clients))
            raise CredentialError(
                f"several gateway backends are configured ({configured}): name one in credentials.gateway",
                field="credentials.gateway",
            )
        return backend

    def grant(self, request: SessionRequest) -> CredentialGrant:
        provider = session_provider(request)
        backend = self.backend_for(request)
        client = self.keys.client(backend)
        key = self.keys.ensure(request.tenant_id, backend)
        return token_grant(self.name, provider, key.key, auth=KeyAuth.bearer, base_url=client.base_url(provider))

    def release(self, request: SessionRequest) -> None:
        return None  # the key belongs to the tenant, not to the session
