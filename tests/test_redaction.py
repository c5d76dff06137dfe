"""Unit tests of the redactor: registered secret values never survive into text or log events."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from celery import Celery
from pydantic import SecretStr

from worker.credentials.base import CredentialGrant
from worker.models import Strategy
from worker.redaction import MASK, REDACTOR, Redactor, redact_handlers


def test_registered_values_are_masked_everywhere() -> None:
    """A registered value is masked in text and in every string field of a log event, until forgotten."""
    redactor = Redactor()
    redactor.register(["sk-ant-secret-123"])
    assert redactor.redact("key=sk-ant-secret-123;") == f"key={MASK};"
    event = redactor.processor(None, "info", {"event": "x sk-ant-secret-123", "n": 1})
    assert event == {"event": f"x {MASK}", "n": 1}
    redactor.forget(["sk-ant-secret-123"])
    assert redactor.redact("sk-ant-secret-123") == "sk-ant-secret-123"


def test_short_values_are_not_registered() -> None:
    """Values too short to be secrets would mask ordinary words, so they are ignored."""
    redactor = Redactor()
    redactor.register(["abc"])
    assert redactor.redact("abc") == "abc"


def test_grant_repr_names_variables_but_not_values() -> None:
    """A CredentialGrant's repr lists variable names and never their values."""
    grant = CredentialGrant(strategy=Strategy.byok, env={"ANTHROPIC_API_KEY": SecretStr("sk-ant-xyz-789")})
    assert "ANTHROPIC_API_KEY" in repr(grant)
    assert "sk-ant-xyz-789" not in repr(grant)
    assert grant.secret_values() == ["sk-ant-xyz-789"]


SECRET = "sk-ant-hostile-0123456789"


def test_a_value_two_sessions_share_stays_masked_until_both_forget_it() -> None:
    """Values are counted: an org key two concurrent sessions use stays masked while one of them still runs."""
    redactor = Redactor()
    redactor.register([SECRET])
    redactor.register([SECRET])
    redactor.forget([SECRET])
    assert redactor.redact(SECRET) == MASK
    redactor.forget([SECRET])
    assert redactor.redact(SECRET) == SECRET


def test_a_hold_keeps_forgotten_values_masked_until_released() -> None:
    redactor = Redactor()
    redactor.hold()
    redactor.register([SECRET])
    redactor.forget([SECRET])
    assert redactor.redact(SECRET) == MASK
    redactor.release()
    assert redactor.redact(SECRET) == SECRET


def test_data_is_masked_in_keys_and_values_at_any_depth() -> None:
    redactor = Redactor()
    redactor.register([SECRET])
    data = {"reply": f"key {SECRET}", "usage": {f"leak {SECRET}": 1}, "tools": [SECRET], "n": 2, "none": None}
    assert redactor.redact_data(data) == {
        "reply": f"key {MASK}",
        "usage": {f"leak {MASK}": 1},
        "tools": [MASK],
        "n": 2,
        "none": None,
    }


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """A plain handler on the root logger, as Celery sets up its own, its output masked by redact_handlers()."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    root.handlers[:] = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)
    redact_handlers()
    yield stream
    root.handlers[:] = saved
    root.setLevel(level)


def test_every_handler_masks_messages_arguments_and_tracebacks(log_output: io.StringIO) -> None:
    REDACTOR.register([SECRET])
    try:
        try:
            raise ValueError(f"boom {SECRET}")
        except ValueError:
            logging.getLogger("celery.app.trace").exception("Task failed: %s", {"reply": SECRET})
    finally:
        REDACTOR.forget([SECRET])
    text = log_output.getvalue()
    assert "boom" in text and "Task failed" in text
    assert SECRET not in text


def _leaky_task(fail: bool) -> dict[str, str]:
    """What a bring-up does: registers the session's values, forgets them when it ends, and the returned result or
    the exception still holds what the agent echoed."""
    REDACTOR.register([SECRET])
    try:
        if fail:
            raise RuntimeError(f"the agent said {SECRET}")
        return {"reply": SECRET}
    finally:
        REDACTOR.forget([SECRET])


@pytest.mark.parametrize("fail", [False, True])
def test_celery_logs_and_stores_a_task_outcome_masked(log_output: io.StringIO, fail: bool) -> None:
    """Celery logs "Task … succeeded in …: <result>" (or the exception and its traceback) after the task function
    returned: the task holds the redactor until then (tasks/__init__.py), and its exception leaves it masked."""
    import tasks

    app = Celery("redaction-test", broker="memory://", backend="cache+memory://")
    task = app.task(name="leaky", base=tasks.RedactedTask)(_leaky_task)
    outcome = task.apply(args=[fail])
    text = log_output.getvalue()
    assert ("raised" if fail else "succeeded") in text
    assert SECRET not in text
    if fail:
        assert MASK in str(outcome.result) and SECRET not in f"{outcome.result!r} {outcome.traceback}"
