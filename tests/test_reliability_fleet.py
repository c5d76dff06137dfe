"""The fleet under load and under a broker restart: a shared cap across worker processes, and no request lost
when Redis restarts mid-run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest
import redis as redis_lib

from tests.conftest import RedisServer, WorkerProcess, wait_for
from tests.fleet import Fleet, fleet_fixture  # noqa: F401 - the fixture
from worker.limits import Semaphore
from worker.models import SessionRequest, SessionState

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., WorkerProcess]


def test_a_provider_cap_holds_across_three_workers(
    fleet: Fleet, worker_factory: WorkerFactory, docker_client: docker.DockerClient
) -> None:
    """Three worker processes (twelve pool processes), sixty requests, a docker cap of five: all end ready, and
    the semaphore's own record shows five bring-ups at once at the most, and that the cap was reached."""
    env = {**fleet.env, "SANDBOX_WORKER_FLEET__PROVIDER_CONCURRENCY": json.dumps({"docker": 5})}
    for _ in range(3):
        worker_factory(env=env, concurrency=4)
    requests = [fleet.request(f"cap{index:02d}", sandbox={"ttl_seconds": 300}) for index in range(60)]
    started = time.monotonic()
    for request in requests:
        fleet.client.submit(request)

    results = fleet.wait_ended([r.request_id for r in requests], 300)

    assert {result.state for result in results.values()} == {SessionState.ready}, [
        result.error for result in results.values() if result.error
    ]
    semaphore = Semaphore(fleet.redis, "provider:docker", 5)
    assert semaphore.peak() == 5
    assert semaphore.holders() == []
    assert len(fleet.containers(docker_client)) == 60
    print(f"60 bring-ups under a cap of 5 in {time.monotonic() - started:.1f}s")


def test_redis_restart_mid_run_loses_no_request(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    worker_factory: WorkerFactory,
    docker_client: docker.DockerClient,
) -> None:
    """An append-only Redis restarted while bring-ups are queued and in flight: every request still ends ready,
    and requests sent after the restart are served too."""
    server = RedisServer(tmp_path / "aof-redis", appendonly=True)
    server.start()
    fleet = Fleet(server, monkeypatch)
    try:
        worker_factory(env=fleet.env, concurrency=3)
        before = [fleet.request("aof", session={"prompt": "/sleep 2"}) for _ in range(9)]
        for request in before:
            fleet.client.submit(request)
        wait_for(
            lambda: sum(fleet.record(r.request_id) is not None for r in before) >= 3, 60, 0.1, "bring-ups in flight"
        )

        server.restart()
        after = fleet.request("aof-after")
        wait_for(lambda: _submitted(fleet, after), 60, 0.5, "the broker to accept a request again")
        results = fleet.wait_ended([r.request_id for r in [*before, after]], 180)

        assert {result.state for result in results.values()} == {SessionState.ready}, [
            result.error for result in results.values() if result.error
        ]
        assert len(fleet.containers(docker_client)) == 10
    finally:
        fleet.close(docker_client)
        server.stop()


def _submitted(fleet: Fleet, request: SessionRequest) -> bool:
    try:
        fleet.client.submit(request)
    except (redis_lib.ConnectionError, OSError):
        return False
    return True
