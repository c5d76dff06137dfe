"""A stand-in Daytona: the API and the toolbox that the real ``daytona`` SDK (0.226.1) speaks, on one port,
with every sandbox a real Docker container.

Wire protocol (see ../shared/reference/e2b-daytona.md §2): the API lives under ``/api``, the toolbox (the
in-sandbox daemon) under ``/toolbox/<sandbox id>`` (the sandbox JSON's ``toolboxProxyUrl`` is
``<base>/toolbox``), and preview links under ``/preview/<sandbox id>/<port>``: a reverse proxy that checks
``X-Daytona-Preview-Token`` (or ``Authorization: Bearer <api key>``) and streams to the container's published
port without buffering (SSE works). Every API and toolbox call needs ``Authorization: Bearer <api key>``;
errors use the envelope the SDK parses (``message``, ``code``, ``source``, ``statusCode``).

Semantics kept from the real service:

- create answers with the strict Sandbox JSON; with ``start_delay`` the sandbox reports ``starting`` for that
  long, so the SDK's poll loop runs. ``snapshot`` names map to images (``snapshots``; ``sandbox-worker`` and
  no snapshot mean ``image``), unknown snapshots are a 400; ``buildInfo`` with a FROM-only Dockerfile runs
  that image (``build_failed`` when it is not present locally).
- ``process/execute`` runs ``<shell> -c <command>`` (first of zsh, bash, sh in the container) with the
  request's env and cwd, answers the real exit code with stdout+stderr in ``result``, and a command that
  outlives ``timeout`` (default 10 s, as documented by the toolbox API) is killed and answered 408
  ``PROCESS_EXECUTION_TIMEOUT``. Backgrounded children (``nohup cmd >log 2>&1 &``) survive the call.
- sessions are one long-lived shell each, fed through a FIFO: commands run sequentially, ``cd``/``export``
  persist, ``runAsync`` answers 202 at once and the command keeps running; logs are split stdout/stderr.
  Command stdin is /dev/null (``…/input`` and the websocket log follow are not implemented).
- lifecycle, measured in "minutes" of ``minute`` seconds (60 by default; tests shrink it):
  ``autoStopInterval`` (default 15, 0 = never) stops a sandbox idle for that long; a stopped sandbox is
  deleted ``autoDeleteInterval`` minutes later (0 = at once, negative = never, the default);
  ``ttlMinutes`` (0 = off) destroys it that long after creation whatever its state (``destroying`` while
  its container is removed). Stop with
  ``autoDeleteInterval=0`` therefore deletes. Activity is any API, toolbox or preview request on the sandbox.
- a deleted sandbox is forgotten at once (GET answers 404 rather than ``destroyed``), and so is one whose
  container disappeared (``vanish()`` does that on purpose); the toolbox answers 404 with source
  ``DAYTONA_PROXY`` for them, as the real proxy does for a deleted sandbox.
- ``cpu``/``memory`` (GiB) requested with an image are applied with ``docker update`` when the engine allows it
  and reported back; snapshots get 1 CPU / 1 GiB / 3 GiB disk as reported values.

Not implemented (404): Socket.IO (the SDK silently falls back to polling), archive, pause, fork, volumes,
snapshots API, signed preview URLs, git, LSP, PTY, computer use.

Tests use :class:`DaytonaStandIn` as a context manager; ``.faults`` is the shared
:class:`~tests.standins.faults.FaultInjector` (also the request record), ``vanish(id)`` removes a sandbox behind
the SDK's back. Every container is labelled ``sandbox-worker-standin=daytona``; on exit an instance removes
the containers it made (and only those, so several stand-ins can share one engine).

Manual runs (``sandbox-worker submit --provider daytona``)::

    python -m tests.standins.daytona --port 3222 --image sandbox-worker/sandbox:0.4.2-agents --api-key KEY

then point the worker at it::

    export SANDBOX_WORKER_DAYTONA__API_URL=http://127.0.0.1:3222/api
    export SANDBOX_WORKER_DAYTONA__API_KEY=KEY
    # the default snapshot name "sandbox-worker" maps to --image; add others with --snapshot NAME=IMAGE

Stop it with Ctrl-C; it removes its containers on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import posixpath
import re
import secrets
import shlex
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import docker.errors
import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins.containers import ContainerSandboxes
from tests.standins.faults import Fault, FaultInjector
from tests.standins.server import ThreadedServer
from worker import pins

STANDIN = "daytona"
SOURCE_API = "DAYTONA_API"
SOURCE_DAEMON = "DAYTONA_DAEMON"
SOURCE_PROXY = "DAYTONA_PROXY"
DEFAULT_SNAPSHOT = "sandbox-worker"
SESSIONS_DIR = "/tmp/.daytona-standin/sessions"  # inside the sandbox container

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Error(Exception):
    """Answered as the Daytona error envelope."""

    def __init__(self, status: int, message: str, *, code: str | None = None, source: str = SOURCE_API) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.source = status, message, code, source


def _envelope(request: Request, error: _Error) -> JSONResponse:
    phrase = HTTPStatus(error.status).phrase
    body = {
        "statusCode": error.status,
        "message": error.message,
        "error": phrase,
        "code": error.code or phrase.upper().replace(" ", "_"),
        "source": error.source,
        "path": request.url.path,
        "method": request.method,
        "timestamp": _iso(time.time()),
    }
    return JSONResponse(body, status_code=error.status)


@dataclass
class _Session:
    session_id: str
    shell_pid: int
    commands: dict[str, str] = field(default_factory=dict)  # cmd id -> command, in order

    @property
    def directory(self) -> str:
        return f"{SESSIONS_DIR}/{self.session_id}"


@dataclass
class _Sandbox:
    id: str
    name: str
    image: str
    snapshot: str | None
    user: str
    env: dict[str, str]
    labels: dict[str, str]
    public: bool
    network_block_all: bool
    target: str
    cpu: int
    gpu: int
    memory: int
    disk: int
    auto_stop: float
    auto_archive: float
    auto_delete: float
    ttl: int
    created_at: float
    ready_at: float
    preview_token: str
    state: str = "started"
    desired_state: str = "started"
    error_reason: str | None = None
    dockerfile: str | None = None
    updated_at: float = 0.0
    last_activity: float = 0.0
    stopped_at: float | None = None
    shell: str | None = None
    sessions: dict[str, _Session] = field(default_factory=dict)
    network_allow_list: str | None = None

    def touch(self) -> None:
        self.last_activity = time.time()


class DaytonaStandIn:
    """A Daytona API + toolbox + preview proxy on 127.0.0.1, each sandbox a Docker container of ``image``.

    ``ports`` are the container ports published (and so reachable through preview links); ``start_delay`` keeps
    new sandboxes ``starting`` for that many seconds; ``minute`` is the length of a lifecycle minute in seconds;
    ``page_size`` is the largest list page it answers (smaller ``limit``s are honoured), so small values make
    clients walk ``nextCursor``.
    """

    def __init__(
        self,
        image: str = pins.SANDBOX_IMAGE,
        *,
        api_key: str = "standin-daytona-key",
        ports: Sequence[int] = (2468,),
        start_delay: float = 0.0,
        minute: float = 60.0,
        page_size: int = 100,
        snapshots: Mapping[str, str] | None = None,
        organization_id: str = "standin-org",
        target: str = "us",
        port: int | None = None,
    ) -> None:
        self.image = image
        self.api_key = api_key
        self.ports = tuple(ports)
        self.start_delay = start_delay
        self.minute = minute
        self.page_size = page_size
        self.snapshots = {DEFAULT_SNAPSHOT: image, **(snapshots or {})}
        self.organization_id = organization_id
        self.target = target
        self.containers = ContainerSandboxes(image, standin=STANDIN, ports=self.ports)
        self._by_image: dict[str, ContainerSandboxes] = {image: self.containers}
        self._sandboxes: dict[str, _Sandbox] = {}
        self._created: set[str] = set()  # every sandbox id this instance made a container for
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._janitor = threading.Thread(target=self._janitor_loop, name="daytona-standin-janitor", daemon=True)
        self.faults = FaultInjector(self._asgi)
        self._server = ThreadedServer(self.faults, port=port)
        self.url = self._server.url
        self.api_url = f"{self.url}/api"
        self.toolbox_url = f"{self.url}/toolbox"
        self._router = Starlette(routes=self._routes())
        self._router.add_exception_handler(_Error, self._on_error)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ public API

    def start(self) -> str:
        """Serve; returns the API URL (``<base>/api``)."""
        self._server.start()
        self._janitor.start()
        return self.api_url

    def stop(self) -> None:
        """Stop serving and remove every container this stand-in made."""
        self._stopping.set()
        self._server.stop()
        if self._janitor.is_alive():
            self._janitor.join(timeout=10)
        with self._lock:
            self._sandboxes.clear()
            created = list(self._created)
        # Only this instance's containers: ContainerSandboxes.remove_all() would also remove those of any other
        # Daytona stand-in alive on the same engine (the label names the kind of stand-in, not the instance).
        for sandbox_id in created:
            self.containers.remove(sandbox_id)

    def __enter__(self) -> DaytonaStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every (method, path) received, faults included."""
        return self.faults.requests

    def sandbox_ids(self) -> list[str]:
        """Ids of the sandboxes the stand-in knows (not deleted)."""
        with self._lock:
            return list(self._sandboxes)

    def state(self, sandbox_id: str) -> str | None:
        """The sandbox's state, or None when it is gone."""
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
            return self._refresh(sandbox).state if sandbox else None

    def container_ids(self) -> list[str]:
        """Ids of the sandboxes of this instance whose container still exists (in any state)."""
        with self._lock:
            created = sorted(self._created)
        # Not ContainerSandboxes.ids(): its containers.list() inspects every match and raises NotFound when one
        # is removed meanwhile (the janitor does that).
        return [sandbox_id for sandbox_id in created if self._container_exists(sandbox_id)]

    def _container_exists(self, sandbox_id: str) -> bool:
        try:
            self.containers.container(sandbox_id)
        except KeyError:
            return False
        return True

    def describe(self, sandbox_id: str) -> dict[str, Any] | None:
        """The sandbox as the API would answer it (with ``ttlMinutes`` added), or None when it is gone."""
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
            return None if sandbox is None else {**self._dto(self._refresh(sandbox)), "ttlMinutes": sandbox.ttl}

    def fail_after(self, method: str, path: str, status: int, *, count: int = 1) -> None:
        """Let the next ``count`` requests matching ``method`` and the ``path`` regex do their work, then answer
        ``status`` instead of the real response: a gateway that lost the answer (the classic double-create)."""
        self.faults.add(
            Fault(
                path=path,
                status=status,
                method=method,
                count=count,
                after=True,
                body={"statusCode": status, "message": "injected lost response", "source": SOURCE_PROXY},
            )
        )

    def vanish(self, sandbox_id: str) -> None:
        """Remove the sandbox and its container behind the SDK's back (as if deleted elsewhere or expired)."""
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)
        self.containers.remove(sandbox_id)

    # ------------------------------------------------------------------ plumbing

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/preview/"):
            await self._preview(scope, receive, send)
            return
        await self._router(scope, receive, send)

    async def _on_error(self, request: Request, exc: _Error) -> Response:
        return _envelope(request, exc)

    def _routes(self) -> list[Route]:
        api, box = "/api/sandbox", "/toolbox/{sandbox_id}"
        return [
            Route(api, self._create, methods=["POST"]),
            Route(api, self._list, methods=["GET"]),
            Route(api + "/{sandbox_id}", self._get, methods=["GET"]),
            Route(api + "/{sandbox_id}", self._delete, methods=["DELETE"]),
            Route(api + "/{sandbox_id}/start", self._start_sandbox, methods=["POST"]),
            Route(api + "/{sandbox_id}/stop", self._stop_sandbox, methods=["POST"]),
            Route(api + "/{sandbox_id}/labels", self._put_labels, methods=["PUT"]),
            Route(api + "/{sandbox_id}/ports/{port:int}/preview-url", self._preview_url, methods=["GET"]),
            Route(api + "/{sandbox_id}/toolbox-proxy-url", self._toolbox_proxy_url, methods=["GET"]),
            Route(api + "/{sandbox_id}/last-activity", self._last_activity, methods=["POST"]),
            Route(api + "/{sandbox_id}/{setting}/{value}", self._interval, methods=["POST"]),
            Route(box + "/process/execute", self._execute, methods=["POST"]),
            Route(box + "/process/session", self._create_session, methods=["POST"]),
            Route(box + "/process/session", self._list_sessions, methods=["GET"]),
            Route(box + "/process/session/{session_id}", self._get_session, methods=["GET"]),
            Route(box + "/process/session/{session_id}", self._delete_session, methods=["DELETE"]),
            Route(box + "/process/session/{session_id}/exec", self._session_exec, methods=["POST"]),
            Route(box + "/process/session/{session_id}/command/{command_id}", self._command, methods=["GET"]),
            Route(box + "/process/session/{session_id}/command/{command_id}/logs", self._logs, methods=["GET"]),
            Route(box + "/files/bulk-upload", self._upload, methods=["POST"]),
            Route(box + "/files/bulk-download", self._download, methods=["POST"]),
            Route(box + "/files/info", self._file_info, methods=["GET"]),
            Route(box + "/files/folder", self._folder, methods=["POST"]),
            Route(box + "/files/permissions", self._permissions, methods=["POST"]),
            Route(box + "/files", self._delete_file, methods=["DELETE"]),
            Route(box + "/user-home-dir", self._home_dir, methods=["GET"]),
            Route(box + "/work-dir", self._work_dir, methods=["GET"]),
            Route(box + "/version", self._version, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise _Error(401, "Invalid credentials", code="UNAUTHORIZED")

    def _refresh(self, sandbox: _Sandbox) -> _Sandbox:
        if sandbox.state == "starting" and time.time() >= sandbox.ready_at:
            sandbox.state, sandbox.updated_at = "started", time.time()
        return sandbox

    def _lookup(self, id_or_name: str) -> _Sandbox | None:
        with self._lock:
            sandbox = self._sandboxes.get(id_or_name) or next(
                (s for s in self._sandboxes.values() if s.name == id_or_name), None
            )
            return self._refresh(sandbox) if sandbox else None

    def _forget(self, sandbox_id: str) -> None:
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)

    async def _api_sandbox(self, request: Request) -> _Sandbox:
        """The sandbox named in the API path; 404 when unknown or its container is gone."""
        self._auth(request)
        sandbox = self._lookup(request.path_params["sandbox_id"])
        if sandbox is not None and sandbox.state not in ("build_failed", "error"):
            try:
                await run_in_threadpool(self.containers.container, sandbox.id)
            except KeyError:
                self._forget(sandbox.id)
                sandbox = None
        if sandbox is None:
            raise _Error(404, f"Sandbox with ID or name {request.path_params['sandbox_id']} not found")
        sandbox.touch()
        return sandbox

    def _box_sandbox(self, request: Request) -> _Sandbox:
        """The sandbox a toolbox call is for; the proxy answers 404 for unknown ones, 4xx when not started."""
        self._auth(request)
        sandbox = self._lookup(request.path_params["sandbox_id"])
        if sandbox is None:
            raise _Error(404, "sandbox not found", code="NOT_FOUND", source=SOURCE_PROXY)
        if sandbox.state != "started":
            raise _Error(400, f"sandbox is {sandbox.state}, not started", code="BAD_REQUEST", source=SOURCE_PROXY)
        sandbox.touch()
        return sandbox

    async def _in_container(self, sandbox: _Sandbox, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking ContainerSandboxes call; a vanished container makes the sandbox gone (404)."""
        try:
            return await run_in_threadpool(func, sandbox.id, *args, **kwargs)
        except (KeyError, docker.errors.NotFound) as exc:
            self._forget(sandbox.id)
            raise _Error(404, "sandbox not found", code="NOT_FOUND", source=SOURCE_PROXY) from exc
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # container not running
                self._forget(sandbox.id)
                raise _Error(404, "sandbox not found", code="NOT_FOUND", source=SOURCE_PROXY) from exc
            raise _Error(500, f"daemon error: {exc.explanation}", source=SOURCE_DAEMON) from exc

    def _dto(self, sandbox: _Sandbox, *, listing: bool = False) -> dict[str, Any]:
        dto: dict[str, Any] = {
            "id": sandbox.id,
            "organizationId": self.organization_id,
            "name": sandbox.name,
            "snapshot": sandbox.snapshot,
            "user": sandbox.user,
            "labels": dict(sandbox.labels),
            "public": sandbox.public,
            "networkBlockAll": sandbox.network_block_all,
            "networkAllowList": sandbox.network_allow_list,
            "target": sandbox.target,
            "cpu": sandbox.cpu,
            "gpu": sandbox.gpu,
            "memory": sandbox.memory,
            "disk": sandbox.disk,
            "spot": False,
            "state": sandbox.state,
            "desiredState": sandbox.desired_state,
            "errorReason": sandbox.error_reason,
            "recoverable": False,
            "autoStopInterval": sandbox.auto_stop,
            "autoPauseInterval": 0,
            "autoArchiveInterval": sandbox.auto_archive,
            "autoDeleteInterval": sandbox.auto_delete,
            "createdAt": _iso(sandbox.created_at),
            "updatedAt": _iso(sandbox.updated_at),
            "lastActivityAt": _iso(sandbox.last_activity),
            "daemonVersion": "standin",
            "runnerId": "standin-runner",
            "toolboxProxyUrl": self.toolbox_url,
        }
        if sandbox.ttl:
            dto["autoDestroyAt"] = _iso(sandbox.created_at + sandbox.ttl * self.minute)
        if not listing:
            dto["env"] = dict(sandbox.env)
            dto["kvm"] = False
            dto["volumes"] = []
            if sandbox.dockerfile is not None:
                dto["buildInfo"] = {
                    "dockerfileContent": sandbox.dockerfile,
                    "createdAt": _iso(sandbox.created_at),
                    "updatedAt": _iso(sandbox.created_at),
                    "snapshotRef": sandbox.image,
                }
        return dto

    # ------------------------------------------------------------------ lifecycle

    def _containers_for(self, image: str) -> ContainerSandboxes:
        with self._lock:
            if image not in self._by_image:
                self._by_image[image] = ContainerSandboxes(image, standin=STANDIN, ports=self.ports)
            return self._by_image[image]

    def _launch(self, sandbox: _Sandbox) -> None:
        """Create the container (blocking)."""
        docker_labels = {**sandbox.labels, "daytona-sandbox-id": sandbox.id}
        containers = self._containers_for(sandbox.image)
        with self._lock:
            self._created.add(sandbox.id)
        containers.create(sandbox.id, env=sandbox.env, labels=docker_labels)
        if sandbox.dockerfile is not None:  # resources are only requested with an image
            with contextlib.suppress(docker.errors.APIError):
                containers.container(sandbox.id).update(
                    cpu_period=100_000,
                    cpu_quota=100_000 * sandbox.cpu,
                    mem_limit=f"{sandbox.memory}g",
                    memswap_limit=f"{sandbox.memory}g",
                )

    def _destroy(self, sandbox_id: str) -> None:
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
            if sandbox is not None:
                sandbox.state = "destroying"
                sandbox.desired_state = "destroyed"
        self.containers.remove(sandbox_id)
        self._forget(sandbox_id)

    def _stop_container(self, sandbox: _Sandbox) -> None:
        """Stop the container; delete the sandbox now when autoDeleteInterval is 0."""
        with contextlib.suppress(KeyError, docker.errors.NotFound):
            self.containers.container(sandbox.id).stop(timeout=5)
        with self._lock:
            sandbox.sessions.clear()
            sandbox.state = sandbox.desired_state = "stopped"
            sandbox.stopped_at = sandbox.updated_at = time.time()
        if sandbox.auto_delete == 0:
            self._destroy(sandbox.id)
            sandbox.state = sandbox.desired_state = "destroyed"

    def _janitor_loop(self) -> None:
        while not self._stopping.wait(0.25):
            now = time.time()
            with self._lock:
                sandboxes = [self._refresh(s) for s in self._sandboxes.values()]
            for sandbox in sandboxes:
                with contextlib.suppress(Exception):  # one bad container must not stop the janitor
                    self._lifecycle(sandbox, now)

    def _lifecycle(self, sandbox: _Sandbox, now: float) -> None:
        if sandbox.ttl and now >= sandbox.created_at + sandbox.ttl * self.minute:
            self._destroy(sandbox.id)
        elif sandbox.state == "started" and sandbox.auto_stop > 0:
            if now >= sandbox.last_activity + sandbox.auto_stop * self.minute:
                self._stop_container(sandbox)
        elif sandbox.state == "stopped" and sandbox.auto_delete >= 0 and sandbox.stopped_at is not None:  # noqa: SIM102
            if now >= sandbox.stopped_at + sandbox.auto_delete * self.minute:
                self._destroy(sandbox.id)

    # ------------------------------------------------------------------ API handlers

    async def _create(self, request: Request) -> Response:
        self._auth(request)
        body = await request.json()
        if not isinstance(body, dict):
            raise _Error(400, "request body must be a JSON object")
        env, labels = body.get("env") or {}, body.get("labels") or {}
        for name, value in (("env", env), ("labels", labels)):
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise _Error(400, f"{name} must be an object of strings")
        snapshot = body.get("snapshot")
        dockerfile = (body.get("buildInfo") or {}).get("dockerfileContent")
        state, error_reason = "started", None
        if dockerfile is not None:
            lines = [ln.strip() for ln in dockerfile.splitlines() if ln.strip() and not ln.startswith("#")]
            if len(lines) != 1 or not lines[0].upper().startswith("FROM "):
                raise _Error(400, "the stand-in only builds FROM-only Dockerfiles")
            image = lines[0].split(None, 1)[1].strip()
            try:
                await run_in_threadpool(self.containers.client.images.get, image)
            except docker.errors.ImageNotFound:
                state, error_reason = "build_failed", f"image {image} not found"
            snapshot = None
        else:
            if snapshot is not None and snapshot not in self.snapshots:
                raise _Error(400, f"Snapshot {snapshot} not found. Did you add it through the Daytona Dashboard?")
            image = self.snapshots[snapshot or DEFAULT_SNAPSHOT]
        sandbox_id = str(uuid.uuid4())
        name = body.get("name") or sandbox_id
        with self._lock:
            if any(s.name == name for s in self._sandboxes.values()):
                raise _Error(409, f"Sandbox with name {name} already exists")
        now = time.time()
        auto_delete = body.get("autoDeleteInterval")
        sandbox = _Sandbox(
            id=sandbox_id,
            name=name,
            image=image,
            snapshot=snapshot,
            user=body.get("user") or "root",
            env=dict(env),
            labels=dict(labels),
            public=bool(body.get("public", False)),
            network_block_all=bool(body.get("networkBlockAll", False)),
            network_allow_list=body.get("networkAllowList"),
            target=body.get("target") or self.target,
            cpu=int(body.get("cpu") or 1),
            gpu=int(body.get("gpu") or 0),
            memory=int(body.get("memory") or 1),
            disk=int(body.get("disk") or 3),
            auto_stop=15 if body.get("autoStopInterval") is None else body["autoStopInterval"],
            auto_archive=body.get("autoArchiveInterval") or 7 * 24 * 60,
            auto_delete=auto_delete if auto_delete is not None else -1,
            ttl=int(body.get("ttlMinutes") or 0),
            created_at=now,
            ready_at=now + self.start_delay,
            preview_token=secrets.token_urlsafe(24),
            state="starting" if self.start_delay > 0 and state == "started" else state,
            error_reason=error_reason,
            dockerfile=dockerfile,
            updated_at=now,
            last_activity=now,
        )
        if state == "started":
            try:
                await run_in_threadpool(self._launch, sandbox)
            except docker.errors.APIError as exc:
                raise _Error(500, f"failed to create the sandbox: {exc.explanation}") from exc
        with self._lock:
            self._sandboxes[sandbox_id] = sandbox
        return JSONResponse(self._dto(sandbox))

    async def _list(self, request: Request) -> Response:
        self._auth(request)
        query = request.query_params
        try:
            wanted = json.loads(query["labels"]) if query.get("labels") else {}
            limit = min(int(query.get("limit") or self.page_size), self.page_size)
            offset = int(base64.urlsafe_b64decode(query["cursor"]).decode()) if query.get("cursor") else 0
        except (ValueError, json.JSONDecodeError) as exc:
            raise _Error(400, f"bad query: {exc}") from exc
        states = set(query.getlist("states"))
        with self._lock:
            found = [
                self._refresh(s)
                for s in sorted(self._sandboxes.values(), key=lambda s: (s.created_at, s.id))
                if all(s.labels.get(k) == v for k, v in wanted.items())
                and (not states or s.state in states)
                and s.id.lower().startswith((query.get("id") or "").lower())
                and s.name.lower().startswith((query.get("name") or "").lower())
            ]
        page = found[offset : offset + limit]
        more = offset + limit < len(found)
        cursor = base64.urlsafe_b64encode(str(offset + limit).encode()).decode() if more else None
        return JSONResponse({"items": [self._dto(s, listing=True) for s in page], "nextCursor": cursor})

    async def _get(self, request: Request) -> Response:
        return JSONResponse(self._dto(await self._api_sandbox(request)))

    async def _delete(self, request: Request) -> Response:
        sandbox = await self._api_sandbox(request)
        await run_in_threadpool(self._destroy, sandbox.id)
        sandbox.state = sandbox.desired_state = "destroyed"
        sandbox.updated_at = time.time()
        return JSONResponse(self._dto(sandbox))

    async def _start_sandbox(self, request: Request) -> Response:
        sandbox = await self._api_sandbox(request)
        if sandbox.state == "stopped":
            await run_in_threadpool(lambda: self.containers.container(sandbox.id).start())
            with self._lock:
                now = time.time()
                sandbox.ready_at = now + self.start_delay
                sandbox.state = "starting" if self.start_delay > 0 else "started"
                sandbox.desired_state, sandbox.stopped_at, sandbox.updated_at = "started", None, now
        elif sandbox.state not in ("started", "starting"):
            raise _Error(400, f"Sandbox is {sandbox.state} and cannot be started")
        return JSONResponse(self._dto(sandbox))

    async def _stop_sandbox(self, request: Request) -> Response:
        sandbox = await self._api_sandbox(request)
        if sandbox.state in ("started", "starting"):
            await run_in_threadpool(self._stop_container, sandbox)
        elif sandbox.state != "stopped":
            raise _Error(400, f"Sandbox is {sandbox.state} and cannot be stopped")
        return JSONResponse(self._dto(sandbox))

    async def _put_labels(self, request: Request) -> Response:
        sandbox = await self._api_sandbox(request)
        labels = (await request.json()).get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise _Error(400, "labels must be an object of strings")
        with self._lock:
            sandbox.labels = dict(labels)
        return JSONResponse({"labels": sandbox.labels})

    async def _preview_url(self, request: Request) -> Response:
        sandbox = await self._api_sandbox(request)
        port = request.path_params["port"]
        if not 1 <= port <= 65535:
            raise _Error(400, "invalid port")
        url = f"{self.url}/preview/{sandbox.id}/{port}"
        return JSONResponse({"sandboxId": sandbox.id, "url": url, "token": sandbox.preview_token})

    async def _toolbox_proxy_url(self, request: Request) -> Response:
        await self._api_sandbox(request)
        return JSONResponse({"url": self.toolbox_url})

    async def _last_activity(self, request: Request) -> Response:
        await self._api_sandbox(request)
        return Response(status_code=201)

    async def _interval(self, request: Request) -> Response:
        sandbox = await self._api_sandbox(request)
        setting, raw = request.path_params["setting"], request.path_params["value"]
        attribute = {"autostop": "auto_stop", "autodelete": "auto_delete", "autoarchive": "auto_archive", "ttl": "ttl"}
        if setting not in attribute:
            raise _Error(404, f"Cannot POST {request.url.path}")
        try:
            value = int(raw)
        except ValueError as exc:
            raise _Error(400, f"{setting} must be an integer number of minutes") from exc
        with self._lock:
            setattr(sandbox, attribute[setting], value)
            sandbox.updated_at = time.time()
        return JSONResponse(self._dto(sandbox))

    # ------------------------------------------------------------------ toolbox: process

    async def _shell(self, sandbox: _Sandbox) -> str:
        if sandbox.shell is None:
            probe = "command -v zsh || command -v bash || command -v sh"
            _, out, _ = await self._in_container(sandbox, self.containers.run, ["/bin/sh", "-c", probe])
            sandbox.shell = out.decode().split("\n", 1)[0].strip() or "/bin/sh"
        return sandbox.shell

    async def _work_dir_of(self, sandbox: _Sandbox) -> str:
        container = await self._in_container(sandbox, self.containers.container)
        return str(container.attrs["Config"].get("WorkingDir") or "/")

    async def _resolve(self, sandbox: _Sandbox, path: str | None) -> str:
        if not path:
            raise _Error(400, "path is required", code="INVALID_FILE_PATH", source=SOURCE_DAEMON)
        if path.startswith("/"):
            return posixpath.normpath(path)
        return posixpath.normpath(posixpath.join(await self._work_dir_of(sandbox), path))

    async def _execute(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        body = await request.json()
        command = body.get("command")
        if not isinstance(command, str) or not command:
            raise _Error(400, "command is required", code="BAD_REQUEST", source=SOURCE_DAEMON)
        timeout = body.get("timeout") or 10
        envs = body.get("envs") or {}
        cwd = await self._resolve(sandbox, body["cwd"]) if body.get("cwd") else None
        shell = await self._shell(sandbox)
        started = time.monotonic()
        code, out, err = await self._in_container(
            sandbox, self.containers.run, [shell, "-c", command], env=envs, cwd=cwd, timeout=timeout
        )
        if code == 137 and time.monotonic() - started >= timeout - 0.05:
            raise _Error(
                408,
                f"command execution timeout after {timeout} seconds",
                code="PROCESS_EXECUTION_TIMEOUT",
                source=SOURCE_DAEMON,
            )
        if code in (126, 127) and cwd and b"chdir" in out + err:
            raise _Error(400, f"invalid working directory {cwd}", code="BAD_REQUEST", source=SOURCE_DAEMON)
        return JSONResponse({"exitCode": code, "result": (out + err).decode(errors="replace")})

    def _session(self, sandbox: _Sandbox, session_id: str) -> _Session:
        session = sandbox.sessions.get(session_id)
        if session is None:
            raise _Error(404, f"session {session_id} not found", code="NOT_FOUND", source=SOURCE_DAEMON)
        return session

    async def _create_session(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        session_id = (await request.json()).get("sessionId")
        if not isinstance(session_id, str) or not _SAFE_ID.match(session_id):
            raise _Error(400, "sessionId must match [A-Za-z0-9_.-]{1,128}", code="BAD_REQUEST", source=SOURCE_DAEMON)
        if session_id in sandbox.sessions:
            raise _Error(409, f"session {session_id} already exists", code="CONFLICT", source=SOURCE_DAEMON)
        shell = await self._shell(sandbox)
        directory = f"{SESSIONS_DIR}/{session_id}"
        # The session shell reads commands from a FIFO it holds open read-write (so writers never block and
        # EOF never comes); it runs in its own process group so delete can kill it with its children.
        script = (
            'rm -rf "$1" && mkdir -p "$1" && mkfifo "$1/in" || exit 1; '
            'if command -v setsid >/dev/null; then setsid "$2" 0<>"$1/in" >/dev/null 2>&1 & '
            'else "$2" 0<>"$1/in" >/dev/null 2>&1 & fi; echo $!'
        )
        code, out, err = await self._in_container(
            sandbox, self.containers.run, ["/bin/sh", "-c", script, "sh", directory, shell]
        )
        if code != 0:
            raise _Error(500, f"cannot start the session shell: {err.decode(errors='replace')}", source=SOURCE_DAEMON)
        sandbox.sessions[session_id] = _Session(session_id, int(out.decode().strip()))
        return Response(status_code=201)

    async def _session_json(self, sandbox: _Sandbox, session: _Session) -> dict[str, Any]:
        script = 'for f in "$1"/*/exit_code; do [ -f "$f" ] && echo "$f $(cat "$f")"; done; true'
        _, out, _ = await self._in_container(
            sandbox, self.containers.run, ["/bin/sh", "-c", script, "sh", session.directory]
        )
        exits: dict[str, int] = {}
        for line in out.decode().splitlines():
            path, _, code = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                exits[path.split("/")[-2]] = int(code)
        commands = []
        for command_id, command in session.commands.items():
            item: dict[str, Any] = {"id": command_id, "command": command}
            if command_id in exits:
                item["exitCode"] = exits[command_id]
            commands.append(item)
        return {"sessionId": session.session_id, "commands": commands}

    async def _list_sessions(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        return JSONResponse([await self._session_json(sandbox, s) for s in list(sandbox.sessions.values())])

    async def _get_session(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        session = self._session(sandbox, request.path_params["session_id"])
        return JSONResponse(await self._session_json(sandbox, session))

    async def _delete_session(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        session = self._session(sandbox, request.path_params["session_id"])
        script = 'kill -KILL -- "-$1" 2>/dev/null; kill -KILL "$1" 2>/dev/null; rm -rf "$2"; true'
        await self._in_container(
            sandbox, self.containers.run, ["/bin/sh", "-c", script, "sh", str(session.shell_pid), session.directory]
        )
        sandbox.sessions.pop(session.session_id, None)
        return Response(status_code=204)

    async def _session_exec(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        session = self._session(sandbox, request.path_params["session_id"])
        body = await request.json()
        command = body.get("command")
        if not isinstance(command, str) or not command:
            raise _Error(400, "command is required", code="BAD_REQUEST", source=SOURCE_DAEMON)
        run_async = bool(body.get("runAsync") or body.get("async"))
        command_id = str(uuid.uuid4())
        directory = f"{session.directory}/{command_id}"
        await self._in_container(sandbox, self.containers.write_file, f"{directory}/cmd", command.encode())
        # Sourced in the session shell (cd/export persist); stdin is /dev/null so a command cannot eat the
        # commands queued behind it in the FIFO.
        d = shlex.quote(directory)
        line = f"{{ . {d}/cmd ; }} >{d}/stdout 2>{d}/stderr </dev/null; echo $? >{d}/exit.tmp; mv {d}/exit.tmp {d}/exit_code"
        feed = 'kill -0 "$1" 2>/dev/null && printf "%s\\n" "$3" >"$2/in"'
        code, _, _ = await self._in_container(
            sandbox,
            self.containers.run,
            ["/bin/sh", "-c", feed, "sh", str(session.shell_pid), session.directory, line],
            timeout=10,
        )
        if code != 0:
            raise _Error(410, f"session {session.session_id} has ended", code="SESSION_ENDED", source=SOURCE_DAEMON)
        session.commands[command_id] = command
        if run_async:
            return JSONResponse({"cmdId": command_id}, status_code=202)
        wait = (
            'while [ ! -f "$2/exit_code" ]; do kill -0 "$1" 2>/dev/null || exit 3; sleep 0.05; done; cat "$2/exit_code"'
        )
        code, out, _ = await self._in_container(
            sandbox, self.containers.run, ["/bin/sh", "-c", wait, "sh", str(session.shell_pid), directory], timeout=3600
        )
        if code != 0:
            raise _Error(410, f"session {session.session_id} has ended", code="SESSION_ENDED", source=SOURCE_DAEMON)
        stdout, stderr = await self._command_output(sandbox, directory)
        return JSONResponse(
            {
                "cmdId": command_id,
                "exitCode": int(out.decode().strip()),
                "output": stdout + stderr,
                "stdout": stdout,
                "stderr": stderr,
            }
        )

    async def _command_output(self, sandbox: _Sandbox, directory: str) -> tuple[str, str]:
        stdout = await self._in_container(sandbox, self.containers.read_file, f"{directory}/stdout")
        stderr = await self._in_container(sandbox, self.containers.read_file, f"{directory}/stderr")
        return (stdout or b"").decode(errors="replace"), (stderr or b"").decode(errors="replace")

    def _command_of(self, request: Request) -> tuple[_Sandbox, _Session, str]:
        sandbox = self._box_sandbox(request)
        session = self._session(sandbox, request.path_params["session_id"])
        command_id = request.path_params["command_id"]
        if command_id not in session.commands:
            raise _Error(404, f"command {command_id} not found", code="NOT_FOUND", source=SOURCE_DAEMON)
        return sandbox, session, command_id

    async def _command(self, request: Request) -> Response:
        sandbox, session, command_id = self._command_of(request)
        raw = await self._in_container(
            sandbox, self.containers.read_file, f"{session.directory}/{command_id}/exit_code"
        )
        item: dict[str, Any] = {"id": command_id, "command": session.commands[command_id]}
        if raw is not None and raw.strip():
            item["exitCode"] = int(raw.strip())
        return JSONResponse(item)

    async def _logs(self, request: Request) -> Response:
        sandbox, session, command_id = self._command_of(request)
        stdout, stderr = await self._command_output(sandbox, f"{session.directory}/{command_id}")
        return JSONResponse({"output": stdout + stderr, "stdout": stdout, "stderr": stderr})

    # ------------------------------------------------------------------ toolbox: files

    async def _upload(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        paths: dict[str, str] = {}
        files: dict[str, UploadFile] = {}
        async with request.form(max_files=10_000, max_fields=10_000) as form:
            for key, value in form.multi_items():
                match = re.fullmatch(r"files\[(\d+)\]\.(path|file)", key)
                if match is None:
                    continue
                if match.group(2) == "path" and isinstance(value, str):
                    paths[match.group(1)] = value
                elif match.group(2) == "file" and not isinstance(value, str):
                    files[match.group(1)] = value
            results = []
            for index, upload in files.items():
                destination = await self._resolve(sandbox, paths.get(index) or upload.filename)
                data = await upload.read()
                await self._in_container(sandbox, self.containers.write_file, destination, data)
                results.append({"path": destination, "size": len(data)})
        return JSONResponse({"files": results})

    async def _download(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        paths = (await request.json()).get("paths") or []
        boundary = secrets.token_hex(16)
        chunks: list[bytes] = []
        for source in paths:
            data = await self._in_container(sandbox, self.containers.read_file, await self._resolve(sandbox, source))
            quoted = source.replace('"', "%22")
            if data is None:
                envelope = {
                    "statusCode": 404,
                    "message": f"file not found: {source}",
                    "code": "FILE_NOT_FOUND",
                    "source": SOURCE_DAEMON,
                    "path": "/files/bulk-download",
                    "timestamp": _iso(time.time()),
                }
                part_headers = f'Content-Disposition: form-data; name="error"; filename="{quoted}"\r\n'
                part_headers += "Content-Type: application/json\r\n"
                payload = json.dumps(envelope).encode()
            else:
                part_headers = f'Content-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
                part_headers += "Content-Type: application/octet-stream\r\n"
                payload = data
            chunks.append(f"--{boundary}\r\n{part_headers}\r\n".encode() + payload + b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        return Response(b"".join(chunks), media_type=f"multipart/form-data; boundary={boundary}")

    async def _file_info(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        path = await self._resolve(sandbox, request.query_params.get("path"))
        code, out, _ = await self._in_container(
            sandbox, self.containers.run, ["stat", "-c", "%s\t%A\t%a\t%U\t%G\t%Y\t%F", path]
        )
        if code != 0:
            raise _Error(404, f"file not found: {path}", code="FILE_NOT_FOUND", source=SOURCE_DAEMON)
        size, mode, permissions, owner, group, mtime, kind = out.decode().rstrip("\n").split("\t")
        modified = datetime.fromtimestamp(int(mtime), UTC)
        return JSONResponse(
            {
                "name": posixpath.basename(path) or "/",
                "path": path,
                "isDir": kind == "directory",
                "size": int(size),
                "mode": mode,
                "permissions": f"0{int(permissions, 8):o}",
                "owner": owner,
                "group": group,
                "modTime": modified.strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
                "modifiedAt": modified.isoformat().replace("+00:00", "Z"),
            }
        )

    async def _folder(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        path = await self._resolve(sandbox, request.query_params.get("path"))
        mode = request.query_params.get("mode") or "755"
        if not re.fullmatch(r"[0-7]{3,4}", mode):
            raise _Error(400, "mode must be octal", code="BAD_REQUEST", source=SOURCE_DAEMON)
        code, _, err = await self._in_container(sandbox, self.containers.run, ["mkdir", "-p", "-m", mode, path])
        if code != 0:
            raise _Error(400, err.decode(errors="replace").strip(), code="BAD_REQUEST", source=SOURCE_DAEMON)
        return Response(status_code=201)

    async def _permissions(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        query = request.query_params
        path = await self._resolve(sandbox, query.get("path"))
        argvs: list[list[str]] = []
        if query.get("mode"):
            if not re.fullmatch(r"[0-7]{3,4}", query["mode"]):
                raise _Error(400, "mode must be octal", code="BAD_REQUEST", source=SOURCE_DAEMON)
            argvs.append(["chmod", query["mode"], path])
        if query.get("owner") or query.get("group"):
            argvs.append(["chown", f"{query.get('owner') or ''}:{query.get('group') or ''}".rstrip(":"), path])
        for argv in argvs:
            code, _, err = await self._in_container(sandbox, self.containers.run, argv)
            if code != 0:
                missing = b"No such file" in err
                raise _Error(
                    404 if missing else 400,
                    err.decode(errors="replace").strip(),
                    code="FILE_NOT_FOUND" if missing else "BAD_REQUEST",
                    source=SOURCE_DAEMON,
                )
        return Response(status_code=200)

    async def _delete_file(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        path = await self._resolve(sandbox, request.query_params.get("path"))
        recursive = request.query_params.get("recursive") == "true"
        script = '[ -e "$1" ] || [ -L "$1" ] || exit 4; if [ -d "$1" ] && [ "$2" != true ]; then rmdir "$1"; else rm -rf "$1"; fi'
        code, _, err = await self._in_container(
            sandbox, self.containers.run, ["/bin/sh", "-c", script, "sh", path, "true" if recursive else "false"]
        )
        if code == 4:
            raise _Error(404, f"file not found: {path}", code="FILE_NOT_FOUND", source=SOURCE_DAEMON)
        if code != 0:
            raise _Error(400, err.decode(errors="replace").strip(), code="BAD_REQUEST", source=SOURCE_DAEMON)
        return Response(status_code=204)

    async def _home_dir(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        _, out, _ = await self._in_container(sandbox, self.containers.run, ["/bin/sh", "-c", 'echo "$HOME"'])
        return JSONResponse({"dir": out.decode().strip() or "/"})

    async def _work_dir(self, request: Request) -> Response:
        sandbox = self._box_sandbox(request)
        return JSONResponse({"dir": await self._work_dir_of(sandbox)})

    async def _version(self, request: Request) -> Response:
        self._box_sandbox(request)
        return JSONResponse({"version": "standin"})

    # ------------------------------------------------------------------ preview proxy

    async def _plain(self, send: Send, status: int, message: str) -> None:
        body = json.dumps({"statusCode": status, "message": message, "source": SOURCE_PROXY}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _preview(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/preview/<id>/<port>/<path>`` → ``http://127.0.0.1:<published port>/<path>``, streamed both ways."""
        parts = scope["path"].split("/", 4)  # '', 'preview', id, port, rest
        if len(parts) < 4 or not parts[3].isdigit():
            await self._plain(send, 404, "no such preview")
            return
        sandbox_id, port, rest = parts[2], int(parts[3]), parts[4] if len(parts) > 4 else ""
        sandbox = self._lookup(sandbox_id)
        if sandbox is None:
            await self._plain(send, 404, f"sandbox {sandbox_id} not found")
            return
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        uses_api_key = authorization == f"Bearer {self.api_key}"
        token_ok = secrets.compare_digest(headers.get("x-daytona-preview-token", ""), sandbox.preview_token)
        if not (sandbox.public or token_ok or uses_api_key):
            await self._plain(send, 401, "missing or invalid X-Daytona-Preview-Token")
            return
        if sandbox.state != "started":
            await self._plain(send, 502, f"sandbox is {sandbox.state}")
            return
        try:
            host_port = await run_in_threadpool(self.containers.published_port, sandbox.id, port)
        except KeyError:
            await self._plain(send, 502, f"port {port} is not reachable (the stand-in publishes {list(self.ports)})")
            return
        sandbox.touch()
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        forward = [
            (k, v)
            for k, v in headers.items()
            if k not in _HOP_BY_HOP
            and k not in ("host", "content-length", "x-daytona-preview-token")
            and not (k == "authorization" and uses_api_key)
        ]
        url = f"http://127.0.0.1:{host_port}/{rest}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        timeout = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=5.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            upstream_request = client.build_request(scope["method"], url, headers=forward, content=bytes(body))
            try:
                upstream = await client.send(upstream_request, stream=True)
            except httpx.HTTPError as exc:
                await self._plain(send, 502, f"sandbox port {port} is not answering: {type(exc).__name__}")
                return
            try:
                response_headers = [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in upstream.headers.multi_items()
                    if k.lower() not in _HOP_BY_HOP
                ]
                await send({"type": "http.response.start", "status": upstream.status_code, "headers": response_headers})
                await self._stream(upstream, receive, send)
            finally:
                await upstream.aclose()

    @staticmethod
    async def _stream(upstream: httpx.Response, receive: Receive, send: Send) -> None:
        """Pump the upstream body chunk by chunk until it ends or the client goes away."""

        async def pump() -> None:
            with contextlib.suppress(httpx.HTTPError):
                async for chunk in upstream.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = {asyncio.ensure_future(pump()), asyncio.ensure_future(disconnected())}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stand-in Daytona server backed by Docker containers.")
    parser.add_argument("--port", type=int, default=3222)
    parser.add_argument("--image", default=pins.SANDBOX_IMAGE)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--ports", default="2468", help="comma-separated container ports to publish")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--minute", type=float, default=60.0, help="seconds per lifecycle minute")
    parser.add_argument("--snapshot", action="append", default=[], metavar="NAME=IMAGE")
    args = parser.parse_args(argv)
    snapshots = dict(item.split("=", 1) for item in args.snapshot)
    standin = DaytonaStandIn(
        args.image,
        api_key=args.api_key,
        ports=[int(p) for p in args.ports.split(",") if p],
        start_delay=args.start_delay,
        minute=args.minute,
        snapshots=snapshots,
        port=args.port,
    )
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with standin:
        print(f"Daytona stand-in: SANDBOX_WORKER_DAYTONA__API_URL={standin.api_url}", flush=True)
        done.wait()
    print("stopped; containers removed", flush=True)


if __name__ == "__main__":
    main()
