"""Shared limits against a real Redis: the semaphore's cap, its line, its leases, and the pipeline's use of them."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest
import redis as redis_lib

from tests.conftest import wait_for
from tests.fleet import Fleet, fleet_fixture  # noqa: F401 - the fixture
from worker.errors import CapacityTimeout
from worker.fleet import FleetConfig
from worker.limits import WAITER_TTL_MS, Limits, Semaphore
from worker.models import SessionRequest, SessionState
from worker.pipeline import Pipeline

pytestmark = pytest.mark.integration


def _semaphore(client: redis_lib.Redis, limit: int) -> Semaphore:
    return Semaphore(client, f"test:{uuid.uuid4().hex[:8]}", limit)


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def test_cap_holds_under_contention(redis_client: redis_lib.Redis) -> None:
    """Twelve threads competing for three slots never hold more than three at once, and all get through."""
    semaphore = _semaphore(redis_client, 3)
    lock, inside, most, done = threading.Lock(), [0], [0], []

    def work(name: str) -> None:
        for round_ in range(3):
            semaphore.acquire(f"{name}-{round_}", lease_seconds=10, deadline=_deadline(30))
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.03)
            with lock:
                inside[0] -= 1
            semaphore.release(f"{name}-{round_}")
        done.append(name)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(done) == 12
    assert most[0] == 3
    assert semaphore.peak() == 3
    assert semaphore.holders() == []


def test_waiters_are_served_in_arrival_order(redis_client: redis_lib.Redis) -> None:
    """When the one slot frees, the waiters get it in the order they arrived, not in the order they poll."""
    semaphore = _semaphore(redis_client, 1)
    assert semaphore.try_acquire("first", 10)
    order: list[str] = []

    def wait(name: str) -> None:
        semaphore.acquire(name, lease_seconds=10, deadline=_deadline(30))
        order.append(name)
        time.sleep(0.05)
        semaphore.release(name)

    threads = []
    for index, name in enumerate(("b", "c", "d")):
        threads.append(threading.Thread(target=wait, args=(name,)))
        threads[-1].start()
        while semaphore.waiting() < index + 1:  # each takes its ticket before the next arrives
            time.sleep(0.01)
    semaphore.release("first")
    for thread in threads:
        thread.join(30)

    assert order == ["b", "c", "d"]


def test_a_dead_holder_frees_its_slot_when_its_lease_ends(redis_client: redis_lib.Redis) -> None:
    """A holder that stops renewing (its worker died) loses the slot at the end of its lease."""
    semaphore = _semaphore(redis_client, 1)
    assert semaphore.try_acquire("dead", lease_seconds=0.5)

    waited = semaphore.acquire("next", lease_seconds=10, deadline=_deadline(5))

    assert 0.2 <= waited < 3
    assert semaphore.holders() == ["next"]


def test_a_dead_waiter_loses_its_place_in_line(redis_client: redis_lib.Redis) -> None:
    """A waiter that stopped polling no longer blocks the ones behind it once its place expires."""
    semaphore = _semaphore(redis_client, 1)
    assert semaphore.try_acquire("holder", 10)
    assert not semaphore.try_acquire("dead-waiter", 10)  # takes a ticket, then never polls again
    semaphore.release("holder")

    waited = semaphore.acquire("live-waiter", lease_seconds=10, deadline=_deadline(WAITER_TTL_MS / 1000 + 5))

    assert waited >= WAITER_TTL_MS / 1000 - 1
    assert semaphore.holders() == ["live-waiter"]
    assert semaphore.waiting() == 0


def test_waiting_past_the_deadline_fails_and_leaves_the_line(redis_client: redis_lib.Redis) -> None:
    """A waiter whose deadline passes gets capacity_timeout and gives up its place."""
    semaphore = _semaphore(redis_client, 1)
    assert semaphore.try_acquire("holder", 10)

    with pytest.raises(CapacityTimeout) as caught:
        semaphore.acquire("late", lease_seconds=10, deadline=_deadline(0.5))

    assert caught.value.code == "capacity_timeout"
    assert "cap 1" in caught.value.message
    assert semaphore.waiting() == 0


def test_renew_extends_a_live_lease_and_reports_a_lost_one(redis_client: redis_lib.Redis) -> None:
    """Renewing keeps a slot past its first lease; a lease that already ran out cannot be renewed."""
    semaphore = _semaphore(redis_client, 2)
    assert semaphore.try_acquire("kept", 0.5)
    assert semaphore.try_acquire("lost", 0.3)
    assert semaphore.renew("kept", 5)
    time.sleep(0.7)

    assert not semaphore.renew("lost", 5)
    assert semaphore.holders() == ["kept"]


def _request(tenant: str) -> SessionRequest:
    return SessionRequest(request_id=f"lim-{uuid.uuid4().hex[:8]}", tenant_id=tenant, agent="mock", provider="docker")


def test_a_tenant_at_its_cap_does_not_hold_up_other_tenants(fleet: Fleet) -> None:
    """A request over its tenant's cap waits before the provider's line, so another tenant's request goes first."""
    tenant = f"t{uuid.uuid4().hex[:6]}"
    config = FleetConfig(
        tenant_concurrency=1, provider_concurrency={"docker": 2}, tenant_concurrency_overrides={"vip": 5}
    )
    limits = Limits(fleet.redis, config, lease_seconds=10)
    provider = Semaphore(fleet.redis, "provider:docker", 2)
    first, second, other = _request(tenant), _request(tenant), _request("vip")

    with limits.bring_up(first, _deadline(5)):
        with pytest.raises(CapacityTimeout, match=f"tenant:{tenant}"), limits.bring_up(second, _deadline(0.5)):
            pass  # pragma: no cover
        assert provider.waiting() == 0
        with limits.bring_up(other, _deadline(1)):
            assert sorted(provider.holders()) == sorted([first.request_id, other.request_id])
    assert provider.holders() == []


