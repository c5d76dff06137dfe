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

import contextlib
import functools
import os
import secrets
import shlex
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import certifi
import httpx
import structlog
from httpx_sse import EventSource
from pydantic import SecretStr
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed, wait_incrementing

from providers.base import Endpoint, ExecResult, Provider, Sandbox, detached_command
from worker import pins
from worker.errors import AgentError, DaemonError, DaemonUnhealthy, DaemonUnreachable
from worker.http_transport import MAX_IDLE, HTTPClientTransport
from worker.models import InstallMode

T = TypeVar("T")

log = structlog.get_logger(__name__)

DAEMON_PATH = "/usr/local/bin/sandbox-agent"
DAEMON_LOG = "/tmp/sandbox-agent.log"  # noqa: S108 - a path inside the sandbox, not on the worker
AGENT_PROCESS_DIR = "/root/.local/share/sandbox-agent/bin/agent_processes"
MOCK_AGENT_ASSET = "mock-acp"
# The token-holding front on the published port (see worker/assets/daemon-front): the daemon itself listens on
# the sandbox's loopback, one port up, with no token on its command line.
FRONT_ASSET = "daemon-front"
FRONT_PATH = "/usr/local/lib/sandbox-worker/daemon-front"
LLM_BINDING_PATH = "/sandbox-worker/v1/llm-binding"  # answered by the front (worker/assets/daemon-front)


def new_token() -> SecretStr:
    return SecretStr(secrets.token_urlsafe(32))


@functools.cache
def _asset(name: str) -> bytes:
    """A file shipped with the worker, read once per process: the front is uploaded on every session's path when its
    image's is not the worker's."""
    return resources.files("worker").joinpath("assets", name).read_bytes()


def mock_agent_script() -> bytes:
    """The stand-in ACP agent shipped with the worker (installed as the ``mock`` agent's process)."""
    return _asset(MOCK_AGENT_ASSET)


def front_script() -> bytes:
    """The daemon's token-holding front shipped with the worker (see worker/assets/daemon-front)."""
    return _asset(FRONT_ASSET)


def loopback_port(port: int) -> int:
    """Where the daemon listens on the sandbox's loopback, behind the front on ``port``."""
    return port + 1 if port < 65535 else port - 1


def relay_port(port: int) -> int:
    """Where the front's LLM relay listens on the sandbox's loopback (:meth:`DaemonClient.bind_llm`)."""
    return port + 2 if port < 65534 else port - 2


def relay_url(port: int) -> str:
    """The relay's URL, an agent's LLM base URL in an llm-relay pool."""
    return f"http://127.0.0.1:{relay_port(port)}"


# --------------------------------------------------------------------------------------------------------
# Installing and starting the daemon inside a sandbox


def install_daemon(provider: Provider, sandbox: Sandbox, mode: InstallMode, binary: Path, *, image: str | None) -> None:
    """Make sure the pinned daemon and its front are in the sandbox: uploaded, or the image's, checked."""
    put_daemon(provider, sandbox, mode, binary, image=image)
    if mode is InstallMode.upload:
        check_daemon(provider, sandbox)


def put_daemon(provider: Provider, sandbox: Sandbox, mode: InstallMode, binary: Path, *, image: str | None) -> None:
    """Put the daemon and its front in place before the daemon starts. Uploaded when the mode says so (then the
    daemon's version is checked by :func:`check_daemon`, while it boots); otherwise the image's own, checked once
    per image (``None``: the provider's default) here: the pinned version, and a front that is the worker's, else the
    worker's is uploaded into each of the image's sandboxes."""
    if mode is InstallMode.upload:
        if not binary.is_file():
            raise DaemonError(f"daemon binary not found on the worker at {binary} (run scripts/setup.sh)")
        provider.upload(sandbox, DAEMON_PATH, binary.read_bytes(), mode=0o755)
        provider.upload(sandbox, FRONT_PATH, front_script(), mode=0o755)
        return
    key = image_key(provider, image)
    if key not in _IMAGE_FRONTS:
        _IMAGE_FRONTS[key] = _check_image(provider, sandbox)
    if not _IMAGE_FRONTS[key]:
        provider.upload(sandbox, FRONT_PATH, front_script(), mode=0o755)


def image_key(provider: Provider, image: str | None) -> str:
    """An image as the once-per-image checks know it: by provider and name (``None``: the provider's default)."""
    return f"{provider.name}:{image or '(default)'}"


