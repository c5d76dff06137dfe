"""Choosing the credential strategy of a request and delegating to it.

A request names its strategy in ``credentials.strategy``; when it names none, the tenant's default
(``sandbox-worker tenant set-default``) supplies the strategy and its references, and whatever the request
does set (``llm_provider``, say) still wins. Without either, the mock agent gets no credentials and any other
agent is refused. A strategy is registered only when the worker's settings configure it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from worker.credentials.base import NO_CREDENTIALS, CredentialGrant, CredentialStrategy
from worker.credentials.byok import BringYourOwnKey
from worker.credentials.gateway import GatewayKeys, PerTenantGateway
from worker.credentials.gateway_clients import CLIENTS
from worker.credentials.shared import SharedOrgKey
from worker.credentials.subscription import PersonalSubscription
from worker.credentials.vault import Placeholders, VaultStore, VaultStrategy
from worker.errors import CredentialError
from worker.models import Agent, CredentialsSpec, SessionRequest, Strategy
from worker.secret_store import SecretStore

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store


class NoCredentials:
    """The agent gets no credential from us (the mock agent, or an image that brings its own)."""

    name = Strategy.none

    def grant(self, request: SessionRequest) -> CredentialGrant:
        return NO_CREDENTIALS

    def release(self, request: SessionRequest) -> None:
        return None


class CredentialBroker:
    def __init__(
        self,
        strategies: Iterable[CredentialStrategy],
        tenant_default: Callable[[str], CredentialsSpec | None] = lambda _tenant: None,
    ) -> None:
        self.strategies = {strategy.name: strategy for strategy in strategies}
        self.tenant_default = tenant_default

    def effective(self, request: SessionRequest) -> SessionRequest:
        """``request`` with the tenant's default credentials filled in where it names no strategy."""
        spec = request.credentials
        if spec.strategy is not None:
            return request
        default = self.tenant_default(request.tenant_id)
        if default is None:
            return request
        # A request arrives fully dumped (every field set): only what differs from the defaults overrides.
        overrides = {name: getattr(spec, name) for name in spec.model_dump(exclude_defaults=True)}
        return request.model_copy(update={"credentials": default.model_copy(update=overrides)})

    def strategy_for(self, request: SessionRequest) -> Strategy:
        """The strategy serving ``request`` once the tenant default is applied to it."""
        return self._strategy_of(self.effective(request))

    @staticmethod
    def _strategy_of(request: SessionRequest) -> Strategy:
        chosen = request.credentials.strategy
        if chosen is None:
            if request.agent is Agent.mock:
                return Strategy.none
            raise CredentialError(
                f"no credentials strategy in the request and no default for tenant {request.tenant_id}",
                field="credentials.strategy",
            )
        return chosen

    def grant(self, request: SessionRequest) -> CredentialGrant:
        effective = self.effective(request)  # one read of the tenant default per grant
        name = self._strategy_of(effective)
        try:
            strategy = self.strategies[name]
        except KeyError:
            raise CredentialError(
                f"credentials strategy {name.value} is not configured on this worker", field="credentials.strategy"
            ) from None
        return strategy.grant(effective)

    def release(self, request: SessionRequest) -> None:
        """Release what any strategy holds for this request: releases are keyed by request and idempotent, so a
        tenant default changed since the grant cannot strand a placeholder."""
        for strategy in self.strategies.values():
            strategy.release(request)


def gateway_keys(settings: Settings, store: Store) -> GatewayKeys | None:
    """The tenant keys of every gateway backend these settings enable; None when there is none."""
    gateway = settings.credentials.gateway
    clients = {
        backend: CLIENTS[backend](gateway.backend(backend), prefix=gateway.key_prefix) for backend in gateway.enabled()
    }
    if not clients:
        return None
    return GatewayKeys(SecretStore.from_store(store), clients, lock_seconds=gateway.lock_seconds)


def build_broker(settings: Settings, store: Store) -> CredentialBroker:
    """The strategies this worker's settings enable, and the tenants' defaults from the secret store."""
    config = settings.credentials
    secrets = SecretStore.from_store(store)
    strategies: list[CredentialStrategy] = [NoCredentials(), BringYourOwnKey(secrets, config.provider_urls)]
    if config.shared.enabled:
        strategies.append(SharedOrgKey(config.shared, config.provider_urls))
    if (home := config.subscription.home) is not None:
        minimum = config.subscription.min_validity_seconds
        strategies.append(PersonalSubscription(home, minimum, config.provider_urls))
    keys = gateway_keys(settings, store)
    if keys is not None:
        enabled = list(keys.clients)
        default = config.gateway.default or (enabled[0] if len(enabled) == 1 else None)
        strategies.append(PerTenantGateway(keys, default))
    if config.egress.public_url:
        strategies.append(VaultStrategy(VaultStore(secrets), Placeholders(secrets), config.egress))
    return CredentialBroker(strategies, tenant_default=secrets.default)
