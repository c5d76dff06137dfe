"""The Celery app: Redis broker and results, JSON only, at-least-once delivery with late acks.

``celery -A worker.celery_app worker`` (or ``sandbox-worker worker``) runs it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker.config import Settings, get_settings
from worker.models import ProviderName
from worker.retries import COUNTDOWN_MAX

SESSIONS_QUEUE = "sessions"
PROVIDER_NAMES = tuple(p.value for p in ProviderName)

# Task names: tasks/ registers them; worker.queueing, the client and beat send by name, so nothing in the
# worker package imports the tasks package.
CREATE_SESSION = "sessions.create"
TERMINATE_SESSION = "sessions.terminate"
SESSION_STATUS = "sessions.status"
SESSION_ACCESS = "sessions.access"
REAP = "maintenance.reap"
CHECK_SANDBOXES = "maintenance.check_sandboxes"
BATCHES_TICK = "batches.tick"
BATCHES_ADVANCE = "batches.advance"
SENT_AT_HEADER = "sandbox_worker_sent_at"  # a create message's send time (epoch s): its queue wait starts there


def provider_queue(provider: str) -> str:
    """Requests are routed per provider, so a worker can serve only the providers its host reaches."""
    return f"{SESSIONS_QUEUE}.{provider}"


def visibility_timeout(settings: Settings) -> int:
    """Seconds before Redis hands an unacknowledged message to another worker. It must outlast the longest
    legitimate hold — a retry's countdown plus a whole run up to the hard time limit — or a live task would be
    delivered twice; past it, a message whose worker died is redelivered (the reaper requeues such requests
    sooner)."""
    return COUNTDOWN_MAX + settings.task_time_limit + 60


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("sandbox_worker", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        include=["tasks.sessions", "tasks.maintenance", "tasks.batches"],
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
        broker_transport_options={"visibility_timeout": visibility_timeout(settings)},
        # A lost broker connection leaves running bring-ups alone: they finish and record their result (the
        # store reconnects on its own); their message comes back after the visibility timeout and finds it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_max_retries=None,
        beat_schedule={
            "reap": {"task": REAP, "schedule": settings.fleet.reap_interval_seconds},
            "check-sandboxes": {"task": CHECK_SANDBOXES, "schedule": settings.fleet.sandbox_check_seconds},
            "batches-tick": {"task": BATCHES_TICK, "schedule": settings.fleet.batch_tick_seconds},
        },
        result_expires=7 * 24 * 3600,
        task_track_started=True,
        task_default_queue=SESSIONS_QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Pool processes keep their real stderr: redirected, structlog's stderr handler fed the redirect's logger
        # and every line was dropped by its recursion guard.
        worker_redirect_stdouts=False,
        # Remote control (shutdown, pool resizing, rate limits) obeys anyone who can write to the broker: off
        # unless the operator turns it on.
        worker_enable_remote_control=settings.remote_control,
        worker_send_task_events=True,
        # A web app (an app id set) sends no task-sent events: its Redis user may not publish on the event channel,
        # which carries every task's arguments (docs/operations.md, "Redis users").
        task_send_sent_event=settings.auth.app_id is None,
    )
    return app


app = create_app()


# -- the worker's main process: its metrics endpoint and its heartbeat (docs/operations.md) ------------------------
_heartbeat: list[Any] = []  # the running worker.health.Heartbeat, when there is one


@signals.worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Before the pool forks: one endpoint for every process's samples (worker.metrics)."""
    import structlog

    from worker import metrics

    settings = get_settings()
    if settings.metrics_port and not metrics.serve(settings.metrics_host, settings.metrics_port):
        structlog.get_logger(__name__).warning(
            "no metrics endpoint: PROMETHEUS_MULTIPROC_DIR is not set (start the worker with `sandbox-worker worker`)"
        )


@signals.worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    from worker.health import Heartbeat

    settings = get_settings()
    _heartbeat.append(Heartbeat(settings.heartbeat_file, settings.heartbeat_seconds))
    _heartbeat[-1].start()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    while _heartbeat:
        _heartbeat.pop().stop()


@signals.task_prerun.connect
def _queue_wait(task: Any, **_: Any) -> None:
    """A first delivery of a create: the time it spent queued, on the sender's clock (a retry's countdown or a
    redelivery is not queue wait)."""
    request = task.request
    sent_at = getattr(request, SENT_AT_HEADER, None)
    redelivered = (request.delivery_info or {}).get("redelivered")
    if task.name != CREATE_SESSION or not isinstance(sent_at, int | float) or request.retries or redelivered:
        return
    import time

    from worker import metrics

    queue = (request.delivery_info or {}).get("routing_key") or SESSIONS_QUEUE
    metrics.QUEUE_WAIT_SECONDS.labels(queue).observe(max(time.time() - sent_at, 0.0))


@signals.worker_process_shutdown.connect
def _child_exited(pid: int, **_: Any) -> None:
    from worker import metrics

    metrics.child_exited(pid)
