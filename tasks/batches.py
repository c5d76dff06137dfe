"""Batch tasks: beat's tick (fire due schedules, advance running batches) and the advance a session's end calls."""

from __future__ import annotations

import time

from worker import queueing, runtime
from worker.batches import Batches, load_dir
from worker.celery_app import BATCHES_ADVANCE, BATCHES_TICK, app
from worker.config import get_settings


def batches() -> Batches:
    """Batch runs wired to this app's task queue (:func:`worker.queueing.batches`)."""
    return queueing.batches(runtime.store(), app=app)


@app.task(name=BATCHES_TICK)
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


@app.task(name=BATCHES_ADVANCE, ignore_result=True)
def advance(run_id: str) -> None:
    """Advance one batch run (a session of it has ended)."""
    batches().advance(run_id)
