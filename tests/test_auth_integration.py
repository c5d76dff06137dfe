"""Who may ask for what, end to end: signed requests checked by a real worker before anything is made, and web apps
on a Redis user that can only enqueue and read results (real Redis ACLs)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest
import redis as redis_lib

from tests.conftest import RedisServer, WorkerProcess, owned_containers
from worker.auth import Operation, Signer
from worker.celery_app import CREATE_SESSION
from worker.client import SessionClient
from worker.config import Settings, get_settings
from worker.errors import InvalidRequest
from worker.follow import MessageChunk
from worker.models import SessionResult, SessionState
from worker.redis_acl import app_rules, setuser, worker_rules

pytestmark = pytest.mark.integration

WEB_KEY = "web-app-signing-key-" + uuid.uuid4().hex
OTHER_KEY = "other-app-signing-key-" + uuid.uuid4().hex
APP_PASSWORD, WORKER_PASSWORD = uuid.uuid4().hex, uuid.uuid4().hex
APPS = {"web": {"key": WEB_KEY, "tenants": ["acme"]}, "other": {"key": OTHER_KEY, "tenants": ["beta"]}}
ALLOWED_IMAGES = ["registry.example/*"]


def _url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture(scope="module")
def acl_urls(redis_server: RedisServer) -> dict[str, str]:
    """The two Redis users `sandbox-worker redis-acl` makes, on this session's server."""
    admin = redis_lib.Redis.from_url(redis_server.url)
    admin.execute_command(*setuser("t-app", app_rules(_secret(APP_PASSWORD))))
    admin.execute_command(*setuser("t-worker", worker_rules(_secret(WORKER_PASSWORD))))
    return {"app": _url(redis_server, "t-app", APP_PASSWORD), "worker": _url(redis_server, "t-worker", WORKER_PASSWORD)}


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


