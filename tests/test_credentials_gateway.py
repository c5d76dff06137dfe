"""Per-tenant gateway keys: minting on OpenRouter, LiteLLM and Portkey stand-ins (what they were sent), one
mint under a race, rotation, spend, revocation, error classes, the CLI, and sessions end to end through
real workers into Docker sandboxes whose agent calls the gateway with the tenant key."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest
import redis as redis_lib

from tests.conftest import ROOT, VENV_BIN
from tests.standins.credentials import CredentialStack, bring_up
from tests.standins.gateways import GatewayStandIn, LiteLLMStandIn, OpenRouterStandIn, PortkeyStandIn
from tests.standins.server import ThreadedServer
from worker.config import Settings
from worker.credentials.gateway import GatewayKeys, GatewaySettings
from worker.credentials.gateway_clients import CLIENTS, GatewayUnavailable, TenantKey
from worker.credentials.settings import GatewayBackendSettings
from worker.errors import Busy, ConfigurationError, CredentialError
from worker.models import GatewayBackend
from worker.secret_store import SecretStore
from worker.store import Store

# Every test here uses Redis (the store, the secret store, the gateways' mint locks).
pytestmark = pytest.mark.integration

pytest_plugins = ["tests.standins.credential_fixtures"]

STANDINS: dict[GatewayBackend, tuple[type[GatewayStandIn], str]] = {
    GatewayBackend.openrouter: (OpenRouterStandIn, "/api/v1"),
    GatewayBackend.litellm: (LiteLLMStandIn, "/v1"),
    GatewayBackend.portkey: (PortkeyStandIn, "/v1"),
}


@dataclass
class Gateway:
    backend: GatewayBackend
    standin: GatewayStandIn
    url: str
    management_key: str

    def settings(self, **overrides: Any) -> GatewayBackendSettings:
        values: dict[str, Any] = {"url": self.url, "management_key": self.management_key}
        if self.backend is GatewayBackend.portkey:
            values["workspace_id"] = "ws-1"
        return type(GatewaySettings().backend(self.backend))(**{**values, **overrides})

    def keys(self, settings: Settings, lock_seconds: float = 60.0, **overrides: Any) -> GatewayKeys:
        """A GatewayKeys of its own (its own Redis connection), as one worker process has."""
        client = CLIENTS[self.backend](self.settings(**overrides), prefix="sw")
        secrets = SecretStore.from_store(Store.from_settings(settings))
        return GatewayKeys(secrets, {self.backend: client}, lock_seconds=lock_seconds)


# The management call that deletes a tenant key, per gateway: (method, path fragment).
REVOKE_CALLS = {
    GatewayBackend.openrouter: ("DELETE", "/keys/"),
    GatewayBackend.litellm: ("POST", "/key/delete"),
    GatewayBackend.portkey: ("DELETE", "/api-keys/"),
}


@pytest.fixture(params=list(GatewayBackend), ids=[b.value for b in GatewayBackend])
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """One stand-in gateway on loopback."""
    backend: GatewayBackend = request.param
    cls, path = STANDINS[backend]
    management_key = f"mgmt-{uuid.uuid4().hex}"
    standin = cls(management_key, mint_delay=0.3)
    with ThreadedServer(standin.app()) as server:
        yield Gateway(backend, standin, server.url + path, management_key)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def test_openrouter_key_has_a_name_limit_and_reset(settings: Settings) -> None:
    """OpenRouter gets a key named after the tenant with the configured spend limit and reset period."""
    name = tenant()
    standin = OpenRouterStandIn("mgmt-or")
    with ThreadedServer(standin.app()) as server:
        gw = Gateway(GatewayBackend.openrouter, standin, server.url + "/api/v1", "mgmt-or")
        key = gw.keys(settings, budget_usd=7.5, budget_period="daily").ensure(name, GatewayBackend.openrouter)
    (created,) = standin.creations()
    assert created.body == {"name": f"sw-{name}", "limit": 7.5, "limit_reset": "daily"}
    assert key.key.get_secret_value() == standin.minted[0].key


def test_litellm_makes_a_team_with_a_budget_and_a_key_in_it(settings: Settings) -> None:
    """LiteLLM gets a team per tenant carrying the budget, then the tenant's key inside that team."""
    name = tenant()
    standin = LiteLLMStandIn("mgmt-ll")
    with ThreadedServer(standin.app()) as server:
        gw = Gateway(GatewayBackend.litellm, standin, server.url + "/v1", "mgmt-ll")
        key = gw.keys(settings, budget_usd=40, budget_period="weekly").ensure(name, GatewayBackend.litellm)
    team, generated = standin.calls
    assert (team.path, generated.path) == ("/team/new", "/key/generate")
    assert team.body["team_alias"] == f"sw-{name}"
    assert (team.body["max_budget"], team.body["budget_duration"]) == (40, "7d")
    assert generated.body["team_id"] == key.team_id
    assert generated.body["key_alias"].startswith(f"sw-{name}-")
    assert generated.body["metadata"] == {"tenant_id": name, "created_by": "sw"}


