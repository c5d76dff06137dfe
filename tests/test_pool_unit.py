"""Warm pools on the fake provider and an in-memory Redis: a claim hands out a pooled sandbox and binds the session to
it, an empty pool falls back to a cold start, entries past their max age are recycled and never handed out, pools
count against the sandbox quota, and the reaper neither kills live entries nor leaks orphaned ones."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from providers.fake import FakeProvider, StandInDaemons
from worker.agents import agent_setup, relay_binding
from worker.config import PoolSettings, PoolTarget, Settings, get_settings
from worker.credentials.agents import CREDENTIAL_VARIABLES, KeyAuth, token_grant
from worker.credentials.base import CredentialGrant
from worker.credentials.broker import CredentialBroker
from worker.credentials.none import NoCredentials
from worker.credentials.vault import Placeholders, new_placeholder, proxy_url
from worker.environment import SessionEnvironment, daemon_environment
from worker.limits import Limits, Semaphore
from worker.models import Agent, LLMProvider, ProviderName, SessionRequest, SessionState, Strategy
from worker.pipeline import Pipeline
from worker.pool import (
    LABEL_POOL_ENTRY,
    RELAY_KEY,
    PoolEntry,
    Pools,
    binds_as_is,
    pool_environment,
    pool_name,
)
from worker.reaper import Reaper
from worker.secret_store import SecretStore
from worker.store import Store

pytest_plugins = ["tests.standins.fake_fixtures"]

DOCKER = ProviderName("docker")
TARGET = PoolTarget(provider=DOCKER, agent="mock", size=2)  # type: ignore[arg-type]


class _FakeDocker(FakeProvider):
    """The fake under the name of the provider the pools and the reaper are configured for."""

    name = "docker"


@pytest.fixture
def provider(daemons: StandInDaemons) -> FakeProvider:
    return _FakeDocker(daemons=daemons)


def _settings(size: int = 2, **fleet: Any) -> Settings:
    settings = get_settings()
    pool = PoolSettings(targets=[TARGET.model_copy(update={"size": size})], max_age_seconds=600)
    return settings.model_copy(
        update={"pool": pool, "fleet": settings.fleet.model_copy(update=fleet), "owner": "pool-unit"}
    )


def _pipeline(store: Store, provider: FakeProvider, settings: Settings) -> Pipeline:
    return Pipeline(settings, store, lambda _name: provider, CredentialBroker([NoCredentials()]))


def _request(request_id: str, **sandbox: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "tenant_id": "acme",
        "agent": "mock",
        "provider": "docker",
        "sandbox": sandbox,
        "session": {"prompt": "hello"},
    }


def _pools(store: Store, provider: FakeProvider, settings: Settings) -> Pools:
    return Pools(settings, store, lambda _name: provider, Limits(store.redis, settings.fleet, 30))


def test_a_claim_serves_the_session_from_the_pool_and_the_refill_tops_it_up(
    store: Store, provider: FakeProvider
) -> None:
    settings = _settings()
    pools = _pools(store, provider, settings)
    assert pools.refill() == 2
    pooled = set(provider.sandboxes)
    # No variable of anyone's: only the daemon's own knobs.
    assert all(name.startswith("SANDBOX_AGENT_") for s in pooled for name in provider.daemons.env[s])

    result = _pipeline(store, provider, settings).create(_request("warm-1"))

    assert result.state is SessionState.ready and result.warm, result.error
    assert result.sandbox_id in pooled and result.reply == "mock: hello"
    assert "pool_claim" in result.timings_ms
    assert provider.calls.count("start") == 2  # no cold start
    assert pools.refill() == 1 and len(provider.sandboxes) == 3  # the claimed one is replaced, never returned


def test_the_claim_binds_the_session_environment_by_restarting_the_daemon(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=1)
    pools = _pools(store, provider, settings)
    pools.refill()
    [sandbox_id] = provider.sandboxes
    pool_token = provider.daemons.tokens[sandbox_id]
    assert "TEAM" not in provider.daemons.env[sandbox_id]

    result = _pipeline(store, provider, settings).create(_request("warm-env", env={"TEAM": "blue"}))

    assert result.state is SessionState.ready and result.warm and result.sandbox_id == sandbox_id
    assert provider.daemons.env[sandbox_id]["TEAM"] == "blue"  # bound at the claim
    assert provider.daemons.tokens[sandbox_id] != pool_token  # a new daemon, with the session's own token


def test_a_session_that_adds_nothing_uses_the_pooled_daemon_as_it_is(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=1)
    _pools(store, provider, settings).refill()
    [sandbox_id] = provider.sandboxes
    pool_token = provider.daemons.tokens[sandbox_id]
    spawns = provider.calls.count("spawn")

    result = _pipeline(store, provider, settings).create(_request("warm-as-is"))

    assert result.state is SessionState.ready and result.warm
    assert provider.calls.count("spawn") == spawns  # no restart
    assert (result.server_id or "").startswith("sw-pool-")  # the agent the pool spawned and initialized
    record = store.get("warm-as-is")
    token = store.token_of(record) if record is not None else None
    assert token is not None and token.get_secret_value() == pool_token  # the pool's token, handed to this session


def test_an_empty_pool_falls_back_to_a_cold_start(store: Store, provider: FakeProvider) -> None:
    settings = _settings()

    result = _pipeline(store, provider, settings).create(_request("cold-1"))

    assert result.state is SessionState.ready and not result.warm
    assert result.timings_ms["pool_claim"] == 0.0
    assert provider.calls.count("start") == 1


def test_a_request_the_pool_cannot_serve_starts_cold(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=1)
    _pools(store, provider, settings).refill()

    result = _pipeline(store, provider, settings).create(_request("own-labels", labels={"team": "blue"}))

    assert result.state is SessionState.ready and not result.warm


@pytest.mark.parametrize(
    "sandbox",
    [{"labels": {"team": "blue"}}, {"egress": ["github.com"]}, {"cpu": 1}, {"memory_mb": 1024}, {"image": "other"}],
)
def test_no_pool_serves_what_a_started_sandbox_can_no_longer_take(store: Store, sandbox: dict[str, object]) -> None:
    """Labels, egress (a Docker sandbox's forward-proxy pass is sealed at its start), limits, another image."""
    settings = _settings(size=1)
    pools = Pools(settings, store, lambda _name: FakeProvider(), Limits(store.redis, settings.fleet, 30))
    fits = SessionRequest.model_validate({"tenant_id": "acme", "agent": "mock", "provider": "docker"})
    assert pools.target_for(fits) is not None
    assert pools.target_for(fits.model_copy(update={"sandbox": fits.sandbox.model_copy(update=sandbox)})) is None


def test_a_dead_entry_is_removed_and_the_request_starts_cold(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=1)
    _pools(store, provider, settings).refill()
    [pooled] = provider.sandboxes
    provider.daemons.tokens.pop(pooled)  # its daemon no longer answers

    result = _pipeline(store, provider, settings).create(_request("dead-1"))

    assert result.state is SessionState.ready and not result.warm
    assert pooled not in provider.sandboxes


def test_entries_past_their_max_age_are_recycled_and_never_handed_out(
    store: Store, provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(size=1)
    pools = _pools(store, provider, settings)
    pools.refill()
    [old] = provider.sandboxes
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + settings.pool.max_age_seconds + 1)

    result = _pipeline(store, provider, settings).create(_request("late-1"))
    assert result.state is SessionState.ready and not result.warm and result.sandbox_id != old
    assert old not in provider.sandboxes  # the claim removed what it may not hand out

    pools.refill()
    [fresh] = [s for s in provider.sandboxes if s != result.sandbox_id]
    monkeypatch.setattr(time, "time", lambda: real_time() + 2 * (settings.pool.max_age_seconds + 1))
    assert pools.recycle(TARGET) == 1 and fresh not in provider.sandboxes  # the refill's own pass


def test_pooled_sandboxes_count_against_the_quota_and_pass_their_slot_to_the_claim(
    store: Store, provider: FakeProvider
) -> None:
    settings = _settings(size=3, provider_sandboxes={"docker": 2})
    pools = _pools(store, provider, settings)
    assert pools.refill() == 2  # the quota, not the pool's size
    quota = Semaphore(store.redis, "sandboxes:docker", 2)
    assert all(holder.startswith("pool:") for holder in quota.holders())

    result = _pipeline(store, provider, settings).create(_request("quota-1"))

    assert result.warm and "quota-1" in quota.holders() and len(quota.holders()) == 2


def test_the_reaper_keeps_live_entries_and_removes_orphaned_ones(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=2)
    pools = _pools(store, provider, settings)
    pools.refill()
    store.create(SessionRequest.model_validate(_request("marker")))  # the fleet marker
    claimed = _pipeline(store, provider, settings).create(_request("claimed-1"))
    assert claimed.warm
    [ready] = [s for s in provider.sandboxes if s != claimed.sandbox_id]
    orphan = provider.sandboxes[ready]
    # Its entry vanishes from Redis (a fill whose worker died leaves the same: a sandbox no pool entry names).
    name = pool_name(TARGET)
    store.redis.zrem(f"sw:pool:{{{name}}}:ready", orphan.labels[LABEL_POOL_ENTRY])
    pools.refill()  # a replacement, which the reaper must leave alone
    replacement = next(s for s in provider.sandboxes if s not in (ready, claimed.sandbox_id))

    teardown = _pipeline(store, provider, settings).teardown
    reaped = Reaper(settings, store, lambda _n: provider, teardown.terminate, lambda _r: None, teardown.limits).run()

    assert [(r.action, r.sandbox_id, r.done) for r in reaped] == [("remove", ready, True)]
    assert replacement in provider.sandboxes and claimed.sandbox_id in provider.sandboxes


def test_the_reaper_judges_a_claimed_sandbox_as_its_request_s(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=1)
    _pools(store, provider, settings).refill()
    result = _pipeline(store, provider, settings).create(_request("ended-1"))
    assert result.warm
    record = store.get("ended-1")
    assert record is not None
    record.result.state = SessionState.failed  # its request ended without removing it (a worker died mid-way)
    store.put(record)

    teardown = _pipeline(store, provider, settings).teardown
    reaped = Reaper(settings, store, lambda _n: provider, teardown.terminate, lambda _r: None, teardown.limits).run()

    assert [(r.action, r.request_id, r.done) for r in reaped] == [("remove", "ended-1", True)]
    assert result.sandbox_id not in provider.sandboxes


def test_terminate_removes_a_warm_session_s_sandbox(store: Store, provider: FakeProvider) -> None:
    settings = _settings(size=1)
    _pools(store, provider, settings).refill()
    pipeline = _pipeline(store, provider, settings)
    result = pipeline.create(_request("term-1"))
    assert result.warm

    assert pipeline.teardown.terminate("term-1").state is SessionState.terminated
    assert result.sandbox_id not in provider.sandboxes


# -- vault pools: which sessions use the pooled daemon as it is, and the placeholder's adoption ------------------
VAULT_TARGET = PoolTarget.model_validate(
    {"provider": "docker", "agent": "claude", "size": 1, "strategy": "vault", "llm_base_url": "https://llm.example"}
)


def _vault_settings() -> Settings:
    settings = get_settings()
    egress = settings.credentials.egress.model_copy(update={"public_url": "http://proxy.test:8089"})
    return settings.model_copy(update={"credentials": settings.credentials.model_copy(update={"egress": egress})})


def _entry(target: PoolTarget, env: Mapping[str, SecretStr | str], **fields: Any) -> PoolEntry:
    """An entry of ``target`` whose daemon runs with ``env``."""
    return PoolEntry(
        entry_id="e1",
        pool=pool_name(target),
        provider=DOCKER,
        sandbox_id="s1",
        labels={},
        token="t",
        env={k: v for k, v in env.items() if isinstance(v, str)},
        created_at=0,
        expires_at=0,
        **fields,
    )


def _vault_entry(env: dict[str, SecretStr | str]) -> PoolEntry:
    secret_env = sorted(k for k, v in env.items() if not isinstance(v, str))
    return _entry(VAULT_TARGET, env, strategy=Strategy("vault"), secret_env=secret_env, placeholder="sealed")


@pytest.mark.parametrize(
    ("strategy", "llm_base_url", "user_env", "cwd", "as_is"),
    [
        ("vault", "https://llm.example", {}, "/workspace", True),
        ("vault", "https://other.example", {}, "/workspace", False),  # another LLM: another proxy URL
        ("vault", "https://llm.example", {"TEAM": "blue"}, "/workspace", False),
        ("vault", "https://llm.example", {}, "/workspace/app", False),
        ("byok", "https://llm.example", {}, "/workspace", False),  # a key of the tenant's, not a placeholder
    ],
)
def test_only_a_vault_session_like_the_pools_uses_its_daemon_as_it_is(
    strategy: str, llm_base_url: str, user_env: dict[str, str], cwd: str, as_is: bool
) -> None:
    """The session's daemon environment must be the pool's but for the placeholder, from a strategy that adopts it."""
    settings = _vault_settings()
    pooled = pool_environment(VAULT_TARGET, settings)
    assert pooled.placeholder is not None and pooled.env["ANTHROPIC_API_KEY"] == pooled.placeholder
    entry = _vault_entry(pooled.env)
    base_url = proxy_url("http://proxy.test:8089", llm_base_url)
    grant = token_grant(Strategy(strategy), LLMProvider.anthropic, SecretStr("swph-session"), base_url=base_url)
    assert _binds_as_is(grant, user_env, cwd, entry) is as_is


def _binds_as_is(grant: CredentialGrant, user_env: dict[str, str], cwd: str, entry: PoolEntry) -> bool:
    """Whether a Claude Code session in ``cwd`` with ``grant`` and ``user_env`` uses ``entry``'s daemon as it is."""
    request = SessionRequest.model_validate(
        {"tenant_id": "acme", "agent": "claude", "provider": "docker", "session": {"cwd": cwd}}
    )
    setup = agent_setup(
        Agent.claude,
        LLMProvider.anthropic,
        dict(grant.plain_env),
        permissions=request.session.permissions,
        llm_retries=get_settings().llm_retries,
    )
    session_env = SessionEnvironment(daemon_env=daemon_environment(grant, setup, user_env))
    return binds_as_is(request, setup, grant, session_env, entry)


def test_a_pool_target_binds_only_the_vault_strategy() -> None:
    with pytest.raises(ValidationError, match="only the vault strategy"):
        PoolTarget.model_validate({"provider": "docker", "agent": "claude", "size": 1, "strategy": "byok"})


RELAY_TARGET = PoolTarget.model_validate({"provider": "docker", "agent": "claude", "size": 1, "binding": "llm-relay"})


def _relay_entry() -> PoolEntry:
    pooled = pool_environment(RELAY_TARGET, get_settings())
    return _entry(RELAY_TARGET, pooled.env, server_id="sw-pool-e1", binding="llm-relay")


def test_an_llm_relay_pool_starts_claude_with_its_switches_pointed_at_the_relay_with_nobodys_key() -> None:
    settings = get_settings()
    pooled = pool_environment(RELAY_TARGET, settings)
    assert pooled.placeholder is None and all(isinstance(value, str) for value in pooled.env.values())
    assert pooled.env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert {name: pooled.env[name] for name in set(pooled.env) & CREDENTIAL_VARIABLES} == {
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{settings.daemon_port + 2}",
        "ANTHROPIC_API_KEY": RELAY_KEY,
    }
    assert "ANTHROPIC_AUTH_TOKEN" not in pooled.env and pooled.mode == "bypassPermissions"
    assert pool_name(RELAY_TARGET) != pool_name(RELAY_TARGET.model_copy(update={"binding": None}))


@pytest.mark.parametrize(
    "target",
    [
        {"agent": "mock", "binding": "llm-relay"},
        {"agent": "claude", "binding": "llm-relay", "strategy": "vault"},
        {"agent": "claude", "binding": "restart"},
    ],
)
def test_an_llm_relay_binding_is_claude_codes_without_a_strategy(target: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        PoolTarget.model_validate({"provider": "docker", "size": 1, **target})


@pytest.mark.parametrize(
    ("auth", "base_url", "header", "value"),
    [
        (KeyAuth.api_key, None, "x-api-key", "sk-tenant"),
        (KeyAuth.bearer, "https://gateway.example/api", "Authorization", "Bearer sk-tenant"),
    ],
)
def test_a_key_or_bearer_grant_becomes_the_headers_claude_code_would_send(
    auth: KeyAuth, base_url: str | None, header: str, value: str
) -> None:
    grant = token_grant(Strategy("shared"), LLMProvider.anthropic, SecretStr("sk-tenant"), auth=auth, base_url=base_url)
    found = relay_binding(grant)
    assert found is not None
    assert found.base_url == (base_url or "https://api.anthropic.com")
    assert {name: secret.get_secret_value() for name, secret in found.headers.items()} == {header: value}
    assert "sk-tenant" not in repr(found)


def test_an_oauth_token_or_a_credentials_file_does_not_bind_through_the_relay() -> None:
    oauth = token_grant(Strategy("subscription"), LLMProvider.anthropic, SecretStr("sk-ant-oat"), auth=KeyAuth.oauth)
    files = CredentialGrant(Strategy("subscription"), files={".claude/x.json": SecretStr("{}")})
    assert relay_binding(oauth) is None and relay_binding(files) is None


@pytest.mark.parametrize(
    ("strategy", "auth", "user_env", "cwd", "as_is"),
    [
        ("shared", KeyAuth.api_key, {}, "/workspace", True),
        ("gateway", KeyAuth.bearer, {}, "/workspace", True),
        ("subscription", KeyAuth.oauth, {}, "/workspace", False),  # an OAuth token stays in env
        ("shared", KeyAuth.api_key, {"TEAM": "blue"}, "/workspace", False),
        ("shared", KeyAuth.api_key, {}, "/tmp", False),
    ],
)
def test_a_session_like_an_llm_relay_pools_but_for_its_key_uses_its_daemon_as_it_is(
    strategy: str, auth: KeyAuth, user_env: dict[str, str], cwd: str, as_is: bool
) -> None:
    grant = token_grant(
        Strategy(strategy), LLMProvider.anthropic, SecretStr("sk-tenant"), auth=auth, base_url="https://llm.example"
    )
    assert _binds_as_is(grant, user_env, cwd, _relay_entry()) is as_is


def test_a_key_session_prefers_the_llm_relay_pool_and_a_vault_session_the_vault_pool(store: Store) -> None:
    plain = RELAY_TARGET.model_copy(update={"binding": None})
    settings = get_settings().model_copy(update={"pool": PoolSettings(targets=[plain, VAULT_TARGET, RELAY_TARGET])})
    pools = Pools(settings, store, lambda _name: FakeProvider(), Limits(store.redis, settings.fleet, 30))
    request = SessionRequest.model_validate({"tenant_id": "acme", "agent": "claude", "provider": "docker"})
    assert pools.target_for(request, Strategy("shared")) == RELAY_TARGET
    assert pools.target_for(request, Strategy("vault")) == VAULT_TARGET


def test_adopting_moves_the_binding_to_the_pooled_placeholder(store: Store) -> None:
    """The session's binding, its expiry and the sandbox's address move to the pool's placeholder; the grant's own dies;
    a request whose binding is gone adopts nothing (the pooled placeholder stays worthless)."""
    placeholders = Placeholders(SecretStore.from_store(store))
    request = SessionRequest.model_validate({"tenant_id": "acme", "agent": "claude", "provider": "docker"})
    own = placeholders.bind(request, "llm", 600)
    pooled = new_placeholder()
    assert placeholders.lookup(pooled.get_secret_value()) is None

    assert placeholders.adopt(request.request_id, pooled, "172.17.0.5")

    binding = placeholders.lookup(pooled.get_secret_value())
    assert binding is not None and (binding.tenant_id, binding.vault, binding.source) == ("acme", "llm", "172.17.0.5")
    assert placeholders.lookup(own.get_secret_value()) is None
    assert 590 < store.redis.ttl(f"sw:egress-request:{request.request_id}") <= 600
    placeholders.release(request.request_id)
    assert placeholders.lookup(pooled.get_secret_value()) is None
    assert not placeholders.adopt(request.request_id, new_placeholder(), None)
