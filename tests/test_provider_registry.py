"""Unit tests of the provider registry: one entry in providers.REGISTRY is all the worker needs to know a
provider, and loading the settings never imports a provider SDK. Each test runs in a fresh interpreter, since
ProviderName and Settings are built from the registry when their modules are imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import run_fresh

ROOT = Path(__file__).resolve().parent.parent
SDKS = ("docker", "e2b", "daytona", "aiohttp", "urllib3", "requests")


def _run(script: str, **env: str) -> Any:
    return run_fresh(script, **env)


def test_settings_and_models_load_without_any_provider_sdk() -> None:
    """With the provider SDKs not installed, the settings, the models and the runtime still load, and nothing
    imported along the way is an SDK (or its transport)."""
    found = _run(
        f"""
        import importlib.abc, json, sys

        BLOCKED = {SDKS!r}

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None

        sys.meta_path.insert(0, NotInstalled())
        import worker.config, worker.models, worker.runtime

        settings = worker.config.Settings()
        print(json.dumps({{
            "providers": [p.value for p in worker.models.ProviderName],
            "blocks": [type(settings.provider_config(p)).__name__ for p in worker.models.ProviderName],
            "sdks": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
        }}))
        """
    )

    assert found == {
        "providers": ["docker", "e2b", "daytona"],
        "blocks": ["DockerConfig", "E2BConfig", "DaytonaConfig"],
        "sdks": [],
    }


def test_a_registered_provider_gets_a_name_and_a_settings_block() -> None:
    """A driver module plus one registry entry is a new provider: it is a ProviderName (so requests, queues and
    fleet limits accept it) and its config model is a SANDBOX_WORKER_<NAME>__* block of the settings."""
    found = _run(
        """
        import json, sys, types

        import providers

        providers.REGISTRY["fake"] = "fake_driver:FakeProvider"

        from pydantic import Field
        from providers.base import Provider, ProviderConfig

        class FakeConfig(ProviderConfig):
            greeting: str = Field("hello", description="What the fake says.")

        class FakeProvider(Provider):
            name = "fake"
            config_model = FakeConfig

        sys.modules["fake_driver"] = types.SimpleNamespace(FakeProvider=FakeProvider)

        from worker.config import Settings, settings_reference
        from worker.fleet import FleetConfig
        from worker.models import ProviderName, SessionRequest

        settings = Settings()
        request = SessionRequest.model_validate({"tenant_id": "t", "agent": "mock", "provider": "fake"})
        fleet = FleetConfig.model_validate({"provider_concurrency": {"fake": 2}})
        print(json.dumps({
            "names": [p.value for p in ProviderName],
            "greeting": settings.provider_config("fake").greeting,
            "timeout": settings.provider_config("fake").request_timeout,
            "documented": "| `SANDBOX_WORKER_FAKE__GREETING` | `hello` | What the fake says. |" in settings_reference(),
            "request": request.provider.value,
            "fleet": {str(k): v for k, v in fleet.provider_concurrency.items()},
        }))
        """,
        SANDBOX_WORKER_FAKE__GREETING="bonjour",
        SANDBOX_WORKER_FAKE__REQUEST_TIMEOUT="7",
    )

    assert found == {
        "names": ["docker", "e2b", "daytona", "fake"],
        "greeting": "bonjour",
        "timeout": 7.0,
        "documented": True,
        "request": "fake",
        "fleet": {"fake": 2},
    }