# Images (by provider and name) whose daemon this process found to be the pinned version, and whether their front is
# the worker's. An image does not change under its name while a worker runs, so an image's sandbox is checked on its
# first sandbox only, not on every session's hot path (a command in the sandbox: ~70 ms on an idle Docker host).
_IMAGE_FRONTS: dict[str, bool] = {}
_IMAGE_CHECK = '"$0" --version || exit; cat "$1" 2>/dev/null; exit 0'


def _check_image(provider: Provider, sandbox: Sandbox) -> bool:
    """The image's daemon is the pinned version (else :class:`DaemonError`); returns whether its front is ours."""
    result = provider.exec(sandbox, ["sh", "-c", _IMAGE_CHECK, DAEMON_PATH, FRONT_PATH], timeout=30)
    _require_pinned(result)
    return result.stdout.partition("\n")[2] == front_script().decode()


def check_daemon(provider: Provider, sandbox: Sandbox) -> None:
    """The daemon uploaded into the sandbox is the pinned version."""
    _require_pinned(provider.exec(sandbox, [DAEMON_PATH, "--version"], timeout=30))


def _require_pinned(version: ExecResult) -> None:
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
    """Start ``sandbox-agent server`` from the workspace with the session's environment, behind its front, in one
    command in the sandbox (:data:`_START_DAEMON`).

    0.4.2 takes a token only as ``--token``, and a Docker sandbox's command lines are readable by every user of the
    host, so the token never goes on one: the daemon listens with ``--no-token`` on the sandbox's loopback (nothing
    outside the sandbox reaches it) and the front on ``port`` holds the token in its environment, readable only by
    its own uid, and lets through only connections that present it. The front and the token are put in place by
    :func:`put_daemon` and kept out of the daemon's (and so the agent's) environment."""
    launcher = ["sh", "-c", _START_DAEMON, *_server_argv(port)]
    provider.spawn(
        sandbox, launcher, env={**_process_env(env), **_front_env(token, port)}, cwd=cwd, log_path=DAEMON_LOG
    )


def _process_env(env: Mapping[str, SecretStr | str]) -> dict[str, str]:
    process_env = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in env.items()}
    process_env.update(
        SANDBOX_AGENT_LOG_STDOUT="1",
        # Fail fast instead of a silent implicit install on the first ACP POST.
        SANDBOX_AGENT_REQUIRE_PREINSTALL="1",
    )
    return process_env


def _front_env(token: SecretStr, port: int) -> dict[str, str]:
    """What :data:`_START_DAEMON` starts the front with; it unsets both before it becomes the daemon."""
    return {"SW_FRONT": " ".join([FRONT_PATH, *_front_ports(port)]), "SW_FRONT_TOKEN": token.get_secret_value()}


def _front_ports(port: int) -> list[str]:
    return [str(port), str(loopback_port(port)), str(relay_port(port))]


def _server_argv(port: int) -> list[str]:
    return [
        DAEMON_PATH,
        "server",
        "--no-telemetry",
        "--host",
        "127.0.0.1",
        "--port",
        str(loopback_port(port)),
        "--no-token",
    ]


def replace_daemon(
    current: DaemonClient,
    *,
    token: SecretStr,
    port: int,
    cwd: str,
    env: Mapping[str, SecretStr | str],
    files: Mapping[str, bytes],
) -> None:
    """Replace a running daemon no agent runs under yet (a warm pool's) and its front by ones with the session's
    token, environment, files and cwd, through the running daemon's own file and process API: no provider exec
    (~100 ms each on Docker).

    The launcher leaves a detached script behind that kills the running daemon and front, starts the new front
    (the token only in its environment) and becomes the new daemon, so the running daemon may die before it
    answers: the caller checks the outcome with the new token (health)."""
    for path, content in files.items():
        response = current.request("PUT", "/v1/fs/file", params={"path": path}, content=content)
        raise_for_problem(response)
    launcher = "export SW_DAEMON_PID=$PPID && " + detached_command(
        ["setsid", "sh", "-c", _REPLACE_DAEMON, *_server_argv(port)], cwd=cwd, log_path=DAEMON_LOG
    )
    if files:  # the file API writes with the default mode; credentials and configs are the agent's alone
        launcher = f"chmod 600 {shlex.join(files)} && {launcher}"
    body = {
        "command": "sh",
        "args": ["-c", launcher],
        "env": {"PATH": _PATH, **_process_env(env), **_front_env(token, port)},
        "timeoutMs": 10_000,
    }
    try:
        response = current.request("POST", "/v1/processes/run", json=body)
    except httpx.TransportError:
        return  # the running daemon was killed before it answered: the new one's health says whether it worked
    raise_for_problem(response)
    result = response.json()
    if result.get("exitCode") != 0:
        output = str(result.get("stderr") or result.get("stdout") or "").strip()[:200]
        raise DaemonError(f"replacing the daemon failed: the launcher exited {result.get('exitCode')}: {output}")


