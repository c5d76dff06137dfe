"""The spine, end to end: a request on the queue becomes a live agent session in a Docker sandbox,
through a real Redis, a real Celery worker, a real Docker engine and the real sandbox-agent daemon."""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from typing import Any

import docker
import httpx
import pytest

from tests.conftest import WorkerProcess, owned_containers
from worker import pins
from worker.models import SessionState

pytestmark = pytest.mark.integration


def _request(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "request_id": f"spine-{uuid.uuid4().hex[:12]}",
        "tenant_id": "acme",
        "agent": "mock",
        "provider": "docker",
        "session": {"prompt": "hello from the spine"},
    }
    request.update(overrides)
    return request


def test_request_becomes_ready_session(
    celery_worker: WorkerProcess, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """A queued mock-agent request ends ready, with labels on the container, a token-protected daemon and the reply."""
    request = _request(sandbox={"env": {"SW_TEST_COLOUR": "teal"}, "labels": {"team": "core"}})
    stages: list[str] = []
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=120, on_progress=stages.append)

    assert result.state is SessionState.ready, result.error
    assert result.reply == "mock: hello from the spine"
    assert result.session_id and result.daemon_url and result.server_id
    assert set(result.timings_ms) == {"claim", "credentials", "environment", "sandbox", "daemon", "session", "ready"}
    assert "sandbox" in stages and "daemon" in stages

    (container,) = owned_containers(docker_client, request_id=request["request_id"])
    labels = container.labels
    assert labels["sandbox-worker-tenant-id"] == "acme"
    assert labels["team"] == "core"
    assert int(labels["sandbox-worker-created-at"]) <= time.time()
    assert container.attrs["Config"]["Env"].count("SW_TEST_COLOUR=teal") == 1

    token = session_client.token(request["request_id"])
    assert token is not None
    assert token.get_secret_value() not in json.dumps(result.model_dump(mode="json"))
    assert httpx.get(f"{result.daemon_url}/v1/health").status_code == 401
    authed = httpx.get(
        f"{result.daemon_url}/v1/health", headers={"Authorization": f"Bearer {token.get_secret_value()}"}
    )
    assert authed.json() == {"status": "ok"}
    servers = httpx.get(f"{result.daemon_url}/v1/acp", headers={"Authorization": f"Bearer {token.get_secret_value()}"})
    assert [s["serverId"] for s in servers.json()["servers"]] == [result.server_id]

    # A duplicate submit returns the same result and makes no second sandbox.
    session_client.submit(request)
    again = session_client.wait(request["request_id"], timeout=60)
    assert again.session_id == result.session_id
    assert len(owned_containers(docker_client, request_id=request["request_id"])) == 1

    ended = session_client.terminate(request["request_id"])
    assert ended.state is SessionState.terminated
    assert owned_containers(docker_client, request_id=request["request_id"]) == []
    assert session_client.status(request["request_id"]).state is SessionState.terminated
    assert session_client.token(request["request_id"]) is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"agent": "gpt-pilot"}, "agent"),
        ({"provider": "lambda"}, "provider"),
        ({"sandbox": {"ttl_seconds": -5}}, "sandbox.ttl_seconds"),
        ({"surprise": True}, "surprise"),
        ({"sandbox": {"cpu": "lots"}}, "sandbox.cpu"),
        ({"tenant_id": 42}, "tenant_id"),
        ({"sandbox": {"env": {"ANTHROPIC_API_KEY": "x"}}}, "sandbox.env.ANTHROPIC_API_KEY"),
    ],
)
def test_invalid_request_fails_clearly(
    celery_worker: WorkerProcess,
    session_client: Any,
    docker_client: docker.DockerClient,
    overrides: dict[str, Any],
    field: str,
) -> None:
    """An invalid request ends failed with invalid_request naming the field, creates no container and is not retried."""
    request = _request(**overrides)
    session_client.submit(request, validate=False)
    result = session_client.wait(request["request_id"], timeout=60)

    assert result.state is SessionState.failed
    assert result.error is not None
    assert result.error.code == "invalid_request"
    assert result.error.field == field
    assert field.rsplit(".", maxsplit=1)[-1] in result.error.message
    assert owned_containers(docker_client, request_id=request["request_id"]) == []
    assert "Retry in" not in celery_worker.log()


def test_daemon_missing_from_image_fails_at_daemon_stage(
    celery_worker: WorkerProcess, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """'preinstalled' on an image without the daemon fails at the daemon stage, and the container is removed."""
    request = _request(sandbox={"image": pins.LOCAL_BASE_IMAGE})
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=60)

    assert result.state is SessionState.failed
    assert result.error is not None
    assert (result.error.stage, result.error.code) == ("daemon", "daemon_error")
    assert "sandbox-agent" in result.error.message
    assert owned_containers(docker_client, request_id=request["request_id"]) == []


@pytest.fixture(scope="module")
def never_healthy_image() -> Any:
    """An image whose `sandbox-agent` reports the pinned version but never serves HTTP."""
    client = docker.from_env()
    tag = "sandbox-worker/test-never-healthy:1"
    fake = f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "sandbox-agent {pins.SANDBOX_AGENT_VERSION}"; exit 0; fi\nexec sleep 3600\n'
    dockerfile = (
        f'FROM {pins.LOCAL_BASE_IMAGE}\nCOPY sandbox-agent /usr/local/bin/sandbox-agent\nCMD ["sleep", "infinity"]\n'
    )
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data, mode in (("Dockerfile", dockerfile, 0o644), ("sandbox-agent", fake, 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data.encode()), mode
            tar.addfile(info, io.BytesIO(data.encode()))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    yield tag
    client.images.remove(tag, force=True)


def test_daemon_never_healthy_fails_within_deadline(
    worker_factory: Any, session_client: Any, docker_client: docker.DockerClient, never_healthy_image: str
) -> None:
    """A daemon that never answers /v1/health fails at the daemon stage within its deadline; no container is left."""
    worker_factory(env={"SANDBOX_WORKER_HEALTH_TIMEOUT": "3"})
    request = _request(sandbox={"image": never_healthy_image})
    started = time.monotonic()
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=60)

    assert result.state is SessionState.failed
    assert result.error is not None
    assert (result.error.stage, result.error.code) == ("daemon", "daemon_unhealthy")
    assert result.timings_ms["daemon"] < 10_000
    assert time.monotonic() - started < 30
    assert owned_containers(docker_client, request_id=request["request_id"]) == []


def test_upload_mode_installs_daemon_and_stand_in(
    worker_factory: Any, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """With daemon_install=upload, a bare image gets the pinned binary and the stand-in agent copied in, and works."""
    worker_factory(env={"SANDBOX_WORKER_DAEMON_INSTALL": "upload"})
    request = _request(sandbox={"image": pins.LOCAL_BASE_IMAGE})
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=120)

    assert result.state is SessionState.ready, result.error
    assert result.reply == "mock: hello from the spine"
    assert session_client.terminate(request["request_id"]).state is SessionState.terminated


def test_terminate_unknown_request_is_a_clear_error(celery_worker: WorkerProcess, session_client: Any) -> None:
    """Terminating a request that never existed fails with invalid_request on request_id."""
    result = session_client.terminate("does-not-exist")
    assert result.state is SessionState.failed
    assert result.error is not None
    assert (result.error.code, result.error.field) == ("invalid_request", "request_id")
