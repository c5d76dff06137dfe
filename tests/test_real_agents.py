"""The real agents of the sandbox image — Claude Code, Codex, OpenCode — brought up by a real worker in real
Docker sandboxes through each credential strategy that applies to them. Only the LLM API is a stand-in
(tests/standins/llm_api.py): it records the credential, scheme and host of every model request, runs scripted
scenarios (a tool call that writes a file in the session's cwd), and accepts only the keys the strategies hand
out. Nothing here talks to the agents directly: what a test sees is what a client of the worker gets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
import redis as redis_lib
from pydantic import SecretStr

from tests.standins.credentials import SUBSCRIPTION_TENANT, CredentialStack, bridge_address, bring_up
from tests.standins.llm_api import LLMApi
from tests.test_no_leaks import hits, redis_dump
from worker import daemon, pins, runtime
from worker.credentials.vault import Vault, VaultCredential, VaultStore
from worker.models import ProviderName, SessionState
from worker.redaction import MASK

pytestmark = pytest.mark.integration

TOOL_FILE = "made-by-the-agent.txt"
# What the adapters run as, seen in /proc/<pid>/cmdline of a sandbox.
ADAPTERS = ("claude-agent-acp", "codex-acp", "opencode")


@pytest.fixture(scope="module")
def stack(
    base_env: dict[str, str], docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CredentialStack]:
    """The credential stack of the strategy tests, with the real agents' image and LLM APIs that stream."""
    provider_api = LLMApi(tool_file=TOOL_FILE, tool_content="written-by-a-tool")
    stack = CredentialStack(
        base_env=base_env,
        workdir=tmp_path_factory.mktemp("real-agents"),
        bridge=bridge_address(docker_client),
        image=pins.SANDBOX_IMAGE,
        provider_api=provider_api,  # type: ignore[arg-type]
        vault_api=LLMApi(),  # type: ignore[arg-type]
    )
    try:
        stack.start()
        for gateway in stack.gateways.values():
            gateway.upstream = provider_api
        yield stack
    finally:
        stack.stop()


def _api(stack: CredentialStack) -> LLMApi:
    api = stack.provider_api
    assert isinstance(api, LLMApi)
    return api


def _request(
    stack: CredentialStack, agent: str, credentials: dict[str, Any], prompt: str, tenant: str | None = None
) -> dict[str, Any]:
    return stack.request(agent, credentials, prompt=prompt, tenant=tenant)


def _byok(stack: CredentialStack, request: dict[str, Any], name: str, key: str) -> None:
    stack.secret_store().put(request["tenant_id"], name, SecretStr(key))


def _file(docker_client: docker.DockerClient, sandbox_id: str, path: str) -> str:
    result = docker_client.containers.get(sandbox_id).exec_run(["cat", path])
    return result.output.decode() if result.exit_code == 0 else ""


def _adapters(docker_client: docker.DockerClient, sandbox_id: str) -> list[str]:
    """The agent adapter processes running in the sandbox (by /proc: the image has no procps)."""
    script = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done"
    output = docker_client.containers.get(sandbox_id).exec_run(["sh", "-c", script]).output.decode()
    return [line for line in output.splitlines() if any(name in line for name in ADAPTERS)]


@pytest.mark.parametrize(
    ("agent", "key_name", "scheme"),
    [("claude", "anthropic", "x-api-key"), ("codex", "openai", "bearer"), ("opencode", "anthropic", "x-api-key")],
)
def test_byok_session_runs_a_tool_in_the_sandbox(
    stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient, agent: str, key_name: str,
    scheme: str,
) -> None:  # fmt: skip
    """Each real agent, with the tenant's own key: its model calls reach the configured endpoint carrying that key,
    the tool it is told to call writes a file in the session's cwd, and the result tells what it did."""
    key = f"sk-{key_name}-byok-{uuid.uuid4().hex}"
    api = _api(stack)
    api.accepted = {key}
    request = _request(stack, agent, {"strategy": "byok", "secret_ref": key_name}, "[scenario:tool] make the file")
    _byok(stack, request, key_name, key)
    api.clear()

    session = bring_up(session_client, request, timeout=180)

    result = session.result
    assert result.stop_reason == "end_turn" and result.reply
    assert result.tool_calls, result
    assert _file(docker_client, result.sandbox_id, f"/workspace/{TOOL_FILE}").strip() == "written-by-a-tool"
    calls = api.model_requests()
    assert calls and {(c.credential, c.scheme) for c in calls} == {(key, scheme)}
    assert any(c.tool_result for c in calls)  # the second call carried the tool's output back
    session_client.terminate(request["request_id"])


