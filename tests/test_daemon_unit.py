"""Unit tests of the daemon client and the ACP connection: permission policies, problem mapping, replies."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from providers.base import Endpoint, ExecResult, Sandbox, SandboxSpec
from providers.fake import FakeProvider, StandInDaemons
from tests.conftest import wait_for
from tests.standins.server import ThreadedServer
from worker import pins
from worker.acp import AcpConnection, Turn, agent_error, approve_permissions, reject_permissions
from worker.daemon import (
    FRONT_PATH,
    DaemonClient,
    agent_pinned,
    check_agent,
    check_daemon,
    front_script,
    put_daemon,
    raise_for_problem,
)
from worker.daemon import _proxies as proxies_of_the_process
from worker.errors import AgentError, DaemonError, DaemonUnhealthy, DaemonUnreachable
from worker.models import InstallMode

pytest_plugins = ["tests.standins.fake_fixtures"]

PERMISSION = {
    "options": [
        {"optionId": "reject", "name": "Reject", "kind": "reject_once"},
        {"optionId": "allow", "name": "Allow", "kind": "allow_once"},
    ]
}


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
        raise_for_problem(response)


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


def test_a_first_request_waits_for_the_daemon_then_is_sent_once() -> None:
    """A daemon just started is refused, cut off, then fronted by 502 and the replaced daemon's 401: the first request
    is sent again through all of them and returns the answer; once answered it is not sent again."""
    before = [httpx.ConnectError("refused"), httpx.RemoteProtocolError("cut off"), 502, 401, 503]
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.content.decode())
        if before:
            status = before.pop(0)
            if isinstance(status, Exception):
                raise status
            return httpx.Response(status)
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": 1, "result": {}})

    client = DaemonClient(Endpoint("http://daemon"), SecretStr("t"), transport=httpx.MockTransport(handler))
    response = client.first_request("POST", "/v1/acp/s", boot=10, poll=0.01, content="first")
    assert response.status_code == 200 and sent == ["first"] * 6


@pytest.mark.parametrize(
    ("answer", "error"), [(httpx.ReadTimeout("no answer"), httpx.ReadTimeout), (400, None), (500, None)]
)
def test_a_first_request_the_daemon_took_is_not_sent_again(answer: Any, error: type[Exception] | None) -> None:
    """A daemon that took the request and did not answer in time, or answered it with an error of its own, is up:
    the request is not sent again."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer)

    client = DaemonClient(Endpoint("http://daemon"), SecretStr("t"), transport=httpx.MockTransport(handler))
    if error is not None:
        with pytest.raises(error):
            client.first_request("POST", "/v1/acp/s", boot=10, poll=0.01)
    else:
        assert client.first_request("POST", "/v1/acp/s", boot=10, poll=0.01).status_code == answer
    assert len(sent) == 1


def test_a_first_request_to_a_daemon_that_never_answers_gives_up_at_its_deadline() -> None:
    client = DaemonClient(
        Endpoint("http://daemon"), SecretStr("t"), transport=httpx.MockTransport(lambda _r: httpx.Response(502))
    )
    started = time.monotonic()
    with pytest.raises(DaemonUnhealthy, match=r"after 0\.3s"):
        client.first_request("GET", "/v1/acp/s", boot=0.3)
    assert time.monotonic() - started < 5


