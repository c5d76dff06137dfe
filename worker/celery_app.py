"""The Celery app: Redis broker and results, JSON only, at-least-once delivery with late acks.

``celery -A worker.celery_app worker`` (or ``sandbox-worker worker``) runs it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from worker import runtime
from worker.config import Settings, get_settings
from worker.logs import configure_logging
from worker.models import ProviderName

SESSIONS_QUEUE = "sessions"
PROVIDER_NAMES = tuple(p.value for p in ProviderName)


def provider_queue(provider: str) -> str:
    """Requests are routed per provider, so a worker can serve only the providers its host reaches."""
    return f"{SESSIONS_QUEUE}.{provider}"


ALL_QUEUES = (SESSIONS_QUEUE, *(provider_queue(p) for p in PROVIDER_NAMES))


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("sandbox_worker", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        include=["tasks.sessions"],
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # At-least-once: a task is acknowledged only when it finished, and goes back to the queue when the
        # worker process dies under it. Idempotency by request_id makes the redelivery safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        # A message unacknowledged for longer than this is redelivered: keep it above the hard time limit.
        broker_transport_options={"visibility_timeout": settings.task_time_limit + 60},
        result_expires=7 * 24 * 3600,
        task_track_started=True,
        task_default_queue=SESSIONS_QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = create_app()


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    configure_logging(get_settings().log_format)


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    runtime.close()