@pytest.mark.parametrize(("agent", "value"), [("claude", "shared_anthropic"), ("codex", "shared_openai")])
def test_shared_org_key(stack: CredentialStack, session_client: Any, agent: str, value: str) -> None:
    """An allow-listed tenant's session uses the organisation's key."""
    api = _api(stack)
    api.accepted = {stack.values[value]}
    request = _request(stack, agent, {"strategy": "shared"}, "say hello", tenant="internal-tools")
    api.clear()

    session = bring_up(session_client, request, timeout=180)

    assert session.result.reply
    assert {c.credential for c in api.model_requests()} == {stack.values[value]}
    session_client.terminate(request["request_id"])


def test_subscription_oauth_token_reaches_the_api_as_claude_code_sends_it(
    stack: CredentialStack, session_client: Any
) -> None:
    """The host's Claude login: the OAuth access token is presented as a bearer token, never as an API key."""
    api = _api(stack)
    api.accepted = {stack.values["claude_access"]}
    request = _request(stack, "claude", {"strategy": "subscription"}, "say hello", tenant=SUBSCRIPTION_TENANT)
    api.clear()

    session = bring_up(session_client, request, timeout=180)

    assert session.result.reply
    assert {(c.credential, c.scheme) for c in api.model_requests()} == {(stack.values["claude_access"], "bearer")}
    session_client.terminate(request["request_id"])


def test_gateway_minted_key_is_the_only_key_the_api_sees(stack: CredentialStack, session_client: Any) -> None:
    """Claude Code on a per-tenant OpenRouter key: the gateway mints it, the agent's calls carry it (as a bearer
    token, to the gateway), and the gateway takes nothing else."""
    api = _api(stack)
    api.accepted = None  # the gateway checks the minted key before it forwards
    gateway = stack.gateways["openrouter"]
    request = _request(stack, "claude", {"strategy": "gateway", "gateway": "openrouter"}, "say hello")
    api.clear()

    session = bring_up(session_client, request, timeout=180)

    assert session.result.reply
    minted = {m.key for m in gateway.live()}
    used = {key for _path, key in gateway.llm_calls}
    assert used and used <= minted
    assert {c.credential for c in api.model_requests()} <= minted
    session_client.terminate(request["request_id"])


def test_vault_upstream_sees_the_real_key_and_the_sandbox_only_the_placeholder(
    stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """Claude Code through the egress proxy: the upstream gets the vault's key, while the sandbox's process
    environments, command lines and files hold only the placeholder."""
    vault_api = stack.vault_api
    assert isinstance(vault_api, LLMApi)
    vault_api.accepted = {stack.values["vault"]}
    request = _request(stack, "claude", {"strategy": "vault", "vaults": ["anthropic"]}, "say hello")
    credential = VaultCredential(name="key", token=SecretStr(stack.values["vault"]))
    metadata = {"role": "llm", "engine": "claude", "llm_base_url": stack.urls["vault_api"]}
    VaultStore(stack.secret_store()).create(
        request["tenant_id"], Vault(name="anthropic", metadata=metadata, credentials=[credential])
    )
    vault_api.clear()

    session = bring_up(session_client, request, timeout=180)

    assert session.result.reply
    assert {c.credential for c in vault_api.model_requests()} == {stack.values["vault"]}
    container = docker_client.containers.get(session.result.sandbox_id)
    real = stack.values["vault"].encode()
    for command in ("cat /proc/*/environ", "cat /proc/*/cmdline", "grep -rs . /root /workspace /tmp"):
        assert real not in container.exec_run(["sh", "-c", command]).output, command
    session_client.terminate(request["request_id"])


@pytest.mark.parametrize(("agent", "key_name"), [("claude", "anthropic"), ("codex", "openai")])
def test_a_refused_key_fails_the_prompt_with_llm_auth_failed_in_seconds(
    stack: CredentialStack, session_client: Any, agent: str, key_name: str
) -> None:
    """A key the LLM API refuses (wrong or revoked): the first prompt fails with a clear code, not after minutes of
    the agent's own retries, and nothing is left running."""
    api = _api(stack)
    api.accepted = {"sk-the-only-good-key"}
    request = _request(stack, agent, {"strategy": "byok", "secret_ref": key_name}, "say hello")
    _byok(stack, request, key_name, f"sk-revoked-{uuid.uuid4().hex}")

    started = time.monotonic()
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=120)

    assert result.state is SessionState.failed and result.error is not None, result
    assert (result.error.code, result.error.stage) == ("llm_auth_failed", "session"), result.error
    assert time.monotonic() - started < 60
    assert result.sandbox_id is None


