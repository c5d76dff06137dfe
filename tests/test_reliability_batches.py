"""Scheduled batches: batch files, runs that keep to their concurrency and deadline, and a schedule fired exactly
once per tick by two beat processes."""

from __future__ import annotations

import itertools
import re
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from tests.conftest import WorkerProcess
from tests.fleet import BeatProcess, Fleet, fleet_fixture  # noqa: F401 - the fixture
from worker.batches import Batches, BatchSpec, RunState, load_batch, manual_run_id
from worker.errors import InvalidRequest
from worker.models import SessionRequest, SessionState

pytestmark = pytest.mark.integration

TEMPLATE = {"tenant_id": "acme", "agent": "mock", "provider": "docker"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: b\nschedule: every day\nsessions: [{}]\ndefaults: {tenant_id: a, agent: mock, provider: docker}",
         "schedule: Value error, not a cron expression"),
        ("name: b\nsessions:\n  - {tenant_id: a, agent: mock, provider: docker}\n  - {tenant_id: a, agent: gpt, provider: docker}",
         "sessions[1]: agent: Input should be"),
        ("name: b\nsessions: [{tenant_id: a, agent: mock, provider: docker, count: 0}]", "sessions[0].count"),
        ("name: b\nconcurrency: 0\nsessions: [{tenant_id: a, agent: mock, provider: docker}]", "concurrency:"),
        ("name: b c\nsessions: [{tenant_id: a, agent: mock, provider: docker}]", "name: String should match"),
        ("name: b\nsessions: [{tenant_id: a, agent: mock, provider: docker}]\nretries: 3", "retries: Extra inputs"),
        ("name: [unclosed", "while parsing"),
    ],
)  # fmt: skip
def test_a_broken_batch_file_is_refused_with_its_problem_named(tmp_path: Path, text: str, problem: str) -> None:
    """A batch file with a bad schedule, template, count, concurrency, name, key or YAML fails with the file and
    the place of the problem in the message."""
    path = tmp_path / "broken.yaml"
    path.write_text(text)

    with pytest.raises(InvalidRequest) as caught:
        load_batch(path)

    assert caught.value.message.startswith(f"{path}: ")
    assert problem in caught.value.message


def test_templates_expand_over_the_defaults_into_numbered_requests() -> None:
    """Each template is merged over the defaults (nested keys too) and repeated ``count`` times, in order."""
    spec = BatchSpec(
        name="expand",
        defaults={**TEMPLATE, "sandbox": {"ttl_seconds": 60, "env": {"A": "1"}}},
        sessions=[{"session": {"prompt": "one"}}, {"sandbox": {"env": {"B": "2"}}, "count": 2}],
    )

    requests = spec.requests("run-1")

    assert [r.request_id for r in requests] == ["run-1-0000", "run-1-0001", "run-1-0002"]
    assert requests[0].session.prompt == "one"
    assert requests[1].sandbox.env == {"A": "1", "B": "2"}
    assert requests[2].sandbox.ttl_seconds == 60


