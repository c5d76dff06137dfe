"""Bringing up one agent session: named stages, each timed and reported, compensated in reverse on failure.

    claim → credentials → environment → sandbox → daemon → session → ready

Provider-agnostic: it sees providers only through :class:`providers.base.Provider`, credentials only
through :class:`worker.credentials.broker.CredentialBroker`.

Delivery is at least once and workers die anywhere, so the request_id owns one record (:mod:`worker.store`) and
one lease (:mod:`worker.lease`). The worker holding the lease brings the request up; a duplicate answers at once
with the state as it stands (its task asks again shortly); a redelivery whose worker died takes the expired lease over and, in the claim stage, adopts the sandbox
that worker left (found by label, its daemon answering with the token kept encrypted in the record) or removes it
and starts again. The sandbox, daemon and session stages run under the fleet's shared limits
(:mod:`worker.limits`). Ending things — compensation, terminate — is :mod:`worker.teardown`'s job.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis
import structlog
from pydantic import SecretStr

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
from worker import daemon, failover, metrics
from worker.acp import AcpConnection
from worker.agents import HOME, AgentSetup, agent_setup, relay_binding
from worker.breaker import Breaker
from worker.config import Settings
from worker.credentials.agents import llm_provider_for
from worker.credentials.base import CredentialGrant
from worker.credentials.broker import CredentialBroker
from worker.environment import SessionEnvironment, build_environment
from worker.errors import (
    AgentError,
    Busy,
    DaemonError,
    DaemonUnhealthy,
    InvalidRequest,
    ProviderUnavailable,
    SandboxGone,
    SandboxWorkerError,
    StoreUnavailable,
    Terminated,
    TooManyAttempts,
)
from worker.fleet import StageName
from worker.lease import Lease
from worker.limits import Limits
from worker.models import (
    ErrorInfo,
    InstallMode,
    ProviderName,
    SessionRequest,
    SessionResult,
    SessionState,
    SkippedProvider,
    cap_reply,
    invalid_result,
    parse_request,
)
from worker.pool import Claimed, Pools, binds_as_is
from worker.redaction import REDACTOR
from worker.retries import RetryLater, RetryPolicy
from worker.store import Advance, SessionRecord, Store
from worker.teardown import Teardown

log = structlog.get_logger(__name__)

WARM_HEALTH_POLL = 0.01  # s between health probes of a warm sandbox's daemon: it is up in tens of ms

# What a stage asks of Redis before it runs (Pipeline._stage). "write": the lease and terminate requests checked
# and the record saying the stage began written, in one round trip. "check": only checked (a stage of milliseconds
# whose outcome the next write carries). "none": nothing, for a stage that touches nothing outside this process (the
# next write checks and carries it).
Report = Literal["write", "check", "none"]


class ProgressHook(Protocol):
    def __call__(self, stage: str, result: SessionResult) -> None: ...


class _LeaseLost(Exception):
    """Our lease ran out mid-bring-up, so another worker may own the request now: stop and touch nothing."""


def no_progress(stage: str, result: SessionResult) -> None:
    return None


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
    lease: Lease
    provider: Provider | None = None
    sandbox: Sandbox | None = None
    adopted: bool = False  # the sandbox comes from a previous attempt (its daemon is restarted)
    warm: Claimed | None = None  # the sandbox comes from a warm pool (its daemon is bound to this session)
    warm_as_is: bool = False  # the session uses the warm daemon, agent and session as they are (pool.binds_as_is)
    booting: bool = False  # the daemon was started and has not answered yet (its first request waits for it)
    token: SecretStr | None = None
    image: str | None = None  # the image of a new sandbox with a preinstalled daemon (its checks are made once)
    grant: CredentialGrant | None = None
    agent: AgentSetup = field(default_factory=AgentSetup)
    acp: AcpConnection | None = None
    client: daemon.DaemonClient | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # What the sandbox can read and must never come back out (worker.redaction): the grant's values, the daemon
    # token, the provider's edge headers.
    secrets: list[str] = field(default_factory=list)

    def mask(self, values: list[str]) -> None:
        REDACTOR.register(values)
        self.secrets += values


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
        limits: Limits | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.credentials = credentials
        self.progress = progress
        self.worker_id = worker_id or uuid.uuid4().hex
        self.retries = RetryPolicy.from_settings(settings)
        self.limits = limits or Limits(store.redis, settings.fleet, settings.lease_seconds)
        self.teardown = Teardown(settings, store, providers, credentials, self.limits)
        self.pools = Pools(settings, store, providers, self.limits)

    # -- claim: one record and one lease per request ------------------------------------------------------
    def create(self, payload: Any) -> SessionResult:
        """Bring up the session a raw request asks for. Returns the final result; raises RetryLater when a
        transient failure should be retried by the caller."""
        try:
            request = parse_request(payload)
        except InvalidRequest as exc:
            log.info("request rejected", field=exc.field, reason=exc.message)
            rejected = invalid_result(payload, exc)
            if isinstance(payload, Mapping) and isinstance(payload.get("request_id"), str):
                self.store.reject(rejected)  # no record to hold the answer: keep it where clients look
            return rejected

        # The request's record is created (if it is not there yet) as its lease is taken, in one round trip.
        lease = Lease(
            self.store,
            request.request_id,
            self.worker_id,
            self.settings.lease_seconds,
            on_beat=lambda: self.limits.renew(request),
            create=self.store.new_record(request),
        )
        taken = lease.acquire()
        try:
            record = lease.record
            assert record is not None
            if record.request != request:
                # The id is the first request's: its record stays as it is, and this one is answered only here.
                error = InvalidRequest(
                    "request_id is already used by a different request", field="request_id", stage="claim"
                )
                log.info("request rejected", field="request_id", reason=error.message)
                return invalid_result({"request_id": request.request_id}, error)
            if record.result.state.terminal:
                return record.result
            if not taken:
                # Another worker holds the lease: answer at once with the state as it stands, holding no process;
                # the task asks again after a short countdown (and takes over if the lease has expired by then).
                raise RetryLater(Busy("another worker is bringing this request up"), record.result)
            return self._run(request, lease)
        finally:
            if taken:
                lease.release()

    def _run(self, request: SessionRequest, lease: Lease) -> SessionResult:
        record = lease.record
        assert record is not None
        record.attempts += 1
        record.result.started_at = time.time()
        attempt = _Attempt(record=record, lease=lease)
        structlog.contextvars.bind_contextvars(
            request_id=request.request_id, tenant_id=request.tenant_id, provider=request.provider.value
        )
        started, outcome = time.perf_counter(), "error"
        try:
            with lease.heartbeat():
                try:
                    result = self._stages(request, attempt)
                except _LeaseLost:
                    raise
                except Exception as exc:  # every failure compensates; the classification decides what follows
                    result = self._fail(request, attempt, exc)
                outcome = result.state.value
                return result
        except RetryLater:
            outcome = "retried"
            raise
        except _LeaseLost:
            outcome = "lease_lost"
            log.warning("lease lost mid-bring-up: leaving the request to the worker that took it over")
            raise RetryLater(Busy("the lease on this request ran out during the bring-up"), record.result) from None
        finally:
            self._summarise(request, attempt, outcome, time.perf_counter() - started)
            if attempt.acp is not None:
                attempt.acp.detach()
            if attempt.client is not None:
                attempt.client.close()
            REDACTOR.forget(attempt.secrets)
            structlog.contextvars.unbind_contextvars("request_id", "tenant_id", "provider", "sandbox_id")

    def _summarise(self, request: SessionRequest, attempt: _Attempt, outcome: str, seconds: float) -> None:
        """The attempt's one summary line and its metrics (worker.metrics): what ended how, where, how fast."""
        result = attempt.record.result
        provider = attempt.provider.name if attempt.provider is not None else request.provider.value
        chosen = attempt.grant.strategy if attempt.grant is not None else request.credentials.strategy
        strategy = chosen.value if chosen is not None else ""
        warm = "true" if attempt.warm is not None else "false"
        code = result.error.code if result.error is not None and outcome != "ready" else ""
        metrics.SESSIONS.labels(outcome, provider, request.agent.value, strategy, warm, code).inc()
        metrics.SESSION_SECONDS.labels(outcome, provider, warm).observe(seconds)
        log.info(
            "session summary",
            outcome=outcome,
            provider=provider,
            agent=request.agent.value,
            strategy=strategy,
            warm=attempt.warm is not None,
            attempt=attempt.record.attempts,
            stage=result.stage,
            code=code or None,
            stages_ms=attempt.timings,
            total_ms=round(seconds * 1000, 1),
        )

    # -- the stage runner ---------------------------------------------------------------------------------
    def _checkpoint(self, attempt: _Attempt, stage: str) -> None:
        """Stop here when our lease ran out or someone asked for the session to end. The lease is asked of Redis,
        not only of the heartbeat: a pause longer than the lease (GC, a frozen VM) may end before a beat notices.
        Both are asked in one round trip (its holder is our worker id)."""
        holder, terminating = self.store.checkpoint(attempt.record.request.request_id)
        self._passed(attempt, stage, lost=holder != self.worker_id, terminating=terminating)

    def _passed(self, attempt: _Attempt, stage: str, *, lost: bool, terminating: bool) -> None:
        if attempt.lease.lost.is_set() or lost:
            attempt.lease.lost.set()
            raise _LeaseLost
        if terminating:
            raise Terminated("terminated while starting", stage=stage)

    def _report(self, attempt: _Attempt, stage: StageName) -> None:
        """The checkpoint before a stage, and the record saying the stage began written only if it passes: both in
        one round trip (Store.advance)."""
        self._passed(attempt, stage, lost=False, terminating=False)  # a lease the heartbeat lost: write nothing
        result = attempt.record.result
        kept = {"state": result.state, "stage": result.stage}  # the stage never began if the write does not land
        result.state, result.stage = SessionState.starting, stage
        self._advance(attempt, stage, kept)
        self.progress(stage, attempt.record.result)

    def _advance(self, attempt: _Attempt, stage: str, kept: Mapping[str, Any], *, release: bool = False) -> None:
        """Write the record only while the lease is ours and nobody asked to end the request (one round trip,
        Store.advance), giving the lease back with it when ``release``. When it is not written, the result's fields
        named in ``kept`` go back to what the record keeps, and the bring-up stops."""
        found = self.store.advance(attempt.record, self.worker_id, release=release)
        if found is not Advance.written:
            for name, value in kept.items():
                setattr(attempt.record.result, name, value)
        elif release:
            attempt.lease.given_back()
        self._passed(attempt, stage, lost=found is Advance.lease_lost, terminating=found is Advance.terminating)

    @contextlib.contextmanager
    def _stage(self, attempt: _Attempt, stage: StageName, *, report: Report = "write") -> Iterator[None]:
        """Run one stage: timed, and before it, as ``report`` says, checked against the lease and terminate requests
        and reported (the record written, the progress hook called). A stage with a drill's pause is reported
        whatever it says, so that its record shows where the worker holds."""
        if report == "write" or stage in self.settings.fleet.fault_pause:
            self._report(attempt, stage)
        else:
            if report == "check":
                self._checkpoint(attempt, stage)
            else:
                self._passed(attempt, stage, lost=False, terminating=False)  # a lease the heartbeat lost
            attempt.record.result.state = SessionState.starting
            attempt.record.result.stage = stage
        started = time.perf_counter()
        try:
            yield
            self._fault_pause(stage)
        except SandboxWorkerError as exc:
            exc.stage = exc.stage or stage
            raise
        finally:
            elapsed = time.perf_counter() - started
            attempt.timings[stage] = round(elapsed * 1000, 1)
            attempt.record.result.timings_ms = dict(attempt.timings)
            provider = attempt.provider.name if attempt.provider is not None else attempt.record.request.provider.value
            warm = "true" if attempt.warm is not None else "false"
            metrics.STAGE_SECONDS.labels(stage, provider, warm).observe(elapsed)
        log.info("stage done", stage=stage, ms=attempt.timings[stage])

    def _fault_pause(self, stage: StageName) -> None:
        """The fault-injection hook (``fleet.fault_pause``): hold the stage, lease kept, for a crash drill."""
        seconds = self.settings.fleet.fault_pause.get(stage)
        if seconds:
            log.warning("fault injection: pausing at the end of the stage", stage=stage, seconds=seconds)
            time.sleep(seconds)

    # -- the stages ---------------------------------------------------------------------------------------
    def _stages(self, request: SessionRequest, attempt: _Attempt) -> SessionResult:
        settings = self.settings
        record = attempt.record
        # A first attempt's claim touches nothing outside this process; a later one's may adopt or remove a sandbox.
        with self._stage(attempt, "claim", report="none" if record.attempts == 1 else "write"):
            provider = attempt.provider = self.providers(request.provider)
            if record.attempts > settings.fleet.max_attempts:
                raise TooManyAttempts(f"gave up after {settings.fleet.max_attempts} attempts")
            if record.attempts > 1:
                self._adopt_or_remove(provider, request, attempt)

        # Reported only before a grant that creates something (a vault placeholder, a minted key): other strategies
        # read what they hand out, and the sandbox stage's report carries their stage.
        with self._stage(attempt, "credentials", report="none"):
            effective = self.credentials.effective(request)  # the tenant default, for this stage and the next
            if self.credentials.creates(effective):
                self._report(attempt, "credentials")
            grant = attempt.grant = self.credentials.grant(request, effective=effective)
            attempt.mask(grant.secret_values())

        with self._stage(attempt, "environment", report="none"):
            llm = llm_provider_for(request.agent, effective.credentials.llm_provider)
            attempt.agent = agent_setup(
                request.agent,
                llm,
                dict(grant.plain_env),
                permissions=request.session.permissions,
                llm_retries=settings.llm_retries,
            )
            environment = build_environment(request, grant, attempt.agent)

        with contextlib.ExitStack() as slots:
            with self._stage(attempt, "sandbox"):
                deadline = time.monotonic() + settings.fleet.slot_wait_seconds
                checkpoint = functools.partial(self._checkpoint, attempt, "sandbox")
                slots.enter_context(self.limits.tenant_slot(request, deadline, checkpoint))
                provider, sandbox = self._acquire_sandbox(request, attempt, provider, environment, deadline, slots)
                structlog.contextvars.bind_contextvars(provider=provider.name, sandbox_id=sandbox.sandbox_id)
                grant = self._bind_credentials(request, attempt, sandbox, grant, environment)

            # The sandbox and the daemon's token go out with the daemon stage's report, before the daemon starts: a
            # redelivery finds the sandbox in the record and adopts it with the token. A warm sandbox used as it is:
            # daemon and session stages take milliseconds, carried by the ready write.
            self._choose_token(attempt)
            warm_as_is: Report = "check" if attempt.warm_as_is else "write"
            with self._stage(attempt, "daemon", report=warm_as_is):
                client = self._start_daemon(request, attempt, provider, sandbox, grant, environment)

            with self._stage(attempt, "session", report="write" if request.session.prompt else warm_as_is):
                self._open_session(request, attempt, client)

        with self._stage(attempt, "ready", report="none"):
            record.result.state = SessionState.ready
            record.result.error = None
            record.result.ready_at = time.time()
        # Written like a stage's report: a session whose end was asked during its last stage ends terminated, never ready.
        # The lease goes back with it: nothing after this touches what it guards.
        self._advance(attempt, "ready", {"state": SessionState.starting, "ready_at": None}, release=True)
        log.info("session ready", sandbox_id=sandbox.sandbox_id, timings_ms=attempt.timings)
        return record.result

    def _choose_token(self, attempt: _Attempt) -> None:
        """The daemon's token: a warm daemon used as it is keeps its own; any other daemon started for the session
        gets a new one (an adopted sandbox's too: its daemon is restarted with this attempt's credentials)."""
        warm = attempt.warm
        token = attempt.token = warm.token if warm is not None and attempt.warm_as_is else daemon.new_token()
        attempt.mask([token.get_secret_value()])
        attempt.record.daemon_token = self.store.cipher.encrypt(token)

    def _adopt_or_remove(self, provider: Provider, request: SessionRequest, attempt: _Attempt) -> None:
        """A previous attempt whose worker died may have left a sandbox: adopt it when its daemon answers with the
        token in the record, remove it (and any other) otherwise."""
        record = attempt.record
        labels = {LABEL_OWNER: self.settings.owner, LABEL_REQUEST_ID: request.request_id}
        found = self.retries.in_stage(lambda: provider.list_owned(labels))
        known = record.result.sandbox_id
        if known and all(s.sandbox_id != known for s in found):  # a warm sandbox has its pool's labels, not ours
            found += [s for s in [self.retries.in_stage(lambda: provider.find(known))] if s is not None]
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

    @functools.cached_property
    def breaker(self) -> Breaker:
        return Breaker(self.store.redis, self.settings.fleet)

    def _acquire_sandbox(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        provider: Provider,
        environment: SessionEnvironment,
        deadline: float,
        slots: contextlib.ExitStack,
    ) -> tuple[Provider, Sandbox]:
        """Stage 4, the sandbox the session runs in: the one adopted from a dead attempt, or a new one under the
        provider's caps, failing over to the next provider (:mod:`worker.failover`) when one is down or its
        breaker open, or one claimed from the request's warm pool (:mod:`worker.pool`) when it has a ready one.
        Holds the provider's bring-up slot in ``slots``."""
        record = attempt.record
        checkpoint = functools.partial(self._checkpoint, attempt, "sandbox")
        if attempt.sandbox is not None:
            slots.enter_context(self.limits.provider_slot(request, request.provider, deadline, checkpoint))
            expires_at = attempt.sandbox.labels.get(LABEL_EXPIRES_AT)
            record.expires_at = float(expires_at) if expires_at else None
            record.result.sandbox_id = attempt.sandbox.sandbox_id
            self.store.put(record)
            return provider, attempt.sandbox
        warm = self._claim_warm(request, attempt, provider, deadline, slots)
        if warm is not None:
            return provider, warm
        record.result.skipped = []
        failed: SandboxWorkerError | None = None
        for name in failover.candidates(request, self.settings.fleet):
            admission = self.breaker.admit(name, request.request_id)
            if not admission:
                log.info("skipping a provider", provider=name.value, reason=admission.reason)
                record.result.skipped.append(SkippedProvider(provider=name, reason=admission.reason))
                continue
            candidate = provider if name == request.provider else self.providers(name)
            attempt.provider, record.result.provider = candidate, name
            held = contextlib.ExitStack()
            try:
                held.enter_context(self.limits.provider_slot(request, name, deadline, checkpoint))
                sandbox = self._start_sandbox(request, attempt, candidate, name, environment, deadline)
            except SandboxWorkerError as exc:
                held.close()
                if not failover.provider_side(exc):
                    raise
                self.breaker.failure(name)
                with contextlib.suppress(Exception):  # what a failed create may have left; frees its quota slot
                    self.teardown.remove_sandboxes(candidate, request, None)
                reason = REDACTOR.redact(f"{exc.code}: {exc.message}")[:300]
                record.result.skipped.append(SkippedProvider(provider=name, reason=reason))
                log.warning("provider failed, failing over", provider=name.value, code=exc.code)
                failed = exc
                continue
            except BaseException:
                held.close()
                raise
            self.breaker.success(name, admission)
            slots.enter_context(held)
            record.result.sandbox_id = sandbox.sandbox_id  # written with the daemon stage's report
            return candidate, sandbox
        if failed is not None:
            raise failed
        skipped = ", ".join(f"{s.provider.value} ({s.reason})" for s in record.result.skipped)
        raise ProviderUnavailable(f"no provider to run on: {skipped}", provider=request.provider.value)

    def _claim_warm(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        provider: Provider,
        deadline: float,
        slots: contextlib.ExitStack,
    ) -> Sandbox | None:
        """A started sandbox from the request's warm pool, under the provider's bring-up cap; None (start cold) when
        the request has no pool or its pool had nothing alive to give."""
        target = self.pools.target_for(request, attempt.grant.strategy if attempt.grant else None)
        if target is None:
            return None
        record = attempt.record
        checkpoint = functools.partial(self._checkpoint, attempt, "sandbox")
        with contextlib.ExitStack() as held:
            held.enter_context(self.limits.provider_slot(request, request.provider, deadline, checkpoint))
            claimed = self.pools.claim(request, target, provider)
            attempt.timings["pool_claim"] = round(claimed.seconds * 1000, 1) if claimed else 0.0
            if claimed is None:
                return None
            slots.enter_context(held.pop_all())
        attempt.warm, attempt.sandbox = claimed, claimed.sandbox
        record.expires_at = time.time() + request.sandbox.ttl_seconds
        record.result.provider, record.result.sandbox_id, record.result.warm = (
            request.provider,
            claimed.sandbox.sandbox_id,
            True,
        )
        self.store.put(record)
        return claimed.sandbox

    def _bind_credentials(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        sandbox: Sandbox,
        grant: CredentialGrant,
        environment: SessionEnvironment,
    ) -> CredentialGrant:
        """Tie the grant to its sandbox before the daemon stage hands it over: to its private address where it has
        one; and where the session uses a warm daemon as it is, the grant adopts the placeholder its agent already
        holds (bound to nothing until now)."""
        warm = attempt.warm
        if warm is not None and binds_as_is(request, attempt.agent, grant, environment, warm.entry):
            adopted = (
                self.credentials.adopt(request, grant, warm.placeholder, sandbox.private_address)
                if warm.placeholder is not None
                else grant
            )
            if adopted is not None:
                attempt.warm_as_is, attempt.grant = True, adopted
                attempt.mask(adopted.secret_values())
                return adopted
        if sandbox.private_address:
            self.credentials.bind(request, grant, sandbox.private_address)
        return grant

    def _start_sandbox(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        provider: Provider,
        name: ProviderName,
        environment: SessionEnvironment,
        deadline: float,
    ) -> Sandbox:
        """A new sandbox of ``request`` on the provider ``name``, under that provider's quota."""
        settings, record = self.settings, attempt.record
        labels = sandbox_labels(settings.owner, request, time.time())
        checkpoint = functools.partial(self._checkpoint, attempt, "sandbox")
        until = float(labels[LABEL_EXPIRES_AT])
        self.limits.reserve_sandbox(request, until=until, deadline=deadline, checkpoint=checkpoint, provider=name)
        spec = SandboxSpec(
            image=failover.image_for(request, name),
            labels=labels,
            env=environment.sandbox_env,
            cpu=request.sandbox.cpu,
            memory_mb=request.sandbox.memory_mb,
            ttl_seconds=request.sandbox.ttl_seconds,
            ports=(settings.daemon_port,),
            idempotency_key=f"{request.request_id}-{record.attempts}",
            egress=tuple(request.sandbox.egress),
        )
        attempt.sandbox = self.retries.in_stage(lambda: provider.start(spec))
        record.expires_at = until
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
        settings, record, retry, warm = self.settings, attempt.record, self.retries.in_stage, attempt.warm
        if attempt.adopted:
            # The sandbox is reused, its daemon is not: it runs with the dead attempt's environment, and this
            # attempt's credentials may differ (a vault placeholder is per grant). A restart costs ~50 ms.
            retry(lambda: daemon.stop_daemon(provider, sandbox))
        token = attempt.token
        assert token is not None
        # A warm daemon runs with no tenant's anything: used as it is (its agent and session too) when the sandbox
        # stage found it fit, otherwise replaced by the session's.
        if warm is None:
            self._launch_daemon(request, attempt, provider, sandbox, grant, environment)
        elif not attempt.warm_as_is:  # its daemon and agent were checked and installed when it was filled
            self._replace_warm_daemon(request, attempt, warm, grant, environment)
        endpoint = (
            warm.endpoint if warm is not None else retry(lambda: provider.endpoint(sandbox, settings.daemon_port))
        )
        client = attempt.client = daemon.DaemonClient(endpoint, token, timeout=settings.session_timeout)
        # Waited for by the session's first request (a daemon used as it is answered the claim's check moments ago).
        attempt.booting = not attempt.warm_as_is
        record.result.daemon_url = endpoint.url
        # The edge's tokens (a preview or traffic token); the Host header only names the sandbox.
        attempt.mask([value for name, value in endpoint.headers.items() if name.lower() != "host"])
        record.daemon_headers = self.store.seal_headers(endpoint.headers)
        return client

    def _launch_daemon(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        provider: Provider,
        sandbox: Sandbox,
        grant: CredentialGrant,
        environment: SessionEnvironment,
    ) -> None:
        """The session's daemon with the session's token, environment and cwd, then, while it boots, the rest: the
        agent process that reads the session's files starts only at the session stage's first ACP request, and a
        daemon of the wrong version fails here all the same."""
        settings, retry = self.settings, self.retries.in_stage
        assert attempt.token is not None
        served_by = attempt.record.result.provider or request.provider
        image = failover.image_for(request, served_by)
        retry(
            lambda: daemon.put_daemon(provider, sandbox, settings.daemon_install, settings.daemon_binary, image=image)
        )
        start = functools.partial(
            daemon.start_daemon,
            provider,
            sandbox,
            token=attempt.token,
            port=settings.daemon_port,
            cwd=request.session.cwd,
            env=environment.daemon_env,
        )
        retry(start)
        if settings.daemon_install is InstallMode.upload:
            retry(lambda: daemon.check_daemon(provider, sandbox))
        else:  # the image's daemon is checked once per image (put_daemon), and so is its agent (the session stage)
            attempt.image = daemon.image_key(provider, image)
        retry(lambda: daemon.install_agent(provider, sandbox, request.agent.value, settings.daemon_install))
        for path, content in self._session_files(attempt, grant).items():
            retry(functools.partial(provider.upload, sandbox, path, content, mode=0o600))

    def _replace_warm_daemon(
        self,
        request: SessionRequest,
        attempt: _Attempt,
        warm: Claimed,
        grant: CredentialGrant,
        environment: SessionEnvironment,
    ) -> None:
        """Bind the session to a warm sandbox: its daemon (no tenant's anything) is replaced by one with the session's
        token, environment, files and cwd, through the pooled daemon's own API (``daemon.replace_daemon``)."""
        assert attempt.token is not None
        pooled = daemon.DaemonClient(warm.endpoint, warm.token, timeout=self.settings.session_timeout)
        try:
            daemon.replace_daemon(
                pooled,
                token=attempt.token,
                port=self.settings.daemon_port,
                cwd=request.session.cwd,
                env=environment.daemon_env,
                files=self._session_files(attempt, grant),
            )
        finally:
            pooled.close()

    @staticmethod
    def _session_files(attempt: _Attempt, grant: CredentialGrant) -> dict[str, bytes]:
        """The agent's config files and the grant's credential files, by absolute path in the sandbox."""
        files = {**attempt.agent.files, **{path: value.get_secret_value() for path, value in grant.files.items()}}
        return {f"{HOME}/{path}": content.encode() for path, content in files.items()}

    def _daemon_up(self, attempt: _Attempt, first: Callable[[float], object]) -> None:
        """The first request to the daemon the daemon stage started (``first``, given the seconds it may take to come
        up; none when it answered already). A daemon that never answers is the daemon stage's failure, and its log
        says why."""
        if not attempt.booting:
            first(0.0)
            return
        try:
            first(self.settings.health_timeout)
        except DaemonUnhealthy as exc:
            exc.stage = "daemon"
            assert attempt.provider is not None and attempt.sandbox is not None
            tail = REDACTOR.redact(daemon.daemon_log_tail(attempt.provider, attempt.sandbox))
            if tail:
                exc.message = f"{exc.message}; daemon log: {tail[-600:]}"
            raise
        attempt.booting = False

    def _open_session(self, request: SessionRequest, attempt: _Attempt, client: daemon.DaemonClient) -> None:
        settings, record = self.settings, attempt.record
        poll = WARM_HEALTH_POLL if attempt.warm is not None else None  # a warm sandbox's daemon is up in tens of ms
        pooled = attempt.warm.entry if attempt.warm is not None and attempt.warm_as_is else None
        server_id = (pooled and pooled.server_id) or f"sw-{request.request_id}-{record.attempts}"
        acp = attempt.acp = AcpConnection(
            client, server_id, request.agent.value, permissions=request.session.permissions
        )
        session_id = pooled.session_id if pooled is not None else None
        if pooled is not None and pooled.server_id:
            acp.attach(pooled.acp_requests)  # checked, spawned and initialized when the pool filled the sandbox
            if pooled.binding is not None:
                # The credential goes to the front's relay (pool.binds_as_is checked that it can): its values were
                # masked at the credentials stage, and the request carrying them is not logged.
                assert attempt.grant is not None
                relay = relay_binding(attempt.grant)
                assert relay is not None
                client.bind_llm(relay.base_url, relay.headers)
        elif daemon.agent_pinned(request.agent.value, image=attempt.image):
            self._daemon_up(attempt, lambda boot: acp.initialize(settings.session_timeout, boot=boot, poll=poll))
        else:
            if attempt.booting:  # the agent's check below asks the daemon too
                self._daemon_up(attempt, lambda boot: client.wait_healthy(boot, poll=poll))
            # The agent's version check (Claude Code's `--version` takes a second or more) overlaps the ACP handshake.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-check") as background:
                checked = background.submit(daemon.check_agent, client, request.agent.value, image=attempt.image)
                acp.initialize(timeout=settings.session_timeout)
                checked.result()
        if session_id is None:
            if attempt.agent.auth_method:
                acp.authenticate(attempt.agent.auth_method, timeout=settings.session_timeout)
            session_id = acp.new_session(request.session.cwd, timeout=settings.session_timeout)
        mode = request.session.mode or attempt.agent.mode
        if mode and not (pooled is not None and pooled.mode == mode):
            acp.set_mode(session_id, mode, timeout=settings.session_timeout)
        if request.session.model:
            acp.set_model(session_id, request.session.model, timeout=settings.session_timeout)
        record.result.server_id, record.result.session_id = server_id, session_id
        if request.session.prompt:
            turn = acp.prompt(session_id, request.session.prompt, timeout=settings.prompt_timeout)
            # Agent output may echo a secret (a prompt-injected agent, a careless tool): the store redacts the
            # result before it is kept or returned.
            # Not validated on assignment (a bring-up sets its result's fields a few dozen times): capped here.
            record.result.reply, record.result.tool_calls = cap_reply(turn.text), turn.tool_calls
            record.result.stop_reason, record.result.usage = turn.stop_reason, turn.usage

    # -- failure ------------------------------------------------------------------------------------------
    @staticmethod
    def _still_ours(attempt: _Attempt) -> bool:
        """Whether the lease is still ours before compensating. When Redis cannot say (down beyond its client
        retries) nobody can take the lease over meanwhile, so the attempt compensates what it made as before."""
        try:
            return attempt.lease.held()
        except redis.RedisError:
            return not attempt.lease.lost.is_set()

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
        if not self._still_ours(attempt):
            # Compensation removes every sandbox labelled with the request, frees its quota slot and its credentials,
            # and the record is the request's: all of it may be the new owner's by now. Touch nothing.
            raise _LeaseLost from exc
        error = self._diagnose(attempt, _as_worker_error(exc))
        if attempt.acp is not None:
            attempt.acp.detach()
            attempt.acp = None
        known = attempt.sandbox.sandbox_id if attempt.sandbox else None
        self.teardown.compensate(request, attempt.provider, known, granted=attempt.grant is not None)
        stage = error.stage or record.result.stage
        # Masked in the error itself: a transient one travels on in RetryLater, to the task's give-up record.
        message = error.message = REDACTOR.redact(error.message)
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
