"""The sandbox-agent daemon: putting it in a sandbox, starting it, and speaking its HTTP API.

Facts this module relies on (verified against 0.4.2, see docs/architecture.md):

* ``--token`` protects every ``/v1`` route, ``/v1/health`` included; the probe must send it.
* The daemon hands its own environment to the agent, so credentials are set when it starts.
* Sessions are ACP JSON-RPC over ``POST /v1/acp/{server}``; replies also arrive on the SSE stream, and a
  POST can hang past the daemon's request timeout, so a reply is taken from whichever comes first.
* ``DELETE /v1/acp/{server}`` never returns while the agent lives, so sessions are ended by removing the
  sandbox, or by restarting the daemon (:func:`stop_daemon`), never by DELETE.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import structlog
from pydantic import SecretStr
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from providers.base import Endpoint, Provider, Sandbox
from worker import pins
from worker.errors import AgentError, DaemonError, DaemonUnhealthy, DaemonUnreachable
from worker.models import InstallMode

log = structlog.get_logger(__name__)

DAEMON_PATH = "/usr/local/bin/sandbox-agent"
DAEMON_LOG = "/tmp/sandbox-agent.log"  # noqa: S108 - a path inside the sandbox, not on the worker
AGENT_PROCESS_DIR = "/root/.local/share/sandbox-agent/bin/agent_processes"
MOCK_AGENT_ASSET = "mock-acp"


def new_token() -> SecretStr:
    return SecretStr(secrets.token_urlsafe(32))


def mock_agent_script() -> bytes:
    """The stand-in ACP agent shipped with the worker (installed as the ``mock`` agent's process)."""
    return resources.files("worker").joinpath("assets", MOCK_AGENT_ASSET).read_bytes()


# --------------------------------------------------------------------------------------------------------
# Installing and starting the daemon inside a sandbox


def install_daemon(provider: Provider, sandbox: Sandbox, mode: InstallMode, binary: Path) -> None:
    """Make sure the pinned daemon is in the sandbox: upload the static binary, or check the image has it."""
    if mode is InstallMode.upload:
        if not binary.is_file():
            raise DaemonError(f"daemon binary not found on the worker at {binary} (run scripts/setup.sh)")
        provider.upload(sandbox, DAEMON_PATH, binary.read_bytes(), mode=0o755)
    version = provider.exec(sandbox, [DAEMON_PATH, "--version"], timeout=30)
    expected = f"sandbox-agent {pins.SANDBOX_AGENT_VERSION}"
    if not version or not version.stdout.strip().startswith(expected):
        found = (version.stdout or version.stderr).strip()[:200] or f"exit code {version.exit_code}"
        raise DaemonError(f"{DAEMON_PATH} in the sandbox is not {expected} ({found})")


def install_agent(provider: Provider, sandbox: Sandbox, agent: str, mode: InstallMode) -> None:
    """Install the agent the session runs. ``mock`` is our stand-in ACP agent; the others use the
    daemon's installer, which needs internet in the sandbox unless the image already has them."""
    if agent == "mock":
        if mode is InstallMode.upload:
            provider.upload(sandbox, f"{AGENT_PROCESS_DIR}/mock-acp", mock_agent_script(), mode=0o755)
        return
    result = provider.exec(sandbox, [DAEMON_PATH, "install-agent", agent], timeout=300)
    if not result:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"exit code {result.exit_code}"]
        raise AgentError(f"installing agent {agent} failed: {detail[0][:300]}")


def start_daemon(
    provider: Provider,
    sandbox: Sandbox,
    *,
    token: SecretStr,
    port: int,
    cwd: str,
    env: Mapping[str, SecretStr | str],
) -> None:
    """Start ``sandbox-agent server`` from the workspace with the session's environment."""
    process_env = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in env.items()}
    process_env.update(
        SANDBOX_AGENT_LOG_STDOUT="1",
        # Fail fast instead of a silent implicit install on the first ACP POST.
        SANDBOX_AGENT_REQUIRE_PREINSTALL="1",
    )
    argv = [
        DAEMON_PATH, "server", "--no-telemetry", "--host", "0.0.0.0", "--port", str(port),  # noqa: S104
        f"--token={token.get_secret_value()}",  # "=": a token may start with "-"
    ]  # fmt: skip
    provider.spawn(sandbox, argv, env=process_env, cwd=cwd, log_path=DAEMON_LOG)


