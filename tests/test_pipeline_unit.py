"""The pipeline on the fake provider and an in-memory Redis: stages, compensation, adoption, terminate, a lost
lease, input bounds and the record as the one source of truth for clients, in seconds and without a Redis server
or a Docker engine (the integration suites prove the same against the real ones)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import structlog.testing
from celery import Celery
from prometheus_client import REGISTRY
from pydantic import SecretStr

from providers.base import LABEL_OWNER, LABEL_REQUEST_ID
from providers.fake import FakeProvider, StandInDaemons
from worker.client import SessionClient
from worker.config import Settings, get_settings
from worker.credentials.base import CredentialGrant
from worker.credentials.broker import CredentialBroker
from worker.credentials.none import NoCredentials
from worker.errors import InvalidRequest, ProviderAuthError, ProviderError, ProviderUnavailable
from worker.fleet import STAGES
from worker.models import (
    REPLY_CUT_MARKER,
    REPLY_MAX,
    ErrorInfo,
    SessionRequest,
    SessionResult,
    SessionState,
    Strategy,
    invalid_result,
)
from worker.pipeline import Pipeline, ProgressHook, no_progress
from worker.queueing import send_create
from worker.redaction import MASK
from worker.retries import RetryLater
from worker.store import Store

pytest_plugins = ["tests.standins.fake_fixtures"]


class _Crash(BaseException):
    """A worker dying mid-stage: nothing of the pipeline's own handling runs."""


@pytest.fixture
def provider(daemons: StandInDaemons) -> FakeProvider:
    return FakeProvider(daemons=daemons)


def _settings(**fleet: Any) -> Settings:
    settings = get_settings()
    update = {"stage_attempts": 2, **fleet}
    return settings.model_copy(update={"fleet": settings.fleet.model_copy(update=update), "lease_seconds": 5})


def _pipeline(store: Store, provider: FakeProvider, progress: ProgressHook = no_progress, **fleet: Any) -> Pipeline:
    broker = CredentialBroker([NoCredentials()])
    return Pipeline(_settings(**fleet), store, lambda _name: provider, broker, progress=progress)


def _request(request_id: str = "req-1", prompt: str | None = "hello") -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": "acme",
        "agent": "mock",
        "provider": "docker",
        "session": {"prompt": prompt},
    }


def test_a_request_comes_up_through_every_stage(store: Store, provider: FakeProvider) -> None:
    result = _pipeline(store, provider).create(_request())

    assert result.state is SessionState.ready, result.error
    assert result.reply == "mock: hello"
    assert list(result.timings_ms) == list(STAGES)
    [sandbox] = provider.sandboxes.values()
    assert sandbox.labels[LABEL_REQUEST_ID] == "req-1" and LABEL_OWNER in sandbox.labels
    record = store.get("req-1")
    assert record is not None and record.result == result
    assert store.token_of(record) is not None and store.lease_holder("req-1") is None


def test_only_a_grant_that_creates_something_is_reported_before_it_runs(store: Store, provider: FakeProvider) -> None:
    """The credentials stage writes its record (the stage named, the lease checked) before a grant that creates
    something outside the worker, and the grant sees it there; a strategy that only reads what it hands out leaves
    that to the sandbox stage's report."""
    seen: list[str | None] = []

    class Minting:
        name = Strategy("gateway")
        creates = True

        def grant(self, request: SessionRequest) -> CredentialGrant:
            record = store.get(request.request_id)
            seen.append(record.result.stage if record is not None else None)
            return CredentialGrant(strategy=self.name)

        def release(self, request: SessionRequest) -> None:
            return None

    reported: list[str] = []
    broker = CredentialBroker([NoCredentials(), Minting()])  # type: ignore[list-item]
    pipeline = Pipeline(
        _settings(), store, lambda _name: provider, broker, progress=lambda stage, _: reported.append(stage)
    )
    minted = pipeline.create({**_request("minted"), "credentials": {"strategy": "gateway"}})
    assert minted.state is SessionState.ready, minted.error
    assert reported == ["credentials", "sandbox", "daemon", "session"] and seen == ["credentials"]

    reported.clear()
    plain = pipeline.create(_request("plain"))
    assert plain.state is SessionState.ready and list(plain.timings_ms) == list(STAGES)
    assert reported == ["sandbox", "daemon", "session"]


