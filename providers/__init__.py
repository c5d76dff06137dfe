"""Sandbox providers: one driver per backend behind :class:`providers.base.Provider`, and the registry.

``REGISTRY`` is the one list of providers. Everything per provider is derived from it: the
:class:`worker.models.ProviderName` enum (request field, Celery queues, fleet limits), the
``SANDBOX_WORKER_<NAME>__*`` settings blocks of :class:`worker.config.Settings` (each driver's
``config_model``) and the driver built by :func:`load_provider`.

This module imports nothing at load time, so :mod:`worker.models` (the bottom layer) can read the names
without pulling in a driver. A driver module imports its SDK only where it calls it, so loading its config
model never needs the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from providers.base import Provider, ProviderConfig

# A new provider is one module (its config model and driver) plus one line here: "module:DriverClass".
REGISTRY: dict[str, str] = {
    "docker": "providers.docker:DockerProvider",
    "e2b": "providers.e2b:E2BProvider",
    "daytona": "providers.daytona:DaytonaProvider",
}


def driver_class(name: str) -> type[Provider]:
    """The driver class registered as ``name`` (importing its module, which does not import the SDK)."""
    from providers.base import Provider
    from worker.registry import load_registered

    driver: type[Provider] = load_registered(REGISTRY, name, Provider)
    return driver


def config_models() -> dict[str, type[ProviderConfig]]:
    """Each registered provider's config model, in registry order."""
    return {name: driver_class(name).config_model for name in REGISTRY}


def load_provider(name: str, config: ProviderConfig) -> Provider:
    """Instantiate the driver registered as ``name`` with its config model."""
    driver = driver_class(name)
    if not isinstance(config, driver.config_model):
        raise TypeError(f"the {name} driver takes a {driver.config_model.__name__}, not a {type(config).__name__}")
    return driver(config)