# Stops every `sandbox-agent server` and daemon front in the sandbox (the agents exit with the daemon) and waits
# for them to go, so new ones can bind the ports. Plain sh and /proc: minimal images have no procps.
_STOP_DAEMON = r"""
front=$1  # a function's $1 is its own argument
pids() { for p in /proc/[0-9]*; do
  case "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" in "$0 server"*|"python3 "*" $front "*) echo "${p#/proc/}";; esac; done; }
for pid in $(pids); do kill -TERM "$pid" 2>/dev/null; done
for _ in $(seq 50); do [ -z "$(pids)" ] && exit 0; sleep 0.1; done
for pid in $(pids); do kill -KILL "$pid" 2>/dev/null; done
"""


_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Starts the front (``SW_FRONT``: its path and ports) with the token and the sandbox's proxy (its LLM relay's way out)
# and nothing else in its environment (no session credential, no PYTHON* variable: -I), and becomes the daemon
# (``$0 "$@"``), which holds neither of the front's variables: one command in the sandbox for both.
_START_DAEMON = rf"""
env -i PATH={_PATH} SANDBOX_WORKER_DAEMON_TOKEN="$SW_FRONT_TOKEN" HTTPS_PROXY="${{HTTPS_PROXY:-}}" \
  NO_PROXY="${{NO_PROXY:-}}" python3 -I -S $SW_FRONT &
unset SW_FRONT SW_FRONT_TOKEN
exec "$0" "$@"
"""

# Run by the running daemon (its process API), so the launcher's parent is that daemon: the launcher passes its pid
# as SW_DAEMON_PID. Kills it and its front (SIGKILL: nothing runs under them to end cleanly), waits until they are
# dead (gone, or zombies: PID 1 of a container may never reap them) so the ports are free, then starts the new front
# and daemon as _START_DAEMON does.
_REPLACE_DAEMON = (
    r"""
pid=$SW_DAEMON_PID; unset SW_DAEMON_PID
[ "$(readlink "/proc/$pid/exe")" = "$0" ] || { echo "parent $pid is not $0" >&2; exit 1; }
kill -KILL "$pid"
for p in /proc/[0-9]*; do
  case "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" in "python3 "*" $SW_FRONT "*) kill -KILL "${p#/proc/}";; esac; done
while read -r _ _ state _ < "/proc/$pid/stat" 2>/dev/null && [ "$state" != Z ]; do sleep 0.005; done
for _ in $(seq 200); do
  busy=; for p in /proc/[0-9]*; do
    case "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" in "python3 "*" $SW_FRONT "*) busy=1;; esac; done
  [ -z "$busy" ] && break; sleep 0.005; done"""
    + _START_DAEMON
)


def stop_daemon(provider: Provider, sandbox: Sandbox) -> None:
    """End the daemon a previous attempt started, so the session's daemon starts with this attempt's
    environment (credentials may differ: a vault placeholder is per grant)."""
    result = provider.exec(sandbox, ["sh", "-c", _STOP_DAEMON, DAEMON_PATH, FRONT_PATH], timeout=30)
    if not result:
        raise DaemonError(f"could not stop the previous daemon (exit code {result.exit_code})")


# Agents (by image and name) this process found installed at the pinned version in an image with a preinstalled
# daemon: like the daemon's, checked on the image's first sandbox only (asking costs a request to the daemon, which
# runs the agent's `--version`: a second or more for Claude Code).
_PINNED_AGENTS: set[tuple[str, str]] = set()


def agent_pinned(agent: str, *, image: str | None) -> bool:
    """Whether ``agent`` was found installed at its pin in ``image`` already (never, without an image)."""
    return image is not None and (image, agent) in _PINNED_AGENTS


def check_agent(client: DaemonClient, agent: str, *, image: str | None = None) -> None:
    """The daemon has ``agent`` installed, at the pinned version where we pin one (``mock`` is ours); with ``image``
    (a preinstalled daemon's), once per image."""
    if agent_pinned(agent, image=image):
        return
    info = client.get_json(f"/v1/agents/{agent}", config="true")
    if not info.get("installed"):
        raise AgentError(
            f"agent {agent} is not installed in the sandbox image (see docs/providers.md for the images that carry it)"
        )
    expected = pins.AGENT_VERSIONS.get(agent)
    found = str(info.get("version") or "")
    if expected is not None and found != expected:
        raise AgentError(
            f"agent {agent} in the sandbox is version {found[:80]!r}, the worker is pinned to {expected!r}"
        )
    if image is not None:
        _PINNED_AGENTS.add((image, agent))