def test_a_duplicate_gets_the_first_result_and_no_second_sandbox(store: Store, provider: FakeProvider) -> None:
    first = _pipeline(store, provider).create(_request())
    again = _pipeline(store, provider).create(_request())

    assert again == first and provider.calls.count("start") == 1


def test_bad_input_fails_naming_the_field_and_creates_nothing(store: Store, provider: FakeProvider) -> None:
    result = _pipeline(store, provider).create({**_request(), "sandbox": {"ttl_seconds": 0}})

    assert result.state is SessionState.failed and result.error is not None
    assert result.error.code == "invalid_request" and result.error.field == "sandbox.ttl_seconds"
    assert provider.calls == [] and store.get("req-1") is None


def test_a_permanent_provider_error_fails_at_once_and_frees_the_quota(store: Store, provider: FakeProvider) -> None:
    provider.fail("start", ProviderAuthError("bad key", provider="fake"))
    pipeline = _pipeline(store, provider, provider_sandboxes={"docker": 1})

    failed = pipeline.create(_request("req-1"))
    assert failed.state is SessionState.failed and failed.error is not None
    assert (failed.error.code, failed.error.stage) == ("provider_auth", "sandbox")
    assert provider.calls.count("start") == 1 and provider.sandboxes == {}
    # The quota of one live sandbox was released: the next request gets it.
    assert pipeline.create(_request("req-2")).state is SessionState.ready


def test_a_transient_error_is_retried_in_the_stage_then_left_to_the_task(store: Store, provider: FakeProvider) -> None:
    provider.fail("start", *[ProviderUnavailable("503", provider="fake")] * 2)

    with pytest.raises(RetryLater) as raised:
        _pipeline(store, provider).create(_request())

    assert raised.value.error.code == "provider_unavailable" and provider.calls.count("start") == 2
    record = store.get("req-1")
    assert record is not None and record.result.state is SessionState.queued and provider.sandboxes == {}
    # The next attempt starts clean and succeeds.
    assert _pipeline(store, provider).create(_request()).state is SessionState.ready


def test_a_failure_after_the_sandbox_exists_removes_it(store: Store, provider: FakeProvider) -> None:
    provider.fail("spawn", ProviderError("launcher exited 1", provider="fake"))

    result = _pipeline(store, provider).create(_request())

    assert result.state is SessionState.failed and result.error is not None and result.error.stage == "daemon"
    assert provider.calls.count("start") == 1 and provider.sandboxes == {}
    assert result.sandbox_id is None and result.daemon_url is None


def test_terminate_during_bring_up_stops_at_the_next_stage(store: Store, provider: FakeProvider) -> None:
    def terminate_at_daemon(stage: str, result: SessionResult) -> None:
        if stage == "daemon":  # a client asks while the daemon starts; the pipeline stops before the session
            store.request_terminate(result.request_id)

    result = _pipeline(store, provider, progress=terminate_at_daemon).create(_request())

    assert result.state is SessionState.terminated and result.error is not None
    assert result.error.stage == "session" and provider.sandboxes == {}


def test_terminate_asked_before_the_ready_write_ends_the_session(store: Store, provider: FakeProvider) -> None:
    """The ready record is written only if no terminate was asked meanwhile: one asked during the last stage ends the
    session terminated (its sandbox removed), never ready."""

    def terminate_at_session(stage: str, result: SessionResult) -> None:
        if stage == "session":
            store.request_terminate(result.request_id)

    result = _pipeline(store, provider, progress=terminate_at_session).create(_request())

    assert result.state is SessionState.terminated and result.error is not None
    assert result.error.stage == "ready" and result.ready_at is None and provider.sandboxes == {}
    kept = store.get("req-1")
    assert kept is not None and kept.result.state is SessionState.terminated


def test_a_lease_lost_before_the_ready_write_writes_nothing(store: Store, provider: FakeProvider) -> None:
    """A worker whose lease another took over during the last stage leaves the record to it: not written ready."""

    def taken_over_at_session(stage: str, result: SessionResult) -> None:
        if stage == "session":
            store.redis.set(f"sw:lease:{result.request_id}", "another-worker")

    with pytest.raises(RetryLater):
        _pipeline(store, provider, progress=taken_over_at_session).create(_request())

    kept = store.get("req-1")
    assert kept is not None and kept.result.state is SessionState.starting and kept.result.stage == "session"


