"""Following a ready session from Python (worker.follow): a real worker, a Docker sandbox and the stand-in agent.

The worker uploads the stand-in agent (daemon_install=upload), so its scripted tool calls, permission requests and
cancellable turns are the checkout's, whatever image is built."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from tests.conftest import ROOT, WorkerProcess
from worker.access import DaemonAccess
from worker.client import SessionClient
from worker.errors import AgentError, DaemonError, InvalidRequest
from worker.follow import MessageChunk, PermissionAnswer, PermissionRequest, SessionHandle, ToolCall, TurnEnd
from worker.models import SessionState

pytestmark = pytest.mark.integration


@pytest.fixture
def ready(worker_factory: Any, docker_client: Any) -> Iterator[tuple[SessionClient, str]]:
    worker_factory(env={"SANDBOX_WORKER_DAEMON_INSTALL": "upload"})
    client = SessionClient()
    request_id = f"follow-{uuid.uuid4().hex[:12]}"
    client.submit({"request_id": request_id, "tenant_id": "acme", "agent": "mock", "provider": "docker",
                   "session": {"prompt": "first"}})  # fmt: skip
    result = client.wait(request_id, timeout=120)
    assert result.state is SessionState.ready, result.error
    yield client, request_id
    client.terminate(request_id)


def _text(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, MessageChunk))


def _readme_example() -> str:
    """The first Python block of the README's 'Following a session' section."""
    section = (ROOT / "README.md").read_text().split("## Following a session", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_follow_prompts_streams_tool_calls_answers_and_cancels(
    ready: tuple[SessionClient, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A second prompt is answered (and the first turn's replayed events are not taken for it), a tool call streams,
    a permission request is allowed then rejected as asked, a prompt waits for the turn in progress, a cancel
    ends a long turn 'cancelled', a wrong token is refused when following starts, and the README's example runs."""
    client, request_id = ready
    with client.follow(request_id) as session:
        events = list(session.prompt("second"))
        assert _text(events) == "mock: second"
        assert events[-1] == TurnEnd(stop_reason="end_turn")

        events = list(session.prompt("/tool notes.txt"))
        calls = [e for e in events if isinstance(e, ToolCall)]
        assert [(c.title, c.status, c.update) for c in calls] == [
            ("Read notes.txt", "pending", False),
            (None, "completed", True),
        ]
        assert _text(events) == "mock: read notes.txt"

        for allow, reply in ((True, "allowed: a.txt"), (False, "rejected: a.txt")):
            events = []
            for event in session.prompt("/ask a.txt"):
                events.append(event)
                if isinstance(event, PermissionRequest):
                    assert event.tool_call is not None and event.tool_call.title == "Read a.txt"
                    session.answer(event, allow=allow)
            answers = [e for e in events if isinstance(e, PermissionAnswer)]
            assert [(a.allowed, a.option_id) for a in answers] == [(allow, "allow" if allow else "reject")]
            assert _text(events) == reply

        turn = session.prompt("/sleep 60")
        with pytest.raises(AgentError, match="a turn is in progress"):
            session.prompt("too early")
        threading.Timer(0.5, session.cancel).start()
        assert list(turn)[-1] == TurnEnd(stop_reason="cancelled")
        assert _text(list(session.prompt("still here"))) == "mock: still here"

    access = client.access(request_id)
    result = client.status(request_id)
    assert access is not None and result is not None and result.server_id and result.session_id
    wrong = DaemonAccess(access.url, SecretStr("not-the-token"), access.headers)
    with pytest.raises(DaemonError, match="401"):
        SessionHandle(wrong, result.server_id, result.session_id)

    # The README's 'Following a session' example runs as written, with its client and request_id.
    exec(_readme_example(), {"client": client, "request_id": request_id})
    out = capsys.readouterr().out
    assert "[tool] Read README.md" in out
    assert "allowed: README.md" in out


def test_follow_needs_a_ready_session(celery_worker: WorkerProcess) -> None:
    """Following a request that has no ready session is a clear error on request_id."""
    with pytest.raises(InvalidRequest) as caught:
        SessionClient().follow("never-submitted")
    assert caught.value.field == "request_id"
