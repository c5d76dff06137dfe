"""Sending work to the task queue, by task name: which task, on which queue, under which task id.

The one place where that is decided, used by the tasks (:mod:`tasks.maintenance`, :mod:`tasks.batches`), the
``sandbox-worker`` command and :class:`worker.client.SessionClient`. It sends through a Celery app by name
(``app.send_task``), so the ``worker`` package never imports the ``tasks`` package that defines the tasks.

Every send is signed (:mod:`worker.auth`) when the sender has a key: the client's app, or the worker's own key for
what workers send themselves (the reaper's requeues, batch sessions). The signature goes as the task's ``auth``
argument, beside the request.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from worker.auth import Operation, Signer
from worker.batches import Batches
from worker.celery_app import (
    BATCHES_ADVANCE,
    CREATE_SESSION,
    PROVIDER_NAMES,
    SENT_AT_HEADER,
    SESSION_ACCESS,
    SESSION_STATUS,
    SESSIONS_QUEUE,
    TERMINATE_SESSION,
    provider_queue,
)
from worker.models import SessionRequest
from worker.store import Store


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from worker.celery_app import app as default  # built from the settings on first use

    return default


# Senders declare nothing: a send is a push onto the queue's list, and workers declare the queues they consume. So
# a web app's Redis user needs no write to kombu's binding table (docs/operations.md, "Redis users").
NO_DECLARE: list[object] = []


def _signed(operation: Operation, subject: Any, signer: Signer | None) -> dict[str, Any]:
    """The task's keyword arguments: its ``auth`` envelope when there is a signer (``signer``, else this process's
    own from the settings), none otherwise (a worker in open mode accepts that)."""
    if signer is None:
        from worker.config import get_settings

        signer = get_settings().auth.signer()
    return {"auth": signer.sign(operation, subject)} if signer is not None else {}


def queue_of(provider: object) -> str:
    """The provider's queue; the shared sessions queue when ``provider`` names none (the worker rejects such a
    request and records why)."""
    return provider_queue(provider) if isinstance(provider, str) and provider in PROVIDER_NAMES else SESSIONS_QUEUE


def task_id_for(request_id: str) -> str:
    """A task id of its own for each send of a request: ``<request_id>.<uuid>``. No two sends share a Celery result
    (a request_id has no dot), so a second request reusing an id cannot overwrite the first one's; clients read the
    session record (:meth:`worker.store.Store.result`), never a task result."""
    return f"{request_id}.{uuid.uuid4().hex}"


def send_create(
    payload: dict[str, Any], *, app: Celery | None = None, signer: Signer | None = None, **options: Any
) -> AsyncResult:
    """Queue ``sessions.create`` for a request payload (a SessionRequest as JSON) on its provider's queue, under a
    task id of its own (:func:`task_id_for`), signed (:func:`_signed`). ``options`` go to ``send_task`` (``link``,
    ``link_error``...)."""
    request_id = str(payload.get("request_id") or "")
    return _app(app).send_task(
        CREATE_SESSION,
        args=[payload],
        kwargs=_signed(Operation.create, payload, signer),
        task_id=task_id_for(request_id),
        queue=queue_of(payload.get("provider")),
        declare=NO_DECLARE,
        headers={SENT_AT_HEADER: time.time()},  # the queue wait's start (worker.metrics.QUEUE_WAIT_SECONDS)
        **options,
    )


def enqueue(request: SessionRequest, *, app: Celery | None = None, **options: Any) -> None:
    """Queue ``request`` on its provider's queue (a requeue when its message was lost)."""
    send_create(request.model_dump(mode="json"), app=app, **options)


def send_terminate(
    request_id: str, provider: str | None, *, app: Celery | None = None, signer: Signer | None = None
) -> AsyncResult:
    """Queue ``sessions.terminate`` for ``request_id`` on its provider's queue (the shared one when unknown)."""
    return _app(app).send_task(
        TERMINATE_SESSION,
        args=[request_id],
        kwargs=_signed(Operation.terminate, request_id, signer),
        queue=queue_of(provider),
        declare=NO_DECLARE,
    )


def send_status(request_id: str, *, app: Celery | None = None, signer: Signer | None = None) -> AsyncResult:
    """Queue ``sessions.status`` for ``request_id`` on the shared queue: how a signed client reads a request's state
    (it has no access to the records)."""
    return _send_about(SESSION_STATUS, Operation.status, request_id, app, signer)


def send_access(request_id: str, *, app: Celery | None = None, signer: Signer | None = None) -> AsyncResult:
    """Queue ``sessions.access`` for ``request_id`` on the shared queue: a ready session's daemon URL and token,
    the secrets sealed for the signing app (:meth:`worker.auth.AppCredential.seal`)."""
    return _send_about(SESSION_ACCESS, Operation.access, request_id, app, signer)


def _send_about(
    name: str, operation: Operation, request_id: str, app: Celery | None, signer: Signer | None
) -> AsyncResult:
    return _app(app).send_task(
        name, args=[request_id], kwargs=_signed(operation, request_id, signer), queue=SESSIONS_QUEUE, declare=NO_DECLARE
    )


def batches(store: Store, *, app: Celery | None = None) -> Batches:
    """Batch runs wired to the task queue: each session of a run advances the run when it ends, however it ends."""

    def submit(request: SessionRequest, run_id: str) -> None:
        advance = _app(app).signature(BATCHES_ADVANCE, args=[run_id], immutable=True)
        enqueue(request, app=app, link=advance, link_error=advance)

    def terminate(request: SessionRequest) -> None:
        send_terminate(request.request_id, request.provider.value, app=app)

    return Batches(store, submit, terminate)
