"""A stand-in E2B server: the control plane, envd and the port proxy on one port, backed by Docker.

It speaks the wire protocols the real e2b 2.63.0 SDK uses (../../shared/reference/e2b-daytona.md §1), so the
driver is tested with the real SDK end to end:

- **control plane** (REST/JSON, ``X-API-KEY``): ``POST /v2/sandboxes`` (201; ``Idempotency-Key`` honoured: the
  same key returns the same sandbox), ``GET /sandboxes/{id}``, ``GET /v2/sandboxes`` (double-encoded
  ``metadata`` filter, ``state``, ``limit``/``nextToken`` paging with an ``x-next-token`` header),
  ``DELETE /sandboxes/{id}`` (204/404), ``POST /sandboxes/{id}/timeout``, ``POST /v2/sandboxes/{id}/connect``.
  Errors are ``{"code": <status>, "message": ...}``.
- **envd** (selected by the ``E2b-Sandbox-Id`` header, ``X-Access-Token`` checked against the issued token):
  Connect RPC ``process.Process/*`` and ``filesystem.Filesystem/{Stat,MakeDir,Remove,ListDir}`` mounted with the
  SDK's own generated ASGI applications, ``GET/POST /files`` and ``/health``. An unknown sandbox gets
  ``502 {"code": 502, "message": "The sandbox <id> was not found"}``, like the real edge.
- **ports**: a request whose ``Host`` is ``<port>-<sandboxID>.<domain>`` (what ``Sandbox.get_host(port)``
  returns) is reverse-proxied, streaming both ways (SSE passes unbuffered), to that port of the container,
  published on 127.0.0.1.

Each sandbox is a real container of the configured image (``envVars`` as its environment, ``metadata`` as its
labels, plus ``sandbox-worker-standin=e2b``). Commands run with the ``docker`` CLI's ``exec``: output streams as
events in order with the real exit code, ``Connect-Timeout-Ms`` kills the process group when it elapses
(``timeout=0`` means no limit), a client disconnect does not, and ``SendSignal`` kills it. A per-sandbox timer
removes the container when its ``timeout`` elapses (``set_timeout`` and ``connect`` extend it).

Tests use :class:`E2BStandIn` as a context manager; it adds fault injection (``add_fault``, ``lose_response``,
``clear_faults``), a record of ``requests`` and ``create_requests``, and ``vanish(sandbox_id)``.

Manual runs (``sandbox-worker submit --provider e2b``)::

    python -m tests.standins.e2b --port 3111 --image sandbox-worker/sandbox:0.4.2-agents --api-key KEY

then point the worker at it (the command prints these lines)::

    SANDBOX_WORKER_E2B__API_KEY=KEY
    SANDBOX_WORKER_E2B__API_URL=http://127.0.0.1:3111
    SANDBOX_WORKER_E2B__SANDBOX_URL=http://127.0.0.1:3111
    SANDBOX_WORKER_E2B__DOMAIN=e2b.standin
    SANDBOX_WORKER_E2B__PORT_SCHEME=http
    SANDBOX_WORKER_E2B__PORT_PROXY_URL=http://127.0.0.1:3111
    SANDBOX_WORKER_E2B__TEMPLATE=sandbox-worker/sandbox:0.4.2-agents

Every template id maps to the one image given on the command line unless ``templates`` says otherwise.
Containers are removed on exit; leftovers carry the label ``sandbox-worker-standin=e2b``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import contextvars
import gzip
import json
import os
import posixpath
import re
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.filesystem import filesystem_connect, filesystem_pb
from e2b.envd.process import process_connect, process_pb
from protobuf import Oneof
from protobuf.wkt.google.protobuf import timestamp_pb
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from tests.standins.containers import STANDIN_LABEL, ContainerSandboxes
from tests.standins.faults import Fault, FaultInjector
from tests.standins.server import ThreadedServer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

STANDIN = "e2b"
ENVD_PORT = 49983
# Recent enough that the SDK uses today's code paths (default user, stdin flag, octet-stream uploads).
ENVD_VERSION = "0.6.7"
DEFAULT_DOMAIN = "e2b.standin"
DEFAULT_API_KEY = "e2b_standin_key"
DEFAULT_SANDBOX_TIMEOUT = 300
# Containers also carry the id of the stand-in that made them, so concurrent test sessions (each with its own
# stand-in) never list or remove each other's containers; the shared STANDIN_LABEL only finds leftovers.
INSTANCE_LABEL = "sandbox-worker-standin-instance"

# Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1), plus the ones we rewrite.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "e2b-traffic-access-token",
    }
)

# Runs before the command inside the container: reports the in-container pid on stderr (the marker line is
# stripped from the output), changes to the working directory, and makes the command a process-group leader
# so a kill takes its children with it (the pid stays the same: setsid only forks for a group leader).
_PID_MARKER = b"\x1estandin-pid="
_LAUNCHER = (
    "read -r _ _ _ _ pg _ < /proc/$$/stat 2>/dev/null; "
    "printf '\\036standin-pid=%s\\n' \"$$\" >&2; "
    'if [ -n "$1" ]; then cd -- "$1" || exit 1; fi; shift; '
    'if [ "$pg" != "$$" ] && command -v setsid >/dev/null 2>&1; then exec setsid "$@"; fi; '
    'exec "$@"'
)
_KILL = 'kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" -- "$2"'

# Filesystem RPCs run this in the container (the sandbox images ship python3) and read one JSON line back.
_FS_HELPER = r"""
import grp, json, os, pwd, shutil, stat, sys

