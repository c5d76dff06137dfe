"""One contract every provider driver passes: Docker (through a fault-injecting proxy in front of the engine),
E2B and Daytona (the real SDKs against our stand-in servers, each sandbox a real container).

The driver is exercised directly (start, exec, upload, the daemon, list, stop) and through the whole stack
(a real Celery worker bringing up a mock-agent session), then under faults: 429 and 503 on create are retried
to success with one sandbox, 401 fails fast, and a sandbox that vanishes mid-bring-up fails the request
cleanly with nothing left behind.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import docker
import httpx
import pytest

from providers import load_provider
from providers.base import LABEL_OWNER, LABEL_REQUEST_ID, Provider, SandboxSpec
from tests.conftest import OWNER, WorkerProcess, wait_for
from tests.standins.daytona import DaytonaStandIn
from tests.standins.docker_faults import DockerFaultProxy
from tests.standins.e2b import E2BStandIn
from tests.standins.faults import Fault
from worker import daemon, pins
from worker.config import Settings
from worker.models import InstallMode, SessionState

pytestmark = pytest.mark.integration


@dataclass
class Backend:
    """A provider with the server behind it and the levers the contract needs."""

    name: str
    worker_env: dict[str, str]
    fault_on_create: Callable[[int, int], None]  # (status, count)
    clear_faults: Callable[[], None]
    vanish: Callable[[str], None]  # remove a sandbox behind the driver's back
    create_calls: Callable[[], int]  # create requests that reached the server


def _docker_backend() -> Iterator[Backend]:
    client = docker.from_env()
    with DockerFaultProxy() as proxy:
        yield Backend(
            name="docker",
            worker_env={"SANDBOX_WORKER_DOCKER__BASE_URL": proxy.url},
            fault_on_create=lambda status, count: proxy.add(
                Fault(path=r"/containers/create", method="POST", status=status, count=count)
            ),
            clear_faults=proxy.clear,
            vanish=lambda sandbox_id: client.containers.get(sandbox_id).remove(force=True),
            create_calls=lambda: sum(1 for m, p in proxy.requests if m == "POST" and p.endswith("/containers/create")),
        )
    client.close()


def _e2b_backend() -> Iterator[Backend]:
    with E2BStandIn(pins.SANDBOX_IMAGE, api_key="contract-e2b-key") as standin:
        yield Backend(
            name="e2b",
            worker_env=standin.worker_env(),
            fault_on_create=lambda status, count: standin.add_fault(
                r"^/v2/sandboxes$", status, method="POST", count=count, headers={"Retry-After": "0"}
            ),
            clear_faults=standin.clear_faults,
            vanish=standin.vanish,
            create_calls=lambda: len(standin.requests_to(r"^/v2/sandboxes$", "POST")),
        )


def _daytona_backend() -> Iterator[Backend]:
    with DaytonaStandIn(pins.SANDBOX_IMAGE, api_key="contract-daytona-key") as standin:
        yield Backend(
            name="daytona",
            worker_env={
                "SANDBOX_WORKER_DAYTONA__API_URL": standin.api_url,
                "SANDBOX_WORKER_DAYTONA__API_KEY": standin.api_key,
                "SANDBOX_WORKER_DAYTONA__TARGET": standin.target,
                "SANDBOX_WORKER_DAYTONA__CREATE_BACKOFF": "0.05",
            },
            fault_on_create=lambda status, count: standin.faults.add(
                Fault(path=r"^/api/sandbox$", method="POST", status=status, count=count, headers={"Retry-After": "0"})
            ),
            clear_faults=standin.faults.clear,
            vanish=standin.vanish,
            create_calls=lambda: sum(1 for m, p in standin.requests if m == "POST" and p == "/api/sandbox"),
        )


BACKENDS = {"docker": _docker_backend, "e2b": _e2b_backend, "daytona": _daytona_backend}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> Iterator[Backend]:
    yield from BACKENDS[request.param]()


@pytest.fixture(scope="module")
def contract_worker(
    backend: Backend, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker per backend, serving only that provider's queue."""
    worker = WorkerProcess(
        {**base_env, **backend.worker_env},
        tmp_path_factory.mktemp(f"contract-{backend.name}") / "worker.log",
        providers=backend.name,
    ).start()
    yield worker
    worker.stop()


