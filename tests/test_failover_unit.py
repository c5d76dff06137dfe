"""Failover and the shared circuit breaker on two fake providers and an in-memory Redis."""

from __future__ import annotations

from typing import Any

import pytest

from providers.base import Provider
from providers.fake import FakeProvider, StandInDaemons
from worker.breaker import Breaker
from worker.config import Settings, get_settings
from worker.credentials.broker import CredentialBroker
from worker.credentials.none import NoCredentials
from worker.errors import ProviderError, ProviderUnavailable
from worker.models import ProviderName, SessionState
from worker.pipeline import Pipeline
from worker.retries import RetryLater
from worker.store import Store

pytest_plugins = ["tests.standins.fake_fixtures"]

DOCKER, E2B = ProviderName("docker"), ProviderName("e2b")


@pytest.fixture
def fakes(daemons: StandInDaemons) -> dict[ProviderName, FakeProvider]:
    return {E2B: FakeProvider(daemons=daemons), DOCKER: FakeProvider(daemons=daemons)}


def _settings(**fleet: Any) -> Settings:
    settings = get_settings()
    update = {"stage_attempts": 1, "breaker_failures": 2, **fleet}
    return settings.model_copy(update={"fleet": settings.fleet.model_copy(update=update), "lease_seconds": 5})


def _pipeline(store: Store, fakes: dict[ProviderName, FakeProvider], **fleet: Any) -> Pipeline:
    def providers(name: ProviderName) -> Provider:
        return fakes[name]

    return Pipeline(_settings(**fleet), store, providers, CredentialBroker([NoCredentials()]))


def _request(request_id: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "tenant_id": "acme", "agent": "mock", "provider": "e2b", **extra}


def test_a_provider_outage_fails_over_to_the_next_provider(
    store: Store, fakes: dict[ProviderName, FakeProvider]
) -> None:
    """A 503 on the first choice's create moves the request to its fallback, which serves it; the result says
    which provider served and why the first was passed over, and the first's quota slot is freed."""
    fakes[E2B].fail("start", ProviderUnavailable("503 from e2b", provider="e2b"))
    pipeline = _pipeline(store, fakes, provider_sandboxes={E2B: 1, DOCKER: 1})

    result = pipeline.create(_request("fo-1", fallback_providers=["docker"]))

    assert result.state is SessionState.ready, result.error
    assert result.provider == DOCKER and result.reply is None
    assert [(s.provider, s.reason.split(":")[0]) for s in result.skipped] == [(E2B, "provider_unavailable")]
    assert fakes[E2B].sandboxes == {} and len(fakes[DOCKER].sandboxes) == 1
    assert store.redis.zcard("sw:sem:{sandboxes:e2b}:holders") == 0
    assert store.redis.zcard("sw:sem:{sandboxes:docker}:holders") == 1
    # Terminate finds the session on the provider that served it.
    assert pipeline.teardown.terminate("fo-1").state is SessionState.terminated
    assert fakes[DOCKER].sandboxes == {}


def test_the_operators_failover_list_applies_when_the_request_names_none(
    store: Store, fakes: dict[ProviderName, FakeProvider]
) -> None:
    """fleet.failover gives the fallbacks of a provider; a request's empty list turns failover off."""
    fakes[E2B].fail("start", *[ProviderUnavailable("503", provider="e2b")] * 2)
    pipeline = _pipeline(store, fakes, failover={E2B: [DOCKER]}, breaker_failures=10)

    assert pipeline.create(_request("fo-ops")).provider == DOCKER
    with pytest.raises(RetryLater):
        pipeline.create(_request("fo-none", fallback_providers=[]))
    assert fakes[DOCKER].calls.count("start") == 1


