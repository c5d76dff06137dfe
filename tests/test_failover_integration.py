"""Failover through the whole stack: the E2B stand-in answers 503 to every create while sessions keep coming up on
Docker, through a real Celery worker; the breaker then stops the worker from calling E2B at all."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import redis as redis_lib

from tests.conftest import OWNER, WorkerProcess, owned_containers
from tests.standins.e2b import E2BStandIn
from worker import pins
from worker.models import ProviderName, SessionState

pytestmark = pytest.mark.integration


@pytest.fixture
def e2b_standin(docker_client: docker.DockerClient) -> Iterator[E2BStandIn]:
    with E2BStandIn(pins.SANDBOX_IMAGE, api_key="failover-e2b-key") as standin:
        yield standin


def test_sessions_come_up_on_docker_while_e2b_answers_503(
    e2b_standin: E2BStandIn,
    worker_factory: Any,
    session_client: Any,
    redis_client: redis_lib.Redis,
    docker_client: docker.DockerClient,
) -> None:
    """Every E2B create answers 503: each request fails over to Docker (the result says so) until two failures
    open E2B's breaker, after which requests skip E2B without a create reaching it."""
    redis_client.delete(*[f"sw:breaker:{{e2b}}:{k}" for k in ("failures", "open", "tripped", "probe")])
    e2b_standin.add_fault(r"^/v2/sandboxes$", 503, method="POST", count=1000, headers={"Retry-After": "0"})
    worker: WorkerProcess = worker_factory(
        providers="e2b,docker",
        env={
            **e2b_standin.worker_env(),
            "SANDBOX_WORKER_E2B__RETRIES": "0",
            "SANDBOX_WORKER_FLEET__STAGE_ATTEMPTS": "1",
            "SANDBOX_WORKER_FLEET__FAILOVER": json.dumps({"e2b": ["docker"]}),
            "SANDBOX_WORKER_FLEET__BREAKER_FAILURES": "2",
            "SANDBOX_WORKER_FLEET__BREAKER_COOLDOWN_SECONDS": "300",
        },
    )
    try:
        results = []
        for n in range(3):
            request = {
                "request_id": f"failover-{n}-{uuid.uuid4().hex[:8]}",
                "tenant_id": "failover",
                "agent": "mock",
                "provider": "e2b",
                "sandbox": {"ttl_seconds": 600},
                "session": {"prompt": f"hello {n}"},
            }
            session_client.submit(request)
            result = session_client.wait(request["request_id"], timeout=180)
            assert result.state is SessionState.ready, (result.error, worker.log()[-3000:])
            assert result.provider == ProviderName("docker") and result.reply == f"mock: hello {n}"
            assert len(owned_containers(docker_client, request_id=request["request_id"])) == 1
            results.append(result)

        creates = len(e2b_standin.requests_to(r"^/v2/sandboxes$", "POST"))
        assert [s.reason.split(":")[0] for r in results[:2] for s in r.skipped] == ["provider_unavailable"] * 2
        assert [(s.provider.value, s.reason) for s in results[2].skipped] == [("e2b", "circuit breaker open")]
        assert creates == 2  # one per failed-over request; none once the breaker opened

        for result in results:
            assert session_client.terminate(result.request_id).state is SessionState.terminated
            assert owned_containers(docker_client, request_id=result.request_id) == []
        assert OWNER in worker.env["SANDBOX_WORKER_OWNER"]
    finally:
        redis_client.delete(*[f"sw:breaker:{{e2b}}:{k}" for k in ("failures", "open", "tripped", "probe")])