@pytest.fixture
def driver(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[Provider]:
    for name, value in backend.worker_env.items():
        monkeypatch.setenv(name, value)
    provider = load_provider(backend.name, Settings().provider_config(backend.name))
    yield provider
    backend.clear_faults()
    for sandbox in provider.list_owned({LABEL_OWNER: OWNER}):
        provider.stop(sandbox.sandbox_id)
    provider.close()


@pytest.fixture(autouse=True)
def _no_faults_left(backend: Backend) -> Iterator[None]:
    backend.clear_faults()
    yield
    backend.clear_faults()


def _request(backend: Backend, **session: Any) -> dict[str, Any]:
    return {
        "request_id": f"contract-{backend.name}-{uuid.uuid4().hex[:10]}",
        "tenant_id": "contract",
        "agent": "mock",
        "provider": backend.name,
        "sandbox": {"ttl_seconds": 600},
        "session": session,
    }


def _owned(provider: Provider, request_id: str) -> list[Any]:
    return provider.list_owned({LABEL_OWNER: OWNER, LABEL_REQUEST_ID: request_id})


def test_driver_runs_a_sandbox_and_the_daemon(driver: Provider, backend: Backend) -> None:
    """start with labels and env, exec, upload, a token-protected healthy daemon, list owned, stop."""
    request_id = f"drv-{uuid.uuid4().hex[:10]}"
    labels = {LABEL_OWNER: OWNER, LABEL_REQUEST_ID: request_id, "contract": backend.name}
    sandbox = driver.start(
        SandboxSpec(image=None, labels=labels, env={"SW_CONTRACT": "yes it is"}, ttl_seconds=300, ports=(2468,))
    )
    try:
        assert driver.find(sandbox.sandbox_id) is not None
        echoed = driver.exec(sandbox, ["sh", "-c", 'printf "%s" "$SW_CONTRACT"; echo oops >&2; exit 4'])
        assert echoed.exit_code == 4
        assert echoed.stdout.startswith("yes it is")  # Daytona's toolbox returns stdout and stderr combined
        assert "oops" in echoed.stdout + echoed.stderr

        driver.upload(sandbox, "/tmp/contract/dir/file.sh", b"#!/bin/sh\necho uploaded\n", mode=0o755)
        assert driver.exec(sandbox, ["/tmp/contract/dir/file.sh"]).stdout.strip() == "uploaded"

        token = daemon.new_token()
        daemon.install_daemon(driver, sandbox, InstallMode.preinstalled, pins_binary_path(), image=None)
        daemon.start_daemon(driver, sandbox, token=token, port=2468, cwd="/workspace", env={"SW_SECRETISH": "x"})
        endpoint = driver.endpoint(sandbox, 2468)
        client = daemon.DaemonClient(endpoint, token)
        client.wait_healthy(30)
        assert httpx.get(f"{endpoint.url}/v1/health", headers=dict(endpoint.headers)).status_code == 401
        assert any(agent["id"] == "mock" and agent["installed"] for agent in client.agents())
        client.close()

        assert [s.sandbox_id for s in _owned(driver, request_id)] == [sandbox.sandbox_id]
        assert _owned(driver, "no-such-request") == []
    finally:
        assert driver.stop(sandbox.sandbox_id) is True
    assert driver.stop(sandbox.sandbox_id) is False
    assert driver.find(sandbox.sandbox_id) is None
    assert _owned(driver, request_id) == []


def pins_binary_path() -> Any:
    return Settings().daemon_binary


def test_session_through_the_celery_task(
    contract_worker: WorkerProcess, session_client: Any, backend: Backend, driver: Provider
) -> None:
    """A mock-agent session comes up through the task with the agent's reply, and terminate removes it."""
    request = _request(backend, prompt=f"hello {backend.name}")
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=180)
    assert result.state is SessionState.ready, result.error
    assert result.reply == f"mock: hello {backend.name}"
    assert len(_owned(driver, request["request_id"])) == 1

    # A web app reaches its session with what the client hands out on request: URL, token, provider headers.
    access = session_client.access(request["request_id"])
    assert access is not None and access.url == result.daemon_url
    servers = httpx.get(f"{access.url}/v1/acp", headers=access.http_headers(), timeout=10).json()["servers"]
    assert [server["serverId"] for server in servers] == [result.server_id]
    assert access.token.get_secret_value() not in result.model_dump_json()

    assert session_client.terminate(request["request_id"]).state is SessionState.terminated
    assert _owned(driver, request["request_id"]) == []


@pytest.mark.parametrize("status", [429, 503])
def test_transient_create_failures_are_retried_to_one_sandbox(
    contract_worker: WorkerProcess, session_client: Any, backend: Backend, driver: Provider, status: int
) -> None:
    """Two 429s or 503s on create are retried with backoff; the session comes up in exactly one sandbox."""
    before = backend.create_calls()
    backend.fault_on_create(status, 2)
    request = _request(backend)
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=180)
    assert result.state is SessionState.ready, result.error
    assert backend.create_calls() - before >= 3
    assert len(_owned(driver, request["request_id"])) == 1
    session_client.terminate(request["request_id"])


def test_unauthorised_create_fails_fast(
    contract_worker: WorkerProcess, session_client: Any, backend: Backend, driver: Provider
) -> None:
    """A 401 on create fails the request at the sandbox stage with provider_auth, without retrying."""
    before = backend.create_calls()
    backend.fault_on_create(401, 10)
    request = _request(backend)
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=120)
    assert result.state is SessionState.failed
    assert result.error is not None
    assert (result.error.stage, result.error.code) == ("sandbox", "provider_auth")
    assert backend.create_calls() - before == 1
    assert _owned(driver, request["request_id"]) == []


def test_sandbox_vanishing_mid_bring_up_fails_cleanly(
    contract_worker: WorkerProcess, session_client: Any, backend: Backend, driver: Provider
) -> None:
    """A sandbox removed behind our back during the session stage fails the request as sandbox_gone, and
    nothing is left behind."""
    request = _request(backend, prompt="/sleep 20")
    session_client.submit(request)
    sandboxes = wait_for(
        lambda: _in_session_stage(session_client, request["request_id"]) and _owned(driver, request["request_id"]),
        90,
        0.1,
        "the bring-up to reach the session stage",
    )
    time.sleep(0.5)  # let the prompt reach the agent
    backend.vanish(sandboxes[0].sandbox_id)

    result = session_client.wait(request["request_id"], timeout=120)
    assert result.state is SessionState.failed
    assert result.error is not None
    assert result.error.code == "sandbox_gone", result.error
    assert result.error.stage == "session"
    assert _owned(driver, request["request_id"]) == []
    assert os.environ["SANDBOX_WORKER_OWNER"] == OWNER


def _in_session_stage(session_client: Any, request_id: str) -> bool:
    status = session_client.status(request_id)
    return status is not None and status.state is SessionState.starting and status.stage == "session"