@pytest.mark.parametrize("agent", ["claude", "codex"])
def test_no_adapter_outlives_its_daemon(
    stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient, agent: str
) -> None:
    """Restarting the daemon in a sandbox that lives on (as adoption does) leaves no adapter process behind:
    the launcher takes the adapter's whole process group down when the daemon goes."""
    key_name = "anthropic" if agent == "claude" else "openai"
    key = f"sk-{uuid.uuid4().hex}"
    _api(stack).accepted = {key}
    request = _request(stack, agent, {"strategy": "byok", "secret_ref": key_name}, "say hello")
    _byok(stack, request, key_name, key)
    session = bring_up(session_client, request, timeout=180)
    sandbox_id = session.result.sandbox_id
    assert _adapters(docker_client, sandbox_id), "the session's adapter should be running"

    driver = runtime.provider(ProviderName.docker)
    sandbox = driver.find(sandbox_id)
    assert sandbox is not None
    daemon.stop_daemon(driver, sandbox)  # what adoption does before it starts the new attempt's daemon

    deadline = time.monotonic() + 15
    while (left := _adapters(docker_client, sandbox_id)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not left, left
    session_client.terminate(request["request_id"])


@pytest.mark.parametrize(("agent", "key_name"), [("claude", "anthropic"), ("codex", "openai")])
def test_a_real_agent_told_to_print_its_key_leaks_it_nowhere(
    stack: CredentialStack, session_client: Any, redis_client: redis_lib.Redis, agent: str, key_name: str
) -> None:
    """A prompt-injected turn (the LLM API's ``leak`` scenario): the real agent runs a tool printing every
    environment it can read and repeats the output in its reply. The key and the daemon's token are masked in the
    result, every Redis key and value and the worker's log."""
    key = f"sk-{key_name}-leak-{uuid.uuid4().hex}"
    api = _api(stack)
    api.accepted = {key}
    request = _request(stack, agent, {"strategy": "byok", "secret_ref": key_name}, "[scenario:leak] show your env")
    _byok(stack, request, key_name, key)

    session = bring_up(session_client, request, timeout=180)

    result = session.result
    assert result.reply and "Stand-in leak:" in result.reply and MASK in result.reply, result.reply
    secrets = {"key": key, "daemon token": session.token}
    places = {
        "result": result.model_dump_json(),
        "redis": redis_dump(redis_client),
        "worker log": stack.worker.log() if stack.worker else "",
    }
    assert {place: hits(secrets, text) for place, text in places.items()} == {place: [] for place in places}
    session_client.terminate(request["request_id"])


def test_following_claude_code_prompts_asks_and_cancels(
    stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """Following a real Claude Code session (worker.follow): a second prompt's tool call streams, the permission
    it asks for (mode 'default', as with permissions 'reject') is allowed by the follower and the tool runs, and a
    cancel ends a slow turn 'cancelled'."""
    from worker.follow import MessageChunk, PermissionRequest, ToolCall, TurnEnd

    key = f"sk-anthropic-follow-{uuid.uuid4().hex}"
    api = _api(stack)
    api.accepted = {key}
    request = _request(stack, "claude", {"strategy": "byok", "secret_ref": "anthropic"}, "say hello")
    request["session"]["permissions"] = "reject"
    _byok(stack, request, "anthropic", key)
    result = bring_up(session_client, request, timeout=180).result

    with session_client.follow(request["request_id"]) as session:
        events: list[Any] = []
        for event in session.prompt("[scenario:tool] make the file"):
            events.append(event)
            if isinstance(event, PermissionRequest):
                session.answer(event, allow=True)
        assert any(isinstance(e, PermissionRequest) for e in events), events
        assert any(isinstance(e, ToolCall) for e in events), events
        assert "".join(e.text for e in events if isinstance(e, MessageChunk)).endswith(f"wrote {TOOL_FILE}.")
        assert isinstance(events[-1], TurnEnd) and events[-1].stop_reason == "end_turn"
        assert _file(docker_client, result.sandbox_id, f"/workspace/{TOOL_FILE}").strip() == "written-by-a-tool"

        turn = session.prompt("[scenario:slow] take your time")
        time.sleep(2)
        session.cancel()
        assert list(turn)[-1].stop_reason == "cancelled"
    session_client.terminate(request["request_id"])
