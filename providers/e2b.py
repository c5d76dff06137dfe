"""E2B driver (e2b SDK, sync API): one E2B sandbox per session, started from a template.

Connection settings are bound to one :class:`e2b.E2B` client per provider (never through the process
environment), so two providers with different keys or endpoints can live in one worker. What the driver relies
on, and why (see ../shared/reference/e2b-daytona.md):

- ``create`` carries ``timeout`` = the spec's TTL (E2B kills the sandbox when it elapses: a hard lifetime, so
  a lost worker cannot leak a sandbox for long) and ``idempotency_key``: the SDK retries 429/502/503/504 on its
  own, and the key makes a retried create return the first sandbox instead of starting a second one.
- Commands run under ``timeout -s KILL`` inside the sandbox, so a command that overruns is a result (exit 137)
  as with the Docker driver; the SDK's stream deadline, a few seconds later, is only the backstop for a
  sandbox that stopped answering.
- The daemon is started by :meth:`providers.base.Provider.spawn`: a short launcher, run with :meth:`exec`,
  that puts it in the background with its output on the log file and exits at once, so envd's command deadline
  and stream never touch the daemon itself (the SDK's ``background=True, timeout=0`` would leave the wait for
  the first event unbounded). Its secrets travel only as that command's ``envs``.
- ``get_host(port)`` is computed by the SDK without a scheme: the endpoint is ``{port_scheme}://{host}``, or
  ``port_proxy_url`` with a ``Host`` header when DNS for the sandbox domain is not available.

Every SDK exception, and the raw httpx/pyqwest transport errors the control plane lets escape, is translated
by :func:`_map_e2b_errors`. The e2b SDK is imported where it is called, so :class:`E2BConfig` loads without it.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, cast

import httpx
from pydantic import Field, SecretStr

from providers.base import Endpoint, ExecResult, Provider, ProviderConfig, Sandbox, SandboxSpec
from worker.errors import (
    ConfigurationError,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
    SandboxGone,
    SandboxWorkerError,
)

if TYPE_CHECKING:
    import e2b

PROVIDER = "e2b"
DEFAULT_DOMAIN = "e2b.app"
# Seconds the SDK's stream deadline trails the in-sandbox `timeout` of a command, so an overrunning command is
# killed (and reported) by the sandbox rather than abandoned by the client.
EXEC_GRACE_SECONDS = 5.0
# `connect` sets the lifetime of a running sandbox to at least this many seconds from now (E2B only ever extends
# it on connect); it is used only for sandboxes this process did not start itself.
CONNECT_MIN_LIFETIME = 60
# Sandboxes per list page (the API's maximum), and a bound so a misbehaving endpoint cannot keep the reaper
# paging forever.
LIST_PAGE_SIZE = 100
MAX_LIST_PAGES = 1000
# Idempotency keys E2B accepts: 1-255 lowercase letters, digits and hyphens.
_IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")
_TRAFFIC_HEADER = "e2b-traffic-access-token"


def _describe(exc: BaseException) -> str:
    """A short, secret-free description: SDK messages carry statuses and ids, never our env values."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


_ErrorTable = tuple[tuple[tuple[type[BaseException], ...], type[ProviderError], int | None], ...]


@functools.cache
def _by_type() -> _ErrorTable:
    """Checked in order: the first entry whose types match decides. SandboxNotRunningException is a subclass of
    TimeoutException, but no retry brings a sandbox back, so it comes first."""
    import e2b

    return (
        ((e2b.AuthenticationException,), ProviderAuthError, 401),  # not a SandboxException
        ((e2b.ServiceBusyException,), ProviderUnavailable, 503),  # not a SandboxException either
        ((e2b.RateLimitException,), ProviderRateLimited, 429),
        ((e2b.SandboxNotFoundException, e2b.SandboxNotRunningException), SandboxGone, 404),
        ((e2b.TimeoutException,), ProviderUnavailable, None),  # deadlines, SandboxUnreachableException
        ((e2b.InvalidArgumentException,), ProviderError, 400),
        ((e2b.NotFoundException,), ProviderError, 404),  # a file or a template: the request was wrong
        # The control plane lets httpx errors escape unwrapped; pyqwest raises the builtin ones.
        ((httpx.TransportError, ConnectionError, TimeoutError), ProviderUnavailable, None),
    )


def _classify(exc: BaseException) -> tuple[type[ProviderError], int | None]:
    import e2b

    for types, error_class, status in _by_type():
        if isinstance(exc, types):
            return error_class, status
    status = exc.status_code if isinstance(exc, e2b.SandboxException) else None
    if status == 401:
        return ProviderAuthError, status
    if status == 429:
        return ProviderRateLimited, status
    if status is not None and status >= 500:
        return ProviderUnavailable, status
    # 400/403/404/409 from the API, and the bare Exception the SDK raises for some malformed answers.
    return ProviderError, status


