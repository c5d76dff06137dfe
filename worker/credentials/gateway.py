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
from typing import TYPE_CHECKING, Self

import structlog
from pydantic import Field

from worker.credentials.agents import KeyAuth, session_provider, token_grant
from worker.credentials.base import CredentialGrant, RegisteredStrategy
from worker.credentials.gateway_clients import CLIENTS, GatewayClient, Spend, TenantKey
from worker.credentials.settings import GatewayBackendSettings, OpenRouterSettings, PortkeySettings, SettingsBlock
from worker.errors import CredentialError
from worker.models import GatewayBackend, SessionRequest, Strategy
from worker.secret_store import SecretStore, check_tenant

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store

log = structlog.get_logger(__name__)

KIND = "gateway"
PENDING = "gateway-pending"  # replaced keys the gateway has not confirmed deleted yet


def _pending_name(backend: GatewayBackend, key: TenantKey) -> str:
    return f"{backend.value}:{key.key_id}"


class GatewaySettings(SettingsBlock):
    default: GatewayBackend | None = Field(
        None, description="Backend for requests that name none; the only enabled one when unset."
    )
    key_prefix: str = Field(
        "sandbox-worker", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Prefix of key, team and alias names."
    )
    lock_seconds: float = Field(60.0, gt=0, description="How long a worker may hold a tenant's mint/rotate lock.")
    openrouter: OpenRouterSettings = Field(default_factory=OpenRouterSettings)
    litellm: GatewayBackendSettings = Field(default_factory=GatewayBackendSettings)
    portkey: PortkeySettings = Field(default_factory=PortkeySettings)

    def backend(self, backend: GatewayBackend) -> GatewayBackendSettings:
        settings: GatewayBackendSettings = getattr(self, backend.value)
        return settings

    def enabled(self) -> list[GatewayBackend]:
        return [backend for backend in GatewayBackend if self.backend(backend).enabled]


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
        """A new key for the tenant; the previous one is deleted at the gateway, or kept as pending revocation
        (and retried by every later rotate and revoke and by the reaper) when the gateway does not answer: a key
        replaced but still live would spend its own budget with nothing left to revoke it."""
        client = self.client(backend)
        with self._locked(tenant, backend):
            self._revoke_pending(tenant, backend)
            previous = self.cached(tenant, backend)
            key = self._mint(client, tenant, previous)
            if previous is not None:
                self.secrets.seal(PENDING, tenant, _pending_name(backend, previous), previous)
                self._revoke_pending(tenant, backend)
        return key

    def pending(self, tenant: str) -> list[str]:
        """The tenant's replaced keys not revoked at their gateway yet, as ``<backend>:<key id>``."""
        return self.secrets.sealed_names(PENDING, tenant)

    def _revoke_pending(self, tenant: str, backend: GatewayBackend) -> None:
        client = self.client(backend)
        for name in self.pending(tenant):
            key = self.secrets.unseal(PENDING, tenant, name, TenantKey)
            if key is None or not name.startswith(f"{backend.value}:"):
                continue
            try:
                client.revoke(key)
            except CredentialError as exc:
                log.warning("revoking a replaced gateway key failed; kept for a retry", key=name, code=exc.code)
                continue
            self.secrets.drop(PENDING, tenant, name)

    def revoke_all_pending(self) -> int:
        """Retry every tenant's pending revocations (the reaper's pass); how many are still pending."""
        return sum(len(self.revoke_pending(tenant)) for tenant in self.secrets.tenants_with(PENDING))

    def revoke_pending(self, tenant: str) -> list[str]:
        """Retry the tenant's pending revocations on every configured backend; what is still pending after."""
        for backend in {GatewayBackend(name.partition(":")[0]) for name in self.pending(tenant)}:
            if backend in self.clients:
                with self._locked(tenant, backend):
                    self._revoke_pending(tenant, backend)
        return self.pending(tenant)

    def revoke(self, tenant: str, backend: GatewayBackend) -> bool:
        """Delete the tenant's key (and its LiteLLM team) at the gateway and forget it. False when none."""
        client = self.client(backend)
        with self._locked(tenant, backend):
            self._revoke_pending(tenant, backend)
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
        from worker import metrics  # not at import: worker.config loads this module, and the worker command must
        # set up the metrics' samples directory before anything imports prometheus-client (worker.metrics)

        key = client.mint(tenant, previous)
        metrics.GATEWAY_MINTS.labels(client.backend.value).inc()
        try:
            self.secrets.seal(KIND, tenant, client.backend.value, key)
        except Exception:
            client.revoke(key)  # a key we cannot keep must not stay alive at the gateway
            raise
        return key


def gateway_keys(settings: Settings, store: Store) -> GatewayKeys | None:
    """The tenant keys of every gateway backend these settings enable; None when there is none."""
    gateway = settings.credentials.strategy_settings(PerTenantGateway.name, GatewaySettings)
    clients = {
        backend: CLIENTS[backend](gateway.backend(backend), prefix=gateway.key_prefix) for backend in gateway.enabled()
    }
    if not clients:
        return None
    return GatewayKeys(SecretStore.from_store(store), clients, lock_seconds=gateway.lock_seconds)


class PerTenantGateway(RegisteredStrategy):
    name = Strategy("gateway")
    creates = True
    settings_model = GatewaySettings

    def __init__(self, keys: GatewayKeys, default: GatewayBackend | None) -> None:
        self.keys = keys
        self.default = default

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self | None:
        """Offered when a gateway backend is enabled (its URL and management key set)."""
        keys = gateway_keys(settings, store)
        if keys is None:
            return None
        enabled = list(keys.clients)
        default = settings.credentials.strategy_settings(cls.name, GatewaySettings).default
        return cls(keys, default or (enabled[0] if len(enabled) == 1 else None))

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
