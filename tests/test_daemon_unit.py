"""Unit tests of the daemon client's pure logic: SSE framing, permission policies, problem mapping."""

from __future__ import annotations

import threading

import httpx
import pytest
from pydantic import SecretStr

from providers.base import Endpoint
from worker.daemon import (
    DaemonClient,
    _raise_for_problem,
    _sse_events,
    approve_permissions,
    reject_permissions,
)
from worker.errors import AgentError, DaemonError, DaemonUnhealthy, DaemonUnreachable

PERMISSION = {
    "options": [
        {"optionId": "reject", "name": "Reject", "kind": "reject_once"},
        {"optionId": "allow", "name": "Allow", "kind": "allow_once"},
    ]
}


def test_sse_frames_are_parsed_and_heartbeats_skipped() -> None:
    """Frames yield (id, data); comments and blank keep-alives yield nothing."""
    lines = [": heartbeat", "", "event: message", "id: 1", 'data: {"a":1}', "", "id: 2", "data: x", "data: y", ""]
    assert list(_sse_events(iter(lines), threading.Event())) == [("1", '{"a":1}'), ("2", "x\ny")]


def test_permission_policies_pick_the_right_option() -> None:
    """The headless policy approves, the strict one rejects, and no option means cancelled."""
    assert approve_permissions(PERMISSION) == {"outcome": {"outcome": "selected", "optionId": "allow"}}
    assert reject_permissions(PERMISSION) == {"outcome": {"outcome": "selected", "optionId": "reject"}}
    assert approve_permissions({"options": []}) == {"outcome": {"outcome": "cancelled"}}


@pytest.mark.parametrize(
    ("status", "kind", "error"),
    [
        (500, "install_failed", AgentError),
        (404, "agent_not_installed", AgentError),
        (502, "stream_error", DaemonUnreachable),
        (401, "token_invalid", DaemonError),
    ],
)
def test_problem_documents_map_to_errors(status: int, kind: str, error: type[Exception]) -> None:
    """RFC 7807 problems from the daemon become the matching error class."""
    response = httpx.Response(status, json={"type": f"urn:sandbox-agent:error:{kind}", "detail": "boom"})
    with pytest.raises(error, match="boom"):
        _raise_for_problem(response)


def test_client_sends_the_bearer_token_and_hides_it() -> None:
    """Every request carries `Authorization: Bearer`; the client's repr does not show the token."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json={"status": "ok"})

    client = DaemonClient(Endpoint("http://daemon"), SecretStr("tok-123456"), transport=httpx.MockTransport(handler))
    assert client.health()
    assert seen == ["Bearer tok-123456"]
    assert "tok-123456" not in repr(client)


def test_wait_healthy_gives_up_at_its_deadline() -> None:
    """A daemon answering 401 forever makes wait_healthy raise DaemonUnhealthy after the deadline."""
    client = DaemonClient(
        Endpoint("http://daemon"), SecretStr("t"), transport=httpx.MockTransport(lambda _r: httpx.Response(401))
    )
    with pytest.raises(DaemonUnhealthy):
        client.wait_healthy(0.3)
