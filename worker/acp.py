"""ACP (the Agent Client Protocol, JSON-RPC) spoken to one agent through the sandbox-agent daemon.

``POST /v1/acp/{server}`` sends an envelope (the first one, naming the agent, creates the server and its agent
process); everything the agent sends back arrives in order on the server's SSE stream ``GET /v1/acp/{server}``.
A POST can hang past the daemon's request timeout, so a reply is taken from whichever comes first. Permission
requests from the agent are answered at once by a policy, so a headless turn never waits for a human.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from worker.daemon import DaemonClient, raise_for_problem
from worker.errors import AgentError, DaemonUnreachable, LLMAuthFailed, LLMRateLimited
from worker.models import PermissionPolicy

PermissionAnswer = Callable[[dict[str, Any]], dict[str, Any]]


def approve_permissions(params: dict[str, Any]) -> dict[str, Any]:
    """Headless policy: pick the first 'allow' option, so a turn never blocks on a human."""
    options = params.get("options") or []
    for kind in ("allow_always", "allow_once"):
        for option in options:
            if option.get("kind") == kind:
                return {"outcome": {"outcome": "selected", "optionId": option["optionId"]}}
    return {"outcome": {"outcome": "cancelled"}}


def reject_permissions(params: dict[str, Any]) -> dict[str, Any]:
    for option in params.get("options") or []:
        if option.get("kind") in ("reject_once", "reject_always"):
            return {"outcome": {"outcome": "selected", "optionId": option["optionId"]}}
    return {"outcome": {"outcome": "cancelled"}}


# Seconds a reply that came in a POST body waits for its copy on the event stream (and the text before it).
STREAM_CATCH_UP = 5.0

# Consecutive failures to (re)open the event stream, ~0.1 s apart, before the daemon counts as lost.
STREAM_FAILURES = 20

# The event stream's read timeout is how often its reader looks at the stop flag.
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=1.0)

# Threads for the POSTs of every ACP connection in the process, kept between sessions: a thread started per
# connection put its start-up handshake on each bring-up's path. A thread is added only when none is idle; a POST
# the daemon holds keeps its thread until its timeout, as it kept a thread of its own before.
POST_THREADS = 64


@functools.cache
def _posts() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=POST_THREADS, thread_name_prefix="acp-post")


# A forked worker process (Celery's prefork children) starts its own threads.
os.register_at_fork(after_in_child=_posts.cache_clear)

PERMISSION_ANSWERS: dict[PermissionPolicy, PermissionAnswer] = {
    PermissionPolicy.approve: approve_permissions,
    PermissionPolicy.reject: reject_permissions,
}

# How the agents word an LLM API's refusal of their key, or its rate limit, in a JSON-RPC error (message or data).
_AUTH_FAILED = re.compile(r"\b401\b|unauthori[sz]ed|invalid (x-)?api[ -]key|authentication (required|failed)", re.I)
_RATE_LIMITED = re.compile(r"\b429\b|rate[ _]limit|too many requests", re.I)


def agent_error(method: str, error: dict[str, Any]) -> AgentError:
    """The error class of a JSON-RPC error from the agent: an LLM API's 401 or 429 gets a code of its own."""
    message = f"{method} failed: [{error.get('code')}] {error.get('message')}"
    data = error.get("data")
    detail = json.dumps(data) if data is not None else ""
    if _AUTH_FAILED.search(message) or _AUTH_FAILED.search(detail):
        return LLMAuthFailed(f"the LLM API refused the credential ({message})")
    if _RATE_LIMITED.search(message) or _RATE_LIMITED.search(detail):
        return LLMRateLimited(f"the LLM API rate-limited the session ({message})")
    return AgentError(message)


@dataclass
class Turn:
    """What one prompt produced: the agent's text, why the turn ended, token usage and the tool calls made."""

    text: str = ""
    stop_reason: str | None = None
    usage: dict[str, int] | None = None
    tool_calls: list[str] = field(default_factory=list)
    _call_index: dict[str, int] = field(default_factory=dict, repr=False)

    def note_tool_call(self, update: dict[str, Any]) -> None:
        """A tool call, or an update of one: its title is what it did. Claude Code titles a call generically
        ("Terminal") and puts the command in a later update; Codex titles it with the command."""
        call_id = str(update.get("toolCallId") or len(self.tool_calls))
        title = update.get("title")
        if call_id not in self._call_index:
            self._call_index[call_id] = len(self.tool_calls)
            self.tool_calls.append(str(title or update.get("kind") or "tool"))
        elif title:
            self.tool_calls[self._call_index[call_id]] = str(title)


