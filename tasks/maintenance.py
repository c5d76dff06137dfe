"""Maintenance tasks: the reaper, run by beat every ``fleet.reap_interval_seconds``."""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks.sessions import create_session
from worker import runtime
from worker.celery_app import app, provider_queue
from worker.config import get_settings
from worker.models import SessionRequest
from worker.reaper import build_reaper


def enqueue(request: SessionRequest, **options: Any) -> None:
    """Queue ``request`` on its provider's queue under its request_id (a requeue when its message was lost)."""
    create_session.apply_async(
        args=[request.model_dump(mode="json")],
        task_id=request.request_id,
        queue=provider_queue(request.provider),
        **options,
    )


@app.task(name="maintenance.reap")
def reap() -> list[dict[str, Any]]:
    """One reaper pass; with several beat replicas, only the first tick of each interval runs one."""
    interval = get_settings().fleet.reap_interval_seconds
    if not runtime.store().claim_once("reap", interval * 0.8):
        return []
    return [dataclasses.asdict(item) for item in build_reaper(enqueue).run()]