@contextmanager
def _map_e2b_errors(action: str, sandbox_id: str | None = None) -> Iterator[None]:
    """Translate e2b SDK exceptions and raw transport errors into :mod:`worker.errors`."""
    try:
        yield
    except SandboxWorkerError:
        raise
    except Exception as exc:
        error_class, status = _classify(exc)
        raise error_class(
            f"e2b {action} failed: {_describe(exc)}", provider=PROVIDER, sandbox_id=sandbox_id, status=status
        ) from exc


def _idempotency_key(key: str | None) -> str | None:
    """The spec's key as E2B accepts it: unchanged when it already fits, else a stable digest of it."""
    if key is None or _IDEMPOTENCY_KEY.fullmatch(key):
        return key
    return "sw-" + hashlib.sha256(key.encode()).hexdigest()


class E2BConfig(ProviderConfig):
    """E2B (e2b SDK)."""

    api_key: SecretStr | None = Field(None, description="E2B API key.")
    api_url: str | None = Field(
        None, description="Control-plane URL; the SDK default (https://api.<domain>) when unset."
    )
    sandbox_url: str | None = Field(None, description="envd URL override (self-hosted E2B or a stand-in server).")
    domain: str | None = Field(None, description="Sandbox domain; the SDK default (e2b.app) when unset.")
    template: str = Field(
        "sandbox-worker", description="Template with the daemon preinstalled (see docs/providers.md)."
    )
    port_scheme: str = Field("https", description="Scheme of the URL built from Sandbox.get_host(port).")
    port_proxy_url: str | None = Field(
        None,
        description="Reach sandbox ports through this URL with a Host header instead of DNS (stand-ins, private edges).",
    )
    public_traffic: bool = Field(
        True,
        description="When false, sandbox ports only answer requests carrying the sandbox's traffic access token "
        "(endpoint() adds it).",
    )
    restrict_egress: bool = Field(
        True,
        description="Deny sandboxes every outbound destination but `egress_always` and the request's "
        "sandbox.egress (E2B network deny_out 0.0.0.0/0 with allow_out); false: E2B's default, open internet.",
    )
    egress_always: list[str] = Field(
        default_factory=lambda: ["api.anthropic.com", "api.openai.com"],
        description="Hosts, addresses or CIDRs every sandbox may reach when egress is restricted: the LLM "
        "endpoints (and the vault egress proxy's address).",
    )
    retries: int = Field(
        3, ge=0, description="Control-plane retries of 429/502/503/504 answers (the SDK's own, with backoff)."
    )