class _Queue:
    """Stands in for the task queue: remembers what was submitted and terminated."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.terminated: list[str] = []

    def submit(self, request: SessionRequest, run_id: str) -> None:
        self.submitted.append(request.request_id)

    def terminate(self, request: SessionRequest) -> None:
        self.terminated.append(request.request_id)


def _finish(fleet: Fleet, request_id: str, state: SessionState) -> None:
    record = fleet.store.get(request_id)
    assert record is not None
    record.result.state = state
    fleet.store.put(record)


def test_a_run_keeps_to_its_concurrency_and_records_counts_and_durations(fleet: Fleet) -> None:
    """A run never has more requests in flight than its concurrency, submits the next as others end, and ends
    with counts by state and durations."""
    queue = _Queue()
    batches = Batches(fleet.store, queue.submit, queue.terminate)
    spec = BatchSpec(name="conc", concurrency=2, defaults=TEMPLATE, sessions=[{"count": 5}])

    run = batches.start(spec, "conc.yaml", manual_run_id(spec.name, time.time()))
    assert run is not None
    assert (len(queue.submitted), run.counts) == (2, {"queued": 2, "pending": 3})
    _finish(fleet, queue.submitted[0], SessionState.ready)
    run = batches.advance(run.run_id)
    assert (len(queue.submitted), run.counts) == (3, {"ready": 1, "queued": 2, "pending": 2})
    for request_id in queue.submitted[1:]:
        _finish(fleet, request_id, SessionState.ready)
    batches.advance(run.run_id)
    for request_id in queue.submitted[3:]:
        _finish(fleet, request_id, SessionState.failed)
    run = batches.advance(run.run_id)

    assert run.state is RunState.finished
    assert run.counts == {"ready": 3, "failed": 2, "pending": 0}
    assert set(run.durations_ms) == {"run", "p50", "max"}
    assert batches.active() == []
    assert queue.terminated == []


def test_a_run_past_its_deadline_terminates_what_is_unfinished(fleet: Fleet) -> None:
    """At the deadline, requests in flight are terminated and the ones never submitted stay pending."""
    queue = _Queue()
    batches = Batches(fleet.store, queue.submit, queue.terminate)
    spec = BatchSpec(name="late", concurrency=2, deadline_seconds=1, defaults=TEMPLATE, sessions=[{"count": 3}])
    run = batches.start(spec, "late.yaml", manual_run_id(spec.name, time.time()))
    assert run is not None
    _finish(fleet, queue.submitted[0], SessionState.ready)
    time.sleep(1.1)

    run = batches.advance(run.run_id)

    assert run.state is RunState.expired
    assert queue.terminated == [queue.submitted[1]]
    assert run.counts == {"ready": 1, "terminated": 1, "pending": 1}


def test_concurrent_ticks_fire_a_due_schedule_once(fleet: Fleet) -> None:
    """Eight ticks racing for the same due time start one run between them."""
    queue = _Queue()
    batches = Batches(fleet.store, queue.submit, queue.terminate)
    spec = BatchSpec(name="race", schedule="* * * * * */10", defaults=TEMPLATE, sessions=[{}])
    now, fired, lock = time.time(), [], threading.Lock()

    def tick() -> None:
        runs = batches.fire_due([(Path("race.yaml"), spec)], now, 60)
        with lock:
            fired.extend(runs)

    threads = [threading.Thread(target=tick) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert len(fired) == 1
    assert len(queue.submitted) == 1
    assert fired[0].scheduled_for == spec.due(now, 60)


def test_a_schedule_fires_once_per_tick_with_two_beat_processes(
    fleet: Fleet,
    worker_factory: Callable[..., WorkerProcess],
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """Two beat replicas both tick every half second; a batch scheduled every 4 s gets exactly one run (and one
    session) per scheduled time, with none missed, and its sessions come up."""
    batch_dir = tmp_path / "batches"
    batch_dir.mkdir()
    (batch_dir / "tick.yaml").write_text(
        textwrap.dedent(
            """\
            name: tick
            schedule: "* * * * * */4"
            concurrency: 1
            deadline_seconds: 60
            defaults: {tenant_id: acme, agent: mock, provider: docker}
            sessions:
              - sandbox: {ttl_seconds: 300}
            """
        )
    )
    env = {
        **fleet.env,
        "SANDBOX_WORKER_FLEET__BATCH_DIR": str(batch_dir),
        "SANDBOX_WORKER_FLEET__BATCH_TICK_SECONDS": "0.5",
        "SANDBOX_WORKER_FLEET__BATCH_MISFIRE_SECONDS": "3",
    }
    worker = worker_factory(env=env, concurrency=3)
    beats = [BeatProcess(env, tmp_path / f"beat{index}").start() for index in range(2)]
    time.sleep(18)
    for beat in beats:
        beat.stop()

    batches = Batches(fleet.store, _Queue().submit, _Queue().terminate)
    runs = batches.runs("tick")
    ticks = sorted(run.scheduled_for or 0 for run in runs)
    assert len(runs) >= 4
    assert len(set(ticks)) == len(ticks)
    assert all(later - earlier == 4 for earlier, later in itertools.pairwise(ticks))
    assert all("Sending due task batches-tick" in beat.log() for beat in beats)
    assert worker.log().count("Task batches.tick[") > 2 * len(runs)
    request_ids = [request.request_id for run in runs for request in run.requests]
    assert len(re.findall(r"Task sessions\.create\[[^\]]+\] received", worker.log())) == len(request_ids)
    results = fleet.wait_ended(request_ids, 60)
    assert {result.state for result in results.values()} == {SessionState.ready}
