"""Unit tests of the ``sandbox-worker`` command's output: sandbox text is never markup, ``--json`` is one
document, and a mistake is one line with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from pydantic import SecretStr
from typer.testing import CliRunner

from worker import cli, pins
from worker.cli import output, sessions
from worker.config import get_settings
from worker.errors import InvalidRequest
from worker.models import ErrorInfo, SessionResult, SessionState
from worker.redaction import REDACTOR

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


ESCAPES = "\x1b[2J\x1b]0;owned\x07 \x9b31m red \u202eevil"


class _EscapingClient(_Client):
    def status(self, request_id: str) -> SessionResult | None:
        return RESULT.model_copy(update={"reply": ESCAPES}) if request_id == RESULT.request_id else None


def test_sandbox_text_reaches_no_terminal_as_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply holding terminal escapes (clear screen, set title, a C1 CSI, a bidi override) is shown escaped, in
    the table and in the JSON document alike, and the document still reads back to the reply as it was."""
    monkeypatch.setattr(sessions, "_client", _EscapingClient)
    runner = CliRunner()

    shown = runner.invoke(cli.app, ["status", "r-1"])
    as_json = runner.invoke(cli.app, ["status", "r-1", "--json"])

    for text in (shown.stderr, as_json.stdout):
        assert not set("\x1b\x07\x9b\u202e") & set(text), repr(text)
    assert "\\x1b[2J\\x1b]0;owned\\x07 \\x9b31m red \\u202eevil" in shown.stderr
    assert json.loads(as_json.stdout)["reply"] == ESCAPES


def test_json_documents_are_ascii(capsys: pytest.CaptureFixture[str]) -> None:
    """A model printed as JSON (``submit``, ``terminate``, ``batch``) escapes every character a terminal could act on."""
    output.json_doc(RESULT.model_copy(update={"reply": ESCAPES}))

    out = capsys.readouterr().out
    assert out.isascii()
    assert json.loads(out)["reply"] == ESCAPES


def _main(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["sandbox-worker", *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return int(exited.value.code or 0)


def test_a_failure_with_json_is_one_json_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --json, a command that fails prints its one document, the error, on stdout (and the line on stderr)."""
    monkeypatch.setattr(sessions, "_client", _Client)

    assert _main(monkeypatch, "status", "nope", "--json") == 1

    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": {"message": "no request nope", "field": "request_id"}}
    assert captured.err == "error: no request nope (field request_id)\n"


class _NotReadyClient(_Client):
    def access(self, request_id: str) -> Any:
        return None


def test_show_token_of_a_session_not_ready_is_still_one_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status --json --show-token`` of a session without a token prints its result with ``token: null`` and no
    second document, exit 1."""
    monkeypatch.setattr(sessions, "_client", _NotReadyClient)

    assert _main(monkeypatch, "status", "r-1", "--json", "--show-token") == 1

    document = json.loads(capsys.readouterr().out)
    assert (document["request_id"], document["token"], document["headers"]) == ("r-1", None, {})


def test_redis_out_of_reach_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Redis not answering ends a command with one line, exit 1, and no password of its URL."""

    def unreachable() -> None:
        raise redis.ConnectionError("Error 111 connecting to redis://:hunter2@10.0.0.1:6379")

    monkeypatch.setattr(cli, "app", unreachable)
    REDACTOR.register(["hunter2"])
    try:
        assert _main(monkeypatch) == 1
    finally:
        REDACTOR.forget(["hunter2"])

    err = capsys.readouterr().err
    assert err.startswith("error: Redis did not answer: ConnectionError: Error 111") and err.count("\n") == 1
    assert "hunter2" not in err


def test_version_json_names_the_pins() -> None:
    shown = CliRunner().invoke(cli.app, ["version", "--json"])

    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert (document["sandbox_agent"], document["sandbox_image"]) == (pins.SANDBOX_AGENT_VERSION, pins.SANDBOX_IMAGE)
    assert document["agents"]["claude"]["reports"] == pins.AGENT_VERSIONS["claude"]


def test_liveness_reads_the_heartbeat_file_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``check --liveness`` passes on a fresh heartbeat file, fails on a stale or missing one, with no Redis (the
    unit tests' Redis address has nothing listening)."""
    beat = tmp_path / "beat"
    monkeypatch.setenv("SANDBOX_WORKER_HEARTBEAT_FILE", str(beat))
    get_settings.cache_clear()
    runner = CliRunner()

    missing = runner.invoke(cli.app, ["check", "--liveness", "--json"])
    beat.touch()
    fresh = runner.invoke(cli.app, ["check", "--liveness", "--json"])
    os.utime(beat, (time.time() - 120, time.time() - 120))
    stale = runner.invoke(cli.app, ["check", "--liveness", "--max-age", "60", "--json"])

    assert (missing.exit_code, fresh.exit_code, stale.exit_code) == (1, 0, 1)
    assert json.loads(fresh.stdout)["ok"] is True
    assert json.loads(stale.stdout)["checks"][0]["detail"].startswith("touched 120")


def test_shell_completion_is_offered() -> None:
    """``--show-completion`` from bash prints bash's completion script for the command. Typer asks the process tree
    for the shell, so the command runs under bash whatever runs the tests (make's recipes run under sh), and bash
    stays its parent (a lone command would be exec'd in bash's place)."""
    command = ["bash", "-c", f"{Path(sys.executable).parent / 'sandbox-worker'} --show-completion; exit $?"]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert shown.returncode == 0, shown.stderr
    assert "_SANDBOX_WORKER_COMPLETE=complete_bash" in shown.stdout


class _StartingClient(_Client):
    def status(self, request_id: str) -> SessionResult | None:
        return RESULT.model_copy(update={"state": SessionState.starting, "stage": "sandbox"})

    def wait(self, request_id: str, *, timeout: float, on_progress: Any) -> SessionResult:
        on_progress("daemon")
        return RESULT.model_copy(update={"state": SessionState.ready, "stage": "ready", "error": None})


def test_status_watch_follows_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """``status --watch --json`` of a starting request waits for it and prints the one, final, document."""
    monkeypatch.setattr(sessions, "_client", _StartingClient)

    shown = CliRunner().invoke(cli.app, ["status", "r-1", "--watch", "--json"])

    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["state"] == "ready"
