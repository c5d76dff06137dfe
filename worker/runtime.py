"""The per-process objects a worker needs, built once and on first use (never at import)."""

from __future__ import annotations

import threading
from functools import lru_cache

from providers import load_provider
from providers.base import Provider
from worker.config import Settings, get_settings
from worker.credentials.broker import CredentialBroker, build_broker
from worker.models import ProviderName
from worker.pipeline import Pipeline, ProgressHook, no_progress
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


def close() -> None:
    with _lock:
        for driver in _providers.values():
            driver.close()
        _providers.clear()
