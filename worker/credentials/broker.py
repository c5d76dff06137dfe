"""Choosing the credential strategy of a request and delegating to it.

A request names its strategy in ``credentials.strategy``; when it names none, the tenant's default
(``sandbox-worker tenant set-default``) supplies the strategy and its references, and whatever the request
does set (``llm_provider``, say) still wins. Without either, the mock agent gets no credentials and any other
agent is refused. A worker offers each registered strategy (:data:`worker.credentials.REGISTRY`) whose
``from_settings`` finds it configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pydantic import SecretStr

from worker.credentials import REGISTRY, strategy_class
from worker.credentials.base import CredentialGrant, CredentialStrategy
from worker.credentials.gateway import gateway_keys
from worker.errors import CredentialError
from worker.models import Agent, CredentialsSpec, SessionRequest, Strategy
from worker.secret_store import SecretStore

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store

__all__ = ["CredentialBroker", "build_broker", "gateway_keys"]  # gateway_keys: the CLI imports it from here


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
                return Strategy("none")
            raise CredentialError(
                f"no credentials strategy in the request and no default for tenant {request.tenant_id}",
                field="credentials.strategy",
            )
        return chosen

    def creates(self, effective: SessionRequest) -> bool:
        """Whether granting ``effective`` (a request with its tenant default applied) creates something outside the
        worker (:attr:`CredentialStrategy.creates`)."""
        strategy = self.strategies.get(self._strategy_of(effective))
        return strategy is not None and strategy.creates

    def grant(self, request: SessionRequest, *, effective: SessionRequest | None = None) -> CredentialGrant:
        """The credentials of ``request``; ``effective`` is ``self.effective(request)`` where the caller read it
        already (the tenant default is read once per bring-up)."""
        effective = effective or self.effective(request)
        name = self._strategy_of(effective)
        try:
            strategy = self.strategies[name]
        except KeyError:
            raise CredentialError(
                f"credentials strategy {name.value} is not configured on this worker", field="credentials.strategy"
            ) from None
        return strategy.grant(effective)

    def bind(self, request: SessionRequest, grant: CredentialGrant, source: str) -> None:
        """The sandbox ``grant`` went to is at ``source``: the granting strategy may tie its credential to it."""
        if (strategy := self.strategies.get(grant.strategy)) is not None:
            strategy.bind(request, source)

    def adopt(
        self, request: SessionRequest, grant: CredentialGrant, placeholder: SecretStr, source: str | None
    ) -> CredentialGrant | None:
        """``grant`` rebound to a warm sandbox's placeholder by its strategy (tied to ``source`` when given), or None
        when that strategy cannot."""
        strategy = self.strategies.get(grant.strategy)
        return strategy.adopt(request, grant, placeholder, source) if strategy is not None else None

    def release(self, request: SessionRequest) -> None:
        """Release what any strategy holds for this request: releases are keyed by request and idempotent, so a
        tenant default changed since the grant cannot strand a placeholder."""
        for strategy in self.strategies.values():
            strategy.release(request)


def build_broker(settings: Settings, store: Store) -> CredentialBroker:
    """Every registered strategy these settings configure, and the tenants' defaults from the secret store."""
    built = (strategy_class(name).from_settings(settings, store) for name in REGISTRY)
    strategies = [strategy for strategy in built if strategy is not None]
    return CredentialBroker(strategies, tenant_default=SecretStore.from_store(store).default)
