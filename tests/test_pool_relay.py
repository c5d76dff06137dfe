"""A warm pool of real Claude Code sandboxes whose sessions bind their keys through the daemon front's LLM relay (real
Redis, Docker, daemon and claude-agent-acp; the LLM API and the gateway are stand-ins): the pooled agent and its
session are made at fill time, pointed at the relay with a key that is nobody's; a claim gives the relay the session's
endpoint and headers and uses daemon, agent and session as they are (no restart). No process of the sandbox but the
front holds the key, before the claim or after."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from pydantic import SecretStr

from tests.standins.credentials import CredentialStack, bridge_address
from tests.standins.llm_api import LLMApi
from tests.test_no_leaks import hits, redis_dump
from tests.test_pool_vault import _holds, _processes
from worker import pins, runtime
from worker.config import get_settings
from worker.daemon import DAEMON_LOG
from worker.limits import Limits
from worker.models import SessionState
from worker.pool import RELAY_KEY, PoolEntry, Pools, pool_name

pytestmark = pytest.mark.integration

TARGET = {"provider": "docker", "agent": "claude", "size": 2, "binding": "llm-relay"}


@pytest.fixture(scope="module")
def stack(
    base_env: dict[str, str], docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CredentialStack]:
    """The credential stack with a streaming stand-in LLM API behind the provider URL and the gateways."""
    api = LLMApi()
    stack = CredentialStack(
        base_env=base_env,
        workdir=tmp_path_factory.mktemp("pool-relay"),
        bridge=bridge_address(docker_client),
        image=pins.SANDBOX_IMAGE,
        provider_api=api,  # type: ignore[arg-type]
    )
    try:
        stack.start()
        if stack.worker is not None:
            stack.worker.stop()  # this process claims; no other worker refills or claims meanwhile
        for gateway in stack.gateways.values():
            gateway.upstream = api
        yield stack
    finally:
        stack.stop()


def _configure(stack: CredentialStack, monkeypatch: pytest.MonkeyPatch) -> Pools:
    monkeypatch.setenv("SANDBOX_WORKER_POOL__TARGETS", json.dumps([{**TARGET, "image": stack.image}]))
    stack.apply_env(monkeypatch)
    runtime.store.cache_clear()
    runtime.credentials.cache_clear()
    settings = get_settings()
    return Pools(settings, runtime.store(), runtime.provider, Limits(runtime.store().redis, settings.fleet, 30))


def _pooled(docker_client: docker.DockerClient) -> dict[str, Any]:
    owner = get_settings().owner
    containers = docker_client.containers.list(filters={"label": "sandbox-worker-pool"})
    return {c.id: c for c in containers if c.labels.get("sandbox-worker-owner") == owner}


def _environ(container: Any) -> bytes:
    return bytes(container.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ"]).output)


def test_warm_claude_sessions_bind_their_own_keys_through_the_relay(
    stack: CredentialStack,
    monkeypatch: pytest.MonkeyPatch,
    docker_client: docker.DockerClient,
    capfd: pytest.CaptureFixture[str],
) -> None:
    pools = _configure(stack, monkeypatch)
    api = stack.provider_api
    assert isinstance(api, LLMApi)
    byok_key = f"sk-ant-byok-{uuid.uuid4().hex}"
    api.accepted = None  # the gateway checks its minted keys; the test checks which key came how

    assert pools.refill() == 2
    containers = _pooled(docker_client)
    assert len(containers) == 2
    # Before a claim: Claude Code runs with its session made, its key nobody's, no key of any tenant in any process
    # or file of the sandbox.
    running = {cid: _processes(c, "sandbox-agent server", "claude-agent-acp") for cid, c in containers.items()}
    for cid, container in containers.items():
        assert any("claude-agent-acp" in line for line in running[cid]), running[cid]
        environ = _environ(container)
        assert f"ANTHROPIC_API_KEY={RELAY_KEY}".encode() in environ and b"ANTHROPIC_AUTH_TOKEN" not in environ
        assert not _holds(container, byok_key) and not _holds(container, stack.values["shared_anthropic"])
    entries = [PoolEntry.model_validate_json(raw) for raw in runtime.store().redis.hvals(_entries(pools))]
    assert {(e.binding, e.acp_requests, e.mode) for e in entries} == {("llm-relay", 3, "bypassPermissions")}
    assert all(e.session_id for e in entries)
    assert api.model_requests() == []

    # Tenant one: its own key (byok), presented as x-api-key.
    first = stack.request("claude", {"strategy": "byok", "secret_ref": "anthropic"}, prompt="say hi")
    stack.secret_store().put(first["tenant_id"], "anthropic", SecretStr(byok_key))
    one = runtime.pipeline().create(first)
    assert one.state is SessionState.ready and one.warm and one.reply, one.error
    assert {(c.credential, c.scheme) for c in api.model_requests()} == {(byok_key, "x-api-key")}

    # Tenant two claims the other entry: its gateway key, minted for it, as a bearer token to the gateway.
    api.clear()
    second = stack.request("claude", {"strategy": "gateway", "gateway": "openrouter"}, prompt="say hi")
    two = runtime.pipeline().create(second)
    assert two.state is SessionState.ready and two.warm and two.reply, two.error
    assert one.sandbox_id != two.sandbox_id
    minted = {m.key for m in stack.gateways["openrouter"].live()}
    # Forwarded by the gateway stand-in under its own path (/api/v1/messages), with the headers it got.
    used = {(c.credential, c.scheme) for c in api.requests if c.path.endswith("/v1/messages")}
    assert used and {key for key, _ in used} <= minted and {scheme for _, scheme in used} == {"bearer"}

    # The pooled daemons, agents and sessions served as they were (no restart), and no process but the front holds a
    # key after the claim either: not the agent's environment.
    pooled_sessions = {e.sandbox_id: e.session_id for e in entries}
    for result in (one, two):
        [cid] = [cid for cid in containers if cid.startswith(str(result.sandbox_id))]
        assert _processes(containers[cid], "sandbox-agent server", "claude-agent-acp") >= running[cid]
        assert result.server_id and result.server_id.startswith("sw-pool-")
        assert result.session_id == pooled_sessions[str(result.sandbox_id)]
        assert not _holds(containers[cid], byok_key)
    # No key in the results, the records, the logs (the worker's, and the daemon's, which the worker reads on failure).
    keys = {"byok": byok_key, **{f"minted_{i}": key for i, key in enumerate(minted)}}
    daemon_logs = "".join(c.exec_run(["cat", DAEMON_LOG]).output.decode(errors="replace") for c in containers.values())
    assert hits(keys, daemon_logs) == []
    assert hits(keys, one.model_dump_json() + two.model_dump_json()) == []
    assert hits(keys, redis_dump(runtime.store().redis)) == []
    assert hits(keys, "".join(capfd.readouterr())) == []
    for request in (first, second):
        runtime.teardown().terminate(request["request_id"])


def _entries(pools: Pools) -> str:
    return f"sw:pool:{{{pool_name(pools.config.targets[0])}}}:entries"


def test_a_key_session_that_does_not_fit_the_pool_replaces_its_daemon(
    stack: CredentialStack, monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> None:
    """User env: the pooled daemon is replaced by one with the session's environment, key included, as before."""
    pools = _configure(stack, monkeypatch)
    api = stack.provider_api
    assert isinstance(api, LLMApi)
    api.accepted, key = None, f"sk-ant-byok-{uuid.uuid4().hex}"
    pools.refill()
    request = stack.request("claude", {"strategy": "byok", "secret_ref": "anthropic"}, prompt="say hi")
    request["sandbox"]["env"] = {"TEAM": "blue"}
    stack.secret_store().put(request["tenant_id"], "anthropic", SecretStr(key))
    api.clear()

    result = runtime.pipeline().create(request)

    assert result.state is SessionState.ready and result.warm and result.reply, result.error
    assert result.server_id and not result.server_id.startswith("sw-pool-")  # its own agent, spawned after the claim
    assert {(c.credential, c.scheme) for c in api.model_requests()} == {(key, "x-api-key")}
    assert key.encode() in _environ(docker_client.containers.get(str(result.sandbox_id)))
    runtime.teardown().terminate(request["request_id"])
    pools.drain()