def entry(path):
    st = os.lstat(path)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return {"name": os.path.basename(path.rstrip("/")) or "/", "type": kind, "path": path, "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode), "permissions": stat.filemode(st.st_mode), "owner": owner,
            "group": group, "mtime": st.st_mtime,
            "target": os.readlink(path) if kind == "symlink" else None}

op, path = sys.argv[1], sys.argv[2]
try:
    if op == "stat":
        out = entry(path)
    elif op == "mkdir":
        if os.path.lexists(path):
            print(json.dumps({"error": "exists"}))
            sys.exit(0)
        os.makedirs(path)
        out = entry(path)
    elif op == "remove":
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        out = None
    elif op == "list":
        depth, out = int(sys.argv[3]), []
        base = path.rstrip("/") or "/"
        if not os.path.isdir(path):
            print(json.dumps({"error": "notdir"}))
            sys.exit(0)
        for root, dirs, files in os.walk(path):
            level = root[len(base):].count("/") + 1
            for name in sorted(dirs + files):
                out.append(entry(os.path.join(root, name)))
            if level >= depth:
                dirs[:] = []
    print(json.dumps({"ok": out}))
except FileNotFoundError:
    print(json.dumps({"error": "notfound"}))
except PermissionError:
    print(json.dumps({"error": "permission"}))
