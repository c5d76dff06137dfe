"""Bringing up one agent session: named stages, each timed and reported, compensated in reverse on failure.

    claim → credentials → environment → sandbox → daemon → session → ready

Provider-agnostic: it sees providers only through :class:`providers.base.Provider`, credentials only
through :class:`worker.credentials.broker.CredentialBroker`.

Delivery is at least once and workers die anywhere, so the request_id owns one record and one lease
(:mod:`worker.store`). The worker holding the lease brings the request up and renews the lease from a heartbeat
thread; a duplicate waits for the result; a redelivery whose worker died takes the expired lease over and, in the
claim stage, adopts the sandbox that worker left (found by label, its daemon answering with the token kept
encrypted in the record) or removes it and starts again. The sandbox, daemon and session stages run under the
fleet's shared limits (:mod:`worker.limits`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, get_args

import redis
import structlog
from pydantic import SecretStr, ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from providers.base import (
    LABEL_CREATED_AT,
    LABEL_EXPIRES_AT,
    LABEL_OWNER,
    LABEL_REQUEST_ID,
    LABEL_TENANT_ID,
    Provider,
    Sandbox,
    SandboxSpec,
)
from worker import daemon
from worker.config import Settings
from worker.credentials.base import CredentialGrant
from worker.credentials.broker import CredentialBroker
from worker.environment import SessionEnvironment, build_environment
from worker.errors import (
    AgentError,
    Busy,
    DaemonError,
    InvalidRequest,
    SandboxGone,
    SandboxWorkerError,
    StoreUnavailable,
    Terminated,
    TooManyAttempts,
)
from worker.fleet import StageName
from worker.limits import Limits
from worker.models import ErrorInfo, ProviderName, SessionRequest, SessionResult, SessionState
from worker.redaction import REDACTOR
from worker.store import SessionRecord, Store

log = structlog.get_logger(__name__)

STAGES: tuple[StageName, ...] = get_args(StageName)


class ProgressHook(Protocol):
    def __call__(self, stage: str, result: SessionResult) -> None: ...


class RetryLater(Exception):
    """A transient failure survived the in-stage retries: the task should run again later.
    Everything the attempt created has been removed."""

    def __init__(self, error: SandboxWorkerError, result: SessionResult) -> None:
        super().__init__(error.message)
        self.error = error
        self.result = result


class _LeaseLost(Exception):
    """Our lease ran out mid-bring-up, so another worker may own the request now: stop and touch nothing."""


def no_progress(stage: str, result: SessionResult) -> None:
    return None


def invalid_result(payload: Any, error: InvalidRequest) -> SessionResult:
    request_id = payload.get("request_id") if isinstance(payload, Mapping) else None
    return SessionResult(
        request_id=request_id if isinstance(request_id, str) and request_id else "invalid",
        state=SessionState.failed,
        stage="claim",
        error=ErrorInfo(code=error.code, stage="claim", message=error.message, field=error.field),
    )


def parse_request(payload: Any) -> SessionRequest:
    """Validate a raw request; the first problem becomes an InvalidRequest naming its field."""
    try:
        return SessionRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise InvalidRequest(f"{where}: {first['msg']}", field=where) from None


def sandbox_labels(owner: str, request: SessionRequest, now: float) -> dict[str, str]:
    return {
        **request.sandbox.labels,
        LABEL_OWNER: owner,
        LABEL_REQUEST_ID: request.request_id,
        LABEL_TENANT_ID: request.tenant_id,
        LABEL_CREATED_AT: str(int(now)),
        LABEL_EXPIRES_AT: str(int(now + request.sandbox.ttl_seconds)),
    }


def _as_worker_error(exc: Exception) -> SandboxWorkerError:
    if isinstance(exc, SandboxWorkerError):
        return exc
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return StoreUnavailable(f"Redis unreachable: {type(exc).__name__}")
    return SandboxWorkerError(f"{type(exc).__name__}: {exc}")


@dataclass
class _Attempt:
    """What one bring-up has created so far, for compensation."""

    record: SessionRecord
    provider: Provider | None = None
    sandbox: Sandbox | None = None
    adopted: bool = False  # the sandbox comes from a previous attempt (its daemon is restarted)
    token: SecretStr | None = None
    grant: CredentialGrant | None = None
    acp: daemon.AcpConnection | None = None
    client: daemon.DaemonClient | None = None
    timings: dict[str, float] = field(default_factory=dict)
    lease_lost: threading.Event = field(default_factory=threading.Event)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Callable[[ProviderName], Provider],
        credentials: CredentialBroker,
        *,
        progress: ProgressHook = no_progress,
        worker_id: str | None = None,
        stage_retries: int = 3,
        limits: Limits | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.credentials = credentials
        self.progress = progress
        self.worker_id = worker_id or uuid.uuid4().hex
        self.stage_retries = stage_retries
        self.limits = limits or Limits(store.redis, settings.fleet, settings.lease_seconds)

    # ---------------------------------------------------------------------------------------------------
    def create(self, payload: Any) -> SessionResult:
        """Bring up the session a raw request asks for. Returns the final result; raises RetryLater when a
        transient failure should be retried by the caller."""
        try:
            request = parse_request(payload)
        except InvalidRequest as exc:
            log.info("request rejected", field=exc.field, reason=exc.message)
            return invalid_result(payload, exc)

        record = self.store.create(request)
        if record.request != request:
            error = InvalidRequest(
                "request_id is already used by a different request", field="request_id", stage="claim"
            )
            return invalid_result({"request_id": request.request_id}, error)
        if record.result.state.terminal:
            return record.result
        if not self._claim(request):
            return self._wait_for_other(request)
        try:
            return self._run(request)
        finally:
            self.store.release_lease(request.request_id, self.worker_id)

    def _claim(self, request: SessionRequest) -> bool:
        return self.store.acquire_lease(request.request_id, self.worker_id, self.settings.lease_seconds)

    def _wait_for_other(self, request: SessionRequest) -> SessionResult:
        """Another worker holds the lease: wait for its result, or take over if its lease expires."""
        deadline = time.monotonic() + self.settings.task_soft_time_limit
        while time.monotonic() < deadline:
            record = self.store.get(request.request_id)
            if record is not None and record.result.state.terminal:
                return record.result
            if self._claim(request):
                try:
                    return self._run(request)
                finally:
                    self.store.release_lease(request.request_id, self.worker_id)
            time.sleep(0.25)
        raise RetryLater(
            Busy("another worker is still bringing this request up"),
            self.store.get(request.request_id).result,  # type: ignore[union-attr]
        )

    @contextlib.contextmanager
    def _heartbeat(self, request: SessionRequest, lost: threading.Event) -> Iterator[None]:
        """Renew the lease and the bring-up slots while we work, so a live bring-up is never taken over and its
        slots never freed. A lease found expired sets ``lost``: another worker may own the request now."""
        stop = threading.Event()
        seconds = self.settings.lease_seconds

        def beat() -> None:
            while not stop.wait(seconds / 3):
                try:
                    if not self.store.renew_lease(request.request_id, self.worker_id, seconds):
                        lost.set()
                        return
                    self.limits.renew(request)
                except Exception as exc:  # Redis away beyond its retries: keep beating while the lease may hold
                    log.warning("heartbeat failed", error=type(exc).__name__)

        thread = threading.Thread(target=beat, name=f"lease-{request.request_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    # ---------------------------------------------------------------------------------------------------
    def _run(self, request: SessionRequest) -> SessionResult:
        record = self.store.get(request.request_id)
        assert record is not None
        if record.result.state.terminal:
            return record.result
        record.attempts += 1
        attempt = _Attempt(record=record)
        structlog.contextvars.bind_contextvars(request_id=request.request_id, tenant_id=request.tenant_id)
        try:
            with self._heartbeat(request, attempt.lease_lost):
                return self._stages(request, attempt)
        except _LeaseLost:
            log.warning("lease lost mid-bring-up: leaving the request to the worker that took it over")
            raise RetryLater(Busy("the lease on this request ran out during the bring-up"), record.result) from None
        except Exception as exc:  # every failure compensates; the classification decides what follows
            return self._fail(request, attempt, exc)
        finally:
            if attempt.acp is not None:
                attempt.acp.detach()
            if attempt.client is not None:
                attempt.client.close()
            if attempt.grant is not None:
                REDACTOR.forget(attempt.grant.secret_values())
            structlog.contextvars.unbind_contextvars("request_id", "tenant_id")

    def _checkpoint(self, attempt: _Attempt, stage: str) -> None:
        """Stop here when our lease ran out or someone asked for the session to end."""
        if attempt.lease_lost.is_set():
            raise _LeaseLost
        current = self.store.get(attempt.record.request.request_id)
        if current is not None and current.terminate_requested:
            raise Terminated("terminated while starting", stage=stage)

    def _stage(self, attempt: _Attempt, stage: StageName) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def timed() -> Iterator[None]:
            self._checkpoint(attempt, stage)
            attempt.record.result.state = SessionState.starting
            attempt.record.result.stage = stage
            self.store.put(attempt.record)
            self.progress(stage, attempt.record.result)
            started = time.perf_counter()
            try:
                yield
                self._fault_pause(stage)
            except SandboxWorkerError as exc:
                exc.stage = exc.stage or stage
                raise
            finally:
                attempt.timings[stage] = round((time.perf_counter() - started) * 1000, 1)
                attempt.record.result.timings_ms = dict(attempt.timings)
            log.info("stage done", stage=stage, ms=attempt.timings[stage])

        return timed()

    def _fault_pause(self, stage: StageName) -> None:
        """The fault-injection hook (``fleet.fault_pause``): hold the stage, lease kept, for a crash drill."""
        seconds = self.settings.fleet.fault_pause.get(stage)
        if seconds:
            log.warning("fault injection: pausing at the end of the stage", stage=stage, seconds=seconds)
            time.sleep(seconds)

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """Retry transient errors within a stage: exponential backoff with jitter, bounded attempts."""

        def note(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.info("transient error, retrying", error=getattr(error, "code", None), try_=state.attempt_number)

        for try_ in Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, SandboxWorkerError) and e.transient),
            wait=wait_random_exponential(multiplier=0.5, max=8),
            stop=stop_after_attempt(self.stage_retries),
            before_sleep=note,
            reraise=True,
        ):
            with try_:
                return fn()
        return None  # pragma: no cover - Retrying always returns or raises

    def _stages(self, request: SessionRequest, attempt: _Attempt) -> SessionResult:
        settings = self.settings
        record = attempt.record
        with self._stage(attempt, "claim"):
            provider = attempt.provider = self.providers(request.provider)
            if record.attempts > settings.fleet.max_attempts:
                raise TooManyAttempts(f"gave up after {settings.fleet.max_attempts} attempts")
            if record.attempts > 1:
                self._adopt_or_remove(provider, request, attempt)

        with self._stage(attempt, "credentials"):
            grant = attempt.grant = self.credentials.grant(request)
            REDACTOR.register(grant.secret_values())

        with self._stage(attempt, "environment"):
            environment: SessionEnvironment = build_environment(request, grant)

        with contextlib.ExitStack() as slots:
            with self._stage(attempt, "sandbox"):
                deadline = time.monotonic() + settings.fleet.slot_wait_seconds
                checkpoint = functools.partial(self._checkpoint, attempt, "sandbox")
                slots.enter_context(self.limits.bring_up(request, deadline, checkpoint))
                sandbox = self._acquire_sandbox(request, attempt, provider, environment, deadline)

            with self._stage(attempt, "daemon"):
                client = self._start_daemon(request, attempt, provider, sandbox, grant, environment)

            with self._stage(attempt, "session"):
                self._open_session(request, attempt, client)

        with self._stage(attempt, "ready"):
            record.result.state = SessionState.ready
            record.result.error = None
        self.store.put(record)
        log.info("session ready", sandbox_id=sandbox.sandbox_id, timings_ms=attempt.timings)
        return record.result

    def _adopt_or_remove(self, provider: Provider, request: SessionRequest, attempt: _Attempt) -> None:
        """A previous attempt whose worker died may have left a sandbox: adopt it when its daemon answers with the
        token in the record, remove it (and any other) otherwise."""
        record = attempt.record
        labels = {LABEL_OWNER: self.settings.owner, LABEL_REQUEST_ID: request.request_id}
        found = self._retrying(lambda: provider.list_owned(labels))
        token = self.store.token_of(record)
        # The sandbox the record names comes first: the token belongs to it.
        for sandbox in sorted(found, key=lambda s: s.sandbox_id != record.result.sandbox_id):
            if attempt.sandbox is None and token is not None and self._daemon_answers(provider, sandbox, token):
                log.info("adopting a previous attempt's sandbox", sandbox_id=sandbox.sandbox_id)
                attempt.sandbox, attempt.token, attempt.adopted = sandbox, token, True
            else:
                log.info("removing a previous attempt's sandbox", sandbox_id=sandbox.sandbox_id)
                provider.stop(sandbox.sandbox_id)
        if not attempt.adopted:
            record.forget_daemon()

    def _daemon_answers(self, provider: Provider, sandbox: Sandbox, token: SecretStr) -> bool:
        try:
            endpoint = provider.endpoint(sandbox, self.settings.daemon_port)
        except SandboxWorkerError:
            return False
        client = daemon.DaemonClient(endpoint, token, timeout=5)
        try:
            return client.health()
        finally:
            client.close()

    def _acquire_sandbox(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        provider: Provider,
        environment: SessionEnvironment,
        deadline: float,
    ) -> Sandbox:
        """Stage 4, the sandbox the session runs in: the one adopted from a dead attempt, or a new one under the
        provider's quota. A warm pool plugs in here, handing out a started sandbox instead of starting one."""
        settings, record = self.settings, attempt.record
        if attempt.sandbox is None:
            labels = sandbox_labels(settings.owner, request, time.time())
            checkpoint = functools.partial(self._checkpoint, attempt, "sandbox")
            self.limits.reserve_sandbox(
                request, until=float(labels[LABEL_EXPIRES_AT]), deadline=deadline, checkpoint=checkpoint
            )
            spec = SandboxSpec(
                image=request.sandbox.image,
                labels=labels,
                env=environment.sandbox_env,
                cpu=request.sandbox.cpu,
                memory_mb=request.sandbox.memory_mb,
                ttl_seconds=request.sandbox.ttl_seconds,
                ports=(settings.daemon_port,),
                idempotency_key=f"{request.request_id}-{record.attempts}",
            )
            attempt.sandbox = self._retrying(lambda: provider.start(spec))
            record.expires_at = float(labels[LABEL_EXPIRES_AT])
        else:
            expires_at = attempt.sandbox.labels.get(LABEL_EXPIRES_AT)
            record.expires_at = float(expires_at) if expires_at else None
        assert attempt.sandbox is not None
        record.result.sandbox_id = attempt.sandbox.sandbox_id
        self.store.put(record)
        return attempt.sandbox

    def _start_daemon(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        provider: Provider,
        sandbox: Sandbox,
        grant: CredentialGrant,
        environment: SessionEnvironment,
    ) -> daemon.DaemonClient:
        settings, record = self.settings, attempt.record
        if attempt.adopted:
            # The sandbox is reused, its daemon is not: it runs with the dead attempt's environment, and this
            # attempt's credentials may differ (a vault placeholder is per grant). A restart costs ~50 ms.
            self._retrying(lambda: daemon.stop_daemon(provider, sandbox))
        token = attempt.token = daemon.new_token()
        record.daemon_token = self.store.cipher.encrypt(token)
        self.store.put(record)
        self._retrying(
            lambda: daemon.install_daemon(provider, sandbox, settings.daemon_install, settings.daemon_binary)
        )
        self._retrying(lambda: daemon.install_agent(provider, sandbox, request.agent.value, settings.daemon_install))
        for path, content in grant.files.items():
            upload = functools.partial(
                provider.upload, sandbox, f"/root/{path}", content.get_secret_value().encode(), mode=0o600
            )
            self._retrying(upload)
        start = functools.partial(
            daemon.start_daemon,
            provider,
            sandbox,
            token=token,
            port=settings.daemon_port,
            cwd=request.session.cwd,
            env=environment.daemon_env,
        )
        self._retrying(start)
        endpoint = self._retrying(lambda: provider.endpoint(sandbox, settings.daemon_port))
        client = attempt.client = daemon.DaemonClient(endpoint, token, timeout=settings.session_timeout)
        try:
            client.wait_healthy(settings.health_timeout)
        except SandboxWorkerError as exc:
            tail = REDACTOR.redact(daemon.daemon_log_tail(provider, sandbox))
            if tail:
                exc.message = f"{exc.message}; daemon log: {tail[-600:]}"
            raise
        record.result.daemon_url = endpoint.url
        record.daemon_headers = self.store.seal_headers(endpoint.headers)
        return client

    def _open_session(self, request: SessionRequest, attempt: _Attempt, client: daemon.DaemonClient) -> None:
        settings, record = self.settings, attempt.record
        server_id = f"sw-{request.request_id}-{record.attempts}"
        acp = attempt.acp = daemon.AcpConnection(client, server_id, request.agent.value)
        acp.initialize(timeout=settings.session_timeout)
        session_id = acp.new_session(request.session.cwd, timeout=settings.session_timeout)
        mode = request.session.mode or daemon.HEADLESS_MODES.get(request.agent.value)
        if mode:
            acp.set_mode(session_id, mode, timeout=settings.session_timeout)
        if request.session.model:
            acp.set_model(session_id, request.session.model, timeout=settings.session_timeout)
        record.result.server_id, record.result.session_id = server_id, session_id
        if request.session.prompt:
            record.result.reply = acp.prompt(session_id, request.session.prompt, timeout=settings.prompt_timeout)

    def _remove_sandboxes(self, provider: Provider, request: SessionRequest, known: str | None) -> int:
        """Remove every sandbox of ``request`` (by label, plus ``known``) and free its live-sandbox slot."""
        labels = {LABEL_OWNER: self.settings.owner, LABEL_REQUEST_ID: request.request_id}
        ids = {s.sandbox_id for s in provider.list_owned(labels)}
        if known:
            ids.add(known)
        for sandbox_id in ids:
            provider.stop(sandbox_id)
        self.limits.release_sandbox(request.provider, request.request_id)
        return len(ids)

    # ---------------------------------------------------------------------------------------------------
    def _compensate(self, request: SessionRequest, attempt: _Attempt) -> None:
        """Undo in reverse order; each step is best effort and logged, none masks the original error. Sandboxes
        are found by label too, so one a retried start created behind a failed call goes as well."""
        steps: list[tuple[str, Callable[[], Any]]] = []
        if attempt.acp is not None:
            steps.append(("detach from the session", attempt.acp.detach))
        if attempt.provider is not None:
            provider, known = attempt.provider, attempt.sandbox.sandbox_id if attempt.sandbox else None
            steps.append(("remove sandboxes", lambda: self._remove_sandboxes(provider, request, known)))
        if attempt.grant is not None:
            steps.append(("release credentials", lambda: self.credentials.release(request)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                log.warning("compensation step failed", step=name, error=type(exc).__name__)
        attempt.acp = None

    @staticmethod
    def _diagnose(attempt: _Attempt, error: SandboxWorkerError) -> SandboxWorkerError:
        """A daemon that stops answering may mean its sandbox is gone (removed, expired): that is permanent,
        and worth saying plainly rather than retrying."""
        if not isinstance(error, (DaemonError, AgentError)) or attempt.sandbox is None or attempt.provider is None:
            return error
        try:
            # The daemon can drop its connections a moment before the provider reports the sandbox gone.
            for delay in (0.0, 1.0):
                time.sleep(delay)
                if attempt.provider.find(attempt.sandbox.sandbox_id) is None:
                    break
            else:
                return error
        except SandboxWorkerError:
            return error
        gone = SandboxGone(
            f"the sandbox disappeared during the bring-up ({error.message})",
            provider=attempt.sandbox.provider,
            sandbox_id=attempt.sandbox.sandbox_id,
        )
        gone.stage = error.stage
        return gone

    def _fail(self, request: SessionRequest, attempt: _Attempt, exc: Exception) -> SessionResult:
        record = attempt.record
        error = self._diagnose(attempt, _as_worker_error(exc))
        self._compensate(request, attempt)
        stage = error.stage or record.result.stage
        message = REDACTOR.redact(error.message)
        record.result.sandbox_id = None
        record.result.daemon_url = None
        record.forget_daemon()
        record.result.error = ErrorInfo(code=error.code, stage=stage, message=message, field=error.field)
        if isinstance(error, Terminated):
            record.result.state = SessionState.terminated
        elif error.transient and record.attempts < self.settings.fleet.max_attempts:
            record.result.state = SessionState.queued
            self.store.put(record)
            log.warning("transient failure, will retry", stage=stage, code=error.code, error=message)
            raise RetryLater(error, record.result) from exc
        else:
            record.result.state = SessionState.failed
        self.store.put(record)
        log.warning("session failed", stage=stage, code=error.code, error=message)
        return record.result

    # ---------------------------------------------------------------------------------------------------
    def terminate(self, request_id: str) -> SessionResult:
        """End a session: close the agent, remove the sandbox, release credentials. Idempotent."""
        record = self.store.get(request_id)
        if record is None:
            raise InvalidRequest(f"no session with request_id {request_id}", field="request_id")
        if record.result.state is SessionState.terminated:
            return record.result
        if not record.result.state.terminal:
            # A bring-up is in flight: flag it; the pipeline stops at its next stage and compensates.
            record.terminate_requested = True
            self.store.put(record)
            if self.store.lease_holder(request_id) is not None:
                return self._wait_terminated(request_id)
        self._teardown(record)
        return record.result

    def _wait_terminated(self, request_id: str) -> SessionResult:
        deadline = time.monotonic() + self.settings.task_soft_time_limit
        while time.monotonic() < deadline:
            record = self.store.get(request_id)
            assert record is not None
            if record.result.state.terminal:
                if record.result.state is not SessionState.terminated:
                    self._teardown(record)
                return record.result
            if self.store.lease_holder(request_id) is None:
                self._teardown(record)
                return record.result
            time.sleep(0.25)
        raise RetryLater(Terminated("the bring-up did not stop in time"), self.store.get(request_id).result)  # type: ignore[union-attr]

    def _teardown(self, record: SessionRecord) -> None:
        request = record.request
        # Removing the sandbox ends the daemon and its agents with it; no ACP close is needed first.
        removed = self._remove_sandboxes(self.providers(request.provider), request, record.result.sandbox_id)
        with contextlib.suppress(SandboxWorkerError):
            self.credentials.release(request)
        record.result.state = SessionState.terminated
        record.result.stage = "terminated"
        record.forget_daemon()
        self.store.put(record)
        log.info("session terminated", request_id=request.request_id, sandboxes=removed)


@dataclass(frozen=True)
class DaemonAccess:
    """Everything a client needs to reach a live session's daemon. Secret: handed out only on request."""

    url: str
    token: SecretStr
    headers: dict[str, SecretStr] = field(default_factory=dict)

    def http_headers(self) -> dict[str, str]:
        """The headers of every request to the daemon: the provider's, then the bearer token."""
        values = {name: value.get_secret_value() for name, value in self.headers.items()}
        return {**values, "Authorization": f"Bearer {self.token.get_secret_value()}"}


def access_for(store: Store, request_id: str) -> DaemonAccess | None:
    """How to reach the daemon of a ready session, for a client that asked for it explicitly."""
    record = store.get(request_id)
    if record is None or record.result.state is not SessionState.ready or not record.result.daemon_url:
        return None
    token = store.token_of(record)
    if token is None:
        return None
    return DaemonAccess(record.result.daemon_url, token, store.headers_of(record))
