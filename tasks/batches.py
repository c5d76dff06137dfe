"""Batch tasks: beat's tick (fire due schedules, advance running batches) and the advance a session's end calls."""

from __future__ import annotations

import time

from tasks.maintenance import enqueue
from tasks.sessions import terminate_session
from worker import runtime
from worker.batches import Batches, load_dir
from worker.celery_app import app, provider_queue
from worker.config import get_settings
from worker.models import SessionRequest


def _submit(request: SessionRequest, run_id: str) -> None:
    advance_run = advance.si(run_id)
    enqueue(request, link=advance_run, link_error=advance_run)


def _terminate(request: SessionRequest) -> None:
    terminate_session.apply_async(args=[request.request_id], queue=provider_queue(request.provider))


def batches() -> Batches:
    """Batch runs wired to this app's task queue."""
    return Batches(runtime.store(), _submit, _terminate)


@app.task(name="batches.tick")
def tick() -> list[str]:
    """Fire every due schedule (once per tick across all beat replicas), then advance every running batch."""
    settings = get_settings()
    runs = batches()
    fired = []
    if settings.fleet.batch_dir is not None:
        due = runs.fire_due(load_dir(settings.fleet.batch_dir), time.time(), settings.fleet.batch_misfire_seconds)
        fired = [run.run_id for run in due]
    for run_id in runs.active():
        runs.advance(run_id)
    return fired


@app.task(name="batches.advance", ignore_result=True)
def advance(run_id: str) -> None:
    """Advance one batch run (a session of it has ended)."""
    batches().advance(run_id)
