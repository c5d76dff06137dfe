"""Idempotency and crash recovery with real worker processes: duplicates, SIGKILL in every stage, a killed pool
process, and a graceful SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import pytest
from celery.result import AsyncResult

from tests.conftest import WorkerProcess, wait_for
from tests.fleet import FAST_LEASE, Fleet, fleet_fixture, pool_children  # noqa: F401 - the fixture
from worker import pins
from worker.fleet import STAGES, FleetConfig
from worker.models import SessionState
from worker.pipeline import Pipeline
from worker.retries import RetryLater

pytestmark = pytest.mark.integration

WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def slow_daemon_image() -> Iterator[str]:
    """The sandbox image with a daemon that takes 8 s to start serving, to hold a bring-up in the daemon stage."""
    client = docker.from_env()
    tag = "sandbox-worker/test-slow-daemon:1"
    wrapper = '#!/bin/sh\nif [ "$1" = "server" ]; then sleep 8; fi\nexec /usr/local/bin/sandbox-agent.real "$@"\n'
    dockerfile = (
        f"FROM {pins.SANDBOX_IMAGE}\n"
        "RUN mv /usr/local/bin/sandbox-agent /usr/local/bin/sandbox-agent.real\n"
        "COPY sandbox-agent /usr/local/bin/sandbox-agent\n"
    )
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("sandbox-agent", wrapper)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data.encode()), 0o755
            tar.addfile(info, io.BytesIO(data.encode()))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    yield tag
    client.images.remove(tag, force=True)
    client.close()


def test_ten_identical_submits_make_one_sandbox_and_ten_identical_results(
    fleet: Fleet, worker_factory: WorkerFactory, docker_client: docker.DockerClient
) -> None:
    """The same request sent ten times at once (ten task ids, one request_id) brings up one sandbox, and every
    one of the ten tasks returns the same result."""
    for _ in range(2):
        worker_factory(env=fleet.env, concurrency=3)
    request = fleet.request("dup", session={"prompt": "hello"})
    payload = request.model_dump(mode="json")

    def send(index: int) -> AsyncResult:
        task_id = f"{request.request_id}-copy{index}"
        return fleet.client.app.send_task("sessions.create", args=[payload], task_id=task_id, queue="sessions.docker")

    with ThreadPoolExecutor(10) as pool:
        tasks = list(pool.map(send, range(10)))
    results = [task.get(timeout=120) for task in tasks]

    assert results[0]["state"] == "ready", results[0]["error"]
    assert results[0]["reply"] == "mock: hello"
    assert all(result == results[0] for result in results)
    containers = fleet.containers(docker_client, request.request_id)
    assert [c.id for c in containers] == [results[0]["sandbox_id"]]
    record = fleet.store.get(request.request_id)
    assert record is not None and record.attempts == 1


def _hold_in(stage: str, slow_daemon_image: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Request overrides and worker settings that keep a bring-up in ``stage`` for a while: the stand-in agent's
    /sleep prompt for the session stage, a slow-starting daemon for the daemon stage, the fault-injection hook
    (a documented setting) for the stages with nothing slow in them."""
    if stage == "session":
        return {"session": {"prompt": "/sleep 6"}}, {}
    if stage == "daemon":
        return {"sandbox": {"image": slow_daemon_image, "ttl_seconds": 600}}, {}
    return {}, {"SANDBOX_WORKER_FLEET__FAULT_PAUSE": json.dumps({stage: 120})}


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_in_a_stage_then_a_new_worker_and_one_reap_finish_the_request(
    stage: str,
    fleet: Fleet,
    worker_factory: WorkerFactory,
    docker_client: docker.DockerClient,
    slow_daemon_image: str,
) -> None:
    """A worker SIGKILLed (whole process group) during the stage: the reaper requeues the request once its lease
    expires, a new worker adopts the sandbox when its daemon answers or replaces it, the request ends ready, and
    one more reap finds no orphan."""
    overrides, hold = _hold_in(stage, slow_daemon_image)
    request = fleet.request(f"kill-{stage}", **overrides)
    doomed = worker_factory(env={**fleet.env, **FAST_LEASE, **hold}, concurrency=1)
    fleet.client.submit(request)
    fleet.wait_stage(request.request_id, stage)
    if hold:
        wait_for(lambda: "fault injection" in doomed.log(), 30, 0.05, "the fault-injection pause")
    else:
        time.sleep(1)  # well inside the 6 s prompt or the 8 s daemon start
    before = {c.id for c in fleet.containers(docker_client, request.request_id)}
    doomed.kill()

    worker_factory(env={**fleet.env, **FAST_LEASE}, concurrency=1)
    # The dead worker's message is unacknowledged until the visibility timeout; the reaper sends it again.
    wait_for(lambda: fleet.store.lease_holder(request.request_id) is None, 15, 0.2, "the lease to expire")
    requeued = fleet.reaper(reap_grace_seconds=0).run()
    result = fleet.wait_ended([request.request_id], 90)[request.request_id]

    assert [(item.action, item.request_id, item.done) for item in requeued] == [("requeue", request.request_id, True)]
    assert result.state is SessionState.ready, result.error
    if stage in ("session", "ready"):
        assert result.sandbox_id in before  # its daemon answered: adopted, not replaced
    assert fleet.reaper(reap_grace_seconds=0).run() == []
    assert [c.id for c in fleet.containers(docker_client, request.request_id)] == [result.sandbox_id]


