"""Celery task definitions, thin over :mod:`worker.runtime`; loaded by the worker (``include`` in celery_app).

The pool processes' set-up and clean-up live here rather than in :mod:`worker.celery_app`, which web apps import
to send tasks and which must not pull in the runtime. So does what keeps a task's secrets out of Celery's own
output: a task holds the redactor until it has ended (Celery logs "Task … succeeded in …: <result>" after the
task function returned), and an exception leaves a task only masked (Celery stores it, with its traceback, in the
result backend and logs it).
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Retry
from celery.signals import after_setup_logger, task_postrun, task_prerun, worker_process_init, worker_process_shutdown

from worker import runtime
from worker.config import get_settings
from worker.errors import SandboxWorkerError
from worker.logs import configure_logging
from worker.redaction import REDACTOR, redact_handlers


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    configure_logging(get_settings().log_format)


@after_setup_logger.connect
def _redact_main_process(**_: Any) -> None:
    """The main process's handlers (Celery's): tasks run there with ``--pool=solo`` or ``threads``."""
    redact_handlers()


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    runtime.close()


@task_prerun.connect
def _hold_secrets(**_: Any) -> None:
    REDACTOR.hold()


@task_postrun.connect
def _release_secrets(**_: Any) -> None:
    REDACTOR.release()


class RedactedTask(Task):  # type: ignore[misc]
    """A task whose exceptions leave it masked: the message and what it was raised from may hold sandbox text."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Retry:
            raise  # "Retry in Ns": nothing of the sandbox
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            masked = REDACTOR.redact(text)
            if masked == text:
                raise
            raise SandboxWorkerError(masked) from None
