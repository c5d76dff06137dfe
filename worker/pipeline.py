"""Bringing up one agent session: named stages, each timed and reported, compensated in reverse on failure.

    claim → credentials → environment → sandbox → daemon → session → ready

Provider-agnostic: it sees providers only through :class:`providers.base.Provider`, credentials only
through :class:`worker.credentials.broker.CredentialBroker`.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import SecretStr, ValidationError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

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
    Busy,
    InvalidRequest,
    SandboxWorkerError,
    Terminated,
)
from worker.models import ErrorInfo, ProviderName, SessionRequest, SessionResult, SessionState
from worker.redaction import REDACTOR
from worker.store import SessionRecord, Store

log = structlog.get_logger(__name__)

STAGES = ("claim", "credentials", "environment", "sandbox", "daemon", "session", "ready")


class ProgressHook(Protocol):
    def __call__(self, stage: str, result: SessionResult) -> None: ...


class RetryLater(Exception):
    """A transient failure survived the in-stage retries: the task should run again later.
    Everything the attempt created has been removed."""

    def __init__(self, error: SandboxWorkerError, result: SessionResult) -> None:
        super().__init__(error.message)
        self.error = error
        self.result = result


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


@dataclass
class _Attempt:
    """What one bring-up has created so far, for compensation."""

    record: SessionRecord
    provider: Provider | None = None
    sandbox: Sandbox | None = None
    grant: CredentialGrant | None = None
    acp: daemon.AcpConnection | None = None
    client: daemon.DaemonClient | None = None
    timings: dict[str, float] = field(default_factory=dict)


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.credentials = credentials
        self.progress = progress
        self.worker_id = worker_id or uuid.uuid4().hex
        self.stage_retries = stage_retries

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
    def _heartbeat(self, request_id: str) -> Iterator[None]:
        """Renew the lease while we work, so a live bring-up is never taken over."""
        stop = threading.Event()
        every = self.settings.lease_seconds / 3

        def beat() -> None:
            while not stop.wait(every):
                self.store.renew_lease(request_id, self.worker_id, self.settings.lease_seconds)

        thread = threading.Thread(target=beat, name=f"lease-{request_id}", daemon=True)
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
            with self._heartbeat(request.request_id):
                return self._stages(request, attempt)
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

    def _stage(self, attempt: _Attempt, stage: str) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def timed() -> Iterator[None]:
            current = self.store.get(attempt.record.request.request_id)
            if current is not None and current.terminate_requested:
                raise Terminated("terminated while starting", stage=stage)
            attempt.record.result.state = SessionState.starting
            attempt.record.result.stage = stage
            self.store.put(attempt.record)
            self.progress(stage, attempt.record.result)
            started = time.perf_counter()
            try:
                yield
            except SandboxWorkerError as exc:
                exc.stage = exc.stage or stage
                raise
            finally:
                attempt.timings[stage] = round((time.perf_counter() - started) * 1000, 1)
                attempt.record.result.timings_ms = dict(attempt.timings)
            log.info("stage done", stage=stage, ms=attempt.timings[stage])

        return timed()

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """Retry transient errors within a stage: exponential backoff with jitter, bounded attempts."""
        for try_ in Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, SandboxWorkerError) and e.transient),
            wait=wait_random_exponential(multiplier=0.5, max=8),
            stop=stop_after_attempt(self.stage_retries),
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
            self._remove_leftovers(provider, request)

        with self._stage(attempt, "credentials"):
            grant = attempt.grant = self.credentials.grant(request)
            REDACTOR.register(grant.secret_values())

        with self._stage(attempt, "environment"):
            environment: SessionEnvironment = build_environment(request, grant)

        with self._stage(attempt, "sandbox"):
            spec = SandboxSpec(
                image=request.sandbox.image,
                labels=sandbox_labels(settings.owner, request, time.time()),
                env=environment.sandbox_env,
                cpu=request.sandbox.cpu,
                memory_mb=request.sandbox.memory_mb,
                ttl_seconds=request.sandbox.ttl_seconds,
                ports=(settings.daemon_port,),
                idempotency_key=f"{request.request_id}-{record.attempts}",
            )
            sandbox = attempt.sandbox = self._retrying(lambda: provider.start(spec))
            record.result.sandbox_id = sandbox.sandbox_id
            self.store.put(record)

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
        token = daemon.new_token()
        record.daemon_token = self.store.cipher.encrypt(token)
        self.store.put(record)
        daemon.install_daemon(provider, sandbox, settings.daemon_install, settings.daemon_binary)
        daemon.install_agent(provider, sandbox, request.agent.value, settings.daemon_install)
        for path, content in grant.files.items():
            provider.upload(sandbox, f"/root/{path}", content.get_secret_value().encode(), mode=0o600)
        daemon.start_daemon(
            provider,
            sandbox,
            token=token,
            port=settings.daemon_port,
            cwd=request.session.cwd,
            env=environment.daemon_env,
        )
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
        return client

    def _open_session(self, request: SessionRequest, attempt: _Attempt, client: daemon.DaemonClient) -> None:
        settings, record = self.settings, attempt.record
        server_id = f"sw-{request.request_id}"
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

    def _remove_leftovers(self, provider: Provider, request: SessionRequest) -> None:
        """A previous attempt that died may have left a sandbox: remove it before starting again."""
        labels = {LABEL_OWNER: self.settings.owner, LABEL_REQUEST_ID: request.request_id}
        for sandbox in provider.list_owned(labels):
            log.info("removing a previous attempt's sandbox", sandbox_id=sandbox.sandbox_id)
            provider.stop(sandbox.sandbox_id)

    # ---------------------------------------------------------------------------------------------------
    def _compensate(self, request: SessionRequest, attempt: _Attempt) -> None:
        """Undo in reverse order; each step is best effort and logged, none masks the original error."""
        steps: list[tuple[str, Callable[[], Any]]] = []
        if attempt.acp is not None:
            steps.append(("detach from the session", attempt.acp.detach))
        if attempt.sandbox is not None and attempt.provider is not None:
            provider, sandbox_id = attempt.provider, attempt.sandbox.sandbox_id
            steps.append(("stop sandbox", lambda: provider.stop(sandbox_id)))
        if attempt.grant is not None:
            steps.append(("release credentials", lambda: self.credentials.release(request)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                log.warning("compensation step failed", step=name, error=type(exc).__name__)
        attempt.acp = None

    def _fail(self, request: SessionRequest, attempt: _Attempt, exc: Exception) -> SessionResult:
        record = attempt.record
        self._compensate(request, attempt)
        error = exc if isinstance(exc, SandboxWorkerError) else SandboxWorkerError(f"{type(exc).__name__}: {exc}")
        stage = error.stage or record.result.stage
        message = REDACTOR.redact(error.message)
        record.result.sandbox_id = None
        record.result.daemon_url = None
        record.daemon_token = None
        record.result.error = ErrorInfo(code=error.code, stage=stage, message=message, field=error.field)
        if isinstance(error, Terminated):
            record.result.state = SessionState.terminated
        elif error.transient:
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
        provider = self.providers(request.provider)
        # Removing the sandbox ends the daemon and its agents with it; no ACP close is needed first.
        labels = {LABEL_OWNER: self.settings.owner, LABEL_REQUEST_ID: request.request_id}
        ids = {s.sandbox_id for s in provider.list_owned(labels)}
        if record.result.sandbox_id:
            ids.add(record.result.sandbox_id)
        for sandbox_id in ids:
            provider.stop(sandbox_id)
        with contextlib.suppress(SandboxWorkerError):
            self.credentials.release(request)
        record.result.state = SessionState.terminated
        record.result.stage = "terminated"
        record.daemon_token = None
        self.store.put(record)
        log.info("session terminated", request_id=request.request_id, sandboxes=len(ids))


def token_for(store: Store, request_id: str) -> SecretStr | None:
    """The daemon token of a live session, for a client that asked for it explicitly."""
    record = store.get(request_id)
    if record is None or record.result.state is not SessionState.ready:
        return None
    return store.token_of(record)
