"""Never leaks: every strategy end to end, then a search for every secret value in every Redis key and value,
the worker's and the egress proxy's logs, and every result; reprs and exception messages too."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import docker
import pytest
import redis as redis_lib
from celery import Celery
from pydantic import SecretStr

from tests.conftest import wait_for
from tests.standins.credentials import SHARED_TENANT, SUBSCRIPTION_TENANT, CredentialStack, bring_up, fail
from worker.config import get_settings
from worker.credentials.broker import build_broker, gateway_keys
from worker.credentials.gateway_clients import GatewayUnavailable
from worker.credentials.subscription import discover
from worker.credentials.vault import Vault, VaultCredential, VaultStore
from worker.errors import SandboxWorkerError
from worker.models import GatewayBackend, LLMProvider, SessionRequest
from worker.redaction import MASK
from worker.store import Store

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.standins.credential_fixtures"]

# (agent, credentials, provider the agent calls): every strategy, every gateway backend, both subscription kinds.
SESSIONS: list[tuple[str, dict[str, Any], str | None]] = [
    ("claude", {"strategy": "byok", "secret_ref": "anthropic"}, "anthropic"),
    ("codex", {"strategy": "shared"}, "openai"),
    ("claude", {"strategy": "subscription"}, "anthropic"),
    ("codex", {"strategy": "subscription"}, None),
    ("claude", {"strategy": "gateway", "gateway": "openrouter"}, "anthropic"),
    ("codex", {"strategy": "gateway", "gateway": "litellm"}, "openai"),
    ("claude", {"strategy": "gateway", "gateway": "portkey"}, "anthropic"),
    ("claude", {"strategy": "vault", "vaults": ["anthropic"]}, "anthropic"),
]


def redis_dump(client: redis_lib.Redis) -> str:
    """Every key and value in Redis, whatever its type, as one text."""
    parts: list[str] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = kind
        parts.append(f"{key} => {value!r}")
    return "\n".join(parts)


def listed_tenant(credentials: dict[str, Any]) -> str | None:
    """The tenant the operator lists for the strategies with an allow-list (None: the stack's default tenant)."""
    return {"shared": SHARED_TENANT, "subscription": SUBSCRIPTION_TENANT}.get(credentials["strategy"])


def provision(stack: CredentialStack, request: dict[str, Any]) -> None:
    """What the request's strategy reads for its tenant: the byok secret, or the vault."""
    strategy = request["credentials"]["strategy"]
    if strategy == "byok":
        stack.secret_store().put(request["tenant_id"], "anthropic", SecretStr(stack.values["byok"]))
    if strategy == "vault":
        vault = Vault(
            name="anthropic",
            metadata={"role": "llm", "engine": "claude", "llm_base_url": stack.urls["vault_api"]},
            credentials=[VaultCredential(name="key", token=SecretStr(stack.values["vault"]))],
        )
        VaultStore(stack.secret_store()).create(request["tenant_id"], vault)


def placeholder_in(docker_client: docker.DockerClient, sandbox_id: str) -> str | None:
    """The vault placeholder in the sandbox's process environments, if there is one."""
    environ = docker_client.containers.get(sandbox_id).exec_run(["sh", "-c", "cat /proc/*/environ"]).output
    for item in environ.split(b"\0"):
        if item.startswith(b"ANTHROPIC_API_KEY=swph-"):
            return item.split(b"=", 1)[1].decode()
    return None


def hits(secrets: dict[str, str], text: str) -> list[str]:
    return sorted(name for name, value in secrets.items() if value and value in text)


def test_every_strategy_end_to_end_leaves_no_secret_behind(
    credential_stack: CredentialStack,
    session_client: Any,
    docker_client: docker.DockerClient,
    redis_client: redis_lib.Redis,
) -> None:
    """After sessions of every strategy (and failures), no secret value is in Redis, the logs or any result."""
    stack = credential_stack
    results: list[str] = []
    placeholders: dict[str, str] = {}
    for n, (agent, credentials, provider) in enumerate(SESSIONS):
        request = stack.request(agent, credentials, tenant=listed_tenant(credentials))
        provision(stack, request)
        session = bring_up(session_client, request)
        assert session.agent_entry()["credentialsAvailable"] is True
        if provider:
            llm = session.llm(provider)
            assert llm["status"] == 200, (credentials, llm)
            results.append(json.dumps(llm))
        if placeholder := placeholder_in(docker_client, session.result.sandbox_id):
            placeholders[f"placeholder_{n}"] = placeholder
        results.append(session.result.model_dump_json())
        ended = session_client.terminate(request["request_id"])
        results.append(ended.model_dump_json())
        results.append(session_client.status(request["request_id"]).model_dump_json())

    # Failures carry messages too: a gateway refusing (echoing its management key), a missing secret.
    gateway = stack.gateways["openrouter"]
    gateway.fail_next = 400
    error = fail(session_client, stack.request("claude", {"strategy": "gateway", "gateway": "openrouter"}))
    assert "failed on purpose" in error.message
    results.append(error.model_dump_json())
    results.append(
        fail(session_client, stack.request("claude", {"strategy": "byok", "secret_ref": "nope"})).model_dump_json()
    )

    secrets = {**stack.secret_values(), **placeholders}
    assert len(placeholders) == 1
    assert len([k for k in secrets if k.startswith("minted_")]) >= 3
    time.sleep(0.5)  # let the worker flush its last log lines
    places = {
        "redis": redis_dump(redis_client),
        "worker log": stack.worker.log() if stack.worker else "",
        "proxy log": stack.proxy.log() if stack.proxy else "",
        "results": "\n".join(results),
    }
    assert "egress" in places["proxy log"] and "session ready" in places["worker log"]
    assert {place: hits(secrets, text) for place, text in places.items()} == {place: [] for place in places}


def test_reprs_and_exception_messages_hold_no_secret(
    credential_stack: CredentialStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings, grants of every strategy, sealed records, clients and exceptions print no secret value."""
    stack = credential_stack
    stack.apply_env(monkeypatch)
    settings = get_settings()
    store = Store.from_settings(settings)
    broker = build_broker(settings, store)
    secrets = stack.secret_values()
    texts: list[str] = [repr(settings), str(settings), settings.model_dump_json(), repr(broker.strategies)]
    tenant = SHARED_TENANT
    stack.secret_store().put(tenant, "anthropic", SecretStr(stack.values["byok"]))
    vault = Vault(
        name="anthropic",
        metadata={"role": "llm", "engine": "claude", "llm_base_url": stack.urls["vault_api"]},
        credentials=[VaultCredential(name="key", token=SecretStr(stack.values["vault"]))],
    )
    VaultStore(stack.secret_store()).create(tenant, vault, replace=True)
    texts += [repr(vault), vault.model_dump_json(), str(vault.model_dump())]
    for agent, credentials, _ in SESSIONS:
        listed = SUBSCRIPTION_TENANT if credentials["strategy"] == "subscription" else tenant
        request = SessionRequest(tenant_id=listed, agent=agent, provider="docker", credentials=credentials)
        grant = broker.grant(request)
        texts += [repr(grant), str(grant)]
        broker.release(request)
    keys = gateway_keys(settings, store)
    assert keys is not None
    for backend in keys.backends_of(tenant):
        cached = keys.cached(tenant, backend)
        assert cached is not None
        texts += [repr(cached), cached.model_dump_json(), repr(keys.client(backend))]
        keys.revoke(tenant, backend)
    assert settings.credentials.subscription.home is not None
    texts.append(repr(discover(settings.credentials.subscription.home, LLMProvider.anthropic)))
    errors: list[SandboxWorkerError] = []
    for backend in GatewayBackend:
        stack.gateways[backend.value].fail_next = 400
        try:
            keys.ensure("leak-check", backend)
        except SandboxWorkerError as exc:
            errors.append(exc)
    stack.gateways["portkey"].fail_next = 503
    try:
        keys.rotate("leak-check", GatewayBackend.portkey)
    except GatewayUnavailable as exc:
        errors.append(exc)
    assert len(errors) == 4
    texts += [f"{e!r} {e} {e.message}" for e in errors]
    secrets = {**secrets, **stack.secret_values()}
    assert hits(secrets, "\n".join(texts)) == []


class EventTap:
    """Every Celery event on the broker while it runs (``task-succeeded`` carries the result's repr)."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery(broker=broker_url)
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, name="event-tap", daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventTap:
        self.thread.start()
        wait_for(lambda: self.receiver is not None, 10, what="the event receiver")
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(timeout=10)

    def text(self) -> str:
        return "\n".join(json.dumps(event, default=str) for event in self.events)


# A hostile agent (the stand-in's /leak and /leak-error) behind every kind of credential a sandbox can hold: a key,
# a subscription's credential file, a gateway's minted key, a vault's placeholder, and the daemon's token.
HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("claude", {"strategy": "byok", "secret_ref": "anthropic"}, "/leak"),
    ("codex", {"strategy": "subscription"}, "/leak"),
    ("claude", {"strategy": "gateway", "gateway": "litellm"}, "/leak"),
    ("claude", {"strategy": "vault", "vaults": ["anthropic"]}, "/leak"),
    ("claude", {"strategy": "byok", "secret_ref": "anthropic"}, "/leak-error"),
]


def test_a_hostile_agent_echoing_its_credentials_leaves_them_nowhere(
    credential_stack: CredentialStack,
    session_client: Any,
    docker_client: docker.DockerClient,
    redis_client: redis_lib.Redis,
) -> None:
    """An agent that prints every credential it can read (variables, credential files, the daemon's token) in its
    reply, tool calls, usage report and errors: the values are masked in every Redis key and value (records, Celery
    results, the broker), the worker's log (Celery's own "succeeded" lines included), the task events and what the
    client gets."""
    stack = credential_stack
    secrets: dict[str, str] = {}
    results: list[str] = []
    with EventTap(get_settings().broker_url) as events:
        for n, (agent, credentials, prompt) in enumerate(HOSTILE):
            request = stack.request(agent, credentials, tenant=listed_tenant(credentials), prompt=prompt)
            provision(stack, request)
            session_client.submit(request)
            result = session_client.wait(request["request_id"], timeout=120)
            results.append(result.model_dump_json())
            if prompt == "/leak-error":
                assert result.error is not None and result.error.code == "agent_error", result
                assert MASK in result.error.message, result.error
                continue
            assert result.reply and MASK in result.reply, result  # the agent did echo something
            assert any(MASK in title for title in result.tool_calls), result
            token = session_client.token(request["request_id"])
            assert token is not None
            secrets[f"daemon_token_{n}"] = token.get_secret_value()
            if placeholder := placeholder_in(docker_client, result.sandbox_id):
                secrets["placeholder"] = placeholder
            results.append(session_client.terminate(request["request_id"]).model_dump_json())
        time.sleep(1)  # the last events and log lines

    secrets.update(stack.secret_values())
    assert "placeholder" in secrets and any(k.startswith("minted_litellm") for k in secrets)
    log = stack.worker.log() if stack.worker else ""
    assert "succeeded in" in log  # Celery's own result line is in the log searched
    assert any(e["type"] == "task-succeeded" and "reply" in str(e.get("result")) for e in events.events)
    places = {
        "redis": redis_dump(redis_client),
        "worker log": log,
        "events": events.text(),
        "results": "\n".join(results),
    }
    assert {place: hits(secrets, text) for place, text in places.items()} == {place: [] for place in places}
