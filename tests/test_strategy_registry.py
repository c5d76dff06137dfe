"""Unit tests of the credential strategy registry: one entry in worker.credentials.REGISTRY is all the worker
needs to know a strategy. Each test runs in a fresh interpreter, since Strategy and the settings are built from
the registry when their modules are imported; none needs Redis (a Store connects only when it is used)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import run_fresh

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "redis://127.0.0.1:9/0"  # nothing listens there: building the broker must not touch Redis


def _run(script: str, **env: str) -> Any:
    return run_fresh(script, SANDBOX_WORKER_REDIS_URL=NOWHERE, **env)


def test_the_registry_gives_the_strategies_their_names_blocks_and_factories() -> None:
    """Strategy follows the registry's order, the strategies with settings get their CREDENTIALS__<NAME> block,
    and unconfigured settings offer only none and byok."""
    found = _run(
        """
        import json

        from worker.config import Settings
        from worker.credentials import settings_models
        from worker.credentials.broker import build_broker
        from worker.models import Strategy
        from worker.store import Store

        settings = Settings()
        print(json.dumps({
            "names": [s.value for s in Strategy],
            "blocks": {name: model.__name__ for name, model in settings_models().items()},
            "offered": sorted(build_broker(settings, Store.from_settings(settings)).strategies),
        }))
        """
    )

    assert found == {
        "names": ["none", "gateway", "byok", "shared", "subscription", "vault"],
        "blocks": {"gateway": "GatewaySettings", "shared": "SharedSettings", "subscription": "SubscriptionSettings"},
        "offered": ["byok", "none"],
    }


def test_a_registered_strategy_gets_a_name_a_settings_block_and_a_place_in_the_broker() -> None:
    """A strategy module plus one registry entry is a new strategy: it is a Strategy (so requests and tenant
    defaults accept it), its settings model is a SANDBOX_WORKER_CREDENTIALS__<NAME>__* block, and the broker
    offers it once those settings configure it."""
    script = """
        import json, sys, types

        import worker.credentials

        worker.credentials.REGISTRY["fake"] = "fake_strategy:FakeStrategy"

        from pydantic import Field
        from worker.credentials.base import NO_CREDENTIALS, RegisteredStrategy
        from worker.credentials.settings import SettingsBlock
        from worker.models import SessionRequest, Strategy

        class FakeSettings(SettingsBlock):
            greeting: str | None = Field(None, description="What the fake says; the strategy is offered when set.")

        class FakeStrategy(RegisteredStrategy):
            name = Strategy("fake")
            settings_model = FakeSettings

            @classmethod
            def from_settings(cls, settings, store):
                fake = settings.credentials.strategy_settings(cls.name, FakeSettings)
                return cls() if fake.greeting else None

            def grant(self, request):
                return NO_CREDENTIALS

            def release(self, request):
                return None

        sys.modules["fake_strategy"] = types.SimpleNamespace(FakeStrategy=FakeStrategy)

        from worker.config import Settings, settings_reference
        from worker.credentials.broker import build_broker
        from worker.store import Store

        settings = Settings()
        request = SessionRequest.model_validate(
            {"tenant_id": "t", "agent": "mock", "provider": "docker", "credentials": {"strategy": "fake"}}
        )
        row = "| `SANDBOX_WORKER_CREDENTIALS__FAKE__GREETING` | `None` | What the fake says; the strategy is offered when set. |"
        print(json.dumps({
            "names": [s.value for s in Strategy],
            "greeting": settings.credentials.strategy_settings("fake", FakeSettings).greeting,
            "documented": row in settings_reference(),
            "request": request.credentials.strategy.value,
            "offered": sorted(build_broker(settings, Store.from_settings(settings)).strategies),
        }))
        """

    configured = _run(script, SANDBOX_WORKER_CREDENTIALS__FAKE__GREETING="bonjour")
    unconfigured = _run(script)

    assert configured == {
        "names": ["none", "gateway", "byok", "shared", "subscription", "vault", "fake"],
        "greeting": "bonjour",
        "documented": True,
        "request": "fake",
        "offered": ["byok", "fake", "none"],
    }
    assert unconfigured == {**configured, "greeting": None, "offered": ["byok", "none"]}
