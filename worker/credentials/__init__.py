"""Credential strategies: how an agent gets its LLM credentials, one module per strategy, and the registry.

``REGISTRY`` is the one list of strategies. Everything per strategy is derived from it: the
:class:`worker.models.Strategy` enum (the request's ``credentials.strategy``, in registry order), the
``SANDBOX_WORKER_CREDENTIALS__<STRATEGY>__*`` settings blocks of :class:`worker.config.CredentialsSettings`
(each strategy's ``settings_model``, when it has one) and the strategies
:func:`worker.credentials.broker.build_broker` offers (each strategy's ``from_settings``, which says whether
the settings configure it).

This module imports nothing at load time, so :mod:`worker.models` (the bottom layer) can read the names
without importing a strategy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import BaseModel

    from worker.credentials.base import RegisteredStrategy

# A new strategy is one module (its settings model, if any, and the strategy) plus one line here:
# "module:StrategyClass". The order is the order of the Strategy enum (and so of the JSON schema).
REGISTRY: dict[str, str] = {
    "none": "worker.credentials.none:NoCredentials",
    "gateway": "worker.credentials.gateway:PerTenantGateway",
    "byok": "worker.credentials.byok:BringYourOwnKey",
    "shared": "worker.credentials.shared:SharedOrgKey",
    "subscription": "worker.credentials.subscription:PersonalSubscription",
    "vault": "worker.credentials.vault:VaultStrategy",
}


def strategy_class(name: str) -> type[RegisteredStrategy]:
    """The strategy class registered as ``name`` (importing its module)."""
    from worker.credentials.base import RegisteredStrategy
    from worker.registry import load_registered

    strategy: type[RegisteredStrategy] = load_registered(REGISTRY, name, RegisteredStrategy)
    return strategy


def settings_models() -> dict[str, type[BaseModel]]:
    """The settings model of each registered strategy that has one, in registry order."""
    models = {name: strategy_class(name).settings_model for name in REGISTRY}
    return {name: model for name, model in models.items() if model is not None}