def test_terminate_of_a_ready_session_removes_its_sandbox(store: Store, provider: FakeProvider) -> None:
    pipeline = _pipeline(store, provider)
    pipeline.create(_request())

    assert pipeline.teardown.terminate("req-1").state is SessionState.terminated
    assert provider.sandboxes == {} and pipeline.teardown.terminate("req-1").state is SessionState.terminated


def test_a_redelivery_adopts_the_sandbox_a_dead_worker_left(store: Store, provider: FakeProvider) -> None:
    def crash_at_session(stage: str, result: SessionResult) -> None:
        if stage == "session":
            raise _Crash

    with pytest.raises(_Crash):
        _pipeline(store, provider, progress=crash_at_session).create(_request())
    [left] = provider.sandboxes

    result = _pipeline(store, provider).create(_request())

    assert result.state is SessionState.ready and result.sandbox_id == left
    assert provider.calls.count("start") == 1  # adopted, not started again
    record = store.get("req-1")
    assert record is not None and record.attempts == 2


def test_a_worker_that_lost_its_lease_stops_and_leaves_the_sandbox(store: Store, provider: FakeProvider) -> None:
    def lose_the_lease(stage: str, result: SessionResult) -> None:
        if stage == "daemon":
            store.redis.set(f"sw:lease:{result.request_id}", "another-worker")
            time.sleep(2.5)  # one heartbeat (every lease_seconds / 3) notices

    with pytest.raises(RetryLater) as raised:
        _pipeline(store, provider, progress=lose_the_lease).create(_request())

    assert raised.value.error.code == "busy"
    assert len(provider.sandboxes) == 1 and store.lease_holder("req-1") == "another-worker"


def test_a_worker_whose_lease_ran_out_touches_nothing_when_its_stage_then_fails(
    store: Store, provider: FakeProvider
) -> None:
    """A pause longer than the lease, then a takeover, then the stage fails: the stale worker neither removes the
    request's sandbox nor frees its quota slot nor overwrites the record; it leaves them to the new owner."""

    def pause_past_the_lease_then_fail(stage: str, result: SessionResult) -> None:
        if stage == "daemon":
            # The lease expired under a pause and a duplicate delivery took it over (no heartbeat noticed yet).
            store.redis.set(f"sw:lease:{result.request_id}", "new-owner")
            provider.fail("spawn", ProviderError("launcher exited 1", provider="fake"))

    pipeline = _pipeline(store, provider, progress=pause_past_the_lease_then_fail, provider_sandboxes={"docker": 1})
    with pytest.raises(RetryLater) as raised:
        pipeline.create(_request())

    assert raised.value.error.code == "busy"
    assert len(provider.sandboxes) == 1  # the new owner may adopt it
    assert store.redis.zcard("sw:sem:{sandboxes:docker}:holders") == 1  # the slot stays with the request
    record = store.get("req-1")
    assert record is not None and record.result.state is SessionState.starting and record.result.error is None
    assert store.lease_holder("req-1") == "new-owner"


@pytest.mark.parametrize(
    ("sandbox", "field"),
    [
        ({"env": {f"V{i}": "x" for i in range(50_000)}}, "sandbox.env"),
        ({"env": {"BIG": "x" * 5_000_000}}, "sandbox.env.BIG"),
        ({"env": {f"V{i}": "x" * 30_000 for i in range(8)}}, "sandbox.env"),
        ({"labels": {f"l{i}": "x" for i in range(100)}}, "sandbox.labels"),
    ],
)
def test_an_oversized_request_is_refused_at_claim_naming_the_field(
    store: Store, provider: FakeProvider, sandbox: dict[str, Any], field: str
) -> None:
    """Too many env entries, an env value too big, an environment too big in all, too many labels: each is
    `invalid_request` at claim, naming the field, and no sandbox is asked for."""
    result = _pipeline(store, provider).create({**_request(), "sandbox": sandbox})

    assert result.state is SessionState.failed and result.error is not None
    assert (result.error.code, result.error.stage, result.error.field) == ("invalid_request", "claim", field)
    assert provider.calls == [] and store.get("req-1") is None