def test_a_provider_quota_holds_a_slot_until_the_sandbox_is_released(fleet: Fleet) -> None:
    """A live-sandbox slot outlasts the bring-up and is freed only by release_sandbox."""
    limits = Limits(fleet.redis, FleetConfig(provider_sandboxes={"e2b": 1}), lease_seconds=10)
    quota = Semaphore(fleet.redis, "sandboxes:e2b", 1)
    first = SessionRequest(request_id=f"q-{uuid.uuid4().hex[:6]}", tenant_id="a", agent="mock", provider="e2b")
    second = first.model_copy(update={"request_id": f"q-{uuid.uuid4().hex[:6]}"})

    limits.reserve_sandbox(first, until=time.time() + 600, deadline=_deadline(1))
    with pytest.raises(CapacityTimeout):
        limits.reserve_sandbox(second, until=time.time() + 600, deadline=_deadline(0.5))
    limits.release_sandbox(first.provider, first.request_id)
    limits.reserve_sandbox(second, until=time.time() + 600, deadline=_deadline(1))

    assert quota.holders() == [second.request_id]


def test_a_request_waiting_for_a_slot_stops_when_terminated(fleet: Fleet, docker_client: docker.DockerClient) -> None:
    """A bring-up waiting in line for a provider slot gives up its place when the session is terminated, and
    starts no sandbox."""
    settings = fleet.settings.model_copy(update={"fleet": FleetConfig(provider_concurrency={"docker": 1})})
    pipeline = fleet.pipeline()
    pipeline = Pipeline(settings, fleet.store, pipeline.providers, pipeline.credentials)
    blocker = Semaphore(fleet.redis, "provider:docker", 1)
    assert blocker.try_acquire("someone-else", 60)
    request = fleet.request("waiting")
    with ThreadPoolExecutor(1) as pool:
        bring_up = pool.submit(pipeline.create, request.model_dump(mode="json"))
        wait_for(lambda: blocker.waiting() == 1, 10, what="the request to wait in line")

        ended = pipeline.teardown.terminate(request.request_id)
        result = bring_up.result(timeout=10)

    assert ended.state is result.state is SessionState.terminated
    assert blocker.waiting() == 0
    assert fleet.containers(docker_client, request.request_id) == []
