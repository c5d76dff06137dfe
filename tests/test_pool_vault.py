"""A warm pool of real Claude Code sandboxes for vault sessions (real Redis, Docker, daemon, egress proxy; the LLM API
is the stand-in): the pooled agent already runs against the egress proxy with a placeholder bound to no tenant, which
the proxy refuses; the claim binds that placeholder to the claiming tenant's vault and to the sandbox's address, and
the session uses the pooled daemon, agent and ACP session as they are (no restart, no session/new)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from pydantic import SecretStr

from tests.conftest import wait_for
from tests.standins.credentials import CredentialStack, bridge_address
from tests.standins.llm_api import LLMApi
from worker import pins, runtime
from worker.config import get_settings
from worker.credentials.vault import Placeholders, Vault, VaultCredential, VaultStore
from worker.limits import Limits
from worker.models import SessionState
from worker.pool import PoolEntry, Pools, pool_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    base_env: dict[str, str], docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CredentialStack]:
    """The egress proxy and a stand-in LLM API behind it for the vault, with the real agents' image."""
    stack = CredentialStack(
        base_env=base_env,
        workdir=tmp_path_factory.mktemp("pool-vault"),
        bridge=bridge_address(docker_client),
        image=pins.SANDBOX_IMAGE,
        vault_api=LLMApi(),  # type: ignore[arg-type]
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


def _configure(stack: CredentialStack, monkeypatch: pytest.MonkeyPatch) -> Pools:
    """This process is a worker of the stack's settings with one warm pool of Claude Code for vault sessions."""
    target = {
        "provider": "docker",
        "agent": "claude",
        "image": stack.image,
        "size": 1,
        "strategy": "vault",
        "llm_base_url": stack.urls["vault_api"],
    }
    monkeypatch.setenv("SANDBOX_WORKER_POOL__TARGETS", json.dumps([target]))
    stack.apply_env(monkeypatch)
    runtime.store.cache_clear()
    runtime.credentials.cache_clear()
    settings = get_settings()
    return Pools(settings, runtime.store(), runtime.provider, Limits(runtime.store().redis, settings.fleet, 30))


def _entries(pools: Pools) -> str:
    return f"sw:pool:{{{pool_name(pools.config.targets[0])}}}:entries"


def _tenant_with_vault(stack: CredentialStack) -> str:
    """A new tenant whose LLM vault ``anthropic`` holds the stack's vault key for the stand-in LLM API."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    metadata = {"role": "llm", "engine": "claude", "llm_base_url": stack.urls["vault_api"]}
    credential = VaultCredential(name="key", token=SecretStr(stack.values["vault"]))
    VaultStore(stack.secret_store()).create(
        tenant, Vault(name="anthropic", metadata=metadata, credentials=[credential])
    )
    return tenant


# pid, then command line, of every process in the sandbox (by /proc: the image has no procps)
_PROCESSES = "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\"; done"


def _processes(container: Any, *names: str) -> set[str]:
    """The pid and command line of the sandbox's processes running any of ``names``."""
    lines = container.exec_run(["sh", "-c", _PROCESSES]).output.decode(errors="replace").splitlines()
    return {line for line in lines if any(name in line for name in names)}


def _placeholder(container: Any) -> str:
    """The key in the environment of the sandbox's daemon."""
    environ = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ"]).output
    found = next(part for part in environ.split(b"\0") if part.startswith(b"ANTHROPIC_API_KEY="))
    return found.split(b"=", 1)[1].decode()


_POST = """
import sys, urllib.error, urllib.request
body = b'{"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "ping"}]}'
request = urllib.request.Request(sys.argv[1], data=body, headers={"x-api-key": sys.argv[2], "content-type": "application/json"})
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode())
"""


def _holds(container: Any, secret: str) -> bool:
    """Whether ``secret`` is in any process's environment or command line, or in a file where a session's would be."""
    processes = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline"]).output
    files = container.exec_run(["grep", "-rsl", "--", secret, "/root", "/tmp", "/workspace", "/etc", "/home"]).output
    return secret.encode() in processes or bool(files.strip())


def _post_from(container: Any, url: str, placeholder: str) -> str:
    """POST a model call to ``url`` with ``placeholder`` from inside ``container``: "<status> [<body>]"."""
    return str(container.exec_run(["python3", "-c", _POST, url, placeholder]).output.decode().strip())


def _post_from_another(client: docker.DockerClient, image: str, url: str, placeholder: str) -> str:
    output: bytes = client.containers.run(image, entrypoint=["python3", "-c", _POST, url, placeholder], remove=True)
    return output.decode().strip()


def test_a_warm_claude_vault_session_adopts_the_pooled_placeholder(
    stack: CredentialStack, monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> None:
    pools = _configure(stack, monkeypatch)
    assert stack.proxy is not None
    vault_api = stack.vault_api
    assert isinstance(vault_api, LLMApi)
    real = stack.values["vault"]
    vault_api.accepted = {real}
    upstream_host = stack.urls["vault_api"].removeprefix("http://")
    model_url = f"{stack.proxy.url}/{upstream_host}/v1/messages"

    assert pools.refill() == 1
    [container] = [
        c
        for c in docker_client.containers.list(filters={"label": "sandbox-worker-pool"})
        if c.labels.get("sandbox-worker-owner") == get_settings().owner
    ]
    # Before the claim: Claude Code already runs (spawned, initialized, its session made) with a placeholder that is
    # bound to nothing, so the proxy refuses it even from its own sandbox; no tenant's key is anywhere in it.
    running = _processes(container, "sandbox-agent server", "claude-agent-acp")
    assert any("claude-agent-acp" in line for line in running), running
    placeholder = _placeholder(container)
    assert placeholder.startswith("swph-")
    placeholders = Placeholders(stack.secret_store())
    assert placeholders.lookup(placeholder) is None
    refused = _post_from(container, model_url, placeholder)
    assert refused.startswith("403 ") and "not valid" in refused, refused
    assert not _holds(container, real)
    assert vault_api.model_requests() == []
    [entry] = [PoolEntry.model_validate_json(raw) for raw in runtime.store().redis.hvals(_entries(pools))]
    assert entry.session_id and entry.mode == "bypassPermissions"

    tenant = _tenant_with_vault(stack)
    request = stack.request("claude", {"strategy": "vault", "vaults": ["anthropic"]}, tenant=tenant, prompt="say hi")
    result = runtime.pipeline().create(request)

    assert result.state is SessionState.ready and result.warm, result.error
    assert container.id.startswith(result.sandbox_id) and result.reply
    assert (result.server_id, result.session_id) == (entry.server_id, entry.session_id)  # no session/new
    # The same daemon and agent processes: no restart, no second agent.
    assert _processes(container, "sandbox-agent server", "claude-agent-acp") == running
    assert {c.credential for c in vault_api.model_requests()} == {real}
    # Bound to the claiming tenant's vault and to this sandbox: accepted from it, refused from anywhere else.
    binding = placeholders.lookup(placeholder)
    assert binding is not None and (binding.request_id, binding.tenant_id) == (request["request_id"], tenant)
    assert _post_from(container, model_url, placeholder) == "200"
    assert _post_from_another(docker_client, stack.image, model_url, placeholder).startswith("403 ")
    assert not _holds(container, real)

    runtime.teardown().terminate(request["request_id"])
    assert placeholders.lookup(placeholder) is None
    wait_for(lambda: not docker_client.containers.list(filters={"id": container.id}), 30, what="sandbox removed")


def test_a_vault_session_that_does_not_fit_the_pool_rebinds_with_its_own_placeholder(
    stack: CredentialStack, monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> None:
    """User env: the pooled daemon is replaced by the session's, with the grant's own placeholder; the pooled one stays
    bound to nothing."""
    pools = _configure(stack, monkeypatch)
    assert pools.refill() == 1
    [container] = [
        c
        for c in docker_client.containers.list(filters={"label": "sandbox-worker-pool"})
        if c.labels.get("sandbox-worker-owner") == get_settings().owner
    ]
    pooled = _placeholder(container)
    tenant = _tenant_with_vault(stack)
    request = stack.request("claude", {"strategy": "vault", "vaults": ["anthropic"]}, tenant=tenant, prompt="say hi")
    request["sandbox"]["env"] = {"TEAM": "blue"}

    result = runtime.pipeline().create(request)

    assert result.state is SessionState.ready and result.warm and result.reply, result.error
    own = _placeholder(container)
    placeholders = Placeholders(stack.secret_store())
    assert own != pooled and placeholders.lookup(pooled) is None
    binding = placeholders.lookup(own)
    assert binding is not None and binding.tenant_id == tenant
    runtime.teardown().terminate(request["request_id"])
