"""How often a request is tried, layer by layer: the one place that says so.

Three layers retry, each only what it can see, and their budgets multiply:

* **driver** — a provider SDK call answered 429/5xx or cut off (each provider's own setting: ``e2b.retries``,
  ``daytona.create_attempts``; Docker's engine is local and is not retried there);
* **stage** — a transient :class:`~worker.errors.SandboxWorkerError` inside one pipeline stage
  (``fleet.stage_attempts`` tries, jittered exponential backoff);
* **request** — a bring-up that failed transiently after its stage retries is compensated and run again by the
  task (``fleet.max_attempts`` bring-ups of one request, counting task retries, redeliveries and takeovers).

So one provider create is called at most ``max_attempts x stage_attempts x driver attempts`` times per request,
each attempt starting clean (compensation removes what the failed one made). Bad input is never retried.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from worker.config import Settings
from worker.errors import SandboxWorkerError
from worker.models import SessionResult

log = structlog.get_logger(__name__)

T = TypeVar("T")

# The longest countdown before a task retry. With Redis, a task waiting out its countdown is already delivered and
# unacknowledged, so this counts against the broker's visibility timeout (worker.celery_app).
COUNTDOWN_MAX = 60


# Seconds before a duplicate delivery asks again whether the worker bringing its request up has finished (or died,
# its lease expiring). Such a task holds no process while it waits.
BUSY_COUNTDOWN = 3


def _transient(error: BaseException) -> bool:
    return isinstance(error, SandboxWorkerError) and error.transient


def _note(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.info("transient error, retrying", error=getattr(error, "code", None), try_=state.attempt_number)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    request_attempts: int = 6
    stage_attempts: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(request_attempts=settings.fleet.max_attempts, stage_attempts=settings.fleet.stage_attempts)

    @property
    def task_retries(self) -> int:
        """Celery retries of a session task: every bring-up attempt after the first."""
        return self.request_attempts - 1

    @staticmethod
    def countdown(retries: int) -> int:
        """Seconds before task retry number ``retries + 1``: exponential, capped."""
        return int(min(COUNTDOWN_MAX, 2 ** (retries + 1)))

    def in_stage(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient errors within the stage."""
        return _stage_retrying(self.stage_attempts)(fn)


@functools.cache
def _stage_retrying(attempts: int) -> Retrying:
    """The stage's retry loop, built once: a bring-up runs a handful of calls through it, and building one costs
    about as much as running a call through it. A Retrying keeps each call's state per thread, so one serves all."""
    return Retrying(
        retry=retry_if_exception(_transient),
        wait=wait_random_exponential(multiplier=0.5, max=8),
        stop=stop_after_attempt(attempts),
        before_sleep=_note,
        reraise=True,
    )


class RetryLater(Exception):
    """A transient failure (or a bring-up still running elsewhere): the task should run again later. Everything
    this attempt created has been removed."""

    def __init__(self, error: SandboxWorkerError, result: SessionResult) -> None:
        super().__init__(error.message)
        self.error = error
        self.result = result
