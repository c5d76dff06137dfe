"""Choosing the credential strategy of a request and delegating to it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from worker.credentials.base import NO_CREDENTIALS, CredentialGrant, CredentialStrategy
from worker.errors import CredentialError
from worker.models import Agent, SessionRequest, Strategy

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
        strategies: Mapping[Strategy, CredentialStrategy],
        tenant_default: Callable[[str], Strategy | None] = lambda _tenant: None,
    ) -> None:
        self.strategies = dict(strategies)
        self.tenant_default = tenant_default

    def strategy_for(self, request: SessionRequest) -> Strategy:
        chosen = request.credentials.strategy or self.tenant_default(request.tenant_id)
        if chosen is None:
            if request.agent is Agent.mock:
                return Strategy.none
            raise CredentialError(
                f"no credentials strategy in the request and no default for tenant {request.tenant_id}",
                field="credentials.strategy",
            )
        return chosen

    def _strategy(self, request: SessionRequest) -> CredentialStrategy:
        name = self.strategy_for(request)
        try:
            return self.strategies[name]
        except KeyError:
            raise CredentialError(
                f"credentials strategy {name.value} is not configured on this worker", field="credentials.strategy"
            ) from None

    def grant(self, request: SessionRequest) -> CredentialGrant:
        return self._strategy(request).grant(request)

    def release(self, request: SessionRequest) -> None:
        self._strategy(request).release(request)


def build_broker(settings: Settings, store: Store) -> CredentialBroker:
    """The strategies this worker's settings enable."""
    return CredentialBroker({Strategy.none: NoCredentials()})