# Stops every `sandbox-agent server` in the sandbox (its agents exit with it) and waits for it to go, so a new one
# can bind the port. Plain sh and /proc: minimal images have no procps.
_STOP_DAEMON = r"""
pids() { for p in /proc/[0-9]*; do
  case "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" in "$0 server"*) echo "${p#/proc/}";; esac; done; }
for pid in $(pids); do kill -TERM "$pid" 2>/dev/null; done
for _ in $(seq 50); do [ -z "$(pids)" ] && exit 0; sleep 0.1; done
for pid in $(pids); do kill -KILL "$pid" 2>/dev/null; done
"""


def stop_daemon(provider: Provider, sandbox: Sandbox) -> None:
    """End the daemon a previous attempt started, so the session's daemon starts with this attempt's
    environment (credentials may differ: a vault placeholder is per grant)."""
    result = provider.exec(sandbox, ["sh", "-c", _STOP_DAEMON, DAEMON_PATH], timeout=30)
    if not result:
        raise DaemonError(f"could not stop the previous daemon (exit code {result.exit_code})")


def daemon_log_tail(provider: Provider, sandbox: Sandbox, lines: int = 15) -> str:
    """The end of the daemon's log, for error messages. Best effort."""
    try:
        result = provider.exec(sandbox, ["tail", "-n", str(lines), DAEMON_LOG], timeout=10)
    except Exception:
        return ""
    return result.stdout.strip()


# --------------------------------------------------------------------------------------------------------
# HTTP client