def test_a_killed_pool_process_is_redelivered_and_its_sandbox_adopted(
    fleet: Fleet, worker_factory: WorkerFactory, docker_client: docker.DockerClient
) -> None:
    """SIGKILL of the pool process alone: the worker hands the message back at once (reject_on_worker_lost), and
    the redelivery takes the lease over when it expires and adopts the running sandbox."""
    request = fleet.request("child", session={"prompt": "/sleep 5"})
    worker = worker_factory(env={**fleet.env, **FAST_LEASE}, concurrency=1)
    fleet.client.submit(request)
    fleet.wait_stage(request.request_id, "session")
    time.sleep(0.5)
    (child,) = pool_children(worker.process.pid)  # type: ignore[union-attr]
    (before,) = fleet.containers(docker_client, request.request_id)

    os.kill(child, signal.SIGKILL)
    result = fleet.wait_ended([request.request_id], 90)[request.request_id]

    assert result.state is SessionState.ready, result.error
    assert result.sandbox_id == before.id
    assert [c.id for c in fleet.containers(docker_client, request.request_id)] == [before.id]
    assert "WorkerLostError" in worker.log()
    record = fleet.store.get(request.request_id)
    assert record is not None and record.attempts == 2


def test_sigterm_lets_the_bring_up_in_flight_finish_and_leaves_the_queue_alone(
    fleet: Fleet, worker_factory: WorkerFactory, docker_client: docker.DockerClient
) -> None:
    """SIGTERM to the worker (as docker stop and Kubernetes send it): the bring-up in flight finishes ready, the
    request still queued is not started, and the next worker brings it up."""
    in_flight = fleet.request("term", session={"prompt": "/sleep 4"})
    queued = fleet.request("term")
    worker = worker_factory(env=fleet.env, concurrency=1)
    fleet.client.submit(in_flight)
    fleet.wait_stage(in_flight.request_id, "session")
    fleet.client.submit(queued)

    os.kill(worker.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
    worker.process.wait(timeout=60)  # type: ignore[union-attr]

    record = fleet.store.get(in_flight.request_id)
    assert record is not None and record.result.state is SessionState.ready, record and record.result.error
    assert [c.id for c in fleet.containers(docker_client, in_flight.request_id)] == [record.result.sandbox_id]
    assert fleet.store.get(queued.request_id) is None
    assert fleet.containers(docker_client, queued.request_id) == []

    worker_factory(env=fleet.env, concurrency=1)
    assert fleet.wait_ended([queued.request_id], 60)[queued.request_id].state is SessionState.ready


def test_a_worker_that_lost_its_lease_stops_and_leaves_the_request_to_the_new_holder(
    fleet: Fleet, docker_client: docker.DockerClient
) -> None:
    """When another worker holds the lease (ours ran out), the bring-up stops at its next stage without removing
    the sandbox or touching the record, and asks to be retried later."""
    pause = FleetConfig(fault_pause={"sandbox": 4})
    settings = fleet.settings.model_copy(update={"lease_seconds": 5, "fleet": pause})
    pipeline = fleet.pipeline()
    pipeline = Pipeline(settings, fleet.store, pipeline.providers, pipeline.credentials)
    request = fleet.request("stolen")
    with ThreadPoolExecutor(1) as pool:
        bring_up = pool.submit(pipeline.create, request.model_dump(mode="json"))
        wait_for(lambda: fleet.containers(docker_client, request.request_id), 30, 0.05, "the sandbox")
        fleet.redis.set(f"sw:lease:{request.request_id}", "another-worker", px=60_000)

        with pytest.raises(RetryLater) as caught:
            bring_up.result(timeout=30)

    assert caught.value.error.code == "busy"
    assert len(fleet.containers(docker_client, request.request_id)) == 1
    assert fleet.store.lease_holder(request.request_id) == "another-worker"
    record = fleet.store.get(request.request_id)
    assert record is not None and record.result.state is SessionState.starting
