"""The secret store (encrypted at rest in Redis, refused without a key), tenant defaults, the broker's
choice of strategy, and the `secrets`, `tenant` and `vault` commands."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import redis as redis_lib
from cryptography.fernet import Fernet
from pydantic import SecretStr

from tests.conftest import ROOT, VENV_BIN, RedisServer
from tests.standins.gateways import LiteLLMStandIn
from tests.standins.server import ThreadedServer
from worker.config import Settings
from worker.credentials.base import NO_CREDENTIALS, CredentialGrant
from worker.credentials.broker import CredentialBroker, build_broker
from worker.credentials.vault import Vault, VaultCredential, VaultStore
from worker.errors import ConfigurationError, CredentialError, InvalidRequest
from worker.models import CredentialsSpec, LLMProvider, SessionRequest, SessionState, Strategy
from worker.secret_store import SecretStore
from worker.store import Cipher, Rekey, Store

# Every test here uses Redis (the store, the secret store, the gateways' mint locks).
pytestmark = pytest.mark.integration

VALUE = "sk-ant-" + "s" * 30


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(settings: Settings) -> SecretStore:
    return SecretStore.from_store(Store.from_settings(settings))


def test_secrets_round_trip_encrypted(store: SecretStore, redis_client: redis_lib.Redis) -> None:
    """A secret comes back as SecretStr, is ciphertext in Redis, is listed by name only, and can be deleted."""
    name = tenant()
    store.put(name, "anthropic", SecretStr(VALUE))
    store.put(name, "openai.prod", SecretStr("sk-proj-" + "o" * 20))

    assert store.get(name, "anthropic").get_secret_value() == VALUE
    raw = redis_client.hget(f"sw:secrets:{name}", "anthropic")
    assert raw and VALUE not in raw
    assert store.names(name) == ["anthropic", "openai.prod"]
    assert store.delete(name, "anthropic") and not store.delete(name, "anthropic")
    with pytest.raises(CredentialError) as missing:
        store.get(name, "anthropic", field="credentials.secret_ref")
    assert missing.value.field == "credentials.secret_ref"
    assert repr(store) == "SecretStore()"


def test_secrets_refused_without_the_right_key(settings: Settings, store: SecretStore) -> None:
    """Without a Fernet key nothing is stored or read; with another key, stored values cannot be read."""
    name = tenant()
    store.put(name, "k", SecretStr(VALUE))
    keyless = SecretStore(store.redis, Cipher(None))
    with pytest.raises(ConfigurationError, match="SANDBOX_WORKER_FERNET_KEY"):
        keyless.put(name, "other", SecretStr(VALUE))
    with pytest.raises(ConfigurationError, match="SANDBOX_WORKER_FERNET_KEY"):
        keyless.get(name, "k")
    rekeyed = SecretStore(store.redis, Cipher(SecretStr(Fernet.generate_key().decode())))
    with pytest.raises(ConfigurationError, match="cannot be decrypted"):
        rekeyed.get(name, "k")
    assert store.names(name) == ["k"]


@pytest.mark.parametrize(
    ("tenant_id", "name", "value", "field"),
    [
        ("bad tenant", "k", VALUE, "tenant_id"),
        ("acme", "../k", VALUE, "name"),
        ("acme", "k", "  ", "value"),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    store: SecretStore, tenant_id: str, name: str, value: str, field: str
) -> None:
    """Bad tenant ids, secret names and empty values are InvalidRequest naming the field."""
    with pytest.raises(InvalidRequest) as refused:
        store.put(tenant_id, name, SecretStr(value))
    assert refused.value.field == field


def test_tenant_default_and_purge(store: SecretStore, redis_client: redis_lib.Redis) -> None:
    """A tenant default needs a strategy, round-trips, and purge forgets secrets, records and the default."""
    name = tenant()
    with pytest.raises(InvalidRequest):
        store.set_default(name, CredentialsSpec())
    store.set_default(name, CredentialsSpec(strategy=Strategy.byok, secret_ref="k"))
    assert store.default(name) == CredentialsSpec(strategy=Strategy.byok, secret_ref="k")
    store.put(name, "k", SecretStr(VALUE))
    store.seal("vault", name, "v", CredentialsSpec(strategy=Strategy.none))
    store.purge(name)
    assert store.default(name) is None and store.names(name) == [] and store.sealed_names("vault", name) == []
    assert not [k for k in redis_client.scan_iter(f"*{name}*")]


class Recording:
    def __init__(self, name: Strategy) -> None:
        self.name = name
        self.granted: list[SessionRequest] = []
        self.released: list[str] = []

    def grant(self, request: SessionRequest) -> CredentialGrant:
        self.granted.append(request)
        return NO_CREDENTIALS

    def release(self, request: SessionRequest) -> None:
        self.released.append(request.request_id)


def test_broker_fills_in_the_tenant_default_and_releases_everywhere() -> None:
    """A request naming no strategy gets the tenant default, its own settings still win, and release reaches
    every strategy (so a default changed since the grant cannot strand anything)."""
    byok, vault = Recording(Strategy.byok), Recording(Strategy.vault)
    default = CredentialsSpec(strategy=Strategy.byok, secret_ref="team", llm_provider=LLMProvider.anthropic)
    broker = CredentialBroker([byok, vault], tenant_default=lambda t: default if t == "acme" else None)
    request = SessionRequest.model_validate(
        SessionRequest(
            tenant_id="acme", agent="opencode", provider="docker", credentials={"llm_provider": "openai"}
        ).model_dump(mode="json")
    )

    broker.grant(request)
    broker.release(request)

    (granted,) = byok.granted
    assert (granted.credentials.strategy, granted.credentials.secret_ref) == (Strategy.byok, "team")
    assert granted.credentials.llm_provider is LLMProvider.openai
    assert byok.released == vault.released == [request.request_id]
    other = SessionRequest(tenant_id="other", agent="claude", provider="docker")
    with pytest.raises(CredentialError, match="no default for tenant other"):
        broker.grant(other)
    mock = SessionRequest(tenant_id="other", agent="mock", provider="docker")
    assert broker.strategy_for(mock) is Strategy.none
    with pytest.raises(CredentialError, match="gateway is not configured"):
        broker.grant(mock.model_copy(update={"credentials": CredentialsSpec(strategy=Strategy.gateway)}))


def test_build_broker_enables_what_the_settings_configure(settings: Settings) -> None:
    """Only configured strategies are offered: none and byok always, the others when their block is set."""
    assert set(build_broker(settings, Store.from_settings(settings)).strategies) == {Strategy.none, Strategy.byok}
    configured = Settings(
        credentials={
            "shared": {"openai": "sk-proj-x", "tenants": ["internal"]},
            "subscription": {"home": "/nonexistent"},
            "gateway": {"litellm": {"url": "http://127.0.0.1:9/v1", "management_key": "m"}},
            "egress": {"public_url": "http://172.17.0.1:8089"},
        }
    )
    assert set(build_broker(configured, Store.from_settings(configured)).strategies) == set(Strategy)


# -- the CLI ------------------------------------------------------------------------------------------------
def cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    argv = [str(VENV_BIN / "sandbox-worker"), *args]
    return subprocess.run(
        argv, check=False, input=stdin, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_secrets_commands(base_env: dict[str, str], store: SecretStore) -> None:
    """`secrets put` reads the value from stdin, `list` prints names only, `delete` removes; errors are clear."""
    name = tenant()
    put = cli(["secrets", "put", "--tenant", name, "anthropic"], base_env, stdin=VALUE + "\n")
    assert put.returncode == 0, put.stderr
    assert store.get(name, "anthropic").get_secret_value() == VALUE
    listed = cli(["secrets", "list", "--tenant", name], base_env)
    assert listed.stdout.split() == ["anthropic"]
    empty = cli(["secrets", "put", "--tenant", name, "x"], base_env, stdin="\n")
    assert empty.returncode == 2 and "no secret value on stdin" in empty.stderr
    keyless = cli(["secrets", "put", "--tenant", name, "y"], {**base_env, "SANDBOX_WORKER_FERNET_KEY": ""}, stdin=VALUE)
    assert keyless.returncode == 2 and "SANDBOX_WORKER_FERNET_KEY is not set" in keyless.stderr
    assert cli(["secrets", "delete", "--tenant", name, "anthropic"], base_env).returncode == 0
    assert cli(["secrets", "delete", "--tenant", name, "anthropic"], base_env).returncode == 2
    for result in (put, listed, empty, keyless):
        assert VALUE not in result.stdout + result.stderr


def test_tenant_and_vault_commands(base_env: dict[str, str], store: SecretStore) -> None:
    """`tenant set-default|show`, `vault create|list|delete` (token from stdin, listed masked), and `tenant remove`
    revoking the tenant's gateway key and LiteLLM team before forgetting everything."""
    name = tenant()
    token = "sk-ant-vault-" + "v" * 20
    standin = LiteLLMStandIn("mgmt-remove")
    with ThreadedServer(standin.app()) as server:
        env = {
            **base_env,
            "SANDBOX_WORKER_CREDENTIALS__GATEWAY__LITELLM__URL": server.url + "/v1",
            "SANDBOX_WORKER_CREDENTIALS__GATEWAY__LITELLM__MANAGEMENT_KEY": "mgmt-remove",
        }
        default = cli(["tenant", "set-default", name, "--strategy", "vault", "--vault", "llm"], env)
        assert default.returncode == 0, default.stderr
        created = cli(
            ["vault", "create", "llm", "--tenant", name, "--engine", "claude", "--meta", "team=core"], env, stdin=token
        )
        assert created.returncode == 0, created.stderr
        listed = json.loads(cli(["vault", "list", "--tenant", name], env).stdout)
        assert listed[0]["metadata"] == {"team": "core", "role": "llm", "engine": "claude"}
        assert listed[0]["credentials"][0]["token"] == "**********"
        bad = cli(["vault", "create", "x", "--tenant", name, "--engine", "gpt"], env, stdin=token)
        assert bad.returncode == 2 and "metadata.engine" in bad.stderr
        assert cli(["gateway", "rotate", name, "--backend", "litellm"], env).returncode == 0
        shown = json.loads(cli(["tenant", "show", name], env).stdout)
        assert shown == {
            "default": {"strategy": "vault", "vaults": ["llm"]},
            "secrets": [],
            "vaults": ["llm"],
            "gateway_keys": ["litellm"],
            "gateway_keys_pending_revocation": [],
        }
        removed = cli(["tenant", "remove", name], env)
        assert removed.returncode == 0, removed.stderr
    assert standin.minted[0].revoked and all(team["deleted"] for team in standin.teams.values())
    assert store.default(name) is None and store.sealed_names("vault", name) == []
    for result in (created, removed):
        assert token not in result.stdout + result.stderr


