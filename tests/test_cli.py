"""Unit tests of the ``sandbox-worker`` command's output: sandbox text is never markup, ``--json`` is one
document, and a mistake is one line with a non-zero exit."""

from __future__ import annotations

import json
import sys
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from worker import cli
from worker.cli import output, sessions
from worker.errors import InvalidRequest
from worker.models import ErrorInfo, SessionResult, SessionState

REPLY = "done [/x] and [bold]not bold[/bold] :smile:"
RESULT = SessionResult(
    request_id="r-1",
    state=SessionState.failed,
    stage="prompt",
    reply=REPLY,
    error=ErrorInfo(code="agent_error", stage="prompt", message="agent said [/red] oops"),
)


class _Access:
    token = SecretStr("tok-123")
    headers: ClassVar[dict[str, SecretStr]] = {"X-Edge": SecretStr("edge-1")}


class _Client:
    def status(self, request_id: str) -> SessionResult | None:
        return RESULT if request_id == RESULT.request_id else None

    def access(self, request_id: str) -> Any:
        return _Access()


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setattr(sessions, "_client", _Client)
    return CliRunner()


def test_status_prints_agent_text_as_it_is(runner: CliRunner) -> None:
    """A reply or an error message holding ``[/x]``, markup or emoji codes is printed verbatim, not parsed."""
    shown = runner.invoke(cli.app, ["status", "r-1"])

    assert shown.exit_code == 0, shown.output
    assert REPLY in shown.stderr
    assert "agent_error at prompt: agent said [/red] oops" in shown.stderr


def test_status_json_is_one_document(runner: CliRunner) -> None:
    """``status --json --show-token`` prints exactly one JSON document on stdout, the token and headers in it."""
    shown = runner.invoke(cli.app, ["status", "r-1", "--json", "--show-token"])

    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert document["reply"] == REPLY
    assert (document["token"], document["headers"]) == ("tok-123", {"X-Edge": "edge-1"})


def test_an_unknown_request_is_one_error_line(runner: CliRunner) -> None:
    """Asking for a request that does not exist prints one ``error:`` line naming it and exits 1."""
    shown = runner.invoke(cli.app, ["status", "nope"])

    assert shown.exit_code == 1
    assert shown.stdout == ""
    assert shown.stderr == "error: no request nope (field request_id)\n"


def test_main_reports_a_sandbox_worker_error_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SandboxWorkerError raised by a command ends it with one line naming the field, exit 2, no traceback."""

    def broken() -> None:
        raise InvalidRequest("tenant [/x] has no secret named " + "k" * 120, field="name")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.setattr(sys, "argv", ["sandbox-worker"])

    with pytest.raises(SystemExit) as exited:
        cli.main()

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: tenant [/x] has no secret named {'k' * 120} (field name)\n"


def test_plain_text_is_never_markup(capsys: pytest.CaptureFixture[str]) -> None:
    """:func:`output.plain` cells and :func:`output.line` print brackets and colons as they are."""
    output.show(output.plain("[/x] [red]x[/red] :smile:"))
    output.line("[/x] :smile:")

    captured = capsys.readouterr()
    assert captured.err == "[/x] [red]x[/red] :smile:\n"
    assert captured.out == "[/x] :smile:\n"
