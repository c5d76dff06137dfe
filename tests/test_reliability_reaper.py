"""The reaper against a real Redis and Docker engine: what it removes, what it never touches, ttl and requeues."""

from __future__ import annotations

import time
from typing import Any

import docker
import pytest

from providers.base import (
    LABEL_CREATED_AT,
    LABEL_EXPIRES_AT,
    LABEL_OWNER,
    LABEL_REQUEST_ID,
    Sandbox,
    SandboxSpec,
)
from tests.fleet import Fleet, fleet_fixture  # noqa: F401 - the fixture
from worker import runtime
from worker.config import get_settings
from worker.lease import Lease
from worker.models import ProviderName, SessionRequest, SessionState
from worker.store import SessionRecord

pytestmark = pytest.mark.integration


def _sandbox(fleet: Fleet, request_id: str | None, *, age: float = 0, owner: str | None = None) -> Sandbox:
    now, ttl = time.time() - age, 600
    labels = {LABEL_OWNER: owner or fleet.owner, LABEL_CREATED_AT: str(int(now)), LABEL_EXPIRES_AT: str(int(now + ttl))}
    if request_id is not None:
        labels[LABEL_REQUEST_ID] = request_id
    return runtime.provider(ProviderName.docker).start(SandboxSpec(image=None, labels=labels))


def _record(fleet: Fleet, state: SessionState, **result: Any) -> SessionRecord:
    record = fleet.store.create(fleet.request("reap"))
    record.result.state = state
    record.result = record.result.model_copy(update=result)
    fleet.store.put(record)
    return record


def _exists(client: docker.DockerClient, sandbox: Sandbox) -> bool:
    return bool(client.api.containers(all=True, quiet=True, filters={"id": sandbox.sandbox_id}))


def test_reaper_removes_only_what_it_can_prove_is_orphaned(fleet: Fleet, docker_client: docker.DockerClient) -> None:
    """Sandboxes of failed or missing requests and strays of ready ones go; unlabelled, foreign, leased, recent
    and in-flight ones stay; a dry run touches nothing."""
    failed = _record(fleet, SessionState.failed)
    leased = _record(fleet, SessionState.failed)
    assert Lease(fleet.store, leased.request.request_id, "a-live-worker", 60).acquire()
    in_flight = _record(fleet, SessionState.starting)
    ready = _record(fleet, SessionState.ready)
    orphans = {
        "failed": _sandbox(fleet, failed.request.request_id),
        "no record": _sandbox(fleet, "gone-long-ago", age=3600),
        "stray": _sandbox(fleet, ready.request.request_id),
    }
    survivors = {
        "recent, no record": _sandbox(fleet, "just-created"),
        "leased": _sandbox(fleet, leased.request.request_id),
        "in flight": _sandbox(fleet, in_flight.request.request_id),
        "no request label": _sandbox(fleet, None),
        "another owner": _sandbox(fleet, "someone-elses", age=3600, owner=f"{fleet.owner}-other"),
    }
    ready.result.sandbox_id = _sandbox(fleet, ready.request.request_id).sandbox_id
    fleet.store.put(ready)
    try:
        plan = fleet.reaper(reap_grace_seconds=300).run(dry_run=True)
        assert sorted((item.reason, item.sandbox_id) for item in plan) == sorted(
            [
                ("request failed", orphans["failed"].sandbox_id),
                ("no record", orphans["no record"].sandbox_id),
                ("not the ready session's sandbox", orphans["stray"].sandbox_id),
            ]
        )
        assert all(_exists(docker_client, sandbox) for sandbox in orphans.values())

        done = fleet.reaper(reap_grace_seconds=300).run()

        assert all(item.done and item.action == "remove" for item in done)
        assert not any(_exists(docker_client, sandbox) for sandbox in orphans.values())
        assert all(_exists(docker_client, sandbox) for sandbox in survivors.values())
        assert [c.id for c in fleet.containers(docker_client, ready.request.request_id)] == [ready.result.sandbox_id]
    finally:
        runtime.provider(ProviderName.docker).stop(survivors["another owner"].sandbox_id)