def test_rotating_the_fernet_key_loses_no_secret(redis_server: RedisServer, base_env: dict[str, str]) -> None:
    """Secrets, sealed vaults and session records' daemon tokens and headers written under key A: with the setting
    "B,A" they still decrypt, `secrets rekey` re-encrypts all of them with B (again: nothing to do), and then B
    alone opens everything, A nothing; a record's expiry is kept. A value no configured key opens fails the command,
    naming where it is, and a value changed meanwhile is left alone."""
    url = redis_server.url.rsplit("/", 1)[0] + "/7"  # a database of its own: rekey scans every key
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    old, new, other = (Fernet.generate_key().decode() for _ in range(3))

    def stores(key: str) -> tuple[Store, SecretStore, VaultStore]:
        store = Store(client, Cipher(SecretStr(key)))
        secrets = SecretStore.from_store(store)
        return store, secrets, VaultStore(secrets)

    store, secrets, vaults = stores(old)
    name = tenant()
    secrets.put(name, "anthropic", SecretStr(VALUE))
    credential = VaultCredential(name="key", token=SecretStr("sk-ant-vault-" + "v" * 20))
    vaults.create(name, Vault(name="llm", metadata={"role": "llm", "engine": "claude"}, credentials=[credential]))
    request = SessionRequest(tenant_id=name, agent="mock", provider="docker")
    record = store.create(request)
    record.daemon_token = store.cipher.encrypt(SecretStr("daemon-token-" + "d" * 20))
    record.daemon_headers = store.seal_headers({"X-Edge-Token": "edge-" + "e" * 20})
    record.result.state = SessionState.failed
    store.put(record)
    env = {**base_env, "SANDBOX_WORKER_REDIS_URL": url, "SANDBOX_WORKER_FERNET_KEY": f"{new},{old}"}

    assert stores(f"{new},{old}")[1].get(name, "anthropic").get_secret_value() == VALUE
    first = cli(["secrets", "rekey", "--json"], env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"rotated": 4, "current": 0, "raced": 0, "unreadable": []}
    again = cli(["secrets", "rekey", "--json"], env)
    assert json.loads(again.stdout) == {"rotated": 0, "current": 4, "raced": 0, "unreadable": []}

    store, secrets, vaults = stores(new)
    assert secrets.get(name, "anthropic").get_secret_value() == VALUE
    vault = vaults.get(name, "llm")
    assert vault is not None and vault.credentials[0].token.get_secret_value() == credential.token.get_secret_value()
    kept = store.get(request.request_id)
    assert kept is not None
    assert store.token_of(kept) == SecretStr("daemon-token-" + "d" * 20)
    assert store.headers_of(kept)["X-Edge-Token"].get_secret_value() == "edge-" + "e" * 20
    assert 0 < client.ttl(f"sw:session:{request.request_id}") <= store.retention_seconds
    with pytest.raises(ConfigurationError):
        stores(old)[1].get(name, "anthropic")

    stores(other)[1].put(name, "stray", SecretStr(VALUE))
    stray = cli(["secrets", "rekey"], env)
    assert stray.returncode == 1
    assert f"no configured Fernet key decrypts sw:secrets:{name} stray (field fernet_key)" in stray.stderr
    rekey = Rekey(client, Cipher(SecretStr(new)))
    rekey.set_if_unchanged(f"sw:session:{request.request_id}", "what it was before a worker wrote", "{}")
    assert rekey.raced == 1 and store.get(request.request_id) is not None
    client.flushdb()
