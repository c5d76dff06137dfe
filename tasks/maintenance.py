"""Maintenance tasks: the reaper (and the retry of pending gateway key revocations), run by beat every
``fleet.reap_interval_seconds``, and its check for vanished sandboxes of ready sessions, every
``fleet.sandbox_check_seconds``."""

from __future__ import annotations

import dataclasses
from typing import Any

from worker import runtime
from worker.celery_app import CHECK_SANDBOXES, REAP, app
from worker.config import get_settings
from worker.credentials.gateway import gateway_keys
from worker.queueing import enqueue
from worker.reaper import build_reaper


@app.task(name=REAP)
def reap() -> list[dict[str, Any]]:
    """One reaper pass; with several beat replicas, only the first tick of each interval runs one."""
    interval = get_settings().fleet.reap_interval_seconds
    if not runtime.store().claim_once("reap", interval * 0.8):
        return []
    keys = gateway_keys(get_settings(), runtime.store())
    if keys is not None:  # replaced gateway keys whose delete failed: retried here until the gateway confirms
        keys.revoke_all_pending()
    return [dataclasses.asdict(item) for item in build_reaper(enqueue).run()]


@app.task(name=CHECK_SANDBOXES)
def check_sandboxes() -> list[dict[str, Any]]:
    """End the ready sessions whose sandbox is gone (their vault placeholders die with them); one run per tick."""
    interval = get_settings().fleet.sandbox_check_seconds
    if not runtime.store().claim_once("check-sandboxes", interval * 0.8):
        return []
    return [dataclasses.asdict(item) for item in build_reaper(enqueue).end_vanished()]