def test_portkey_key_has_usage_limits_and_the_tenant_as_user(settings: Settings) -> None:
    """Portkey gets a workspace service key with a credit limit, an alert threshold and the tenant as _user."""
    name = tenant()
    standin = PortkeyStandIn("mgmt-pk")
    with ThreadedServer(standin.app()) as server:
        gw = Gateway(GatewayBackend.portkey, standin, server.url + "/v1", "mgmt-pk")
        gw.keys(settings, budget_usd=30).ensure(name, GatewayBackend.portkey)
    (created,) = standin.creations()
    assert created.body["name"] == f"sw-{name}"
    assert created.body["workspace_id"] == "ws-1"
    assert created.body["scopes"] == ["completions.write"]
    assert created.body["usage_limits"] == {"credit_limit": 30, "alert_threshold": 24, "periodic_reset": "monthly"}
    assert created.body["defaults"]["metadata"]["_user"] == name


def test_portkey_needs_a_workspace_and_a_monthly_reset(settings: Settings) -> None:
    """Portkey without a workspace, or with a reset period it does not support, is a configuration error."""
    standin = PortkeyStandIn("mgmt-pk")
    with ThreadedServer(standin.app()) as server:
        gw = Gateway(GatewayBackend.portkey, standin, server.url + "/v1", "mgmt-pk")
        with pytest.raises(ConfigurationError, match="workspace_id"):
            gw.keys(settings, workspace_id=None).ensure(tenant(), GatewayBackend.portkey)
        with pytest.raises(ConfigurationError, match="monthly or never"):
            gw.keys(settings, budget_period="weekly").ensure(tenant(), GatewayBackend.portkey)
    assert standin.calls == []


def test_racing_workers_mint_once(gateway: Gateway, settings: Settings, redis_client: redis_lib.Redis) -> None:
    """Eight workers asking at once for a new tenant's key mint one key and all get it; Redis holds it encrypted."""
    name = tenant()
    results: list[str] = []
    errors: list[BaseException] = []

    def ask(keys: GatewayKeys) -> None:
        try:
            results.append(keys.ensure(name, gateway.backend).key.get_secret_value())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(gateway.keys(settings),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors
    assert len(gateway.standin.creations()) == 1
    assert set(results) == {gateway.standin.minted[0].key}
    sealed = redis_client.hget(f"sw:sealed:gateway:{name}", gateway.backend.value)
    assert sealed and gateway.standin.minted[0].key not in sealed


def test_a_mint_slower_than_the_lock_still_mints_once(gateway: Gateway, settings: Settings) -> None:
    """The mint lock is renewed while its holder mints: a gateway slower than the lock's lifetime does not let a
    second worker in to mint a second key (it waits its turn, then gets busy, a transient error, or the key)."""
    gateway.standin.mint_delay = 2.5
    name = tenant()
    results: list[TenantKey | Busy] = []

    def ask() -> None:
        try:
            results.append(gateway.keys(settings, lock_seconds=1).ensure(name, gateway.backend))
        except Busy as busy:
            results.append(busy)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=30)

    assert len(gateway.standin.creations()) == 1
    assert len({r.key_id for r in results if isinstance(r, TenantKey)}) == 1 and len(results) == 2