def _acp_transport(stream_delay: float) -> httpx.MockTransport:
    """A daemon whose POST replies at once while the event stream (chunks, then the reply) lags behind."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = json.loads(request.content)
            result = {"sessionId": "s1"} if body["method"] == "session/new" else {"stopReason": "end_turn"}
            if body["method"] == "initialize":
                result = {"protocolVersion": 1}
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"], "result": result})

        def events() -> Iterator[bytes]:
            time.sleep(stream_delay)
            yield b": heartbeat\n\n"  # comments are keep-alives, not events
            for n, text in enumerate(["mock: ", "hello"], start=1):
                update = {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": text}}
                envelope = {
                    "jsonrpc": "2.0",
                    "method": "session/update",
                    "params": {"sessionId": "s1", "update": update},
                }
                yield f"id: {n}\ndata: {json.dumps(envelope)}\n\n".encode()
            reply = {"jsonrpc": "2.0", "id": 3, "result": {"stopReason": "end_turn"}}
            yield f"id: 3\ndata: {json.dumps(reply)}\n\n".encode()
            time.sleep(5)

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    return httpx.MockTransport(handler)


def test_prompt_reply_waits_for_the_ordered_event_stream() -> None:
    """A prompt whose POST answers before the stream delivers the text still returns the whole text."""
    client = DaemonClient(Endpoint("http://daemon"), SecretStr("t"), transport=_acp_transport(stream_delay=0.5))
    acp = AcpConnection(client, "srv", "mock")
    try:
        acp.initialize(timeout=5)
        session_id = acp.new_session("/workspace", timeout=5)
        assert acp.prompt(session_id, "hello", timeout=10).text == "mock: hello"
    finally:
        acp.detach()
        client.close()


def test_a_turn_names_each_tool_call_by_its_latest_title() -> None:
    """Claude Code titles a Bash call "Terminal" and puts the command in an update; each call is listed once."""
    turn = Turn()
    turn.note_tool_call({"sessionUpdate": "tool_call", "toolCallId": "a", "title": "Terminal", "kind": "execute"})
    turn.note_tool_call({"sessionUpdate": "tool_call_update", "toolCallId": "a", "title": "echo hi > file.txt"})
    turn.note_tool_call({"sessionUpdate": "tool_call_update", "toolCallId": "a", "status": "completed"})
    turn.note_tool_call({"sessionUpdate": "tool_call", "toolCallId": "b", "kind": "read"})
    assert turn.tool_calls == ["echo hi > file.txt", "read"]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"message": "Internal error: Invalid API key · Fix external API key"}, "llm_auth_failed"),
        ({"message": "Internal error", "data": {"message": "unexpected status 401 Unauthorized"}}, "llm_auth_failed"),
        ({"message": "Internal error: API Error: 429 rate_limit_error"}, "llm_rate_limited"),
        ({"message": "Internal error: something else"}, "agent_error"),
    ],
)
def test_llm_refusals_get_codes_of_their_own(data: dict[str, object], code: str) -> None:
    """The agents' wording of an LLM API's 401 or 429 (message or data) becomes a stable error code."""
    assert agent_error("session/prompt", {"code": -32603, **data}).code == code


class _Images(FakeProvider):
    """A fake whose images answer the daemon's check with the outputs given, one per check, and counts the calls."""

    def __init__(self, daemons: StandInDaemons, *outputs: str) -> None:
        super().__init__(daemons=daemons)
        self.outputs = list(outputs)

    def exec(self, sandbox: Sandbox, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        if "--version" in argv or (argv[:2] == ["sh", "-c"] and "--version" in argv[2]):
            self._call("exec")
            return ExecResult(0, self.outputs.pop(0), "")
        return super().exec(sandbox, argv, **kwargs)


def test_a_preinstalled_daemon_and_its_front_are_checked_once_per_image(daemons: StandInDaemons) -> None:
    """The pinned version and the image's front are asked of an image's first sandbox only; a mismatched version is
    never remembered as pinned; an image whose front is not the worker's gets the worker's in each sandbox."""
    pinned = f"sandbox-agent {pins.SANDBOX_AGENT_VERSION}\n"
    ours = front_script().decode()
    provider = _Images(daemons, "sandbox-agent 0.0.1\n", pinned + ours, pinned + "an older front\n")
    spec = SandboxSpec(image=None, labels={}, env={})
    first, second, third = provider.start(spec), provider.start(spec), provider.start(spec)
    image, binary = uuid.uuid4().hex, Path("/nonexistent")
    with pytest.raises(DaemonError, match="is not sandbox-agent"):
        put_daemon(provider, first, InstallMode.preinstalled, binary, image=image)
    put_daemon(provider, first, InstallMode.preinstalled, binary, image=image)
    put_daemon(provider, second, InstallMode.preinstalled, binary, image=image)
    assert provider.calls.count("exec") == 2
    assert provider.calls.count("upload") == 0  # the image's front is the worker's

    older = uuid.uuid4().hex
    put_daemon(provider, second, InstallMode.preinstalled, binary, image=older)
    put_daemon(provider, third, InstallMode.preinstalled, binary, image=older)
    assert provider.calls.count("exec") == 3
    assert provider.files[third.sandbox_id][FRONT_PATH] == ours.encode()
    assert provider.calls.count("upload") == 2

    provider.outputs.append(pinned)
    check_daemon(provider, third)  # an uploaded daemon: always asked
    assert provider.calls.count("exec") == 4


def test_a_preinstalled_agent_is_checked_once_per_image() -> None:
    """An agent found at its pin in an image is not asked of that image's next sandboxes; one not installed is never
    remembered, and without an image (an uploaded daemon) it is always asked."""
    asked: list[str] = []
    installed = {"mock": False}

    def handler(request: httpx.Request) -> httpx.Response:
        agent = request.url.path.rsplit("/", 1)[-1]
        asked.append(agent)
        return httpx.Response(200, json={"id": agent, "installed": installed[agent], "version": "builtin"})

    client = DaemonClient(Endpoint("http://daemon"), SecretStr("t"), transport=httpx.MockTransport(handler))
    image = f"fake:{uuid.uuid4().hex}"
    with pytest.raises(AgentError, match="not installed"):
        check_agent(client, "mock", image=image)
    assert not agent_pinned("mock", image=image)
    installed["mock"] = True
    check_agent(client, "mock", image=image)
    check_agent(client, "mock", image=image)
    assert asked == ["mock", "mock"]
    assert agent_pinned("mock", image=image) and not agent_pinned("mock", image=None)
    check_agent(client, "mock")
    assert len(asked) == 3


def _cookie_and_stream_app() -> Starlette:
    """A daemon that sets a cookie on every answer, echoes what it was sent, and streams events that never end."""

    async def echo(request: Request) -> Response:
        seen = {"authorization": request.headers.get("authorization"), "cookie": request.headers.get("cookie")}
        response = JSONResponse(seen)
        response.set_cookie("edge", "sticky")
        return response

    async def events(_request: Request) -> Response:
        async def forever() -> AsyncIterator[bytes]:
            yield b"id: 1\ndata: {}\n\n"
            await asyncio.sleep(3600)

        return StreamingResponse(forever(), media_type="text/event-stream")

    return Starlette(routes=[Route("/d/{daemon}/v1/echo", echo), Route("/d/{daemon}/v1/events", events)])


def test_daemon_clients_share_a_connection_pool_but_no_token_or_cookie() -> None:
    """Clients of different daemons in one process send each its own token, never a cookie another daemon (or its
    edge) set, and closing one leaves the others working."""
    with ThreadedServer(_cookie_and_stream_app()) as server:
        first = DaemonClient(Endpoint(f"{server.url}/d/a"), SecretStr("token-a"))
        second = DaemonClient(Endpoint(f"{server.url}/d/b"), SecretStr("token-b"))
        assert first.get_json("/v1/echo") == {"authorization": "Bearer token-a", "cookie": None}
        first.close()
        assert second.get_json("/v1/echo") == {"authorization": "Bearer token-b", "cookie": None}
        assert second.get_json("/v1/echo")["cookie"] is None
        second.close()
        with pytest.raises(RuntimeError, match="closed"):
            second.get_json("/v1/echo")


def test_daemon_requests_take_the_environments_proxy_unless_no_proxy_names_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As an httpx client would: ``HTTP_PROXY`` carries a daemon's requests (this proxy answers them itself), and
    ``NO_PROXY`` sends those to the hosts it names direct (here: to nothing listening)."""
    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
        monkeypatch.setenv("NO_PROXY", "direct.invalid")
        proxies_of_the_process.cache_clear()  # read once per process: this one's environment now
        assert DaemonClient(Endpoint("http://daemon.invalid:2468"), SecretStr("t")).health()
        assert seen == ["http://daemon.invalid:2468/v1/health"]
        assert not DaemonClient(Endpoint("http://direct.invalid:2468"), SecretStr("t")).health()
        assert seen == ["http://daemon.invalid:2468/v1/health"]
    finally:
        proxy.shutdown()
        proxy.server_close()
        monkeypatch.undo()
        proxies_of_the_process.cache_clear()


def test_closing_a_client_ends_its_event_stream_at_once() -> None:
    """A reader blocked on an event stream with nothing to read is woken when its client closes, long before its
    read timeout: the stream does not linger in the shared pool."""
    with ThreadedServer(_cookie_and_stream_app()) as server:
        client = DaemonClient(Endpoint(f"{server.url}/d/a"), SecretStr("t"))
        got: list[str] = []
        ended = threading.Event()

        def read() -> None:
            try:
                with client.events("/v1/events", timeout=httpx.Timeout(10.0, read=600.0)) as events:
                    for event in events.iter_sse():
                        got.append(event.id)
            except httpx.TransportError:
                pass
            finally:
                ended.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: got == ["1"], timeout=10)
        client.close()
        assert ended.wait(timeout=60)  # the read timeout is ten minutes


def test_a_detached_connection_sends_nothing_more() -> None:
    """POSTs run on threads shared by the process's connections: one detached sends no request after it."""
    posted: list[str] = []
    inner = _acp_transport(stream_delay=0.0)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posted.append(json.loads(request.content)["method"])
        return inner.handle_request(request)

    client = DaemonClient(Endpoint("http://daemon"), SecretStr("t"), transport=httpx.MockTransport(handler))
    acp = AcpConnection(client, "srv", "mock")
    try:
        acp.initialize(timeout=5)
        acp.detach()
        with pytest.raises(RuntimeError, match="detached"):
            acp.new_session("/workspace", timeout=5)
        assert posted == ["initialize"]
    finally:
        client.close()