@dataclass
class _Inbox:
    """Envelopes from the agent, by JSON-RPC id, plus the text chunks of each session."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    responses: dict[Any, dict[str, Any]] = field(default_factory=dict)
    turns: dict[str, Turn] = field(default_factory=dict)  # the turn in progress per session
    text: dict[str, list[str]] = field(default_factory=dict)
    exited: dict[str, Any] | None = None
    lost: str | None = None  # why the stream cannot be reopened (the daemon or its sandbox is gone)
    last_event_id: str | None = None


class AcpConnection:
    """One ACP server (one agent process) on the daemon, driven over HTTP with replies read from SSE."""

    def __init__(
        self,
        client: DaemonClient,
        server_id: str,
        agent: str,
        *,
        permissions: PermissionPolicy = PermissionPolicy.approve,
    ) -> None:
        self.client = client
        self.server_id = server_id
        self.agent = agent
        self.permissions = PERMISSION_ANSWERS[permissions]
        self._ids = itertools.count(1)
        self._inbox = _Inbox()
        self._sent: set[Future[httpx.Response | None]] = set()  # POSTs not done yet
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._path = f"/v1/acp/{server_id}"

    # -- life cycle -------------------------------------------------------------------------------------
    def __enter__(self) -> AcpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def detach(self) -> None:
        """Stop reading; the agent keeps running for whoever connects next."""
        self._stop.set()
        for future in self._sent.copy():
            future.cancel()  # those not started yet
        # The reader is not joined: it sees the flag within its one-second read timeout, or at once when the
        # caller closes the client under it.

    # -- requests ---------------------------------------------------------------------------------------
    def initialize(self, timeout: float, *, boot: float = 0.0, poll: float | None = None) -> dict[str, Any]:
        """The server's first request. ``boot``: the daemon was just started, and this is the first request it gets,
        sent again while it does not answer for up to ``boot`` seconds (DaemonClient.first_request), every ``poll``
        seconds if given: a health probe before it would cost a request more."""
        params = {"protocolVersion": 1, "clientInfo": {"name": "sandbox-worker", "version": "1"}}
        # The first POST creates the server and must name the agent; the SSE stream exists only after it, so the
        # reply can come only in the POST's body.
        query = {"agent": self.agent}
        result = self.request("initialize", params, timeout=timeout, query=query, inline=True, boot=boot, poll=poll)
        self._reader = threading.Thread(target=self._read_events, name=f"acp-sse-{self.server_id}", daemon=True)
        self._reader.start()
        return result

    def attach(self, requests_before: int = 1) -> None:
        """Drive a server another connection created and initialized (a warm pool's agent) instead of
        :meth:`initialize`: read its stream, and number this connection's requests after the ``requests_before`` that
        connection sent, so a replayed old reply is never taken for a new one."""
        self._ids = itertools.count(requests_before + 1)
        self._reader = threading.Thread(target=self._read_events, name=f"acp-sse-{self.server_id}", daemon=True)
        self._reader.start()

    def new_session(self, cwd: str, timeout: float) -> str:
        result = self.request("session/new", {"cwd": cwd, "mcpServers": []}, timeout=timeout)
        session_id = result.get("sessionId")
        if not isinstance(session_id, str) or not session_id:
            raise AgentError(f"agent {self.agent} returned no sessionId from session/new")
        return session_id

    def set_mode(self, session_id: str, mode: str, timeout: float) -> None:
        try:
            self.request("session/set_mode", {"sessionId": session_id, "modeId": mode}, timeout=timeout)
        except AgentError as exc:
            if "-32601" not in str(exc):
                raise
            self.request(
                "session/set_config_option",
                {"sessionId": session_id, "configId": "mode", "value": mode},
                timeout=timeout,
            )

    def set_model(self, session_id: str, model: str, timeout: float) -> None:
        self.request(
            "session/set_config_option", {"sessionId": session_id, "configId": "model", "value": model}, timeout=timeout
        )

    def authenticate(self, method_id: str, timeout: float) -> None:
        self.request("authenticate", {"methodId": method_id}, timeout=timeout)

    def prompt(self, session_id: str, text: str, timeout: float) -> Turn:
        """Send a prompt and return what the agent did in this turn."""
        with self._inbox.lock:
            self._inbox.turns[session_id], self._inbox.text[session_id] = Turn(), []
        try:
            result = self.request(
                "session/prompt",
                {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]},
                timeout=timeout,
                from_stream=True,
            )
        finally:
            with self._inbox.lock:
                turn = self._inbox.turns.pop(session_id)
                turn.text = "".join(self._inbox.text.pop(session_id))
        turn.stop_reason = result.get("stopReason")
        usage = result.get("usage") or (result.get("_meta") or {}).get("usage")
        if isinstance(usage, dict):
            turn.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        if turn.stop_reason not in (None, "end_turn", "max_tokens", "max_turn_requests"):
            raise AgentError(f"turn ended with stopReason {turn.stop_reason!r}")
        return turn

    def request(
        self,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float,
        query: Mapping[str, str] | None = None,
        from_stream: bool = False,
        inline: bool = False,
        boot: float = 0.0,
        poll: float | None = None,
    ) -> dict[str, Any]:
        """Send a JSON-RPC request; the reply is taken from the POST body or the event stream, whichever comes
        first. ``from_stream`` waits for the stream's copy as well (briefly, when the POST was first): the stream
        is ordered, so everything the agent sent before its reply (the turn's text) has then arrived too.
        ``inline`` POSTs from this thread, where the reply can come only in the POST's body; ``boot`` and ``poll``
        as :meth:`initialize` takes them."""
        request_id = next(self._ids)
        envelope = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        future = self._submit(envelope, query, timeout, inline=inline, boot=boot, poll=poll)
        deadline = time.monotonic() + timeout
        with self._inbox.lock:
            while True:
                if request_id in self._inbox.responses:
                    reply = self._inbox.responses.pop(request_id)
                    break
                if future.done():
                    body = self._post_result(future, method)
                    if body is not None:
                        reply = body
                        if from_stream:
                            self._await_streamed(request_id, STREAM_CATCH_UP)
                        break
                if self._inbox.exited is not None:
                    raise AgentError(f"agent {self.agent} exited during {method} ({self._inbox.exited})")
                if self._inbox.lost is not None:
                    raise DaemonUnreachable(f"lost the daemon during {method}: {self._inbox.lost}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentError(f"{method} got no reply within {timeout:g}s")
                self._inbox.lock.wait(min(remaining, 0.1))
        if "error" in reply:
            raise agent_error(method, reply["error"] or {})
        result: dict[str, Any] = reply.get("result") or {}
        return result

    def _await_streamed(self, request_id: int, seconds: float) -> None:
        """With the inbox lock held: wait until the stream delivered the reply to ``request_id`` (then drop it)."""
        deadline = time.monotonic() + seconds
        while request_id not in self._inbox.responses and self._inbox.lost is None and self._inbox.exited is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._inbox.lock.wait(min(remaining, 0.1))
        self._inbox.responses.pop(request_id, None)

    def _post_result(self, future: Future[httpx.Response | None], method: str) -> dict[str, Any] | None:
        try:
            response = future.result()
        except httpx.TimeoutException:
            return None  # the reply will come on SSE
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"{method}: {type(exc).__name__}") from exc
        if response is None or response.status_code == 202 or not response.content:
            return None
        raise_for_problem(response)
        body: dict[str, Any] = response.json()
        return body

    def _submit(
        self,
        envelope: dict[str, Any],
        query: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        *,
        inline: bool = False,
        boot: float = 0.0,
        poll: float | None = None,
    ) -> Future[httpx.Response | None]:
        """POST ``envelope`` on the process's POST threads (:meth:`detach` cancels it if it has not started), or from
        this thread when ``inline`` (to a daemon just started when ``boot``), done when this returns."""
        if self._stop.is_set():
            raise RuntimeError(f"the ACP connection to {self.server_id} is detached")
        if inline:
            done: Future[httpx.Response | None] = Future()
            try:
                done.set_result(self._post(envelope, query, timeout, boot=boot, poll=poll))
            except Exception as exc:  # as a POST thread's future holds it, for _post_result to classify
                done.set_exception(exc)
            return done
        future = _posts().submit(self._post, envelope, query, timeout)
        self._sent.add(future)
        future.add_done_callback(self._sent.discard)
        return future

    def _post(
        self,
        envelope: dict[str, Any],
        query: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        *,
        boot: float = 0.0,
        poll: float | None = None,
    ) -> httpx.Response | None:
        # The query goes in the path: httpx would parse the URL twice more to merge it in.
        path = f"{self._path}?{urllib.parse.urlencode(query)}" if query else self._path
        post: dict[str, Any] = {
            "content": json.dumps(envelope),
            "headers": {"Content-Type": "application/json", "Accept": "application/json"},
            "timeout": timeout,
        }
        try:
            if boot:
                return self.client.first_request("POST", path, boot=boot, poll=poll, **post)
            return self.client.request("POST", path, **post)
        finally:
            with self._inbox.lock:
                self._inbox.lock.notify_all()

    # -- the event stream -------------------------------------------------------------------------------
    def _read_events(self) -> None:
        failures = 0
        while not self._stop.is_set() and self._inbox.exited is None:
            headers: dict[str, str] = {}
            if self._inbox.last_event_id:
                headers["Last-Event-ID"] = self._inbox.last_event_id
            problem = None
            try:
                with self.client.events(self._path, headers=headers, timeout=_STREAM_TIMEOUT) as events:
                    if events.response.status_code == 200:
                        failures = 0
                        for event in events.iter_sse():
                            if self._stop.is_set():
                                break
                            self._inbox.last_event_id = event.id or self._inbox.last_event_id
                            self._dispatch(event.data)
                    else:
                        problem = f"event stream answered {events.response.status_code}"
            except httpx.ReadTimeout:
                continue  # no event in the last second: look at the stop flag and resume from Last-Event-ID
            except Exception as exc:  # a closed client or a broken stream: resume unless we were told to stop
                problem = f"event stream failed: {type(exc).__name__}"
            if problem is None or self._stop.is_set():
                continue
            failures += 1
            if failures >= STREAM_FAILURES:
                with self._inbox.lock:
                    self._inbox.lost = problem
                    self._inbox.lock.notify_all()
                return
            time.sleep(0.1)

    def _note_update(self, params: dict[str, Any]) -> None:
        """With the inbox lock held: add a session update to the turn in progress (its text, its tool calls)."""
        session_id = params.get("sessionId", "")
        update = params.get("update") or {}
        kind = update.get("sessionUpdate")
        if kind == "agent_message_chunk" and session_id in self._inbox.text:
            content = update.get("content") or {}
            if content.get("type") == "text":
                self._inbox.text[session_id].append(content.get("text", ""))
        elif kind in ("tool_call", "tool_call_update") and session_id in self._inbox.turns:
            self._inbox.turns[session_id].note_tool_call(update)
            text = self._inbox.text[session_id]
            if kind == "tool_call" and text and not text[-1].endswith("\n"):
                text.append("\n\n")  # the text before a tool call and the text after it are separate messages

    def _dispatch(self, data: str) -> None:
        try:
            envelope = json.loads(data)
        except ValueError:
            return
        method = envelope.get("method")
        with self._inbox.lock:
            if method is None and "id" in envelope:
                self._inbox.responses[envelope["id"]] = envelope
            elif method == "session/update":
                self._note_update(envelope.get("params") or {})
            elif method == "_adapter/agent_exited":
                self._inbox.exited = envelope.get("params") or {}
            self._inbox.lock.notify_all()
        if method == "session/request_permission" and "id" in envelope:
            answer = self.permissions(envelope.get("params") or {})
            self._submit({"jsonrpc": "2.0", "id": envelope["id"], "result": answer})