def test_a_rotation_whose_revoke_fails_keeps_the_old_key_pending_until_revoked(
    gateway: Gateway, settings: Settings
) -> None:
    """The gateway fails the old key's delete: the new key is in use, the old one is listed as pending revocation
    (not forgotten) and revoked by the next retry once the gateway answers again."""
    keys, name = gateway.keys(settings), tenant()
    old = keys.ensure(name, gateway.backend)
    gateway.standin.fail_calls = (*REVOKE_CALLS[gateway.backend], 503)
    new = keys.rotate(name, gateway.backend)

    assert keys.ensure(name, gateway.backend).key_id == new.key_id
    assert keys.pending(name) == [f"{gateway.backend.value}:{old.key_id}"]
    assert [m.revoked for m in gateway.standin.minted] == [False, False]

    gateway.standin.fail_calls = None
    keys = gateway.keys(settings)
    keys.revoke_all_pending()
    assert keys.pending(name) == []
    assert [m.revoked for m in gateway.standin.minted] == [True, False]


def test_rotate_replaces_the_key_and_revokes_the_old(gateway: Gateway, settings: Settings) -> None:
    """Rotation mints a new key (in the same LiteLLM team), deletes the old one at the gateway, and caches the new."""
    keys, name = gateway.keys(settings), tenant()
    old = keys.ensure(name, gateway.backend)
    new = keys.rotate(name, gateway.backend)

    assert new.key.get_secret_value() != old.key.get_secret_value()
    assert [m.revoked for m in gateway.standin.minted] == [True, False]
    assert keys.ensure(name, gateway.backend).key_id == new.key_id
    assert new.team_id == old.team_id


def test_spend_is_read_back(gateway: Gateway, settings: Settings) -> None:
    """The spend the gateway reports for the tenant's key comes back in USD with its limit."""
    keys, name = gateway.keys(settings), tenant()
    key = keys.ensure(name, gateway.backend)
    gateway.standin.spend_usd[key.key_id] = 3.25

    spend = keys.spend(name, gateway.backend)

    assert spend.spent_usd == pytest.approx(3.25)
    assert spend.limit_usd == 25.0
    if gateway.backend is GatewayBackend.portkey:
        assert "api_key_ids" in gateway.standin.calls[-1].query
        assert gateway.standin.calls[-1].query["api_key_ids"] == key.key_id


def test_revoke_deletes_at_the_gateway_and_forgets(gateway: Gateway, settings: Settings) -> None:
    """Revoking (tenant removal) deletes the key, and the LiteLLM team, at the gateway and forgets the key."""
    keys, name = gateway.keys(settings), tenant()
    key = keys.ensure(name, gateway.backend)

    assert keys.revoke(name, gateway.backend) is True
    assert gateway.standin.minted[0].revoked
    assert keys.cached(name, gateway.backend) is None
    assert keys.revoke(name, gateway.backend) is False
    if isinstance(gateway.standin, LiteLLMStandIn):
        assert gateway.standin.teams[key.team_id or ""]["deleted"] is True


def test_gateway_errors_are_classified_and_masked(gateway: Gateway, settings: Settings) -> None:
    """A wrong management key is a configuration error, a 503 a transient one, a refusal a credentials error
    whose message never repeats the management key the gateway echoed."""
    with pytest.raises(ConfigurationError, match="rejected the management key"):
        gateway.keys(settings, management_key="wrong").ensure(tenant(), gateway.backend)
    gateway.standin.fail_next = 503
    with pytest.raises(GatewayUnavailable) as unavailable:
        gateway.keys(settings).ensure(tenant(), gateway.backend)
    assert unavailable.value.transient
    gateway.standin.fail_next = 400
    with pytest.raises(CredentialError) as refused:
        gateway.keys(settings).ensure(tenant(), gateway.backend)
    assert "failed on purpose" in refused.value.message
    assert gateway.management_key not in refused.value.message
    assert gateway.management_key not in repr(refused.value)


