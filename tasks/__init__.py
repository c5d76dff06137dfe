"""Celery task definitions, thin over :mod:`worker.runtime`; loaded by the worker (``include`` in celery_app).

The pool processes' set-up and clean-up live here rather than in :mod:`worker.celery_app`, which web apps import
to send tasks and which must not pull in the runtime.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from worker import runtime
from worker.config import get_settings
from worker.logs import configure_logging
from worker.pool import RefillThread

_refill: list[RefillThread] = []


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    configure_logging(get_settings().log_format)
    # Every process of every worker refills the warm pools (a per-pool lock keeps them from overfilling): no leader
    # whose death empties them.
    thread = runtime.start_pool_refill()
    if thread is not None:
        _refill.append(thread)


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    for thread in _refill:
        thread.stop()
    runtime.close()
