"""Session tasks: thin wrappers over :mod:`worker.pipeline`."""

from __future__ import annotations

from typing import Any

from celery import Task

from worker import runtime
from worker.celery_app import CREATE_SESSION, TERMINATE_SESSION, app
from worker.config import get_settings
from worker.errors import InvalidRequest
from worker.models import ErrorInfo, SessionResult, SessionState
from worker.retries import RetryLater, RetryPolicy


# max_retries=None: the retry policy (worker/retries.py) decides, from the settings.
@app.task(bind=True, name=CREATE_SESSION, max_retries=None)
def create_session(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    """Bring up the session ``request`` asks for (a SessionRequest as a JSON object)."""

    def progress(stage: str, result: SessionResult) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "request_id": result.request_id})

    policy = RetryPolicy.from_settings(get_settings())
    try:
        return runtime.pipeline(progress).create(request).model_dump(mode="json")
    except RetryLater as exc:
        if self.request.retries >= policy.task_retries:
            result = exc.result.model_copy(
                update={
                    "state": SessionState.failed,
                    "error": ErrorInfo(code=exc.error.code, stage=exc.error.stage, message=exc.error.message),
                }
            )
            return result.model_dump(mode="json")
        raise self.retry(countdown=policy.countdown(self.request.retries)) from None


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
