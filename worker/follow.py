"""Following a ready session from Python: more prompts, its events as typed models, permission answers, cancel.

sandbox-agent has no Python SDK; this is the part of one our users need. It speaks ACP to the agent process the
worker started (the session's ``server_id`` and ``session_id``) through the daemon, with the access the worker
hands out (:meth:`worker.client.SessionClient.access`)::

    with client.follow(request_id) as session:
        for event in session.prompt("add a test"):
            if isinstance(event, PermissionRequest):
                session.answer(event, allow=True)
            elif isinstance(event, MessageChunk):
                print(event.text, end="")

Everything in an event comes from the agent: untrusted text, to be escaped wherever it is shown.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from providers.base import Endpoint
from worker.access import DaemonAccess
from worker.acp import agent_error, approve_permissions, reject_permissions
from worker.daemon import DaemonClient, raise_for_problem
from worker.errors import AgentError


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


class MessageChunk(_Event):
    """A piece of the agent's reply."""

    type: Literal["message"] = "message"
    text: str


class ToolCall(_Event):
    """A tool call the agent started, or an update of one (same ``tool_call_id``): a later title or status."""

    type: Literal["tool_call"] = "tool_call"
    tool_call_id: str
    title: str | None = None
    kind: str | None = None
    status: str | None = None
    update: bool = False


class PermissionOption(_Event):
    option_id: str
    name: str = ""
    kind: str = ""


class PermissionRequest(_Event):
    """The agent asks before a tool call; the turn waits until :meth:`SessionHandle.answer`."""

    type: Literal["permission"] = "permission"
    id: str | int
    tool_call: ToolCall | None = None
    options: list[PermissionOption] = []


class PermissionAnswer(_Event):
    """The answer this client gave to a permission request."""

    type: Literal["permission_answer"] = "permission_answer"
    id: str | int
    allowed: bool
    option_id: str | None = None


class TurnEnd(_Event):
    """The prompt's turn is over: ``stop_reason`` is ``end_turn``, ``cancelled``, ``max_tokens``..."""

    type: Literal["turn_end"] = "turn_end"
    stop_reason: str | None = None
    usage: dict[str, int] | None = None


Event = Annotated[MessageChunk | ToolCall | PermissionRequest | PermissionAnswer | TurnEnd, Field(discriminator="type")]


def _tool_call(update: dict[str, Any], *, is_update: bool) -> ToolCall:
    return ToolCall(
        tool_call_id=str(update.get("toolCallId") or ""),
        title=update.get("title") if isinstance(update.get("title"), str) else None,
        kind=update.get("kind") if isinstance(update.get("kind"), str) else None,
        status=update.get("status") if isinstance(update.get("status"), str) else None,
        update=is_update,
    )


def parse_envelope(envelope: dict[str, Any], session_id: str) -> Event | None:
    """The event an agent→client envelope of ``session_id`` carries, or None (another session, a kind not followed)."""
    params: dict[str, Any] = envelope["params"] if isinstance(envelope.get("params"), dict) else {}
    if params.get("sessionId") != session_id:
        return None
    method = envelope.get("method")
    if method == "session/request_permission" and "id" in envelope:
        tool = params.get("toolCall")
        options = [
            PermissionOption(option_id=str(o.get("optionId")), name=str(o.get("name", "")), kind=str(o.get("kind", "")))
            for o in params.get("options") or []
            if isinstance(o, dict)
        ]
        call = _tool_call(tool, is_update=False) if isinstance(tool, dict) else None
        return PermissionRequest(id=envelope["id"], tool_call=call, options=options)
    update = params.get("update") if method == "session/update" else None
    if not isinstance(update, dict):
        return None
    kind = update.get("sessionUpdate")
    if kind == "agent_message_chunk":
        content = update.get("content") or {}
        if content.get("type") == "text" and isinstance(content.get("text"), str):
            return MessageChunk(text=content["text"])
    elif kind in ("tool_call", "tool_call_update"):
        return _tool_call(update, is_update=kind == "tool_call_update")
    return None


