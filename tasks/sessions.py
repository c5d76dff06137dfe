"""Session tasks: thin wrappers over :mod:`worker.pipeline`."""

from __future__ import annotations

from typing import Any

from celery import Task

from worker import runtime
from worker.celery_app import RETRY_COUNTDOWN_MAX, app
from worker.errors import InvalidRequest
from worker.models import ErrorInfo, SessionResult, SessionState
from worker.pipeline import RetryLater

MAX_RETRIES = 5


def _backoff(retries: int) -> int:
    return int(min(RETRY_COUNTDOWN_MAX, 2 ** (retries + 1)))


@app.task(bind=True, name="sessions.create", max_retries=MAX_RETRIES)
def create_session(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Bring up the session ``request`` asks for (a SessionRequest as a JSON object)."""

    def progress(stage: str, result: SessionResult) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "request_id": result.request_id})

    try:
        return runtime.pipeline(progress).create(request).model_dump(mode="json")
    except RetryLater as exc:
        if self.request.retries >= self.max_retries:
            result = exc.result.model_copy(
                update={
                    "state": SessionState.failed,
                    "error": ErrorInfo(code=exc.error.code, stage=exc.error.stage, message=exc.error.message),
                }
            )
            return result.model_dump(mode="json")
        raise self.retry(countdown=_backoff(self.request.retries)) from None


@app.task(bind=True, name="sessions.terminate", max_retries=MAX_RETRIES)
def terminate_session(self: Task, request_id: str) -> dict[str, Any]:
    """End the session of ``request_id``: close the agent, remove the sandbox, release credentials."""
    try:
        return runtime.pipeline().terminate(request_id).model_dump(mode="json")
    except InvalidRequest as exc:
        return SessionResult(
            request_id=request_id,
            state=SessionState.failed,
            error=ErrorInfo(code=exc.code, message=exc.message, field=exc.field),
        ).model_dump(mode="json")
    except RetryLater:
        raise self.retry(countdown=_backoff(self.request.retries)) from None
