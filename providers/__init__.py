"""Sandbox providers: one driver per backend behind :class:`providers.base.Provider`.

Drivers are imported lazily, so an SDK is only needed on workers that serve its provider.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from providers.base import Provider

# A new provider is one module plus one line here.
REGISTRY: dict[str, str] = {
    "docker": "providers.docker:DockerProvider",
    "e2b": "providers.e2b:E2BProvider",
    "daytona": "providers.daytona:DaytonaProvider",
}


def load_provider(name: str, config: Any) -> Provider:
    """Instantiate the driver registered as ``name`` with its config model."""
    module_name, _, class_name = REGISTRY[name].partition(":")
    factory: Callable[[Any], Provider] = getattr(importlib.import_module(module_name), class_name)
    return factory(config)