@pytest.fixture(scope="module")
def signed_worker(
    base_env: dict[str, str],
    acl_urls: dict[str, str],
    docker_client: docker.DockerClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """A worker in signed mode (the default) on the workers' Redis user."""
    env = {
        **base_env,
        "SANDBOX_WORKER_BROKER_URL": acl_urls["worker"],
        "SANDBOX_WORKER_RESULT_BACKEND": acl_urls["worker"],
        "SANDBOX_WORKER_REDIS_URL": acl_urls["worker"],
        "SANDBOX_WORKER_AUTH__MODE": "signed",
        "SANDBOX_WORKER_AUTH__APPS": json.dumps(APPS),
        "SANDBOX_WORKER_AUTH__IMAGES": json.dumps(ALLOWED_IMAGES),
    }
    worker = WorkerProcess(env, tmp_path_factory.mktemp("signed") / "worker.log", providers="docker").start()
    yield worker
    worker.stop()


def _client(monkeypatch: pytest.MonkeyPatch, url: str, app_id: str, key: str) -> SessionClient:
    """A web app's client: its app id and key, and the web app's Redis user."""
    for name in ("BROKER_URL", "RESULT_BACKEND", "REDIS_URL"):
        monkeypatch.setenv(f"SANDBOX_WORKER_{name}", url)
    monkeypatch.setenv("SANDBOX_WORKER_AUTH__APP_ID", app_id)
    monkeypatch.setenv("SANDBOX_WORKER_AUTH__APP_KEY", key)
    get_settings.cache_clear()
    return SessionClient(Settings())


def _request(**overrides: Any) -> dict[str, Any]:
    return {
        "request_id": f"auth-{uuid.uuid4().hex[:12]}",
        "tenant_id": "acme",
        "agent": "mock",
        "provider": "docker",
        "session": {"prompt": "hello"},
        **overrides,
    }


def _refused_with_nothing_made(
    result: SessionResult, field: str, request_id: str, docker_client: docker.DockerClient, admin: redis_lib.Redis
) -> None:
    assert result.state is SessionState.failed
    assert result.error is not None and (result.error.code, result.error.field) == ("invalid_request", field)
    assert owned_containers(docker_client, request_id=request_id) == []
    assert admin.exists(f"sw:session:{request_id}", f"sw:rejected:{request_id}", f"sw:lease:{request_id}") == 0


def test_a_web_app_brings_up_its_tenants_session_and_no_other_app_reaches_it(
    signed_worker: WorkerProcess,
    acl_urls: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    docker_client: docker.DockerClient,
) -> None:
    """The allowed path on the web app's Redis user: submit, follow, status, access, follow the agent, terminate.
    Another app, not allowed for the tenant, may neither read its status or daemon, follow it, nor terminate it."""
    web = _client(monkeypatch, acl_urls["app"], "web", WEB_KEY)
    request = _request()
    stages: list[str] = []
    web.submit(request)
    result = web.wait(request["request_id"], timeout=120, on_progress=stages.append)
    assert result.state is SessionState.ready, result.error
    assert result.reply == "mock: hello" and "sandbox" in stages
    assert web.status(request["request_id"]).state is SessionState.ready  # type: ignore[union-attr]
    access = web.access(request["request_id"])
    assert access is not None
    assert httpx.get(f"{access.url}/v1/health", headers=access.http_headers()).json() == {"status": "ok"}
    with web.follow(request["request_id"]) as session:  # through the sealed access
        first, *_ = session.prompt("again")
        assert first == MessageChunk(text="mock: again")

    # A retry or redelivery of the accepted request, its signature past the window: answered from its record.
    stale = Signer("web", _secret(WEB_KEY)).sign(Operation.create, request, now=time.time() - 7200)
    again = web.app.send_task(
        CREATE_SESSION, args=[request], kwargs={"auth": stale}, queue="sessions.docker", declare=[]
    )
    assert SessionResult.model_validate(again.get(timeout=60)).session_id == result.session_id

    other = _client(monkeypatch, acl_urls["app"], "other", OTHER_KEY)
    refused = other.terminate(request["request_id"])
    assert refused is not None and refused.error is not None and refused.error.field == "tenant_id"
    assert len(owned_containers(docker_client, request_id=request["request_id"])) == 1
    peek = other.status(request["request_id"])
    assert peek is not None and peek.error is not None and peek.error.field == "tenant_id" and peek.reply is None
    assert other.access(request["request_id"]) is None
    with pytest.raises(InvalidRequest):
        other.follow(request["request_id"])

    ended = web.terminate(request["request_id"])
    assert ended is not None and ended.state is SessionState.terminated
    assert owned_containers(docker_client, request_id=request["request_id"]) == []
    assert web.status(request["request_id"]).state is SessionState.terminated  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("tenant", "tenant_id"),
        ("image", "sandbox.image"),
        ("unsigned", "auth"),
        ("forged", "auth.signature"),
        ("expired", "auth.issued_at"),
    ],
)
def test_a_refused_request_makes_nothing(
    case: str,
    field: str,
    signed_worker: WorkerProcess,
    acl_urls: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    docker_client: docker.DockerClient,
    redis_client: redis_lib.Redis,
) -> None:
    """Refused before any record, credential or sandbox, with the field and the reason, answered in the task's
    result only."""
    web = _client(monkeypatch, acl_urls["app"], "web", WEB_KEY)
    request = _request()
    if case in ("tenant", "image"):
        request = _request(tenant_id="beta") if case == "tenant" else _request(sandbox={"image": "evil.example/x:1"})
        web.submit(request)
        result = web.wait(request["request_id"], timeout=60)
    else:
        auth: dict[str, Any] = {}
        if case == "forged":
            auth = {"auth": Signer("web", _secret("f" * 40)).sign(Operation.create, request)}
        elif case == "expired":
            auth = {"auth": Signer("web", _secret(WEB_KEY)).sign(Operation.create, request, now=time.time() - 7200)}
        task = web.app.send_task(
            CREATE_SESSION, args=[request], kwargs=auth, queue="sessions.docker", declare=[]
        )  # what a client without the right key can put on the broker
        result = SessionResult.model_validate(task.get(timeout=60))
    _refused_with_nothing_made(result, field, request["request_id"], docker_client, redis_client)


@pytest.mark.parametrize(
    "command",
    [
        ("SET", "sw:egress:0000", '{"tenant_id": "victim", "vault": "prod"}'),  # bind a placeholder to a vault
        ("SET", "sw:terminate:someone-elses-request", "1"),
        ("DEL", "sw:lease:someone-elses-request"),
        ("GET", "sw:session:someone-elses-request"),
        ("LRANGE", "sessions.docker", "0", "-1"),  # other apps' requests on the queue
        ("PSUBSCRIBE", "celery-task-meta-*"),  # every task's result
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
    ],
)
def test_the_web_apps_redis_user_cannot_touch_worker_state(
    command: tuple[str, ...], acl_urls: dict[str, str], redis_client: redis_lib.Redis
) -> None:
    """Refused (NOPERM) to the web app's user; the default user, with no ACL, does it (the test can fail)."""
    app_user = redis_lib.Redis.from_url(acl_urls["app"])
    with pytest.raises(redis_lib.exceptions.NoPermissionError):
        app_user.execute_command(*command)
    if command[0] not in ("FLUSHALL", "PSUBSCRIBE", "CONFIG"):
        redis_client.execute_command(*command)
    redis_client.delete("sw:egress:0000", "sw:terminate:someone-elses-request")
