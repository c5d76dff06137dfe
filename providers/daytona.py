"""Daytona driver, on the real ``daytona`` SDK (pinned 0.226.1).

**Sync or async.** The SDK's sync client (``Daytona``) enforces the wall-clock limits of create, delete,
start, stop and the state waits with ``SIGALRM`` when called from the main thread (it replaces the process's
SIGALRM handler for the duration) and with ``PyThreadState_SetAsyncExc`` from any other thread (an exception
injected at an arbitrary bytecode, which cannot interrupt a blocking socket read). Celery's prefork children
run tasks in their main thread, while the worker also calls providers from other threads (the reaper, the
CLI), so both mechanisms would be live. This driver therefore uses the **async client** (``AsyncDaytona``),
whose limits are plain ``asyncio.wait_for`` and whose transport is one aiohttp session, and drives it through
**one private event loop on a daemon thread** per provider instance (:class:`_LoopThread`). Every public
method submits a coroutine to that loop and waits for it with an outer deadline (the call's own timeout plus a
grace), so no call can hang the caller, and no signal handler or async exception is ever involved. The loop
and client are created lazily and rebuilt after a fork (a Celery prefork child never reuses its parent's
loop thread, which does not exist in the child).

**Configuration** is bound per client from :class:`DaytonaConfig` (api key, API URL, target), never from
the process environment. One SDK quirk: when ``target`` is unset the SDK still falls
back to ``DAYTONA_TARGET`` (process env or a ``.env`` file in the working directory) before the organisation
default.

**Mapping** ``SandboxSpec`` → Daytona:

- ``spec.image`` names a *snapshot* (the request's ``sandbox.image`` is a snapshot for Daytona) and overrides
  ``config.snapshot``; without it ``config.image`` (built by Daytona from that image, and the only case where
  ``cpu``/``memory_mb`` apply, rounded up to whole CPUs and GiB) or else ``config.snapshot`` is used.
- ``env`` → ``env_vars``; ``labels`` + ``sandbox-worker-idempotency-key`` → ``labels``. Daytona adds its own
  ``code-toolbox-language`` label.
- lifetime: ``ttl_minutes`` = ``ttl_seconds`` in minutes, rounded up (Daytona destroys the sandbox that long
  after creation whatever its state), ``auto_stop_interval`` = the same number of idle minutes (so an
  abandoned sandbox stops even where TTLs are not enforced) and ``auto_delete_interval`` =
  ``config.auto_delete_minutes`` (0: a stopped sandbox is deleted at once).

**Create retries.** Daytona's SDK retries no HTTP statuses, so :meth:`DaytonaProvider.start` retries 429,
502, 503, 504 and connection errors itself (tenacity: jittered exponential backoff, bounded attempts and
``start_timeout`` overall, ``Retry-After`` honoured). A failed create may still have created the sandbox
(a 504 or a read timeout after the API accepted it), so before every retry, and before the first attempt when
the caller supplied an idempotency key, the driver lists sandboxes by the idempotency label and adopts the
one it finds (deleting any duplicates). Without a caller key a fresh key is used per ``start()`` call, so the
adoption is always scoped to this very request.

**Exec.** ``process.exec`` returns stdout and stderr combined: :class:`ExecResult` carries it all in
``stdout`` (``stderr`` is empty). A command that outlives its timeout is killed by the Daytona daemon and
reported as exit code 137 (like the Docker driver's ``timeout -s KILL``), not as an exception.

**Spawn** is :meth:`providers.base.Provider.spawn` over this ``exec``: session commands take no env, so secrets
would have to be written into the command text, which Daytona keeps in the session's command list
(``get_session`` shows it) and which shows up in ``ps``, and an env file would sit on disk between upload and
chmod; ``process.exec`` carries ``env`` in the request body and the daemon sets it on that process only. The
launcher backgrounds the daemon under nohup with its output in the log file and stdin from /dev/null, so the
exec returns at once and the daemon, reparented, keeps running; this is the SDK's documented way to start a
server.

The SDK (and its transports, aiohttp and urllib3) is imported where it is called, so :class:`DaytonaConfig`
loads without it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import functools
import math
import os
import shlex
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import httpx
import pydantic
import structlog
from pydantic import Field, SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_random_exponential

from providers.base import (
    EXIT_KILLED_AT_TIMEOUT,
    Endpoint,
    ExecResult,
    Provider,
    ProviderConfig,
    Sandbox,
    SandboxSpec,
    egress_network,
)
from worker.errors import (
    ConfigurationError,
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
    SandboxGone,
)

if TYPE_CHECKING:
    import daytona
    from daytona import AsyncDaytona, AsyncSandbox, CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams

log = structlog.get_logger(__name__)

T = TypeVar("T")

PROVIDER = "daytona"
LABEL_IDEMPOTENCY_KEY = "sandbox-worker-idempotency-key"
PREVIEW_TOKEN_HEADER = "X-Daytona-Preview-Token"  # noqa: S105 - a header name, not a secret
# Seconds the bridge waits beyond an SDK call's own timeout before it gives up on the coroutine.
_BRIDGE_GRACE = 10.0
# A Retry-After longer than this is not honoured in full (the Celery-level retry takes over instead).
_RETRY_AFTER_CAP = 60.0
_GONE_STATES = frozenset({"destroyed", "destroying"})
# States an earlier attempt's sandbox can be in and still not be adopted (it will never become "started" alone).
_NOT_ADOPTABLE = _GONE_STATES | {"error", "build_failed", "stopping", "stopped", "archiving", "archived"}
_RETRYABLE_CREATE_STATUSES = frozenset({429, 502, 503, 504})
_HANDLE_CACHE_SIZE = 256
_LIST_PAGE_SIZE = 100


# --------------------------------------------------------------------------------------------- errors


def _caused_by_transport(exc: BaseException) -> bool:
    """Whether a transport failure (refused connection, reset, read timeout) is in ``exc``'s cause chain.
    The sync SDK surfaces a refused connection as a bare ``DaytonaError`` caused by urllib3's ``MaxRetryError``;
    the async one as aiohttp ``ClientError``s."""
    import aiohttp
    import urllib3.exceptions

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(
            current,
            urllib3.exceptions.HTTPError | aiohttp.ClientError | httpx.TransportError | OSError | TimeoutError,
        ):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


_ErrorTable = tuple[tuple[tuple[type[BaseException], ...], type[ProviderError]], ...]


@functools.cache
def _by_class() -> _ErrorTable:
    """Ordered: subclasses before their bases (a file that is missing is not a sandbox that is gone)."""
    import daytona

    return (
        ((daytona.DaytonaFileAccessDeniedError, daytona.DaytonaGitAuthFailedError), ProviderError),  # in-sandbox
        ((daytona.DaytonaAuthenticationError, daytona.DaytonaForbiddenError), ProviderAuthError),
        ((daytona.DaytonaRateLimitError,), ProviderRateLimited),
        ((daytona.DaytonaFileNotFoundError, daytona.DaytonaProcessNotFoundError), ProviderError),
        ((daytona.DaytonaNotFoundError, daytona.DaytonaSpotEvictedError), SandboxGone),
        (
            (
                daytona.DaytonaTimeoutError,
                daytona.DaytonaConnectionError,
                daytona.DaytonaInternalServerError,
                daytona.DaytonaBadGatewayError,
                daytona.DaytonaServiceUnavailableError,
            ),
            ProviderUnavailable,
        ),
    )


def _class_for_status(status: int) -> type[ProviderError]:
    if status in (401, 403):
        return ProviderAuthError
    if status in (404, 410):
        return SandboxGone
    if status == 429:
        return ProviderRateLimited
    if status == 408 or status >= 500:
        return ProviderUnavailable
    return ProviderError


def _translate(exc: daytona.DaytonaError, *, operation: str, sandbox_id: str | None) -> ProviderError:
    """The most specific worker error for one SDK exception."""
    status = exc.status_code
    detail = f"daytona {operation} failed: {type(exc).__name__}"
    if status is not None:
        detail += f" (HTTP {status})"
    detail += f": {_short(exc)}"
    error_cls = next((cls for sdk_classes, cls in _by_class() if isinstance(exc, sdk_classes)), None)
    if error_cls is None and status is not None:
        error_cls = _class_for_status(status)  # a bare DaytonaError with a status (file uploads raise these)
    if error_cls is None:
        # A bare DaytonaError without a status: a transport failure (connection refused) carries its cause;
        # anything else is an SDK-side refusal (a sandbox in an error state, an unexpected answer).
        error_cls = ProviderUnavailable if _caused_by_transport(exc) else ProviderError
    return error_cls(detail, provider=PROVIDER, sandbox_id=sandbox_id, status=status)


@contextlib.contextmanager
def _map_daytona_errors(operation: str, sandbox_id: str | None = None) -> Iterator[None]:
    """Translate every SDK exception, raw transport error and bridge timeout into :mod:`worker.errors`."""
    import aiohttp
    import daytona
    import urllib3.exceptions

    try:
        yield
    except ProviderError:
        raise
    except daytona.DaytonaError as exc:
        raise _translate(exc, operation=operation, sandbox_id=sandbox_id) from exc
    except (aiohttp.ClientError, httpx.TransportError, urllib3.exceptions.HTTPError, TimeoutError, OSError) as exc:
        # TimeoutError covers asyncio's and concurrent.futures' (aliases since 3.11): the bridge's deadline.
        raise ProviderUnavailable(
            f"daytona {operation} failed: {type(exc).__name__}: {_short(exc)}", provider=PROVIDER, sandbox_id=sandbox_id
        ) from exc
    except pydantic.ValidationError as exc:
        raise ProviderError(
            f"daytona {operation} failed: unexpected answer ({exc.error_count()} validation errors)",
            provider=PROVIDER,
            sandbox_id=sandbox_id,
        ) from exc


# --------------------------------------------------------------------------------------------- bridge


class _LoopThread:
    """One asyncio loop on a daemon thread; the single bridge between the driver's sync API and the SDK."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop; after ``timeout`` seconds cancel it and raise :class:`TimeoutError`."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:g}s") from None

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


