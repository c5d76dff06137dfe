"""Loading a class named in a registry (``"module:Class"`` strings): the providers' and the strategies'.

Bottom layer: it imports nothing of the project, so the import-free registries can use it lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def load_registered(registry: Mapping[str, str], name: str, base: type[Any]) -> type[Any]:
    """The class registered as ``name``, checked to be a ``base`` whose ``name`` is that registry key."""
    module_name, _, class_name = registry[name].partition(":")
    found = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(found, type) and issubclass(found, base)) or getattr(found, "name", None) != name:
        raise TypeError(f"{registry[name]} is not the {base.__name__} registered as {name!r}")
    return found