class DaemonClient:
    """A small httpx client for one daemon. The token is sent as ``Authorization: Bearer``."""

    def __init__(
        self,
        endpoint: Endpoint,
        token: SecretStr,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        headers = {**endpoint.headers, "Authorization": f"Bearer {token.get_secret_value()}"}
        self.http = httpx.Client(
            base_url=endpoint.url, headers=headers, timeout=timeout, transport=transport, follow_redirects=False
        )

    def __repr__(self) -> str:
        return f"DaemonClient({self.endpoint.url!r})"

    def close(self) -> None:
        self.http.close()

    def health(self) -> bool:
        try:
            response = self.http.get("/v1/health", timeout=5)
        except httpx.TransportError:
            return False
        return response.status_code == 200 and response.json().get("status") == "ok"

    def wait_healthy(self, timeout: float) -> float:
        """Poll ``/v1/health`` until it answers ok; returns the seconds it took."""
        started = time.monotonic()

        class _NotYet(Exception):
            pass

        def probe() -> None:
            if not self.health():
                raise _NotYet

        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(_NotYet),
                wait=wait_exponential(multiplier=0.02, max=0.5),
                stop=stop_after_delay(timeout),
                reraise=True,
            ):
                with attempt:
                    probe()
        except _NotYet:
            raise DaemonUnhealthy(f"daemon not healthy after {timeout:g}s at {self.endpoint.url}") from None
        return time.monotonic() - started

    def get_json(self, path: str, **params: Any) -> Any:
        try:
            response = self.http.get(path, params=params)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"GET {path}: {type(exc).__name__}") from exc
        _raise_for_problem(response)
        return response.json()

    def agents(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = self.get_json("/v1/agents")["agents"]
        return agents


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
        detail = problem.get("detail") or problem.get("title") or ""
        kind = str(problem.get("type", "")).rsplit(":", 1)[-1]
    except ValueError:
        detail, kind = response.text[:200], ""
    message = f"daemon answered {response.status_code} {kind}: {detail}".strip()
    if kind in ("agent_not_installed", "install_failed", "unsupported_agent", "agent_process_exited"):
        raise AgentError(message)
    if response.status_code >= 500:
        raise DaemonUnreachable(message)
    raise DaemonError(message)


# --------------------------------------------------------------------------------------------------------
# ACP over HTTP


PermissionPolicy = Callable[[dict[str, Any]], dict[str, Any]]


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

# Headless-safe modes by agent: the permissive mode where the agent has one, so no prompt waits for a human.
HEADLESS_MODES: dict[str, str] = {"claude": "bypassPermissions", "codex": "full-access"}


@dataclass
class _Inbox:
    """Envelopes from the agent, by JSON-RPC id, plus the text chunks of each session."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    responses: dict[Any, dict[str, Any]] = field(default_factory=dict)
    chunks: dict[str, list[str]] = field(default_factory=dict)
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
        permissions: PermissionPolicy = approve_permissions,
    ) -> None:
        self.client = client
        self.server_id = server_id
        self.agent = agent
        self.permissions = permissions
        self._ids = itertools.count(1)
        self._inbox = _Inbox()
        self._posts = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"acp-post-{server_id}")
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
        self._posts.shutdown(wait=False, cancel_futures=True)
        # The reader is not joined: it sees the flag within its one-second read timeout, or at once when the
        # caller closes the client under it.

    # -- requests ---------------------------------------------------------------------------------------
    def initialize(self, timeout: float) -> dict[str, Any]:
        params = {"protocolVersion": 1, "clientInfo": {"name": "sandbox-worker", "version": "1"}}
        # The first POST creates the server and must name the agent; the SSE stream exists only after it.
        result = self.request("initialize", params, timeout=timeout, query={"agent": self.agent})
        self._reader = threading.Thread(target=self._read_events, name=f"acp-sse-{self.server_id}", daemon=True)
        self._reader.start()
        return result

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

    def prompt(self, session_id: str, text: str, timeout: float) -> str:
        """Send a prompt and return the agent's text for this turn."""
        with self._inbox.lock:
            self._inbox.chunks[session_id] = []
        result = self.request(
            "session/prompt",
            {"sessionId": session_id, "prompt": [{"type": "text", "text": text}]},
            timeout=timeout,
            from_stream=True,
        )
        with self._inbox.lock:
            reply = "".join(self._inbox.chunks.pop(session_id, []))
        if result.get("stopReason") not in (None, "end_turn", "max_tokens", "max_turn_requests"):
            raise AgentError(f"turn ended with stopReason {result.get('stopReason')!r}")
        return reply

    def cancel(self, session_id: str) -> None:
        self._post({"jsonrpc": "2.0", "method": "session/cancel", "params": {"sessionId": session_id}})

    def request(
        self,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float,
        query: Mapping[str, str] | None = None,
        from_stream: bool = False,
    ) -> dict[str, Any]:
        """Send a JSON-RPC request; the reply is taken from the POST body or the event stream, whichever comes
        first. ``from_stream`` waits for the stream's copy as well (briefly, when the POST was first): the stream
        is ordered, so everything the agent sent before its reply (the turn's text) has then arrived too."""
        request_id = next(self._ids)
        envelope = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        future = self._posts.submit(self._post, envelope, query, timeout)
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
            error = reply["error"] or {}
            raise AgentError(f"{method} failed: [{error.get('code')}] {error.get('message')}")
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
        _raise_for_problem(response)
        body: dict[str, Any] = response.json()
        return body

    def _post(
        self, envelope: dict[str, Any], query: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> httpx.Response | None:
        try:
            return self.client.http.post(
                self._path,
                params=dict(query or {}),
                content=json.dumps(envelope),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=timeout,
            )
        finally:
            with self._inbox.lock:
                self._inbox.lock.notify_all()

    # -- the event stream -------------------------------------------------------------------------------
    def _read_events(self) -> None:
        failures = 0
        while not self._stop.is_set() and self._inbox.exited is None:
            headers = {"Accept": "text/event-stream"}
            if self._inbox.last_event_id:
                headers["Last-Event-ID"] = self._inbox.last_event_id
            problem = None
            try:
                with self.client.http.stream(
                    "GET", self._path, headers=headers, timeout=httpx.Timeout(10.0, read=1.0)
                ) as response:
                    if response.status_code == 200:
                        failures = 0
                        for event_id, data in _sse_events(response.iter_lines(), self._stop):
                            self._inbox.last_event_id = event_id or self._inbox.last_event_id
                            self._dispatch(data)
                    else:
                        problem = f"event stream answered {response.status_code}"
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
                params = envelope.get("params") or {}
                update = params.get("update") or {}
                if update.get("sessionUpdate") == "agent_message_chunk":
                    content = update.get("content") or {}
                    if content.get("type") == "text":
                        self._inbox.chunks.setdefault(params.get("sessionId", ""), []).append(content.get("text", ""))
            elif method == "_adapter/agent_exited":
                self._inbox.exited = envelope.get("params") or {}
            self._inbox.lock.notify_all()
        if method == "session/request_permission" and "id" in envelope:
            answer = self.permissions(envelope.get("params") or {})
            self._posts.submit(self._post, {"jsonrpc": "2.0", "id": envelope["id"], "result": answer})


def _sse_events(lines: Iterator[str], stop: threading.Event) -> Iterator[tuple[str | None, str]]:
    """Parse ``event:``/``id:``/``data:`` frames; comments (heartbeats) are skipped."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if stop.is_set():
            return
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("id:"):
            event_id = line[3:].strip()