def test_a_bad_request_does_not_fail_over(store: Store, fakes: dict[ProviderName, FakeProvider]) -> None:
    """A create refused as the request's fault (a 4xx naming a field) fails the request on its first choice."""
    fakes[E2B].fail("start", ProviderError("no such template", provider="e2b", status=400, field="sandbox.image"))

    result = _pipeline(store, fakes).create(_request("fo-bad", fallback_providers=["docker"]))

    assert result.state is SessionState.failed and result.error is not None
    assert result.error.code == "provider_error" and result.provider == E2B
    assert fakes[DOCKER].calls.count("start") == 0


def test_the_breaker_opens_skips_the_provider_then_probes_and_closes(
    store: Store, fakes: dict[ProviderName, FakeProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two failures open e2b's breaker: the next request skips e2b without calling it; after the cool-down one
    probe goes through, and its success closes the breaker."""
    fakes[E2B].fail("start", *[ProviderUnavailable("503", provider="e2b")] * 2)
    pipeline = _pipeline(store, fakes, breaker_cooldown_seconds=60)
    for n in range(2):
        assert pipeline.create(_request(f"trip-{n}", fallback_providers=["docker"])).provider == DOCKER
    assert pipeline.breaker.state(E2B) == "open" and fakes[E2B].calls.count("start") == 2

    skipped = pipeline.create(_request("skip", fallback_providers=["docker"]))
    assert skipped.provider == DOCKER and fakes[E2B].calls.count("start") == 2  # not called
    assert [(s.provider, s.reason) for s in skipped.skipped] == [(E2B, "circuit breaker open")]

    store.redis.delete("sw:breaker:{e2b}:open")  # the cool-down ran out
    assert pipeline.breaker.state(E2B) == "half_open"
    other = Breaker(store.redis, pipeline.settings.fleet)  # another worker, while the probe is in flight
    assert other.admit(E2B, "probe").probe and not other.admit(E2B, "someone-else")
    store.redis.delete("sw:breaker:{e2b}:probe")
    probe = pipeline.create(_request("probe"))
    assert probe.state is SessionState.ready and probe.provider == E2B and probe.skipped == []
    assert pipeline.breaker.state(E2B) == "closed"


def test_a_failed_probe_opens_the_breaker_again(store: Store) -> None:
    """Half-open, one failure is enough to open the breaker for another cool-down; a success resets the count."""
    breaker = Breaker(store.redis, _settings(breaker_failures=3).fleet)
    assert not breaker.failure(E2B) and not breaker.failure(E2B)
    breaker.success(E2B, breaker.admit(E2B, "after-two"))
    assert not breaker.failure(E2B) and breaker.state(E2B) == "closed"
    assert not breaker.failure(E2B) and breaker.failure(E2B) and breaker.state(E2B) == "open"
    store.redis.delete("sw:breaker:{e2b}:open")
    assert breaker.admit(E2B, "probe").probe
    assert breaker.failure(E2B) and breaker.state(E2B) == "open"


def test_a_success_admitted_before_a_streak_began_leaves_it(store: Store) -> None:
    """A create admitted with no failures counted writes nothing when it succeeds (the common case costs no round
    trip); failures counted after its admission stand, as if it had succeeded before them."""
    breaker = Breaker(store.redis, _settings(breaker_failures=3).fleet)
    admitted = breaker.admit(E2B, "early")
    assert admitted and not admitted.streak
    assert not breaker.failure(E2B)
    breaker.success(E2B, admitted)
    assert not breaker.failure(E2B) and breaker.failure(E2B) and breaker.state(E2B) == "open"


def test_every_provider_skipped_is_transient(store: Store, fakes: dict[ProviderName, FakeProvider]) -> None:
    """With every candidate's breaker open the request is retried later, not failed."""
    pipeline = _pipeline(store, fakes, breaker_failures=1)
    pipeline.breaker.failure(E2B)
    pipeline.breaker.failure(DOCKER)

    with pytest.raises(RetryLater) as raised:
        pipeline.create(_request("all-open", fallback_providers=["docker"]))
    assert raised.value.error.code == "provider_unavailable"
    assert "start" not in fakes[E2B].calls + fakes[DOCKER].calls