"""

_current: contextvars.ContextVar[_SandboxRecord] = contextvars.ContextVar("e2b_standin_sandbox")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


@dataclass
class _SandboxRecord:
    sandbox_id: str
    template_id: str
    image: str
    envd_token: str
    traffic_token: str | None
    metadata: dict[str, str]
    env: dict[str, str]
    started_at: datetime
    end_at: datetime
    allow_internet_access: bool | None
    container_id: str = ""
    processes: dict[int, _Process] = field(default_factory=dict)
    host_ports: dict[int, int] = field(default_factory=dict)
    timer: threading.Timer | None = None
    home: str | None = None

    def created_body(self, domain: str, envd_version: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "templateID": self.template_id,
            "sandboxID": self.sandbox_id,
            "clientID": "standin",
            "envdVersion": envd_version,
            "envdAccessToken": self.envd_token,
            "domain": domain,
            "alias": self.template_id,
        }
        if self.traffic_token:
            body["trafficAccessToken"] = self.traffic_token
        return body

    def listed_body(self, domain: str, envd_version: str) -> dict[str, Any]:
        return {
            "templateID": self.template_id,
            "alias": self.template_id,
            "sandboxID": self.sandbox_id,
            "clientID": "standin",
            "startedAt": _iso(self.started_at),
            "endAt": _iso(self.end_at),
            "envdVersion": envd_version,
            "cpuCount": 2,
            "memoryMB": 1024,
            "diskSizeMB": 4096,
            "state": "running",
            "metadata": dict(self.metadata),
            "domain": domain,
            **({"allowInternetAccess": self.allow_internet_access} if self.allow_internet_access is not None else {}),
        }


class _Gone:
    """Published instead of an end event when the sandbox disappeared under a running command."""


class _Process:
    """One command started through envd: a ``docker exec`` CLI process whose output fans out to subscribers."""

    def __init__(
        self,
        app: _E2BApp,
        record: _SandboxRecord,
        pid: int,
        tag: str | None,
        config: process_pb.ProcessConfig,
        cli: asyncio.subprocess.Process,
    ) -> None:
        self.app = app
        self.record = record
        self.pid = pid
        self.tag = tag
        self.config = config
        self.cli = cli
        self.killed = False
        self.finished = asyncio.Event()
        self.kill_timer: asyncio.TimerHandle | None = None
        self._queues: list[asyncio.Queue[process_pb.ProcessEvent | _Gone]] = []

    def subscribe(self) -> asyncio.Queue[process_pb.ProcessEvent | _Gone]:
        queue: asyncio.Queue[process_pb.ProcessEvent | _Gone] = asyncio.Queue()
        self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[process_pb.ProcessEvent | _Gone]) -> None:
        with contextlib.suppress(ValueError):
            self._queues.remove(queue)

    def _publish(self, event: process_pb.ProcessEvent | _Gone) -> None:
        for queue in list(self._queues):
            queue.put_nowait(event)

    async def _pump(self, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        while chunk := await stream.read(65536):
            data = process_pb.ProcessEvent.DataEvent(output=Oneof(name, chunk))  # type: ignore[arg-type]
            self._publish(process_pb.ProcessEvent(event=Oneof("data", data)))

    async def run(self) -> None:
        await asyncio.gather(self._pump(self.cli.stdout, "stdout"), self._pump(self.cli.stderr, "stderr"))
        code = await self.cli.wait()
        if self.kill_timer is not None:
            self.kill_timer.cancel()
        self.record.processes.pop(self.pid, None)
        if not self.killed and code != 0 and not await self.app.container_alive(self.record):
            self._publish(_Gone())
        elif self.killed:
            end = process_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status="signal: killed")
            self._publish(process_pb.ProcessEvent(event=Oneof("end", end)))
        else:
            end = process_pb.ProcessEvent.EndEvent(exit_code=code, exited=True, status=f"exit status {code}")
            self._publish(process_pb.ProcessEvent(event=Oneof("end", end)))
        self.finished.set()

    async def signal(self, name: str) -> None:
        if name == "KILL":
            self.killed = True
        await self.app.docker_exec(self.record, ["/bin/sh", "-c", _KILL, "sh", name, str(self.pid)])

    async def write_stdin(self, data: bytes) -> None:
        if self.cli.stdin is None or self.cli.stdin.is_closing():
            raise ConnectError(Code.FAILED_PRECONDITION, f"stdin of process {self.pid} is not open")
        self.cli.stdin.write(data)
        await self.cli.stdin.drain()

    def close_stdin(self) -> None:
        if self.cli.stdin is not None:
            self.cli.stdin.close()


class _ProcessService(process_connect.Process):
    """envd's process service on top of ``docker exec`` (subclasses the generated Protocol on purpose:
    unimplemented methods then answer UNIMPLEMENTED instead of crashing)."""

    def __init__(self, app: _E2BApp) -> None:
        self.app = app

    @staticmethod
    def _find(selector: process_pb.ProcessSelector | None) -> _Process:
        record = _current.get()
        match selector.selector if selector is not None else None:
            case Oneof(field="pid", value=pid):
                process = record.processes.get(int(pid))
            case Oneof(field="tag", value=tag):
                process = next((p for p in record.processes.values() if p.tag == tag), None)
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "a process selector is required")
        if process is None:
            raise ConnectError(Code.NOT_FOUND, "process not found")
        return process

    @staticmethod
    async def _events(
        process: _Process,
        queue: asyncio.Queue[process_pb.ProcessEvent | _Gone],
        keepalive: float | None,
    ) -> AsyncIterator[process_pb.ProcessEvent]:
        try:
            yield process_pb.ProcessEvent(event=Oneof("start", process_pb.ProcessEvent.StartEvent(pid=process.pid)))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), keepalive)
                except TimeoutError:
                    yield process_pb.ProcessEvent(event=Oneof("keepalive", process_pb.ProcessEvent.KeepAlive()))
                    continue
                if isinstance(event, _Gone):
                    raise ConnectError(Code.UNAVAILABLE, f"The sandbox {process.record.sandbox_id} was not found")
                yield event
                if event.event is not None and event.event.field == "end":
                    return
        finally:
            process.unsubscribe(queue)

    @staticmethod
    def _keepalive(ctx: RequestContext[Any, Any]) -> float | None:
        value = ctx.request_headers.get("keepalive-ping-interval")
        return float(value) if value and value.isdigit() and int(value) > 0 else None

    async def start(
        self,
        request: process_pb.StartRequest,
        ctx: RequestContext[process_pb.StartRequest, process_pb.StartResponse],
        /,
    ) -> AsyncIterator[process_pb.StartResponse]:
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "the stand-in does not emulate PTYs")
        record = _current.get()
        config = request.process or process_pb.ProcessConfig()
        process = await self.app.start_process(
            record,
            config,
            tag=request.tag if request.has_field("tag") else None,
            stdin=bool(request.stdin),
            timeout_ms=ctx.timeout_ms,
        )
        queue = process.subscribe()
        async for event in self._events(process, queue, self._keepalive(ctx)):
            yield process_pb.StartResponse(event=event)

    async def connect(
        self,
        request: process_pb.ConnectRequest,
        ctx: RequestContext[process_pb.ConnectRequest, process_pb.ConnectResponse],
        /,
    ) -> AsyncIterator[process_pb.ConnectResponse]:
        process = self._find(request.process)
        queue = process.subscribe()
        async for event in self._events(process, queue, self._keepalive(ctx)):
            yield process_pb.ConnectResponse(event=event)

    async def list(
        self, request: process_pb.ListRequest, ctx: RequestContext[process_pb.ListRequest, process_pb.ListResponse], /
    ) -> process_pb.ListResponse:
        record = _current.get()
        return process_pb.ListResponse(
            processes=[process_pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag) for p in record.processes.values()]
        )

    async def send_signal(
        self,
        request: process_pb.SendSignalRequest,
        ctx: RequestContext[process_pb.SendSignalRequest, process_pb.SendSignalResponse],
        /,
    ) -> process_pb.SendSignalResponse:
        process = self._find(request.process)
        name = "TERM" if request.signal == process_pb.Signal.SIGTERM else "KILL"
        await process.signal(name)
        return process_pb.SendSignalResponse()

    async def send_input(
        self,
        request: process_pb.SendInputRequest,
        ctx: RequestContext[process_pb.SendInputRequest, process_pb.SendInputResponse],
        /,
    ) -> process_pb.SendInputResponse:
        process = self._find(request.process)
        match request.input.input if request.input is not None else None:
            case Oneof(field="stdin", value=data):
                await process.write_stdin(bytes(data))
            case _:
                raise ConnectError(Code.UNIMPLEMENTED, "only stdin input is emulated")
        return process_pb.SendInputResponse()

    async def close_stdin(
        self,
        request: process_pb.CloseStdinRequest,
        ctx: RequestContext[process_pb.CloseStdinRequest, process_pb.CloseStdinResponse],
        /,
    ) -> process_pb.CloseStdinResponse:
        self._find(request.process).close_stdin()
        return process_pb.CloseStdinResponse()


class _FilesystemService(filesystem_connect.Filesystem):
    """envd's filesystem RPCs the SDK's ``files.exists/make_dir/remove/list`` use."""

    _TYPES: Mapping[str, filesystem_pb.FileType] = {
        "file": filesystem_pb.FileType.FILE,
        "dir": filesystem_pb.FileType.DIRECTORY,
        "symlink": filesystem_pb.FileType.SYMLINK,
    }

    def __init__(self, app: _E2BApp) -> None:
        self.app = app

    async def _helper(self, *args: str) -> Any:
        record = _current.get()
        code, out, err = await self.app.docker_exec(record, ["python3", "-c", _FS_HELPER, *args])
        if code != 0:
            raise ConnectError(Code.INTERNAL, err.decode(errors="replace") or f"helper exited {code}")
        result = json.loads(out.decode().strip().splitlines()[-1])
        match result.get("error"):
            case None:
                return result["ok"]
            case "notfound":
                raise ConnectError(Code.NOT_FOUND, f"path {args[1]} not found")
            case "exists":
                raise ConnectError(Code.ALREADY_EXISTS, f"path {args[1]} already exists")
            case "notdir":
                raise ConnectError(Code.INVALID_ARGUMENT, f"path {args[1]} is not a directory")
            case other:
                raise ConnectError(Code.PERMISSION_DENIED, f"path {args[1]}: {other}")

    def _entry(self, raw: Mapping[str, Any]) -> filesystem_pb.EntryInfo:
        seconds = int(raw["mtime"])
        return filesystem_pb.EntryInfo(
            name=raw["name"],
            type=self._TYPES[raw["type"]],
            path=raw["path"],
            size=raw["size"],
            mode=raw["mode"],
            permissions=raw["permissions"],
            owner=raw["owner"],
            group=raw["group"],
            modified_time=timestamp_pb.Timestamp(seconds=seconds, nanos=int((raw["mtime"] - seconds) * 1e9)),
            symlink_target=raw["target"],
            is_symlink=raw["type"] == "symlink",
        )

    async def _path(self, path: str) -> str:
        return await self.app.resolve_path(_current.get(), path)

    async def stat(
        self, request: filesystem_pb.StatRequest, ctx: RequestContext[Any, Any], /
    ) -> filesystem_pb.StatResponse:
        return filesystem_pb.StatResponse(entry=self._entry(await self._helper("stat", await self._path(request.path))))

    async def make_dir(
        self, request: filesystem_pb.MakeDirRequest, ctx: RequestContext[Any, Any], /
    ) -> filesystem_pb.MakeDirResponse:
        entry = await self._helper("mkdir", await self._path(request.path))
        return filesystem_pb.MakeDirResponse(entry=self._entry(entry))

    async def remove(
        self, request: filesystem_pb.RemoveRequest, ctx: RequestContext[Any, Any], /
    ) -> filesystem_pb.RemoveResponse:
        await self._helper("remove", await self._path(request.path))
        return filesystem_pb.RemoveResponse()

    async def list_dir(
        self, request: filesystem_pb.ListDirRequest, ctx: RequestContext[Any, Any], /
    ) -> filesystem_pb.ListDirResponse:
        entries = await self._helper("list", await self._path(request.path), str(max(1, request.depth)))
        return filesystem_pb.ListDirResponse(entries=[self._entry(e) for e in entries])


class _E2BApp:
    """The ASGI application: routes each request to the port proxy, envd or the control plane."""

    def __init__(
        self,
        sandboxes: ContainerSandboxes,
        *,
        api_key: str,
        domain: str,
        templates: Mapping[str, str],
        envd_version: str,
        default_timeout: int,
    ) -> None:
        self.sandboxes = sandboxes
        self.api_key = api_key
        self.domain = domain
        self.templates = dict(templates)
        self.envd_version = envd_version
        self.default_timeout = default_timeout
        self.create_requests: list[dict[str, Any]] = []
        self.instance = secrets.token_hex(6)
        self._records: dict[str, _SandboxRecord] = {}
        self._lock = threading.Lock()
        self._idempotent: dict[str, asyncio.Future[_SandboxRecord]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._host = re.compile(rf"^(?P<port>\d+)-(?P<id>[a-z0-9]+)\.{re.escape(domain)}(?::\d+)?$")
        self._process_app = process_connect.ProcessASGIApplication(_ProcessService(self))
        self._filesystem_app = filesystem_connect.FilesystemASGIApplication(_FilesystemService(self))
        self._api = Router(
            routes=[
                Route("/v2/sandboxes", self._create, methods=["POST"]),
                Route("/v2/sandboxes", self._list, methods=["GET"]),
                Route("/sandboxes/{sandbox_id}", self._get_info, methods=["GET"]),
                Route("/sandboxes/{sandbox_id}", self._kill, methods=["DELETE"]),
                Route("/sandboxes/{sandbox_id}/timeout", self._set_timeout, methods=["POST"]),
                Route("/v2/sandboxes/{sandbox_id}/connect", self._connect, methods=["POST"]),
                Route("/sandboxes/{sandbox_id}/connect", self._connect, methods=["POST"]),
                Route("/health", self._api_health, methods=["GET"]),
            ]
        )

    # -- registry -------------------------------------------------------------------------------------

    def record(self, sandbox_id: str) -> _SandboxRecord | None:
        with self._lock:
            return self._records.get(sandbox_id)

    def sandbox_ids(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def forget(self, sandbox_id: str) -> _SandboxRecord | None:
        with self._lock:
            record = self._records.pop(sandbox_id, None)
        if record is not None and record.timer is not None:
            record.timer.cancel()
        return record

    def destroy(self, sandbox_id: str) -> bool:
        """Remove the sandbox and its container (blocking: call it off the event loop). The container goes
        first, so once the control plane forgets a sandbox its container is gone too."""
        record = self.record(sandbox_id)
        if record is not None and record.timer is not None:
            record.timer.cancel()
        removed = self.sandboxes.remove(sandbox_id)
        return self.forget(sandbox_id) is not None or removed

    def _arm_timer(self, record: _SandboxRecord, seconds: float) -> None:
        if record.timer is not None:
            record.timer.cancel()
        record.end_at = datetime.now(UTC) + timedelta(seconds=seconds)
        timer = threading.Timer(max(0.0, seconds), self.destroy, args=(record.sandbox_id,))
        timer.daemon = True
        timer.name = f"e2b-standin-ttl-{record.sandbox_id}"
        record.timer = timer
        timer.start()

    async def container_alive(self, record: _SandboxRecord) -> bool:
        alive = await asyncio.to_thread(self.sandboxes.exists, record.sandbox_id)
        if not alive:
            self.forget(record.sandbox_id)
        return alive

    # -- commands in containers -----------------------------------------------------------------------

    async def docker_exec(
        self, record: _SandboxRecord, argv: Sequence[str], *, timeout: float = 60
    ) -> tuple[int, bytes, bytes]:
        cli = await asyncio.create_subprocess_exec(
            "docker",
            "exec",
            record.container_id,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(cli.communicate(), timeout)
        except TimeoutError:
            cli.kill()
            raise
        return int(cli.returncode or 0), out, err

    async def resolve_path(self, record: _SandboxRecord, path: str) -> str:
        """envd resolves relative paths against the user's home directory."""
        if path.startswith("/"):
            return posixpath.normpath(path)
        if record.home is None:
            _, out, _ = await self.docker_exec(record, ["/bin/sh", "-c", 'printf %s "$HOME"'])
            record.home = out.decode() or "/"
        return posixpath.normpath(posixpath.join(record.home, path))

    async def start_process(
        self,
        record: _SandboxRecord,
        config: process_pb.ProcessConfig,
        *,
        tag: str | None,
        stdin: bool,
        timeout_ms: float | None,
    ) -> _Process:
        envs = dict(config.envs)
        cwd = config.cwd if config.has_field("cwd") else ""
        # Values travel in the CLI's environment (`-e NAME` copies them), never on a command line.
        cli_env = {**os.environ, **envs}
        flags = [arg for name in envs for arg in ("-e", name)]
        cli = await asyncio.create_subprocess_exec(
            "docker",
            "exec",
            *(["-i"] if stdin else []),
            *flags,
            record.container_id,
            "/bin/sh",
            "-c",
            _LAUNCHER,
            "sh",
            cwd,
            config.cmd or "/bin/bash",
            *config.args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env,
        )
        assert cli.stderr is not None
        first = await cli.stderr.readline()
        if not first.startswith(_PID_MARKER):
            rest = await cli.stderr.read()
            await cli.wait()
            if not await self.container_alive(record):
                raise ConnectError(Code.UNAVAILABLE, f"The sandbox {record.sandbox_id} was not found")
            raise ConnectError(Code.INTERNAL, (first + rest).decode(errors="replace").strip())
        pid = int(first[len(_PID_MARKER) :].strip())
        process = _Process(self, record, pid, tag, config, cli)
        record.processes[pid] = process
        if timeout_ms is not None:
            # envd runs the command under the request's deadline: it is killed when the deadline passes, even if
            # the client has gone away.
            loop = asyncio.get_running_loop()
            process.kill_timer = loop.call_later(
                max(0.0, timeout_ms / 1000), lambda: self._spawn_task(process.signal("KILL"))
            )
        self._spawn_task(process.run())
        return process

    def _spawn_task(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- ASGI entry -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.loop = asyncio.get_running_loop()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = self._host.match(headers.get("host", ""))
        if host is not None and int(host["port"]) != ENVD_PORT:
            await self._proxy(scope, receive, send, host["id"], int(host["port"]), headers)
            return
        sandbox_id = headers.get("e2b-sandbox-id") or (host["id"] if host is not None else None)
        if sandbox_id is not None or scope["path"].startswith(("/process.", "/filesystem.", "/files")):
            await self._envd(scope, receive, send, sandbox_id or "", headers)
            return
        if scope["path"] != "/health" and headers.get("x-api-key") != self.api_key:
            await _send_json(send, 401, {"code": 401, "message": "Invalid API key"})
            return
        with contextlib.suppress(ClientDisconnect):  # the client gave up (a timeout): nobody to answer
            await self._api(scope, receive, send)

    # -- envd -----------------------------------------------------------------------------------------

    async def _envd(self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, headers: dict[str, str]) -> None:
        record = self.record(sandbox_id)
        if record is None:
            await _send_json(send, 502, {"code": 502, "message": f"The sandbox {sandbox_id} was not found"})
            return
        path = scope["path"]
        if path == "/health":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if not secrets.compare_digest(headers.get("x-access-token", ""), record.envd_token):
            await _send_json(send, 401, {"code": 401, "message": "invalid access token"})
            return
        token = _current.set(record)
        try:
            if path.startswith("/process.Process/"):
                await self._process_app(scope, receive, send)
            elif path.startswith("/filesystem.Filesystem/"):
                await self._filesystem_app(scope, receive, send)
            elif path == "/files":
                response = await self._files(Request(scope, receive), record)
                await response(scope, receive, send)
            else:
                await _send_json(send, 404, {"code": 404, "message": f"{path} not found"})
        finally:
            _current.reset(token)

    async def _files(self, request: Request, record: _SandboxRecord) -> Response:
        path = request.query_params.get("path", "")
        if request.method == "GET":
            if not path:
                return _error(400, "path is required")
            resolved = await self.resolve_path(record, path)
            data = await asyncio.to_thread(self.sandboxes.read_file, record.sandbox_id, resolved)
            if data is None:
                return _error(404, f"path '{resolved}' does not exist or is not a file")
            return Response(data, media_type="application/octet-stream")
        if request.method != "POST":
            return _error(405, "method not allowed")
        uploads: list[tuple[str, bytes]] = []
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=10_000) as form:
                for part in form.getlist("file"):
                    if isinstance(part, UploadFile):
                        uploads.append((path if path else part.filename or "", await part.read()))
        else:
            body = await request.body()
            if request.headers.get("content-encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            uploads.append((path, body))
        written = []
        for target, data in uploads:
            if not target:
                return _error(400, "path is required")
            resolved = await self.resolve_path(record, target)
            await asyncio.to_thread(self.sandboxes.write_file, record.sandbox_id, resolved, data)
            written.append({"name": posixpath.basename(resolved), "type": "file", "path": resolved})
        return JSONResponse(written)

    # -- port proxy -----------------------------------------------------------------------------------

    async def _proxy(
        self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int, headers: dict[str, str]
    ) -> None:
        record = self.record(sandbox_id)
        if record is None:
            await _send_json(send, 502, {"code": 502, "message": f"The sandbox {sandbox_id} was not found"})
            return
        if record.traffic_token and not secrets.compare_digest(
            headers.get("e2b-traffic-access-token", ""), record.traffic_token
        ):
            await _send_json(send, 403, {"code": 403, "message": "missing or invalid traffic access token"})
            return
        if port not in self.sandboxes.ports:
            await _send_json(send, 502, {"code": 502, "message": f"The sandbox is running but port {port} is not open"})
            return
        if port not in record.host_ports:
            try:
                record.host_ports[port] = await asyncio.to_thread(self.sandboxes.published_port, sandbox_id, port)
            except KeyError:
                await _send_json(send, 502, {"code": 502, "message": f"The sandbox {sandbox_id} was not found"})
                return
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5), trust_env=False)

        body_done = asyncio.Event()
        has_body = "content-length" in headers or "transfer-encoding" in headers

        async def request_body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                if chunk := message.get("body", b""):
                    yield chunk
                if not message.get("more_body", False):
                    break
            body_done.set()

        if not has_body:
            await receive()  # the (empty) request body
            body_done.set()
        upstream_headers = [
            (k, v) for k, v in headers.items() if k not in _HOP_BY_HOP and not (k == "content-length" and not has_body)
        ]
        query = scope.get("query_string", b"").decode("latin-1")
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        upstream = self._http.build_request(
            scope["method"],
            f"http://127.0.0.1:{record.host_ports[port]}{path}" + (f"?{query}" if query else ""),
            headers=upstream_headers,
            content=request_body() if has_body else None,
        )
        try:
            response = await self._http.send(upstream, stream=True)
        except httpx.TransportError as exc:
            await _send_json(
                send, 502, {"code": 502, "message": f"The sandbox is running but port {port} is not open ({exc!r})"}
            )
            return

        async def pump() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.multi_items()
                        if k.lower() not in _HOP_BY_HOP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch_disconnect() -> None:
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch_disconnect())
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await response.aclose()

    # -- control plane --------------------------------------------------------------------------------

    async def _api_health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _create(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("templateID"), str):
            return _error(400, "templateID is required")
        key = request.headers.get("idempotency-key")
        self.create_requests.append({"idempotency_key": key, "body": body})
        if key is not None:
            pending = self._idempotent.get(key)
            if pending is not None:
                try:
                    record = await asyncio.shield(pending)
                except Exception as exc:
                    return _error(500, f"the original request failed: {exc}")
                return JSONResponse(record.created_body(self.domain, self.envd_version), status_code=201)
            pending = asyncio.get_running_loop().create_future()
            self._idempotent[key] = pending
        try:
            record = await self._create_sandbox(body)
        except Exception as exc:
            if key is not None:
                self._idempotent.pop(key).set_exception(exc)
            return _error(500, f"failed to start the sandbox: {exc}")
        if key is not None:
            self._idempotent[key].set_result(record)
        return JSONResponse(record.created_body(self.domain, self.envd_version), status_code=201)

    async def _create_sandbox(self, body: Mapping[str, Any]) -> _SandboxRecord:
        template = body["templateID"]
        timeout = int(body.get("timeout", self.default_timeout))
        network = body.get("network") or {}
        now = datetime.now(UTC)
        record = _SandboxRecord(
            sandbox_id="i" + secrets.token_hex(10),
            template_id=template,
            image=self.templates.get(template, self.sandboxes.image),
            envd_token=secrets.token_urlsafe(24),
            traffic_token=secrets.token_urlsafe(24) if network.get("allowPublicTraffic") is False else None,
            metadata={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
            env={str(k): str(v) for k, v in (body.get("envVars") or {}).items()},
            started_at=now,
            end_at=now,
            allow_internet_access=body.get("allow_internet_access"),
        )
        await asyncio.to_thread(self._run_container, record)
        with self._lock:
            self._records[record.sandbox_id] = record
        self._arm_timer(record, timeout)
        return record

    def _run_container(self, record: _SandboxRecord) -> None:
        labels = {**record.metadata, INSTANCE_LABEL: self.instance}
        if record.image == self.sandboxes.image:
            self.sandboxes.create(record.sandbox_id, env=record.env, labels=labels)
        else:
            # A template mapped to another image: same container shape, different image.
            original = self.sandboxes.image
            try:
                self.sandboxes.image = record.image
                self.sandboxes.create(record.sandbox_id, env=record.env, labels=labels)
            finally:
                self.sandboxes.image = original
        record.container_id = self.sandboxes.container(record.sandbox_id).id or ""

    def _not_found(self, sandbox_id: str) -> Response:
        return _error(404, f"sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it")

    async def _get_info(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        record = self.record(sandbox_id)
        if record is None:
            return self._not_found(sandbox_id)
        body = record.listed_body(self.domain, self.envd_version)
        body["envdAccessToken"] = record.envd_token
        return JSONResponse(body)

    async def _list(self, request: Request) -> Response:
        params = request.query_params
        # The SDK percent-quotes each key and value, urlencodes the pairs, and sends that as one parameter.
        wanted = {unquote(k): unquote(v) for k, v in parse_qsl(params.get("metadata", ""), keep_blank_values=True)}
        states = set((params.get("state") or "running,paused").split(","))
        try:
            limit = int(params.get("limit", "100"))
            offset = int(base64.urlsafe_b64decode(params["nextToken"]).decode()) if params.get("nextToken") else 0
        except ValueError:
            return _error(400, "invalid limit or nextToken")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100")
        with self._lock:
            records = list(self._records.values())
        matching = [
            r
            for r in records
            if "running" in states
            and all(r.metadata.get(k) == v for k, v in wanted.items())
            and params.get("template") in (None, r.template_id)
        ]
        matching.sort(key=lambda r: (r.started_at, r.sandbox_id), reverse=params.get("order") == "desc")
        page = matching[offset : offset + limit]
        headers = {}
        if offset + limit < len(matching):
            headers["x-next-token"] = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
        return JSONResponse([r.listed_body(self.domain, self.envd_version) for r in page], headers=headers)

    async def _kill(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        if self.record(sandbox_id) is None:
            return self._not_found(sandbox_id)
        await asyncio.to_thread(self.destroy, sandbox_id)
        return Response(status_code=204)

    async def _set_timeout(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        record = self.record(sandbox_id)
        if record is None:
            return self._not_found(sandbox_id)
        try:
            timeout = int((await request.json())["timeout"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "timeout is required")
        self._arm_timer(record, timeout)
        return Response(status_code=204)

    async def _connect(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        record = self.record(sandbox_id)
        if record is None:
            return self._not_found(sandbox_id)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return _error(400, "request body is not JSON")
        timeout = int(body.get("timeout", self.default_timeout))
        # A running sandbox's lifetime only ever grows on connect.
        remaining = (record.end_at - datetime.now(UTC)).total_seconds()
        if timeout > remaining:
            self._arm_timer(record, timeout)
        return JSONResponse(record.created_body(self.domain, self.envd_version), status_code=200)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class E2BStandIn:
    """A stand-in E2B server with real containers, for tests and manual runs.

    ``with E2BStandIn(image) as e2b:`` starts it on 127.0.0.1 (``e2b.url``); leaving removes every container it
    created. Point the SDK's ``api_url`` and ``sandbox_url`` at ``e2b.url`` and reach sandbox ports by sending
    ``Host: <sandbox.get_host(port)>`` to ``e2b.url``.
    """

    def __init__(
        self,
        image: str = "sandbox-worker/sandbox:0.4.2-agents",
        *,
        api_key: str = DEFAULT_API_KEY,
        ports: Sequence[int] = (2468,),
        domain: str = DEFAULT_DOMAIN,
        port: int | None = None,
        templates: Mapping[str, str] | None = None,
        envd_version: str = ENVD_VERSION,
        default_timeout: int = DEFAULT_SANDBOX_TIMEOUT,
    ) -> None:
        self.image = image
        self.api_key = api_key
        self.domain = domain
        self.sandboxes = ContainerSandboxes(image, standin=STANDIN, ports=ports)
        self.app = _E2BApp(
            self.sandboxes,
            api_key=api_key,
            domain=domain,
            templates=templates or {},
            envd_version=envd_version,
            default_timeout=default_timeout,
        )
        self.faults = FaultInjector(self.app)
        self._server = ThreadedServer(self.faults, port=port)
        self.url = self._server.url

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> str:
        return self._server.start()

    def stop(self) -> None:
        for sandbox_id in self.app.sandbox_ids():
            self.app.forget(sandbox_id)
        # Removing the containers ends every `docker exec`, so open command streams finish before the server stops.
        self.remove_containers()
        loop = self.app.loop
        if loop is not None and loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.app.aclose(), loop).result(timeout=5)
        self._server.stop()

    def __enter__(self) -> E2BStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls --------------------------------------------------------------------------------

    def add_fault(
        self,
        path: str,
        status: int,
        *,
        method: str | None = None,
        count: int = 1,
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Fault:
        """Answer the next ``count`` requests matching ``method`` and the ``path`` regex with ``status``
        before they reach the server."""
        fault = Fault(
            path=path, status=status, method=method, count=count, delay=delay, headers=dict(headers or {}), body=body
        )
        self.faults.add(fault)
        return fault

    def lose_response(self, path: str, *, method: str | None = None, status: int = 502, count: int = 1) -> Fault:
        """Process the next ``count`` matching requests, then answer ``status`` as if the response was lost."""
        fault = Fault(path=path, status=status, method=method, count=count, after=True)
        self.faults.add(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop queued faults and lost responses, and forget the recorded requests."""
        self.faults.clear()
        self.app.create_requests.clear()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request received so far, as ``(method, path)``."""
        return list(self.faults.requests)

    def requests_to(self, path: str, method: str | None = None) -> list[tuple[str, str]]:
        """The recorded requests whose path matches the ``path`` regex (and ``method`` when given)."""
        return [(m, p) for m, p in self.requests if re.search(path, p) and method in (None, m)]

    @property
    def create_requests(self) -> list[dict[str, Any]]:
        """Each ``POST /v2/sandboxes`` that reached the server: ``{"idempotency_key", "body"}``."""
        return list(self.app.create_requests)

    def sandbox_ids(self) -> list[str]:
        """Ids of the sandboxes the control plane knows (running)."""
        return self.app.sandbox_ids()

    def container_ids(self) -> list[str]:
        """Ids of the sandboxes of this stand-in that have a container, running or not."""
        prefix = f"sw-standin-{STANDIN}-"
        found = self.sandboxes.client.containers.list(
            all=True, filters={"label": f"{INSTANCE_LABEL}={self.app.instance}"}
        )
        return [c.name.removeprefix(prefix) for c in found if c.name and c.name.startswith(prefix)]

    def remove_containers(self) -> None:
        """Remove every container this stand-in created (and only those)."""
        for sandbox_id in self.container_ids():
            self.sandboxes.remove(sandbox_id)

    def vanish(self, sandbox_id: str) -> bool:
        """Remove a sandbox and its container behind the SDK's back, as a host failure would."""
        return self.app.destroy(sandbox_id)

    def worker_env(self) -> dict[str, str]:
        """The settings that point sandbox-worker's E2B provider at this stand-in."""
        return {
            "SANDBOX_WORKER_E2B__API_KEY": self.api_key,
            "SANDBOX_WORKER_E2B__API_URL": self.url,
            "SANDBOX_WORKER_E2B__SANDBOX_URL": self.url,
            "SANDBOX_WORKER_E2B__DOMAIN": self.domain,
            "SANDBOX_WORKER_E2B__PORT_SCHEME": "http",
            "SANDBOX_WORKER_E2B__PORT_PROXY_URL": self.url,
            "SANDBOX_WORKER_E2B__TEMPLATE": self.image,
        }


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.standins.e2b", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3111)
    parser.add_argument("--image", default="sandbox-worker/sandbox:0.4.2-agents")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--domain", default=DEFAULT_DOMAIN)
    parser.add_argument("--ports", default="2468", help="comma-separated container ports to publish")
    args = parser.parse_args(list(argv) if argv is not None else None)
    ports = tuple(int(p) for p in args.ports.split(",") if p)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with E2BStandIn(args.image, api_key=args.api_key, ports=ports, domain=args.domain, port=args.port) as standin:
        print(f"stand-in E2B on {standin.url} (image {args.image}); point the worker at it with:")
        for name, value in standin.worker_env().items():
            print(f"  export {name}={value}")
        print(
            f"Ctrl-C stops it and removes its containers; leftovers of a crashed run are labelled {STANDIN_LABEL}={STANDIN}"
        )
        while not stop.wait(1):
            pass


if __name__ == "__main__":
    main()