def daemon_log_tail(provider: Provider, sandbox: Sandbox, lines: int = 15) -> str:
    """The end of the daemon's log, for error messages. Best effort."""
    try:
        result = provider.exec(sandbox, ["tail", "-n", str(lines), DAEMON_LOG], timeout=10)
    except Exception:
        return ""
    return result.stdout.strip()


# --------------------------------------------------------------------------------------------------------
# HTTP client


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per worker process: loading the CA bundle costs ~50 ms of CPU, which httpx would otherwise
    spend on every client it builds (daemons behind a provider's edge speak HTTPS)."""
    return ssl.create_default_context(cafile=certifi.where())


@functools.cache
def _pool(proxy: str | None) -> httpx.BaseTransport:
    """The worker process's connections to daemons, direct or through ``proxy``: one pool for every daemon, each
    request carrying its daemon's headers and full URL (a client per session cost ~1 ms of CPU and new connections
    for each of its requests). No connection limit: an event stream holds its connection while it is read.

    Direct requests go over the standard library's ``http.client`` (worker.http_transport: half the CPU of httpx's own
    transport per request), proxied ones over httpx's. Requests go to the transport itself, not through an
    ``httpx.Client``: a client's per-request work (merging its defaults, cookies, auth, redirects, hooks; none of
    which a daemon's requests use) was a quarter of each request's CPU. Without a client there is no cookie jar
    either, so no daemon's (or its edge's) cookie ever goes to another's sandbox."""
    if proxy is None:
        return HTTPClientTransport(tls=_tls())
    return httpx.HTTPTransport(
        verify=_tls(), proxy=proxy, limits=httpx.Limits(max_connections=None, max_keepalive_connections=MAX_IDLE)
    )


# A forked worker process (Celery's prefork children) must not share its parent's connections.
os.register_at_fork(after_in_child=_pool.cache_clear)


@functools.cache
def _proxies() -> dict[str, str]:
    """The environment's proxies, read once per process (as the shared client read them), not at every session."""
    return urllib.request.getproxies()


def pool_for(url: str) -> httpx.BaseTransport:
    """The connections a request to ``url`` goes through: the environment's proxy for its scheme (``HTTPS_PROXY``,
    ``HTTP_PROXY``, ``ALL_PROXY``) unless ``NO_PROXY`` names its host, as the standard library reads them (an
    httpx client would too); direct otherwise. The standard library splits the URL too: httpx's parser costs a
    hundred times its CPU, on every session's path."""
    parts = urllib.parse.urlsplit(url)
    proxies = _proxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = None
    return _pool(proxy)


def _interrupt(response: httpx.Response) -> None:
    """Wake the thread reading ``response`` (blocked in a read) by shutting its connection's socket down: closing
    the response from another thread would not (a blocked read ends only with data or its timeout)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _NotUp(Exception):
    """A daemon just started does not answer yet."""


class DaemonClient:
    """Requests to one daemon, its token sent as ``Authorization: Bearer``, over the worker process's shared
    connections (:func:`pool_for`; or over ``transport`` alone, for tests)."""

    def __init__(
        self,
        endpoint: Endpoint,
        token: SecretStr,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = httpx.Timeout(timeout)
        self._timeout = self.timeout.as_dict()
        self._headers = {**endpoint.headers, "Authorization": f"Bearer {token.get_secret_value()}"}
        self._base = endpoint.url.rstrip("/")
        self._urls: dict[str, httpx.URL] = {}
        self._own = transport is not None
        self._closed = False
        self._streams: set[httpx.Response] = set()
        self._transport = transport if transport is not None else pool_for(self._base)

    def __repr__(self) -> str:
        return f"DaemonClient({self.endpoint.url!r})"

    def close(self) -> None:
        """No more requests; this client's event streams end at once (their readers see the connection closed), so
        none lingers in the shared pool. The shared pool stays open for the process's next sessions."""
        self._closed = True
        for response in self._streams.copy():
            _interrupt(response)
        if self._own:
            self._transport.close()

    def url(self, path: str) -> httpx.URL:
        """The daemon's URL of ``path``, parsed once (httpx parses a URL string again at every step of a request)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base + path)
        return url

    def _send(
        self, method: str, path: str, headers: Mapping[str, str], timeout: float | httpx.Timeout | None, **kwargs: Any
    ) -> httpx.Response:
        """``method path`` sent, its response's body not read yet."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        limits = self._timeout if timeout is None else httpx.Timeout(timeout).as_dict()
        request = httpx.Request(method, self.url(path), headers=headers, extensions={"timeout": limits}, **kwargs)
        response = self._transport.handle_request(request)
        response.request = request
        return response

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """``method path`` on the daemon (``kwargs`` as httpx takes them: params, content, json), its body read."""
        response = self._send(
            method, path, {**self._headers, **headers} if headers else self._headers, timeout, **kwargs
        )
        try:
            response.read()
        finally:
            response.close()
        return response

    @contextlib.contextmanager
    def events(
        self, path: str, *, headers: Mapping[str, str] | None = None, timeout: httpx.Timeout
    ) -> Iterator[EventSource]:
        """The daemon's SSE stream at ``path`` (as httpx_sse.connect_sse opens it, on a URL parsed once)."""
        sse = {**self._headers, **(headers or {}), "Accept": "text/event-stream", "Cache-Control": "no-store"}
        response = self._send("GET", path, sse, timeout)
        self._streams.add(response)
        try:
            yield EventSource(response)
        finally:
            self._streams.discard(response)
            response.close()

    def health(self) -> bool:
        try:
            response = self.request("GET", "/v1/health", timeout=5)
        except httpx.TransportError:
            return False
        return response.status_code == 200 and response.json().get("status") == "ok"

    def wait_healthy(self, timeout: float, *, poll: float | None = None) -> float:
        """Poll ``/v1/health`` until it answers ok (as :meth:`first_request` sends a first request); returns the
        seconds it took."""
        started = time.monotonic()

        def probe() -> None:
            if not self.health():
                raise _NotUp

        self._until_up(probe, timeout, poll)
        return time.monotonic() - started

    def first_request(
        self, method: str, path: str, *, boot: float, poll: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """``method path`` (as :meth:`request` takes it) to a daemon just started, which may not listen yet: sent again
        while it is refused or cut off, or answered 401 or 502-504 (by what stands in front of it until it listens, or
        by the daemon it replaces, which knows another token), for up to ``boot`` seconds. A request the daemon took
        and did not answer in time is not sent again."""

        def send() -> httpx.Response:
            try:
                response = self.request(method, path, **kwargs)
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout):
                raise _NotUp from None
            if response.status_code in (401, 502, 503, 504):
                raise _NotUp
            return response

        return self._until_up(send, boot, poll)

    def _until_up(self, send: Callable[[], T], timeout: float, poll: float | None) -> T:
        """``send`` until it stops raising _NotUp. A daemon is up within a few hundred ms and the engine's port proxy
        accepts connections before it listens, so there is no event to await: ``send`` is tried again every 10 ms at
        first (a refused request costs well under a millisecond) and less often after that, or every ``poll``
        seconds where the daemon is known to be up within tens of ms (a warm sandbox's). DaemonUnhealthy after
        ``timeout`` seconds."""
        retrying = Retrying(
            retry=retry_if_exception_type(_NotUp),
            wait=wait_fixed(poll) if poll else wait_incrementing(start=0.01, increment=0.005, max=0.25),
            stop=stop_after_delay(timeout),
            reraise=True,
        )
        try:
            return retrying(send)
        except _NotUp:
            raise DaemonUnhealthy(f"daemon not healthy after {timeout:g}s at {self.endpoint.url}") from None

    def get_json(self, path: str, **params: Any) -> Any:
        try:
            response = self.request("GET", path, params=params)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"GET {path}: {type(exc).__name__}") from exc
        raise_for_problem(response)
        return response.json()

    def agents(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = self.get_json("/v1/agents")["agents"]
        return agents

    def bind_llm(self, base_url: str, headers: Mapping[str, SecretStr]) -> None:
        """Give the front's LLM relay (:func:`relay_url`) the session's endpoint and auth headers: the agent's requests
        to the relay go there from now on, with these headers. The front answers this itself (204); the daemon never
        sees it."""
        body = {"base_url": base_url, "headers": {name: value.get_secret_value() for name, value in headers.items()}}
        try:
            response = self.request("PUT", LLM_BINDING_PATH, json=body)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"PUT {LLM_BINDING_PATH}: {type(exc).__name__}") from exc
        if response.status_code != 204:
            raise DaemonError(f"the daemon's front refused the LLM binding: {response.status_code}")


def raise_for_problem(response: httpx.Response) -> None:
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