def test_reaper_terminates_sessions_past_their_ttl(fleet: Fleet, docker_client: docker.DockerClient) -> None:
    """A ready session past its ttl is terminated through the pipeline (sandbox removed, record terminated), and so
    is a record past its ttl whose sandbox the provider already removed."""
    request = fleet.request("ttl", sandbox={"ttl_seconds": 4})  # long enough to come up (Docker ends it then)
    live = fleet.pipeline().create(request.model_dump(mode="json"))
    assert live.state is SessionState.ready, live.error
    vanished = _record(fleet, SessionState.ready)
    vanished.expires_at = time.time() - 1
    fleet.store.put(vanished)
    record = fleet.store.get(request.request_id)
    assert record is not None
    time.sleep(max(0.0, record.deadline - time.time()) + 0.5)

    done = fleet.reaper().run()

    terminated = {item.request_id for item in done if item.action == "terminate" and item.done}
    assert terminated == {request.request_id, vanished.request.request_id}
    for request_id in terminated:
        record = fleet.store.get(request_id)
        assert record is not None and record.result.state is SessionState.terminated
    assert fleet.containers(docker_client, request.request_id) == []
    assert fleet.reaper().run() == []


def test_reaper_requeues_an_abandoned_request_once_per_grace_period(fleet: Fleet) -> None:
    """An unfinished request with no live lease and an idle record is sent again, but not on every pass."""
    abandoned = _record(fleet, SessionState.starting, stage="daemon")
    working = _record(fleet, SessionState.starting, stage="daemon")
    assert Lease(fleet.store, working.request.request_id, "a-live-worker", 60).acquire()
    requeued: list[SessionRequest] = []
    time.sleep(1.1)
    reaper = fleet.reaper(reap_grace_seconds=1)
    reaper.requeue = requeued.append

    first = reaper.run()
    second = reaper.run()

    assert [(item.action, item.request_id, item.done) for item in first] == [
        ("requeue", abandoned.request.request_id, True)
    ]
    assert [request.request_id for request in requeued] == [abandoned.request.request_id]
    assert [item.done for item in second] == [False]


def test_reaper_refuses_without_a_fleet_identity(
    fleet: Fleet, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default owner label the reaper acts only while Redis holds the fleet marker, and then never on a
    sandbox older than the marker; after a data loss (FLUSHALL) it refuses the whole pass, and `reap` exits 1
    saying why."""
    from typer.testing import CliRunner

    from worker import cli
    from worker.config import DEFAULT_OWNER
    from worker.store import FLEET_MARKER

    def default_owner_reaper() -> Any:
        reaper = fleet.reaper()
        reaper.settings = reaper.settings.model_copy(update={"owner": DEFAULT_OWNER})
        return reaper

    assert fleet.redis.get(FLEET_MARKER) is None
    assert default_owner_reaper().refusal() is not None and default_owner_reaper().run() == []
    assert fleet.reaper().refusal() is None  # a fleet's own label is identity enough

    # An orphan of the default owner from before the marker: "no record" may mean its records were lost.
    old = _sandbox(fleet, "lost-long-ago", age=3600, owner=DEFAULT_OWNER)
    try:
        _record(fleet, SessionState.failed)  # the first record writes the marker
        assert fleet.redis.get(FLEET_MARKER) is not None
        reaper = default_owner_reaper()
        assert reaper.refusal() is None
        assert old.sandbox_id not in {item.sandbox_id for item in reaper.run(dry_run=True)}  # dry: others' stay

        fleet.redis.flushall()  # Redis loses its data: the marker with it
        assert default_owner_reaper().refusal() is not None and default_owner_reaper().run() == []
        assert _exists(docker_client, old)

        monkeypatch.setenv("SANDBOX_WORKER_OWNER", DEFAULT_OWNER)
        get_settings.cache_clear()
        runtime.close()
        runtime.store.cache_clear()
        outcome = CliRunner().invoke(cli.app, ["reap"])
        assert outcome.exit_code == 1 and "refusing to reap" in outcome.output
    finally:
        docker_client.containers.get(old.sandbox_id).remove(force=True)