def test_a_long_reply_is_kept_cut_with_a_marker(store: Store, provider: FakeProvider) -> None:
    """The agent's reply is kept up to 64 Ki characters, then a marker says it was cut: the record stays small."""
    result = _pipeline(store, provider).create(_request("req-long", prompt="y" * 90_000))

    assert result.state is SessionState.ready and result.reply is not None
    assert len(result.reply) == REPLY_MAX + len(REPLY_CUT_MARKER) and result.reply.endswith(REPLY_CUT_MARKER)
    record = store.get("req-long")
    assert record is not None and record.result.reply == result.reply


def _client(store: Store, app: Celery) -> SessionClient:
    client = SessionClient.__new__(SessionClient)
    client.store, client.app, client.signer, client._sent = store, app, None, {}  # open mode: reads the records
    return client


def _app() -> Celery:
    return Celery("unit", broker="memory://", backend="cache+memory://")


def test_wait_reads_the_record_not_a_task_result_another_request_wrote(store: Store, provider: FakeProvider) -> None:
    """A Celery result under the request_id saying 'failed' (a second request's rejection, as before task ids were
    unique) does not fool the first client: wait and status read the record, whose session is ready."""
    app = _app()
    rejection = invalid_result({"request_id": "req-1"}, InvalidRequest("already used", field="request_id"))
    app.backend.store_result("req-1", rejection.model_dump(mode="json"), "SUCCESS")
    _pipeline(store, provider).create(_request())
    client = _client(store, app)

    assert client.wait("req-1", timeout=5).state is SessionState.ready
    status = client.status("req-1")
    assert status is not None and status.state is SessionState.ready


def test_wait_reports_the_stages_the_record_shows(store: Store, provider: FakeProvider) -> None:
    """Progress comes from the record's stage: a client following a bring-up sees its stages."""
    client = _client(store, _app())

    def watch(stage: str, result: SessionResult) -> None:
        time.sleep(0.25)  # long enough for the client's poll to see the stage

    with ThreadPoolExecutor(1) as pool:
        stages: list[str] = []
        pool.submit(_pipeline(store, provider, progress=watch).create, _request())
        result = client.wait("req-1", timeout=20, on_progress=stages.append)

    assert result.state is SessionState.ready and "sandbox" in stages and "daemon" in stages


def test_a_request_rejected_before_it_has_a_record_still_gets_an_answer(store: Store, provider: FakeProvider) -> None:
    """An invalid request has no record: its rejection is kept under its request_id, where status and wait look."""
    _pipeline(store, provider).create({**_request("bad-1"), "sandbox": {"ttl_seconds": 0}})
    client = _client(store, _app())

    result = client.wait("bad-1", timeout=2)
    assert result.state is SessionState.failed and result.error is not None
    assert result.error.field == "sandbox.ttl_seconds"


def test_a_duplicate_answers_at_once_instead_of_polling(store: Store, provider: FakeProvider) -> None:
    """While another worker holds the lease, a duplicate delivery answers at once (RetryLater busy with the state
    as it stands), holding no process for the soft time limit."""
    pipeline = _pipeline(store, provider)
    pipeline.settings = pipeline.settings.model_copy(update={"task_soft_time_limit": 3})
    store.create(SessionRequest.model_validate(_request()))
    store.redis.set("sw:lease:req-1", "another-worker", ex=30)

    started = time.monotonic()
    with pytest.raises(RetryLater) as raised:
        pipeline.create(_request())

    assert time.monotonic() - started < 1
    assert raised.value.error.code == "busy" and raised.value.result.state is SessionState.queued
    assert provider.calls == []


def test_giving_up_writes_the_failure_to_the_record_unless_a_worker_holds_it(store: Store) -> None:
    """A task out of retries records the request failed; not when a worker holds the lease or it has finished."""
    request = SessionRequest.model_validate(_request())
    store.create(request)
    error = ErrorInfo(code="provider_unavailable", stage="sandbox", message="503")

    store.redis.set("sw:lease:req-1", "another-worker", ex=30)
    held = store.give_up("req-1", error)
    assert held is not None and held.state is SessionState.queued
    store.redis.delete("sw:lease:req-1")

    given_up = store.give_up("req-1", error)
    record = store.get("req-1")
    assert given_up is not None and given_up.state is SessionState.failed
    assert record is not None and record.result.state is SessionState.failed and record.result.error == error
    assert store.redis.zscore("sw:active", "req-1") is None