class E2BProvider(Provider):
    """Sandboxes on E2B (or anything speaking its protocols, such as tests/standins/e2b.py)."""

    name = PROVIDER
    config_model: ClassVar[type[ProviderConfig]] = E2BConfig
    config: E2BConfig

    def __init__(self, config: E2BConfig) -> None:
        self.config = config
        self._client: e2b.E2B | None = None
        # SDK handles of the sandboxes this process started or connected to: they hold the envd access token.
        self._handles: dict[str, e2b.Sandbox] = {}

    @property
    def client(self) -> e2b.E2B:
        """The SDK client with this provider's settings bound (built on first use)."""
        if self._client is None:
            import e2b

            if self.config.api_key is None:
                raise ConfigurationError("the E2B provider needs an API key (e2b.api_key)", field="e2b.api_key")
            domain = self.config.domain or DEFAULT_DOMAIN
            params: dict[str, Any] = {
                "api_key": self.config.api_key.get_secret_value(),
                "domain": domain,
                "api_url": self.config.api_url or f"https://api.{domain}",
                "request_timeout": self.config.request_timeout,
                "retries": self.config.retries,
                "debug": False,
            }
            if self.config.sandbox_url:
                params["sandbox_url"] = self.config.sandbox_url
            self._client = e2b.E2B(**params)
        return self._client

    def _handle(self, sandbox_id: str) -> e2b.Sandbox:
        handle = self._handles.get(sandbox_id)
        if handle is None:
            with _map_e2b_errors("connect", sandbox_id):
                handle = self.client.Sandbox.connect(
                    sandbox_id, timeout=CONNECT_MIN_LIFETIME, request_timeout=self.config.request_timeout
                )
            self._handles[sandbox_id] = handle
        return handle

    # -- lifecycle ------------------------------------------------------------------------------------

    def _network(self, spec: SandboxSpec) -> e2b.SandboxNetworkOpts | None:
        """E2B's network options: the port token, and the egress allow-list as deny-all plus allow_out (hosts,
        addresses, CIDRs; E2B filters no ports and no wildcards, so such entries are refused)."""
        network: dict[str, Any] = {} if self.config.public_traffic else {"allow_public_traffic": False}
        for entry in spec.egress:
            if ":" in entry or entry.startswith("*."):
                raise InvalidRequest(
                    f"sandbox.egress: e2b allows hosts, addresses and CIDRs, not ports or wildcards ({entry!r})",
                    field="sandbox.egress",
                )
        if self.config.restrict_egress:
            network.update(deny_out=["0.0.0.0/0"], allow_out=[*self.config.egress_always, *spec.egress])
        elif spec.egress:
            raise InvalidRequest(
                "sandbox.egress: this worker leaves e2b sandboxes' egress open (e2b.restrict_egress)",
                field="sandbox.egress",
            )
        return cast("e2b.SandboxNetworkOpts", network) if network else None

    def start(self, spec: SandboxSpec) -> Sandbox:
        # E2B templates fix CPU and memory, and every port is reachable: spec.cpu/memory_mb/ports do not apply.
        network = self._network(spec)
        with _map_e2b_errors("create"):
            handle = self.client.Sandbox.create(
                template=spec.image or self.config.template,
                timeout=spec.ttl_seconds,
                metadata=dict(spec.labels),
                envs=dict(spec.env),
                network=network,
                idempotency_key=_idempotency_key(spec.idempotency_key),
                request_timeout=self.config.start_timeout,
            )
        self._handles[handle.sandbox_id] = handle
        return Sandbox(provider=PROVIDER, sandbox_id=handle.sandbox_id, labels=dict(spec.labels))

    def find(self, sandbox_id: str) -> Sandbox | None:
        try:
            with _map_e2b_errors("get_info", sandbox_id):
                info = self.client.Sandbox.get_info(sandbox_id, request_timeout=self.config.request_timeout)
        except SandboxGone:
            self._handles.pop(sandbox_id, None)
            return None
        return Sandbox(
            provider=PROVIDER, sandbox_id=info.sandbox_id, labels=dict(info.metadata), state=str(info.state.value)
        )

    def stop(self, sandbox_id: str) -> bool:
        self._handles.pop(sandbox_id, None)
        with _map_e2b_errors("kill", sandbox_id):
            killed: bool = self.client.Sandbox.kill(sandbox_id, request_timeout=self.config.request_timeout)
        return killed

    def list_owned(self, labels: Mapping[str, str]) -> list[Sandbox]:
        import e2b

        wanted = dict(labels)
        query = e2b.SandboxQuery(metadata=wanted, state=[e2b.SandboxState.RUNNING, e2b.SandboxState.PAUSED])
        found: list[Sandbox] = []
        with _map_e2b_errors("list"):
            paginator = self.client.Sandbox.list(
                query=query, limit=LIST_PAGE_SIZE, request_timeout=self.config.request_timeout
            )
            for _ in range(MAX_LIST_PAGES):
                if not paginator.has_next:
                    break
                for info in paginator.next_items():
                    metadata = dict(info.metadata)
                    # Filter again: this list feeds the reaper, which must never kill what it does not own.
                    if all(metadata.get(key) == value for key, value in wanted.items()):
                        found.append(
                            Sandbox(
                                provider=PROVIDER,
                                sandbox_id=info.sandbox_id,
                                labels=metadata,
                                state=str(info.state.value),
                            )
                        )
        return found

    def close(self) -> None:
        # The SDK's connection pools are process-wide; the handles only hold tokens.
        self._handles.clear()
        self._client = None

    # -- inside a sandbox -----------------------------------------------------------------------------

    def exec(
        self,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        import e2b

        handle = self._handle(sandbox.sandbox_id)
        command = shlex.join(["timeout", "-s", "KILL", f"{timeout:g}", *argv])
        with _map_e2b_errors("exec", sandbox.sandbox_id):
            try:
                result = handle.commands.run(
                    command,
                    envs=dict(env) if env else None,
                    cwd=cwd,
                    timeout=timeout + EXEC_GRACE_SECONDS,
                    request_timeout=self.config.request_timeout,
                )
            except e2b.CommandExitException as exc:  # a non-zero exit is a result
                return ExecResult(exc.exit_code, exc.stdout or "", exc.stderr or "")
        return ExecResult(result.exit_code, result.stdout or "", result.stderr or "")

    def upload(self, sandbox: Sandbox, path: str, data: bytes, *, mode: int = 0o644) -> None:
        handle = self._handle(sandbox.sandbox_id)
        with _map_e2b_errors("upload", sandbox.sandbox_id):
            # envd creates the parent directories.
            handle.files.write(path, data, request_timeout=self.config.request_timeout)
            self._run_checked(handle, shlex.join(["chmod", f"{mode:o}", path]), "upload")

    def _run_checked(self, handle: e2b.Sandbox, command: str, action: str) -> None:
        """Run a short helper command; its non-zero exit is the action's failure."""
        import e2b

        try:
            handle.commands.run(
                command, timeout=self.config.request_timeout, request_timeout=self.config.request_timeout
            )
        except e2b.CommandExitException as exc:
            raise ProviderError(
                f"e2b {action} failed: a helper command exited {exc.exit_code}: {_describe(Exception(exc.stderr))}",
                provider=PROVIDER,
                sandbox_id=handle.sandbox_id,
            ) from exc

    def endpoint(self, sandbox: Sandbox, port: int) -> Endpoint:
        handle = self._handle(sandbox.sandbox_id)
        host = handle.get_host(port)
        headers: dict[str, str] = {}
        if handle.traffic_access_token:
            headers[_TRAFFIC_HEADER] = handle.traffic_access_token
        if self.config.port_proxy_url:
            return Endpoint(self.config.port_proxy_url.rstrip("/"), headers={"Host": host, **headers})
        return Endpoint(f"{self.config.port_scheme}://{host}", headers=headers)
