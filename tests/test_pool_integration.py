"""Warm pools against real Redis, Docker, the real daemon and the E2B and Daytona stand-ins: a pooled sandbox holds no
tenant secret before its claim and has it after; a storm of claims hands each entry out once; a pool outlives the
worker that filled it; E2B and Daytona pools bind the session the same way."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import pytest

from providers.fake import FakeProvider, StandInDaemons
from tests.conftest import ROOT, wait_for
from tests.standins.daytona import DaytonaStandIn
from tests.standins.e2b import E2BStandIn
from worker import pins, runtime
from worker.config import PoolTarget, get_settings
from worker.limits import Limits
from worker.models import ProviderName, SessionRequest, SessionState
from worker.pool import Pools, pool_name
from worker.store import Store

pytestmark = pytest.mark.integration


def _configure(monkeypatch: pytest.MonkeyPatch, targets: list[dict[str, Any]], **env: str) -> None:
    monkeypatch.setenv("SANDBOX_WORKER_POOL__TARGETS", json.dumps(targets))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    runtime.store.cache_clear()
    runtime.credentials.cache_clear()


def _pools() -> Pools:
    settings = get_settings()
    return Pools(settings, runtime.store(), runtime.provider, Limits(runtime.store().redis, settings.fleet, 30))


def _request(provider: str, agent: str = "mock", **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"pool-{uuid.uuid4().hex[:12]}",
        "tenant_id": "acme",
        "agent": agent,
        "provider": provider,
        **extra,
    }


def _ready(target: PoolTarget) -> int:
    return int(runtime.store().redis.zcard(f"sw:pool:{{{pool_name(target)}}}:ready"))


def test_a_storm_of_claims_hands_each_entry_out_once(redis_client: Any) -> None:
    """50 threads claim from a pool of 8 at once: exactly 8 hits, 8 distinct sandboxes (real Redis; the fake
    provider's sandboxes are enough, the property lives in the claim script)."""
    settings = get_settings()
    target = PoolTarget(provider=ProviderName("docker"), agent="mock", size=8)  # type: ignore[arg-type]
    settings = settings.model_copy(update={"pool": settings.pool.model_copy(update={"targets": [target]})})
    daemons = StandInDaemons()
    provider = FakeProvider(daemons=daemons)
    store = Store.from_settings(settings)
    store.redis.delete(*[f"sw:pool:{{{pool_name(target)}}}:{k}" for k in ("ready", "entries", "claimed", "filling")])
    pools = Pools(settings, store, lambda _n: provider, Limits(store.redis, settings.fleet, 30))
    try:
        assert pools.refill() == 8
        requests = [SessionRequest.model_validate(_request("docker")) for _ in range(50)]
        with ThreadPoolExecutor(max_workers=50) as threads:
            claims = list(threads.map(lambda r: pools.claim(r, target, provider), requests))
    finally:
        daemons.close()
    hits = [c.sandbox.sandbox_id for c in claims if c is not None]
    assert len(hits) == 8 and len(set(hits)) == 8


@pytest.fixture
def shared_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = f"sk-ant-tenant-{secrets.token_hex(16)}"
    monkeypatch.setenv("SANDBOX_WORKER_CREDENTIALS__SHARED__ANTHROPIC", key)
    monkeypatch.setenv("SANDBOX_WORKER_CREDENTIALS__SHARED__TENANTS", '["acme"]')
    return key


# Every process's environment, and the files a session could have left where the agent and daemon keep theirs.
_SEARCH = 'cat /proc/[0-9]*/environ 2>/dev/null; grep -rsl -- "$0" /root /tmp /workspace /etc /home && echo FILE-HIT'


def _holds(container: Any, secret: str) -> bool:
    out = container.exec_run(["sh", "-c", _SEARCH, secret]).output.decode(errors="replace")
    return secret in out or "FILE-HIT" in out


def test_a_pooled_sandbox_holds_no_tenant_secret_until_its_claim_binds_it(
    monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient, shared_key: str
) -> None:
    target = {"provider": "docker", "agent": "claude", "size": 1}
    _configure(monkeypatch, [target])
    pools = _pools()
    assert pools.refill() == 1
    [container] = [
        c
        for c in docker_client.containers.list(filters={"label": "sandbox-worker-pool"})
        if c.labels.get("sandbox-worker-owner") == get_settings().owner
    ]
    assert not _holds(container, shared_key)
    # What the tenant's session will be told, too: no env of theirs, no label naming them yet.
    assert "sandbox-worker-tenant-id" not in container.labels

    request = _request("docker", "claude", credentials={"strategy": "shared"}, sandbox={"env": {"TEAM": "blue"}})
    result = runtime.pipeline().create(request)

    assert result.state is SessionState.ready and result.warm, result.error
    assert result.sandbox_id == container.id[: len(result.sandbox_id)] or container.id.startswith(result.sandbox_id)
    daemon_env = container.exec_run(["sh", "-c", _DAEMON_ENV]).output.decode(errors="replace")
    assert f"ANTHROPIC_API_KEY={shared_key}" in daemon_env and "TEAM=blue" in daemon_env
    # Bound through the pooled daemon's API: nothing of it written down on the way (its log, the process's record).
    files = container.exec_run(["grep", "-rsl", "--", shared_key, "/root", "/tmp", "/workspace", "/etc", "/home"])
    assert files.output.decode().strip() == ""
    runtime.teardown().terminate(request["request_id"])
    wait_for(lambda: not docker_client.containers.list(filters={"id": container.id}), 30, what="sandbox removed")


# The environment of the running `sandbox-agent server`, one variable a line.
_DAEMON_ENV = r"""
for p in /proc/[0-9]*; do
  case "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" in *"sandbox-agent server"*) tr '\0' '\n' < "$p/environ";; esac
done
"""


def test_a_claim_after_the_filling_worker_died_still_works(
    monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> None:
    target = {"provider": "docker", "agent": "mock", "size": 2}
    _configure(monkeypatch, [target], SANDBOX_WORKER_POOL__REFILL_INTERVAL_SECONDS="0.2")
    filler = subprocess.Popen(  # a worker process's refill thread, nothing else
        [sys.executable, "-c", textwrap.dedent(_FILLER)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pool_target = PoolTarget.model_validate(target)
        wait_for(lambda: _ready(pool_target) == 2, 120, interval=0.2, what="the pool filled")
    finally:
        filler.send_signal(signal.SIGKILL)
        filler.wait(timeout=30)

    results = [runtime.pipeline().create(_request("docker", session={"prompt": "hi"})) for _ in range(2)]

    assert [(r.state, r.warm, r.reply) for r in results] == [(SessionState.ready, True, "mock: hi")] * 2
    for result in results:
        runtime.teardown().terminate(result.request_id)
    _pools().drain()  # what the killed filler's last pass may have left ready


_FILLER = """
import time
from worker import runtime
runtime.start_pool_refill()
time.sleep(600)
"""


@pytest.fixture(scope="module")
def e2b(docker_client: docker.DockerClient) -> Iterator[E2BStandIn]:
    with E2BStandIn(pins.SANDBOX_IMAGE) as server:
        yield server


@pytest.fixture(scope="module")
def daytona(docker_client: docker.DockerClient) -> Iterator[DaytonaStandIn]:
    with DaytonaStandIn(pins.SANDBOX_IMAGE, api_key="pool-daytona-key") as server:
        yield server


def _standin_env(name: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if name == "e2b":
        server: Any = request.getfixturevalue("e2b")
        return dict(server.worker_env())
    server = request.getfixturevalue("daytona")
    return {
        "SANDBOX_WORKER_DAYTONA__API_URL": server.api_url,
        "SANDBOX_WORKER_DAYTONA__API_KEY": server.api_key,
        "SANDBOX_WORKER_DAYTONA__TARGET": server.target,
    }


@pytest.mark.parametrize("name", ["e2b", "daytona"])
def test_pools_on_the_cloud_stand_ins_bind_the_session_at_the_claim(
    name: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    target = {"provider": name, "agent": "mock", "size": 1}
    _configure(monkeypatch, [target], **_standin_env(name, request))
    pools = _pools()
    assert pools.refill() == 1
    provider = runtime.provider(ProviderName(name))
    [sandbox] = provider.list_owned({"sandbox-worker-pool": pool_name(PoolTarget.model_validate(target))})
    before = provider.exec(sandbox, ["sh", "-c", _DAEMON_ENV]).stdout
    assert "TEAM=" not in before and "SANDBOX_AGENT_LOG_STDOUT=1" in before

    result = runtime.pipeline().create(_request(name, sandbox={"env": {"TEAM": "blue"}}, session={"prompt": "hi"}))

    assert result.state is SessionState.ready and result.warm and result.sandbox_id == sandbox.sandbox_id, result.error
    assert result.reply == "mock: hi"
    assert "TEAM=blue" in provider.exec(sandbox, ["sh", "-c", _DAEMON_ENV]).stdout
    runtime.teardown().terminate(result.request_id)
    assert provider.find(sandbox.sandbox_id) is None