def test_cli_rotates_reads_spend_and_revokes(settings: Settings, base_env: dict[str, str]) -> None:
    """`sandbox-worker gateway rotate|spend|revoke TENANT` work against the configured gateway."""
    standin = OpenRouterStandIn("mgmt-cli")
    with ThreadedServer(standin.app()) as server:
        env = {
            **os.environ,
            **base_env,
            "SANDBOX_WORKER_CREDENTIALS__GATEWAY__OPENROUTER__URL": server.url + "/api/v1",
            "SANDBOX_WORKER_CREDENTIALS__GATEWAY__OPENROUTER__MANAGEMENT_KEY": "mgmt-cli",
        }

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            argv = [str(VENV_BIN / "sandbox-worker"), "gateway", *args]
            return subprocess.run(argv, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

        name = tenant()
        missing = cli("rotate", name)
        assert missing.returncode == 2 and "has no gateway key" in missing.stderr
        assert cli("rotate", name, "--backend", "openrouter").returncode == 0
        assert cli("rotate", name).returncode == 0
        standin.spend_usd[standin.minted[1].key_id] = 1.5
        spend = cli("spend", name, "--json")
        assert json.loads(spend.stdout) == [
            {
                "backend": "openrouter",
                "key_name": f"sandbox-worker-{name}",
                "spent_usd": 1.5,
                "limit_usd": 25.0,
                "period": "monthly",
            }
        ]
        revoked = cli("revoke", name)
        assert revoked.returncode == 0 and "revoked openrouter" in revoked.stdout
    assert [m.revoked for m in standin.minted] == [True, True]
    for result in (missing, spend, revoked):
        assert "mgmt-cli" not in result.stdout + result.stderr
        assert all(m.key not in result.stdout + result.stderr for m in standin.minted)


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize(
    ("backend", "agent", "provider", "endpoint"),
    [
        ("openrouter", "claude", "anthropic", "/api/v1/messages"),
        ("litellm", "codex", "openai", "/v1/chat/completions"),
        ("portkey", "claude", "anthropic", "/v1/messages"),
    ],
)
def test_session_gets_the_tenant_key_and_the_gateway_endpoint(
    credential_stack: CredentialStack,
    session_client: Any,
    docker_client: docker.DockerClient,
    backend: str,
    agent: str,
    provider: str,
    endpoint: str,
) -> None:
    """The agent finds the tenant's gateway key and the gateway's endpoint, and its LLM call reaches the gateway
    with that key; the management key is nowhere in the sandbox's processes."""
    stack = credential_stack
    standin = stack.gateways[backend]
    request = stack.request(agent, {"strategy": "gateway", "gateway": backend})

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    env = session.env_report()
    minted = standin.minted[-1]
    if provider == "anthropic":
        assert env["credential_vars"] == ["ANTHROPIC_AUTH_TOKEN"]
        assert env["base_urls"] == {"ANTHROPIC_BASE_URL": stack.urls[backend] + endpoint.removesuffix("/v1/messages")}
    else:
        assert env["credential_vars"] == ["CODEX_API_KEY", "OPENAI_API_KEY"]
        assert env["base_urls"] == {"OPENAI_BASE_URL": stack.urls[backend] + endpoint.removesuffix("/chat/completions")}
    llm = session.llm(provider)
    assert (llm["status"], llm["auth"]) == (200, "bearer")
    assert standin.llm_calls[-1] == (endpoint, minted.key)
    environ = docker_client.containers.get(session.result.sandbox_id).exec_run(["sh", "-c", "cat /proc/*/environ"])
    assert minted.key.encode() in environ.output
    assert stack.values[f"management_{backend}"].encode() not in environ.output
    session_client.terminate(request["request_id"])


@pytest.mark.integration
def test_two_workers_racing_for_a_new_tenant_mint_once(credential_stack: CredentialStack, session_client: Any) -> None:
    """Four sessions of a new tenant, on two workers at once, share the one key minted for it."""
    stack = credential_stack
    standin = stack.gateways["litellm"]
    standin.mint_delay = 0.5
    second = stack.start_worker("worker-race")
    try:
        name = tenant()
        requests = [
            stack.request("codex", {"strategy": "gateway", "gateway": "litellm"}, tenant=name) for _ in range(4)
        ]
        before = len(standin.creations())
        for request in requests:
            session_client.submit(request)
        results = [session_client.wait(r["request_id"], timeout=120) for r in requests]
    finally:
        standin.mint_delay = 0.0
        second.stop()
    assert [r.state.value for r in results] == ["ready"] * 4, [r.error for r in results]
    assert len(standin.creations()) - before == 1
    assert [c.body["metadata"]["tenant_id"] for c in standin.creations()[before:]] == [name]
    for request in requests:
        session_client.terminate(request["request_id"])