# --------------------------------------------------------------------------------------------- helpers


def _minutes(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60))


def _state_name(state: object) -> str:
    value = str(getattr(state, "value", state) or "unknown")
    return "running" if value == "started" else value


def _retry_after(exc: BaseException | None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or an HTTP date), if any."""
    headers = getattr(exc, "headers", None)
    if not headers:
        return None
    raw = next((str(v) for k, v in dict(headers).items() if str(k).lower() == "retry-after"), None)
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            when = email.utils.parsedate_to_datetime(raw)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def _retryable_create(exc: BaseException) -> bool:
    """Transient create failures. The SDK's own wall-clock timeout is not one: the sandbox exists but did
    not start in time, and the driver removes it instead."""
    import daytona

    if not isinstance(exc, daytona.DaytonaError):
        return False
    if isinstance(exc, daytona.DaytonaConnectionError):
        return True
    if exc.status_code is None:
        return not isinstance(exc, daytona.DaytonaTimeoutError) and _caused_by_transport(exc)
    return exc.status_code in _RETRYABLE_CREATE_STATUSES


def _created_at(sandbox: AsyncSandbox) -> str:
    return str(sandbox.created_at or "")


# --------------------------------------------------------------------------------------------- driver


class DaytonaConfig(ProviderConfig):
    """Daytona (daytona SDK)."""

    api_key: SecretStr | None = Field(None, description="Daytona API key.")
    api_url: str = Field("https://app.daytona.io/api", description="Daytona API URL.")
    target: str | None = Field(None, description="Region; the organisation default when unset.")
    snapshot: str | None = Field("sandbox-worker", description="Snapshot with the daemon preinstalled.")
    block_egress: bool = Field(
        False,
        description="Block sandboxes' outbound traffic but `egress_cidrs` (network_block_all / network_allow_list). "
        "Daytona filters IPv4 networks only, not host names: the LLM endpoint must be listed by address.",
    )
    egress_cidrs: list[str] = Field(
        default_factory=list,
        description="IPv4 CIDRs every sandbox may reach when egress is blocked or the request lists sandbox.egress.",
    )
    image: str | None = Field(None, description="Image to build from instead of a snapshot.")
    auto_delete_minutes: int = Field(
        0, ge=-1, description="Minutes after stop before Daytona deletes the sandbox (0 = at once)."
    )
    create_attempts: int = Field(
        4,
        ge=1,
        le=10,
        description="Create attempts on 429/502/503/504 and connection errors (the SDK retries no statuses); "
        "each retry first adopts a sandbox the failed attempt may have created.",
    )
    create_backoff: float = Field(
        0.5, gt=0, description="Initial seconds of the jittered exponential backoff between create attempts."
    )
    create_backoff_max: float = Field(
        10.0, gt=0, description="Cap in seconds of one backoff wait (a Retry-After answer may ask for more, up to 60)."
    )


class DaytonaProvider(Provider):
    """Daytona sandboxes through ``AsyncDaytona`` on a private event loop (see the module docstring)."""

    name: ClassVar[str] = PROVIDER
    config_model: ClassVar[type[ProviderConfig]] = DaytonaConfig
    config: DaytonaConfig

    def __init__(self, config: DaytonaConfig) -> None:
        if config.api_key is None or not config.api_key.get_secret_value():
            raise ConfigurationError("the Daytona API key is not set", field="daytona.api_key")
        self.config = config
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: _LoopThread | None = None
        self._client: AsyncDaytona | None = None
        # Sandbox objects by id, so toolbox calls need no API round trip. Mutated on the loop thread only;
        # close() and a fork replace the whole dict.
        self._handles: OrderedDict[str, AsyncSandbox] = OrderedDict()

    # ------------------------------------------------------------------------ bridge

    def _ensure_client(self) -> tuple[_LoopThread, AsyncDaytona]:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child: the parent's loop thread is not here
                self._loop, self._client, self._handles = None, None, OrderedDict()
                self._pid = os.getpid()
            if self._loop is None:
                self._loop = _LoopThread(f"daytona-provider-{id(self):x}")
            if self._client is None:
                with _map_daytona_errors("client setup"):
                    self._client = self._loop.run(self._new_client(), self.config.request_timeout)
            return self._loop, self._client

    async def _new_client(self) -> AsyncDaytona:
        # Built on the loop: the SDK binds its aiohttp session and event subscription to the running loop.
        import daytona

        assert self.config.api_key is not None
        sdk_config = daytona.DaytonaConfig(
            api_key=self.config.api_key.get_secret_value(), api_url=self.config.api_url, target=self.config.target
        )
        return daytona.AsyncDaytona(sdk_config)

    def _call(
        self,
        operation: str,
        work: Callable[[AsyncDaytona], Awaitable[T]],
        *,
        timeout: float,
        sandbox_id: str | None = None,
    ) -> T:
        """Run ``work(client)`` on the loop with an outer deadline, mapping every failure."""
        import daytona

        loop, client = self._ensure_client()

        async def guarded() -> T:
            try:
                return await work(client)
            except (daytona.DaytonaNotFoundError, daytona.DaytonaSpotEvictedError):
                if sandbox_id is not None:  # forget the cached handle of a sandbox that is gone
                    self._handles.pop(sandbox_id, None)
                raise

        with _map_daytona_errors(operation, sandbox_id):
            return loop.run(guarded(), timeout + _BRIDGE_GRACE)

    async def _handle(self, client: AsyncDaytona, sandbox_id: str) -> AsyncSandbox:
        handle = self._handles.get(sandbox_id)
        if handle is None:
            handle = await client.get(sandbox_id, request_timeout=self.config.request_timeout)
            self._remember(handle)
        else:
            self._handles.move_to_end(sandbox_id)
        return handle

    def _remember(self, handle: AsyncSandbox) -> None:
        self._handles[handle.id] = handle
        self._handles.move_to_end(handle.id)
        while len(self._handles) > _HANDLE_CACHE_SIZE:
            self._handles.popitem(last=False)

    @staticmethod
    def _sandbox(handle: AsyncSandbox) -> Sandbox:
        return Sandbox(
            provider=PROVIDER, sandbox_id=handle.id, labels=dict(handle.labels), state=_state_name(handle.state)
        )

    # ------------------------------------------------------------------------ start

    def _network(self, spec: SandboxSpec) -> dict[str, Any]:
        """Daytona's network options: an allow-list of IPv4 CIDRs (which blocks the rest) or block-all."""
        networks = [egress_network(entry) for entry in spec.egress]
        if None in networks:
            raise InvalidRequest(
                "sandbox.egress: daytona allows IPv4 addresses and CIDRs only, not host names, wildcards or ports",
                field="sandbox.egress",
            )
        allow = [*self.config.egress_cidrs, *(n for n in networks if n)]
        if spec.egress or (self.config.block_egress and allow):
            return {"network_allow_list": ",".join(allow)}
        return {"network_block_all": True} if self.config.block_egress else {}

    def _create_params(
        self, spec: SandboxSpec, labels: Mapping[str, str]
    ) -> CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams:
        import daytona

        minutes = _minutes(spec.ttl_seconds)
        common: dict[str, Any] = {
            **self._network(spec),
            "env_vars": dict(spec.env),
            "labels": dict(labels),
            "public": False,
            "auto_stop_interval": minutes,
            "auto_delete_interval": self.config.auto_delete_minutes,
            "ttl_minutes": minutes,
            "target": self.config.target,
        }
        if spec.image is None and self.config.image is not None:
            resources = None
            if spec.cpu is not None or spec.memory_mb is not None:
                resources = daytona.Resources(
                    cpu=math.ceil(spec.cpu) if spec.cpu is not None else None,
                    memory=math.ceil(spec.memory_mb / 1024) if spec.memory_mb is not None else None,
                )
            return daytona.CreateSandboxFromImageParams(image=self.config.image, resources=resources, **common)
        return daytona.CreateSandboxFromSnapshotParams(snapshot=spec.image or self.config.snapshot, **common)

    def start(self, spec: SandboxSpec) -> Sandbox:
        key = spec.idempotency_key or uuid.uuid4().hex
        labels = {**spec.labels, LABEL_IDEMPOTENCY_KEY: key}
        params = self._create_params(spec, labels)
        adopt_first = spec.idempotency_key is not None
        handle = self._call(
            "create",
            lambda client: self._create(client, params, key, adopt_first=adopt_first),
            # start_timeout bounds the attempts; a failed start may then spend up to this long cleaning up.
            timeout=self.config.start_timeout + 2 * self.config.request_timeout,
        )
        return self._sandbox(handle)

    def _backoff(self, state: RetryCallState) -> float:
        exponential = wait_random_exponential(
            multiplier=self.config.create_backoff, max=self.config.create_backoff_max
        )(state)
        asked = _retry_after(state.outcome.exception() if state.outcome else None)
        return exponential if asked is None else max(exponential, min(asked, _RETRY_AFTER_CAP))

    async def _create(
        self,
        client: AsyncDaytona,
        params: CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams,
        key: str,
        *,
        adopt_first: bool,
    ) -> AsyncSandbox:
        import daytona

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retryable_create),
            stop=stop_after_attempt(self.config.create_attempts) | stop_after_delay(self.config.start_timeout),
            wait=self._backoff,
            before_sleep=lambda state: log.warning(
                "daytona.create.retry",
                attempt=state.attempt_number,
                error=type(state.outcome.exception()).__name__ if state.outcome else None,
                wait=round(state.upcoming_sleep, 2),
            ),
            reraise=True,
        )
        try:
            return await self._create_attempts(client, params, key, retrying, deadline, adopt_first=adopt_first)
        except (daytona.DaytonaAuthenticationError, daytona.DaytonaForbiddenError):
            raise  # nothing can have been created
        except daytona.DaytonaError:
            # A create the API accepted may have failed on the way back (or not started in time): remove whatever
            # exists under this request's key rather than leave it running until its TTL.
            with contextlib.suppress(daytona.DaytonaError, TimeoutError):
                await asyncio.wait_for(self._cleanup_key(client, key), 2 * self.config.request_timeout)
            raise

    async def _create_attempts(
        self,
        client: AsyncDaytona,
        params: CreateSandboxFromSnapshotParams | CreateSandboxFromImageParams,
        key: str,
        retrying: AsyncRetrying,
        deadline: float,
        *,
        adopt_first: bool,
    ) -> AsyncSandbox:
        import daytona

        loop = asyncio.get_running_loop()
        async for attempt in retrying:
            with attempt:
                if adopt_first or attempt.retry_state.attempt_number > 1:
                    adopted = await self._adopt(key, client, deadline)
                    if adopted is not None:
                        return adopted
                remaining = max(1.0, deadline - loop.time())
                try:
                    handle = await client.create(params.model_copy(deep=True), timeout=remaining)
                except daytona.DaytonaTimeoutError as exc:
                    if exc.sandbox_id:  # created but not started in time: do not leave it behind
                        await self._delete_quietly(client, exc.sandbox_id)
                    raise
                self._remember(handle)
                return handle
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _adopt(self, key: str, client: AsyncDaytona, deadline: float) -> AsyncSandbox | None:
        """The live sandbox an earlier attempt created for this idempotency key, started; duplicates removed."""
        import daytona

        found = [
            sandbox
            async for sandbox in client.list(
                daytona.ListSandboxesQuery(labels={LABEL_IDEMPOTENCY_KEY: key}, limit=_LIST_PAGE_SIZE),
                request_timeout=self.config.request_timeout,
            )
            if _state_name(sandbox.state) not in _NOT_ADOPTABLE
        ]
        if not found:
            return None
        found.sort(key=_created_at)
        keep, duplicates = found[0], found[1:]
        for duplicate in duplicates:
            log.warning("daytona.create.duplicate_removed", sandbox_id=duplicate.id, kept=keep.id)
            await self._delete_quietly(client, duplicate.id)
        log.info("daytona.create.adopted", sandbox_id=keep.id, state=_state_name(keep.state))
        if _state_name(keep.state) != "running":
            remaining = max(1.0, deadline - asyncio.get_running_loop().time())
            await keep.wait_for_sandbox_start(timeout=remaining)
        self._remember(keep)
        return keep

    async def _cleanup_key(self, client: AsyncDaytona, key: str) -> None:
        import daytona

        query = daytona.ListSandboxesQuery(labels={LABEL_IDEMPOTENCY_KEY: key}, limit=_LIST_PAGE_SIZE)
        leftovers = [s.id async for s in client.list(query, request_timeout=self.config.request_timeout)]
        for sandbox_id in leftovers:
            log.warning("daytona.create.leftover_removed", sandbox_id=sandbox_id)
            await self._delete_quietly(client, sandbox_id)

    async def _delete_quietly(self, client: AsyncDaytona, sandbox_id: str) -> None:
        import daytona

        try:
            handle = await client.get(sandbox_id, request_timeout=self.config.request_timeout)
            await handle.delete(timeout=self.config.request_timeout)
        except daytona.DaytonaError as exc:
            log.warning("daytona.cleanup_failed", sandbox_id=sandbox_id, error=type(exc).__name__)
        self._handles.pop(sandbox_id, None)

    # ------------------------------------------------------------------------ lookups

    def find(self, sandbox_id: str) -> Sandbox | None:
        import daytona

        async def work(client: AsyncDaytona) -> AsyncSandbox | None:
            try:
                handle = await client.get(sandbox_id, request_timeout=self.config.request_timeout)
            except daytona.DaytonaNotFoundError:
                self._handles.pop(sandbox_id, None)
                return None
            if _state_name(handle.state) in _GONE_STATES:
                self._handles.pop(sandbox_id, None)
                return None
            self._remember(handle)
            return handle

        handle = self._call("get", work, timeout=self.config.request_timeout, sandbox_id=sandbox_id)
        return None if handle is None else self._sandbox(handle)

    def list_owned(self, labels: Mapping[str, str]) -> list[Sandbox]:
        import daytona

        query = daytona.ListSandboxesQuery(labels=dict(labels), limit=_LIST_PAGE_SIZE)

        async def work(client: AsyncDaytona) -> list[Sandbox]:
            return [
                self._sandbox(sandbox)
                async for sandbox in client.list(query, request_timeout=self.config.request_timeout)
                if _state_name(sandbox.state) not in _GONE_STATES
            ]

        # Each page has request_timeout; the whole listing gets a generous outer bound.
        return self._call("list", work, timeout=self.config.request_timeout * 10)

    # ------------------------------------------------------------------------ in the sandbox

    def exec(
        self,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        import daytona

        if not argv:
            raise ValueError("argv must not be empty")
        # The daemon runs the command with the sandbox's shell: quote every argument.
        command = shlex.join(argv)
        seconds = max(1, math.ceil(timeout))

        async def work(client: AsyncDaytona) -> ExecResult:
            handle = await self._handle(client, sandbox.sandbox_id)
            try:
                response = await handle.process.exec(command, cwd=cwd, env=dict(env) if env else None, timeout=seconds)
            except daytona.DaytonaProcessExecutionTimeoutError:
                return ExecResult(EXIT_KILLED_AT_TIMEOUT, "", f"command timed out after {seconds}s and was killed")
            exit_code = response.exit_code if response.exit_code is not None else -1
            return ExecResult(int(exit_code), response.result or "", "")

        # The SDK's own HTTP timeout for exec is the command's timeout + 5 s.
        return self._call(
            "exec", work, timeout=seconds + 5 + self.config.request_timeout, sandbox_id=sandbox.sandbox_id
        )

    def upload(self, sandbox: Sandbox, path: str, data: bytes, *, mode: int = 0o644) -> None:
        # Upload timeout in whole seconds: the request timeout plus one second per MiB.
        seconds = math.ceil(self.config.request_timeout + len(data) / 2**20)

        async def work(client: AsyncDaytona) -> None:
            handle = await self._handle(client, sandbox.sandbox_id)
            await handle.fs.upload_file(data, path, timeout=seconds)
            await handle.fs.set_file_permissions(path, mode=f"{mode:o}", request_timeout=self.config.request_timeout)

        self._call("upload", work, timeout=seconds + 2 * self.config.request_timeout, sandbox_id=sandbox.sandbox_id)

    def endpoint(self, sandbox: Sandbox, port: int) -> Endpoint:
        async def work(client: AsyncDaytona) -> Endpoint:
            handle = await self._handle(client, sandbox.sandbox_id)
            link = await handle.get_preview_link(port, request_timeout=self.config.request_timeout)
            return Endpoint(url=link.url.rstrip("/"), headers={PREVIEW_TOKEN_HEADER: link.token})

        return self._call("preview link", work, timeout=2 * self.config.request_timeout, sandbox_id=sandbox.sandbox_id)

    # ------------------------------------------------------------------------ stop

    def stop(self, sandbox_id: str) -> bool:
        import daytona

        async def work(client: AsyncDaytona) -> bool:
            self._handles.pop(sandbox_id, None)
            try:
                handle = await client.get(sandbox_id, request_timeout=self.config.request_timeout)
                if _state_name(handle.state) in _GONE_STATES:
                    return False
                await handle.delete(timeout=self.config.request_timeout)
            except daytona.DaytonaNotFoundError:
                return False
            return True

        return self._call("delete", work, timeout=2 * self.config.request_timeout, sandbox_id=sandbox_id)

    def close(self) -> None:
        with self._lock:
            loop, client = self._loop, self._client
            self._loop, self._client, self._handles = None, None, OrderedDict()
            same_process = self._pid == os.getpid()
        if loop is None or not same_process:
            return
        if client is not None:
            with contextlib.suppress(Exception):  # closing is best effort: sessions die with the loop anyway
                close = cast(Callable[[], Coroutine[Any, Any, None]], client.close)  # untyped in the SDK
                loop.run(close(), self.config.request_timeout)
        loop.close()

    def __del__(self) -> None:  # pragma: no cover - safety net for providers that were never closed
        with contextlib.suppress(Exception):
            if self._loop is not None and self._pid == os.getpid():
                self._loop.close()
