"""Session tasks: thin wrappers over :mod:`worker.pipeline`."""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks import RedactedTask
from worker import runtime
from worker.celery_app import CREATE_SESSION, TERMINATE_SESSION, app
from worker.config import get_settings
from worker.errors import Busy, InvalidRequest
from worker.models import ErrorInfo, SessionResult, SessionState
from worker.retries import BUSY_COUNTDOWN, RetryLater, RetryPolicy


# max_retries=None: the retry policy (worker/retries.py) decides, from the settings.
@app.task(bind=True, name=CREATE_SESSION, max_retries=None, base=RedactedTask)
def create_session(self: Task, request: dict[str, Any], busy: int = 0) -> dict[str, Any]:
    """Bring up the session ``request`` asks for (a SessionRequest as a JSON object). The session record is what
    clients read; the task's own result is a copy. ``busy`` counts the retries spent as a duplicate, asking again
    while another worker brought the request up: they do not count against the retry policy."""

    def progress(stage: str, result: SessionResult) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "request_id": result.request_id})

    policy = RetryPolicy.from_settings(get_settings())
    try:
        return runtime.pipeline(progress).create(request).model_dump(mode="json")
    except RetryLater as exc:
        if isinstance(exc.error, Busy):
            raise self.retry(args=[request], kwargs={"busy": busy + 1}, countdown=BUSY_COUNTDOWN) from None
        tries = self.request.retries - busy
        if tries >= policy.task_retries:
            error = ErrorInfo(code=exc.error.code, stage=exc.error.stage, message=exc.error.message)
            final = runtime.store().give_up(exc.result.request_id, error)
            result = final or exc.result.model_copy(update={"state": SessionState.failed, "error": error})
            return result.model_dump(mode="json")
        raise self.retry(args=[request], kwargs={"busy": busy}, countdown=policy.countdown(tries)) from None


@app.task(bind=True, name=TERMINATE_SESSION, max_retries=RetryPolicy().task_retries)
def terminate_session(self: Task, request_id: str) -> dict[str, Any]:
    """End the session of ``request_id``: close the agent, remove the sandbox, release credentials."""
    try:
        return runtime.teardown().terminate(request_id).model_dump(mode="json")
    except InvalidRequest as exc:
        return SessionResult(
            request_id=request_id,
            state=SessionState.failed,
            error=ErrorInfo(code=exc.code, message=exc.message, field=exc.field),
        ).model_dump(mode="json")
    except RetryLater:
        raise self.retry(countdown=RetryPolicy.countdown(self.request.retries)) from None
