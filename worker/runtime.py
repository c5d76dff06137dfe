"""The per-process objects a worker needs, built once and on first use (never at import)."""

from __future__ import annotations

import threading
from functools import lru_cache

from providers import load_provider
from providers.base import Provider
from worker.config import Settings, get_settings
from worker.credentials.broker import CredentialBroker, build_broker
from worker.limits import Limits
from worker.models import ProviderName
from worker.pipeline import Pipeline, ProgressHook, no_progress
from worker.pool import Pools, RefillThread
from worker.store import Store
from worker.teardown import Teardown

_lock = threading.Lock()
_providers: dict[ProviderName, Provider] = {}


@lru_cache(maxsize=1)
def store() -> Store:
    return Store.from_settings(get_settings())


def provider(name: ProviderName, settings: Settings | None = None) -> Provider:
    """The driver for ``name``, one instance per process."""
    settings = settings or get_settings()
    with _lock:
        if name not in _providers:
            _providers[name] = load_provider(name.value, settings.provider_config(name))
        return _providers[name]


@lru_cache(maxsize=1)
def credentials() -> CredentialBroker:
    return build_broker(get_settings(), store())


def pipeline(progress: ProgressHook = no_progress) -> Pipeline:
    return Pipeline(get_settings(), store(), provider, credentials(), progress=progress)


def teardown() -> Teardown:
    """Ending sessions (terminate, the reaper), without a bring-up's progress hook."""
    return pipeline().teardown


def start_pool_refill() -> RefillThread | None:
    """This process's refill thread for the warm pools of the settings (None when there are none). It gets drivers of
    its own: a driver is used by one thread at a time, and the bring-ups use this process's."""
    settings = get_settings()
    if not settings.pool.targets:
        return None
    drivers: dict[ProviderName, Provider] = {}

    def own_provider(name: ProviderName) -> Provider:
        if name not in drivers:
            drivers[name] = load_provider(name.value, settings.provider_config(name))
        return drivers[name]

    limits = Limits(store().redis, settings.fleet, settings.lease_seconds)
    thread = RefillThread(Pools(settings, store(), own_provider, limits))
    thread.start()
    return thread


def close() -> None:
    with _lock:
        for driver in _providers.values():
            driver.close()
        _providers.clear()