class SessionHandle:
    """A ready session's agent, driven over the daemon's ACP endpoint. One turn at a time; thread-safe answers.

    Events are read from the server's SSE stream, which first replays what the worker's own connection saw (the
    first prompt's turn): the handle sends a request the agent answers at once and waits for that answer; what came
    before it is history, not followed. A prompt starts by dropping what is left of the previous turn (its caller
    may have stopped reading it)."""

    def __init__(self, access: DaemonAccess, server_id: str, session_id: str, *, timeout: float = 30.0) -> None:
        self.server_id = server_id
        self.session_id = session_id
        headers = {name: value.get_secret_value() for name, value in access.headers.items()}
        self._client = DaemonClient(Endpoint(access.url, headers), access.token, timeout=timeout)
        self._path = f"/v1/acp/{server_id}"
        # Our request ids never collide with the worker connection's numbers (replayed on the stream).
        self._prefix = f"follow-{uuid.uuid4().hex[:8]}-"
        self._ids = itertools.count(1)
        self._events: queue.Queue[Event | BaseException] = queue.Queue()
        self._pending: dict[str, str] = {}  # our request id -> its kind ("barrier" or "prompt")
        self._permissions: dict[str | int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._posts = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"follow-{server_id}")
        self._synced = threading.Event()
        self._in_turn = threading.Event()
        self._lost: AgentError | None = None  # the stream or the agent is gone: nothing more will come
        self._reader = threading.Thread(target=self._read, name=f"follow-sse-{server_id}", daemon=True)
        self._reader.start()
        self._sync(timeout)

    def __enter__(self) -> SessionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop following; the agent keeps running (end the session with ``SessionClient.terminate``)."""
        self._stop.set()
        self._posts.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- what a caller does -------------------------------------------------------------------------------
    def prompt(self, text: str, *, timeout: float = 300.0) -> Iterator[Event]:
        """Send a prompt; iterate the result for the turn's events, ending with its :class:`TurnEnd`. Permission
        requests wait for :meth:`answer`; :meth:`cancel` (from another thread, or between events) ends the turn."""
        if self._lost is not None:
            raise self._lost
        if self._in_turn.is_set():
            raise AgentError("a turn is in progress: read it to its TurnEnd (or cancel it) first")
        self._in_turn.set()
        self._drain()
        params = {"sessionId": self.session_id, "prompt": [{"type": "text", "text": text}]}
        self._send("session/prompt", params, "prompt")
        return self._turn(timeout)

    def _turn(self, timeout: float) -> Iterator[Event]:
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise AgentError(f"session/prompt: no event within {timeout:g}s") from None
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, TurnEnd):
                return

    def answer(self, request: PermissionRequest | str | int, *, allow: bool) -> PermissionAnswer:
        """Allow or reject a permission request, or the one with this id (the first option of that kind the agent
        offered)."""
        ask_id = request.id if isinstance(request, PermissionRequest) else request
        with self._lock:
            params = self._permissions.pop(ask_id, None)
        if params is None:
            raise ValueError(f"permission request {ask_id!r} is unknown or already answered")
        result = (approve_permissions if allow else reject_permissions)(params)
        outcome = result["outcome"]
        answer = PermissionAnswer(id=ask_id, allowed=allow and "optionId" in outcome, option_id=outcome.get("optionId"))
        self._events.put(answer)  # before the agent hears it: the turn's events stay in order
        self._post({"jsonrpc": "2.0", "id": ask_id, "result": result})
        return answer

    def cancel(self) -> None:
        """Ask the agent to end the turn in progress (ACP ``session/cancel``); the turn then ends ``cancelled``."""
        self._post({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": self.session_id}})
        with self._lock:  # pending permission requests are answered 'cancelled', as ACP asks of a client
            waiting, self._permissions = self._permissions, {}
        for ask_id in waiting:
            self._post({"jsonrpc": "2.0", "id": ask_id, "result": {"outcome": {"outcome": "cancelled"}}})

    # -- the wire -------------------------------------------------------------------------------------------
    def _sync(self, timeout: float) -> None:
        """Send an unknown method, which every JSON-RPC peer answers at once (-32601) after everything it sent
        before, and wait for that answer on the stream. The POST itself says whether the daemon lets us in."""
        request_id = self._register("barrier")
        envelope = {"jsonrpc": "2.0", "id": request_id, "method": "_sandbox_worker/sync", "params": {}}
        try:
            self._post(envelope, timeout=timeout)
            if not self._synced.wait(timeout):
                raise AgentError(f"the agent of {self.server_id} did not answer within {timeout:g}s")
            if self._lost is not None:
                raise self._lost
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:
        while not self._events.empty():
            self._events.get_nowait()

    def _register(self, kind: str) -> str:
        request_id = f"{self._prefix}{next(self._ids)}"
        with self._lock:
            self._pending[request_id] = kind
        return request_id

    def _send(self, method: str, params: dict[str, Any], kind: str) -> None:
        request_id = self._register(kind)
        self._posts.submit(self._post_reply, {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})

    def _post(self, envelope: dict[str, Any], timeout: float = 30.0) -> httpx.Response:
        response = self._client.request(
            "POST",
            self._path,
            content=json.dumps(envelope),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            timeout=timeout,
        )
        raise_for_problem(response)
        return response

    def _post_reply(self, envelope: dict[str, Any]) -> None:
        """POST a request in the background: its reply comes on the stream; only a refused POST is reported here."""
        try:
            self._post(envelope, timeout=3600.0)
        except httpx.TimeoutException:
            pass
        except Exception as exc:
            self._in_turn.clear()
            self._events.put(exc)

    def _read(self) -> None:
        last_event_id: str | None = None
        while not self._stop.is_set():
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self._client.events(self._path, headers=headers, timeout=httpx.Timeout(10.0, read=1.0)) as events:
                    raise_for_problem(events.response)
                    for sse in events.iter_sse():
                        last_event_id = sse.id or last_event_id
                        self._dispatch(sse.data)
                        if self._stop.is_set():
                            return
            except httpx.ReadTimeout:
                continue
            except Exception as exc:
                if not self._stop.is_set():
                    self._lose(AgentError(f"lost the session's event stream: {type(exc).__name__}"))
                return

    def _lose(self, error: AgentError) -> None:
        self._lost = error
        self._events.put(error)
        self._synced.set()

    def _dispatch(self, data: str) -> None:
        try:
            envelope = json.loads(data)
        except ValueError:
            return
        if not isinstance(envelope, dict):
            return
        if envelope.get("method") is None and "id" in envelope:
            with self._lock:
                kind = self._pending.pop(envelope["id"], None) if isinstance(envelope["id"], str) else None
            if kind == "barrier":
                self._synced.set()
            elif kind == "prompt":
                self._end_turn(envelope)
            return
        if envelope.get("method") == "_adapter/agent_exited":
            self._lose(AgentError("the agent process exited"))
            return
        if not self._synced.is_set():
            return  # history: the worker's own turn, its permission requests answered already
        event = parse_envelope(envelope, self.session_id)
        if isinstance(event, PermissionRequest):
            with self._lock:
                self._permissions[event.id] = envelope["params"]
        if event is not None:
            self._events.put(event)

    def _end_turn(self, envelope: dict[str, Any]) -> None:
        if "error" in envelope:
            self._events.put(agent_error("session/prompt", envelope.get("error") or {}))
        else:
            result = envelope.get("result") or {}
            usage = result.get("usage") or (result.get("_meta") or {}).get("usage")
            counts = {k: v for k, v in usage.items() if isinstance(v, int)} if isinstance(usage, dict) else None
            self._events.put(TurnEnd(stop_reason=result.get("stopReason"), usage=counts))
        self._in_turn.clear()  # after the turn's last event is queued: the next prompt drops nothing of its own
