"""Session tasks: thin wrappers over :mod:`worker.pipeline`, each checking its sender first (:mod:`worker.auth`)."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task

from tasks import RedactedTask
from worker import runtime
from worker.access import access_for
from worker.auth import (
    AppCredential,
    Operation,
    SignatureExpired,
    authenticate,
    authorize_request,
    authorize_tenant,
)
from worker.celery_app import CREATE_SESSION, SESSION_ACCESS, SESSION_STATUS, TERMINATE_SESSION, app
from worker.config import Settings, get_settings
from worker.errors import Busy, InvalidRequest
from worker.models import ErrorInfo, ProviderName, SessionResult, SessionState, invalid_result, parse_request
from worker.retries import BUSY_COUNTDOWN, RetryLater, RetryPolicy

log = structlog.get_logger(__name__)


def default_images(settings: Settings) -> list[str]:
    """The image, template or snapshot each provider is configured with: always allowed."""
    configs = [settings.provider_config(name) for name in ProviderName]
    return [v for c in configs for f in ("image", "template", "snapshot") if isinstance(v := getattr(c, f, None), str)]


def _refused(request: Any, error: InvalidRequest) -> dict[str, Any]:
    """The answer to a task whose sender may not ask for it: the task's own result, nothing else written."""
    log.info("task refused", field=error.field, reason=error.message)
    return invalid_result(request if isinstance(request, dict) else {}, error).model_dump(mode="json")


def _check_create(request: Any, auth: Any) -> None:
    """Before any record, credential or sandbox: the signature, then the tenant and the image. A request that does
    not parse from an authenticated sender goes on to the pipeline, which answers it as today. A signature past its
    window still serves a request that already has its record: a retry or redelivery of one accepted when fresh
    (a bring-up's retries may outlast any window)."""
    settings = get_settings()
    try:
        sender = authenticate(settings.auth, Operation.create, request, auth)
    except SignatureExpired as expired:
        if not _has_record(request):
            raise
        sender = expired.app
    if sender is None:
        return
    try:
        parsed = parse_request(request)
    except InvalidRequest:
        return
    authorize_request(settings.auth, sender, parsed, default_images(settings))


def _has_record(request: Any) -> bool:
    """Whether this very request has a record (a read: nothing is written before the checks pass)."""
    try:
        parsed = parse_request(request)
    except InvalidRequest:
        return False
    record = runtime.store().get(parsed.request_id)
    return record is not None and record.request == parsed


def _check_request_id(operation: Operation, request_id: str, auth: Any) -> AppCredential | None:
    """A terminate or a status is signed too, and works only for a request whose tenant the sender may act for."""
    sender = authenticate(get_settings().auth, operation, request_id, auth)
    if sender is not None:
        known = runtime.store().result(request_id)
        if known is None:
            raise InvalidRequest(f"no session with request_id {request_id}", field="request_id")
        authorize_tenant(sender, known.tenant_id)
    return sender


# max_retries=None: the retry policy (worker/retries.py) decides, from the settings.
@app.task(bind=True, name=CREATE_SESSION, max_retries=None, base=RedactedTask)
def create_session(self: Task, request: dict[str, Any], busy: int = 0, auth: Any = None) -> dict[str, Any]:
    """Bring up the session ``request`` asks for (a SessionRequest as a JSON object). The session record is what
    clients read; the task's own result is a copy. ``busy`` counts the retries spent as a duplicate, asking again
    while another worker brought the request up: they do not count against the retry policy. ``auth`` is the
    sender's signature (:mod:`worker.auth`); retries carry it along."""
    try:
        _check_create(request, auth)
    except InvalidRequest as exc:
        return _refused(request, exc)

    def progress(stage: str, result: SessionResult) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "request_id": result.request_id})

    policy = RetryPolicy.from_settings(get_settings())
    try:
        return runtime.pipeline(progress).create(request).model_dump(mode="json")
    except RetryLater as exc:
        if isinstance(exc.error, Busy):
            kwargs = {"busy": busy + 1, "auth": auth}
            raise self.retry(args=[request], kwargs=kwargs, countdown=BUSY_COUNTDOWN) from None
        tries = self.request.retries - busy
        if tries >= policy.task_retries:
            error = ErrorInfo(code=exc.error.code, stage=exc.error.stage, message=exc.error.message)
            final = runtime.store().give_up(exc.result.request_id, error)
            result = final or exc.result.model_copy(update={"state": SessionState.failed, "error": error})
            return result.model_dump(mode="json")
        kwargs = {"busy": busy, "auth": auth}
        raise self.retry(args=[request], kwargs=kwargs, countdown=policy.countdown(tries)) from None


def _failed(request_id: str, exc: InvalidRequest) -> dict[str, Any]:
    return SessionResult(
        request_id=request_id,
        state=SessionState.failed,
        error=ErrorInfo(code=exc.code, message=exc.message, field=exc.field),
    ).model_dump(mode="json")


@app.task(bind=True, name=TERMINATE_SESSION, max_retries=RetryPolicy().task_retries)
def terminate_session(self: Task, request_id: str, auth: Any = None) -> dict[str, Any]:
    """End the session of ``request_id``: close the agent, remove the sandbox, release credentials."""
    try:
        _check_request_id(Operation.terminate, request_id, auth)
        return runtime.teardown().terminate(request_id).model_dump(mode="json")
    except InvalidRequest as exc:
        return _failed(request_id, exc)
    except RetryLater:
        raise self.retry(countdown=RetryPolicy.countdown(self.request.retries)) from None


@app.task(name=SESSION_STATUS)
def session_status(request_id: str, auth: Any = None) -> dict[str, Any] | None:
    """What a client is told about ``request_id`` (:meth:`worker.store.Store.result`), for a signed client, which
    cannot read the records itself; None when nothing is known yet."""
    try:
        _check_request_id(Operation.status, request_id, auth)
    except InvalidRequest as exc:
        if exc.field == "request_id":
            return None
        return _failed(request_id, exc)
    result = runtime.store().result(request_id)
    return result.model_dump(mode="json") if result is not None else None


@app.task(name=SESSION_ACCESS)
def session_access(request_id: str, auth: Any = None) -> dict[str, Any] | None:
    """How a signed client reaches a ready session's daemon: its URL, and its token and headers sealed for the app
    that asks (:meth:`worker.auth.AppCredential.seal`), never in clear in a result; None when not ready or refused
    (a client in open mode reads the record itself)."""
    try:
        sender = _check_request_id(Operation.access, request_id, auth)
    except InvalidRequest as exc:
        log.info("task refused", field=exc.field, reason=exc.message)
        return None
    access = access_for(runtime.store(), request_id)
    if sender is None or access is None:
        return None
    headers = {name: sender.seal(value) for name, value in access.headers.items()}
    return {"url": access.url, "token": sender.seal(access.token), "headers": headers}