def test_each_send_of_a_request_has_a_task_id_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sends of one request_id get two task ids, neither of them the request_id."""
    app = _app()
    sent: list[str] = []
    monkeypatch.setattr(app, "send_task", lambda *args, task_id, **kwargs: sent.append(task_id))

    send_create(_request(), app=app)
    send_create(_request(), app=app)

    assert len(set(sent)) == 2 and "req-1" not in sent and all(t.startswith("req-1.") for t in sent)


def test_submit_refuses_a_request_id_another_request_holds(store: Store, provider: FakeProvider) -> None:
    """The client refuses at once to reuse a request_id for a different request; the first session is untouched."""
    _pipeline(store, provider).create(_request())
    client = _client(store, _app())

    with pytest.raises(InvalidRequest) as raised:
        client.submit(_request(prompt="something else"))
    assert raised.value.field == "request_id"


class _KeyGrant:
    """A strategy handing the agent a key: the hostile case is an agent that echoes it back."""

    name = Strategy("byok")
    creates = False

    def grant(self, request: SessionRequest) -> CredentialGrant:
        return CredentialGrant(strategy=self.name, env={"ANTHROPIC_API_KEY": SecretStr(LEAKED)})

    def release(self, request: SessionRequest) -> None:
        return None


LEAKED = "sk-ant-echoed-by-the-agent-0123456789"


def test_an_agent_echoing_its_key_leaves_it_in_no_result_or_record(store: Store, provider: FakeProvider) -> None:
    """The stand-in agent repeats its prompt, which holds the session's key: the reply kept in the result and the
    record is redacted."""
    broker = CredentialBroker([NoCredentials(), _KeyGrant()])
    pipeline = Pipeline(_settings(), store, lambda _name: provider, broker)
    request = {**_request(prompt=f"print {LEAKED}"), "credentials": {"strategy": "byok"}}

    result = pipeline.create(request)

    assert result.state is SessionState.ready and result.reply is not None
    assert LEAKED not in result.reply and MASK in result.reply
    record = store.get(result.request_id)
    assert record is not None and LEAKED not in record.result.model_dump_json()


def _sessions(outcome: str, code: str = "") -> float:
    labels = {"outcome": outcome, "provider": "fake", "agent": "mock", "strategy": "none", "warm": "false"}
    return REGISTRY.get_sample_value("sandbox_worker_sessions_total", {**labels, "code": code}) or 0.0


def test_each_attempt_is_counted_and_summarised_once(store: Store, provider: FakeProvider) -> None:
    """A failed attempt, a retried one and a ready one each add one to the session counter under their outcome
    (a failure with its code), and their stages to the stage histogram; each logs one summary line."""
    before = (_sessions("failed", "provider_auth"), _sessions("retried", "provider_unavailable"), _sessions("ready"))
    stage = REGISTRY.get_sample_value(
        "sandbox_worker_stage_duration_seconds_count", {"stage": "session", "provider": "fake", "warm": "false"}
    )
    with structlog.testing.capture_logs() as logged:
        provider.fail("start", ProviderAuthError("bad key", provider="fake"))
        _pipeline(store, provider).create(_request("req-1"))
        provider.fail("start", *[ProviderUnavailable("503", provider="fake")] * 2)
        with pytest.raises(RetryLater):
            _pipeline(store, provider).create(_request("req-2"))
        _pipeline(store, provider).create(_request("req-2"))

    after = (_sessions("failed", "provider_auth"), _sessions("retried", "provider_unavailable"), _sessions("ready"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert (
        REGISTRY.get_sample_value(
            "sandbox_worker_stage_duration_seconds_count", {"stage": "session", "provider": "fake", "warm": "false"}
        )
        == (stage or 0) + 1
    )
    summaries = [line for line in logged if line["event"] == "session summary"]
    assert [(s["outcome"], s["code"]) for s in summaries] == [
        ("failed", "provider_auth"),
        ("retried", "provider_unavailable"),
        ("ready", None),
    ]
