"""A provider without sandboxes, for the pipeline's unit tests and the orchestration benchmark.

Sandboxes are records in memory; their daemons are one stand-in HTTP server on loopback
(:class:`StandInDaemons`) that speaks the part of sandbox-agent's API the worker uses — the bearer token,
``/v1/health``, ``/v1/agents`` and ACP over ``POST``/SSE ``/v1/acp/{server}`` with a mock agent that answers
``mock: <prompt>``. Commands run "in" a sandbox are answered from a small table. Faults are scripted:
``fail("start", ProviderUnavailable("..."))`` makes the next ``start`` raise that error.

It is not in the registry: nothing routes a real request to it. Tests and benchmarks hand it to the pipeline
directly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from providers.base import Endpoint, ExecResult, Provider, ProviderConfig, Sandbox, SandboxSpec
from worker import pins
from worker.errors import SandboxGone


class FakeConfig(ProviderConfig):
    """Nothing to configure."""


@dataclass
class _Server:
    """One ACP server: its events in order (for SSE replay by Last-Event-ID) and a way to wake readers."""

    events: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def emit(self, envelope: dict[str, Any]) -> None:
        self.events.append(json.dumps(envelope))
        self.changed.set()
        self.changed = asyncio.Event()


class DaemonTables:
    """Which daemon runs in each sandbox: its front's token and its environment. ``tokens`` may be a table shared
    with other processes (a ``multiprocessing`` manager's dict): the benchmark serves the stand-ins from a process of
    their own, so their CPU is not counted as the worker's."""

    def __init__(self, *, tokens: MutableMapping[str, str] | None = None) -> None:
        self.tokens = tokens if tokens is not None else {}  # sandbox id -> token of its running daemon
        self.env: dict[str, dict[str, str]] = {}

    def start(self, sandbox_id: str, env: Mapping[str, str]) -> None:
        """A daemon started with ``env``: its front's token (``SW_FRONT_TOKEN``, see worker.daemon) replaces the
        running daemon's; a command without one starts nothing."""
        env = dict(env)
        if token := env.pop("SW_FRONT_TOKEN", None):
            env.pop("SW_FRONT", None)
            self.tokens[sandbox_id], self.env[sandbox_id] = token, env


class StandInDaemons(DaemonTables):
    """sandbox-agent stand-ins for many sandboxes behind one loopback server: ``/d/<sandbox_id>/v1/...``."""

    def __init__(self, *, tokens: MutableMapping[str, str] | None = None) -> None:
        super().__init__(tokens=tokens)
        self.files: dict[str, dict[str, bytes]] = {}  # written through the daemon's file API
        self._servers: dict[tuple[str, str], _Server] = {}
        app = Starlette(
            routes=[
                Route("/d/{sandbox}/v1/health", self._health),
                Route("/d/{sandbox}/v1/agents/{agent}", self._agents),
                Route("/d/{sandbox}/v1/acp/{server}", self._acp, methods=["GET", "POST"]),
                Route("/d/{sandbox}/v1/fs/file", self._put_file, methods=["PUT"]),
                Route("/d/{sandbox}/v1/processes/run", self._run, methods=["POST"]),
            ]
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="stand-in-daemons", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the stand-in daemon server did not start")
            time.sleep(0.01)

    def url(self, sandbox_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/d/{sandbox_id}"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _authorised(self, request: Request) -> bool:
        token = self.tokens.get(request.path_params["sandbox"])
        return token is not None and request.headers.get("authorization") == f"Bearer {token}"

    async def _health(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({"type": "urn:sandbox-agent:error:token_invalid"}, status_code=401)
        return JSONResponse({"status": "ok"})

    async def _agents(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({"type": "urn:sandbox-agent:error:token_invalid"}, status_code=401)
        agent = request.path_params["agent"]
        return JSONResponse({"id": agent, "installed": agent == "mock", "version": "builtin"})

    async def _put_file(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({"type": "urn:sandbox-agent:error:token_invalid"}, status_code=401)
        data = await request.body()
        self.files.setdefault(request.path_params["sandbox"], {})[request.query_params["path"]] = data
        return JSONResponse({"path": request.query_params["path"], "bytesWritten": len(data)})

    async def _run(self, request: Request) -> Response:
        """A command run by the daemon: one that starts a new front (its token in ``SW_FRONT_TOKEN``) replaces this
        daemon, as worker.daemon.replace_daemon does in a sandbox."""
        if not self._authorised(request):
            return JSONResponse({"type": "urn:sandbox-agent:error:token_invalid"}, status_code=401)
        body = await request.json()
        self.start(request.path_params["sandbox"], body.get("env") or {})
        return JSONResponse({"exitCode": 0, "timedOut": False, "stdout": "", "stderr": ""})

    async def _acp(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({"type": "urn:sandbox-agent:error:token_invalid"}, status_code=401)
        key = (request.path_params["sandbox"], request.path_params["server"])
        if request.method == "GET":
            if key not in self._servers:
                return JSONResponse({"type": "urn:sandbox-agent:error:not_found"}, status_code=404)
            start = int(request.headers.get("last-event-id") or 0)
            return StreamingResponse(self._stream(self._servers[key], start), media_type="text/event-stream")
        server = self._servers.setdefault(key, _Server())
        envelope = await request.json()
        if "method" not in envelope:  # the client's answer to a request of ours (a permission)
            return Response(status_code=202)
        reply = {"jsonrpc": "2.0", "id": envelope["id"], "result": self._answer(server, envelope)}
        server.emit(reply)
        return JSONResponse(reply)

    @staticmethod
    def _answer(server: _Server, envelope: dict[str, Any]) -> dict[str, Any]:
        method, params = envelope["method"], envelope.get("params") or {}
        if method == "initialize":
            return {"protocolVersion": 1, "agentCapabilities": {}, "authMethods": []}
        if method == "session/new":
            return {"sessionId": f"session-{next(server.sessions)}"}
        if method == "session/prompt":
            text = " ".join(part.get("text", "") for part in params.get("prompt", []))
            update = {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": f"mock: {text}"}}
            server.emit({"jsonrpc": "2.0", "method": "session/update", "params": {**params, "update": update}})
            return {"stopReason": "end_turn"}
        return {}

    @staticmethod
    async def _stream(server: _Server, start: int) -> AsyncIterator[bytes]:
        sent = start
        while True:
            while sent < len(server.events):
                sent += 1
                yield f"id: {sent}\ndata: {server.events[sent - 1]}\n\n".encode()
            try:
                await asyncio.wait_for(server.changed.wait(), timeout=15)
            except TimeoutError:
                yield b": keep-alive\n\n"


class FakeProvider(Provider):
    name: ClassVar[str] = "fake"
    config_model: ClassVar[type[ProviderConfig]] = FakeConfig

    def __init__(self, config: ProviderConfig | None = None, *, daemons: StandInDaemons | None = None) -> None:
        super().__init__(config or FakeConfig())
        self.daemons = daemons or StandInDaemons()
        self.sandboxes: dict[str, Sandbox] = {}
        self.files: dict[str, dict[str, bytes]] = defaultdict(dict)
        self.calls: list[str] = []
        self._faults: dict[str, deque[Exception]] = defaultdict(deque)
        self._lock = threading.Lock()

    def fail(self, method: str, *errors: Exception) -> None:
        """The next calls of ``method`` raise ``errors``, one each, in order."""
        self._faults[method].extend(errors)

    def _call(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)
            if self._faults[method]:
                raise self._faults[method].popleft()

    def _live(self, sandbox_id: str) -> Sandbox:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise SandboxGone(f"no sandbox {sandbox_id}", provider=self.name, sandbox_id=sandbox_id)
        return sandbox

    def start(self, spec: SandboxSpec) -> Sandbox:
        self._call("start")
        # Unique across providers sharing one daemon server: a reused id would replay another sandbox's events.
        sandbox = Sandbox(self.name, f"fake-{uuid.uuid4().hex[:12]}", dict(spec.labels))
        self.sandboxes[sandbox.sandbox_id] = sandbox
        return sandbox

    def find(self, sandbox_id: str) -> Sandbox | None:
        self._call("find")
        return self.sandboxes.get(sandbox_id)

    def exec(
        self,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        self._call("exec")
        self._live(sandbox.sandbox_id)
        if argv[-1:] == ["--version"] or (argv[:2] == ["sh", "-c"] and "--version" in argv[2]):  # no daemon front
            return ExecResult(0, f"sandbox-agent {pins.SANDBOX_AGENT_VERSION}\n", "")
        if argv[:2] == ["sh", "-c"] and any(arg.endswith("/sandbox-agent") for arg in argv[3:]):  # stop the daemon
            self.daemons.tokens.pop(sandbox.sandbox_id, None)
        return ExecResult(0, "", "")

    def spawn(self, sandbox: Sandbox, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, log_path: str) -> None:
        self._call("spawn")
        self._live(sandbox.sandbox_id)
        self.daemons.start(sandbox.sandbox_id, env)

    def upload(self, sandbox: Sandbox, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self._call("upload")
        self._live(sandbox.sandbox_id)
        self.files[sandbox.sandbox_id][path] = data

    def endpoint(self, sandbox: Sandbox, port: int) -> Endpoint:
        self._call("endpoint")
        self._live(sandbox.sandbox_id)
        return Endpoint(self.daemons.url(sandbox.sandbox_id))

    def stop(self, sandbox_id: str) -> bool:
        self._call("stop")
        self.daemons.tokens.pop(sandbox_id, None)
        self.files.pop(sandbox_id, None)
        return self.sandboxes.pop(sandbox_id, None) is not None

    def list_owned(self, labels: Mapping[str, str]) -> list[Sandbox]:
        self._call("list_owned")
        return [s for s in self.sandboxes.values() if all(s.labels.get(k) == v for k, v in labels.items())]

    def close(self) -> None:
        self.daemons.close()
