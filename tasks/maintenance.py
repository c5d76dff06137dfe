"""Maintenance tasks: the reaper, run by beat every ``fleet.reap_interval_seconds``."""

from __future__ import annotations

import dataclasses
from typing import Any

from worker import runtime
from worker.celery_app import REAP, app
from worker.config import get_settings
from worker.queueing import enqueue
from worker.reaper import build_reaper


@app.task(name=REAP)
def reap() -> list[dict[str, Any]]:
    """One reaper pass; with several beat replicas, only the first tick of each interval runs one."""
    interval = get_settings().fleet.reap_interval_seconds
    if not runtime.store().claim_once("reap", interval * 0.8):
        return []
    return [dataclasses.asdict(item) for item in build_reaper(enqueue).run()]
