"""Vaults with egress injection: the seed's error cases, placeholders bound and released in Redis, the egress
proxy (credential swap for the vault's host only, SSE unbuffered, echoes masked, dead placeholders and other
hosts refused), and a real Docker sandbox whose agent reaches its LLM through the proxy without ever holding
the real credential."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import httpx
import pytest
import redis as redis_lib
from pydantic import SecretStr

from tests.conftest import VENV_BIN
from tests.standins.credentials import CredentialStack, EgressProxyProcess, bring_up, fail
from tests.standins.llm_upstream import LLMUpstream
from tests.standins.server import ThreadedServer, free_port
from worker.config import Settings
from worker.credentials.settings import EgressSettings
from worker.credentials.vault import (
    CredentialKind,
    Placeholders,
    Vault,
    VaultCredential,
    VaultStore,
    VaultStrategy,
)
from worker.egress_proxy import Masker
from worker.errors import CredentialError, InvalidRequest
from worker.models import SessionRequest, SessionState
from worker.redaction import MASK
from worker.secret_store import SecretStore
from worker.store import Store

# Every test here uses Redis (the store, the secret store, the gateways' mint locks).
pytestmark = pytest.mark.integration

pytest_plugins = ["tests.standins.credential_fixtures"]

REAL = "sk-ant-real-" + "x" * 24


def llm_vault(
    name: str = "llm", *, engine: str = "claude", url: str = "https://api.anthropic.com", **cred: Any
) -> Vault:
    credential = VaultCredential(name="key", token=SecretStr(cred.pop("token", REAL)), **cred)
    return Vault(name=name, metadata={"role": "llm", "engine": engine, "llm_base_url": url}, credentials=[credential])


def session_request(tenant: str, vaults: list[str], agent: str = "claude") -> SessionRequest:
    return SessionRequest(
        tenant_id=tenant, agent=agent, provider="docker", credentials={"strategy": "vault", "vaults": vaults}
    )


@dataclass
class VaultSetup:
    secrets: SecretStore
    vaults: VaultStore
    strategy: VaultStrategy
    tenant: str


@pytest.fixture
def setup(settings: Settings) -> VaultSetup:
    secrets = SecretStore.from_store(Store.from_settings(settings))
    vaults = VaultStore(secrets)
    egress = EgressSettings(public_url="http://proxy.test:8089", placeholder_grace_seconds=60)
    return VaultSetup(
        secrets, vaults, VaultStrategy(vaults, Placeholders(secrets), egress), f"t-{uuid.uuid4().hex[:8]}"
    )


# -- vault management -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"role": "llm", "engine": "gpt"}, "metadata.engine"),
        ({"role": "llm"}, "metadata.engine"),
        ({"role": "llm", "engine": "claude", "llm_base_url": "ftp://x"}, "metadata.llm_base_url"),
    ],
)
def test_vault_metadata_is_checked_at_creation(metadata: dict[str, str], field: str) -> None:
    """Malformed reserved metadata is refused when the vault is made, naming the key."""
    with pytest.raises(InvalidRequest) as refused:
        Vault(name="v", metadata=metadata, credentials=[])
    assert refused.value.field == field


def test_vaults_are_sealed_and_listed_masked(setup: VaultSetup, redis_client: redis_lib.Redis) -> None:
    """A vault is stored encrypted; listing and dumping it mask the token; a second create of the name fails."""
    setup.vaults.create(setup.tenant, llm_vault())
    raw = redis_client.hget(f"sw:sealed:vault:{setup.tenant}", "llm")
    assert raw and REAL not in raw
    (listed,) = setup.vaults.list(setup.tenant)
    assert REAL not in listed.model_dump_json() and REAL not in repr(listed)
    assert listed.credentials[0].token.get_secret_value() == REAL
    with pytest.raises(InvalidRequest) as duplicate:
        setup.vaults.create(setup.tenant, llm_vault())
    assert duplicate.value.field == "name"
    assert setup.vaults.delete(setup.tenant, "llm") and setup.vaults.list(setup.tenant) == []


# -- the seed's errors ------------------------------------------------------------------------------------
MCP_VAULT = Vault(
    name="github",
    metadata={"role": "mcp"},
    credentials=[VaultCredential(name="gh", token=SecretStr("ghp-" + "y" * 20), mcp_server_url="https://mcp.example")],
)


@pytest.mark.parametrize(
    ("vaults", "attach", "agent", "message"),
    [
        ([], [], "claude", "no LLM vault attached"),
        ([MCP_VAULT], ["github"], "claude", "no LLM vault attached (none of github has role=llm)"),
        ([], ["nope"], "claude", "has no vault named nope"),
        ([llm_vault("a"), llm_vault("b")], ["a", "b"], "claude", "several LLM vaults attached (a, b)"),
        ([llm_vault(engine="codex", url="https://api.openai.com/v1")], ["llm"], "claude", "engine mismatch"),
        ([llm_vault()], ["llm"], "codex", "engine mismatch"),
        ([llm_vault(mcp_server_url="https://mcp.example")], ["llm"], "claude", "carries an mcp_server_url"),
        ([llm_vault(kind=CredentialKind.oauth2)], ["llm"], "claude", "needs a static bearer token"),
        ([llm_vault(active=False)], ["llm"], "claude", "has no active credential"),
        ([llm_vault(url="https://api.openai.com/v1")], ["llm"], "claude", "OpenAI-compatible endpoint"),
        ([llm_vault(url="https://openrouter.ai/api/v1")], ["llm"], "claude", "OpenAI-compatible endpoint"),
        ([llm_vault(url="http://llm.internal")], ["llm"], "claude", "plain http llm_base_url"),
    ],
    ids=[
        "none-attached", "only-mcp", "unknown", "several", "codex-vault-claude-agent", "claude-vault-codex-agent",
        "mcp-credential", "not-static-bearer", "no-active", "openai-endpoint", "openai-compatible-gateway", "http",
    ],
)  # fmt: skip
def test_seed_errors_are_clear(
    setup: VaultSetup, vaults: list[Vault], attach: list[str], agent: str, message: str
) -> None:
    """Each of the seed's vault errors is a CredentialError on credentials.vaults that says what is wrong."""
    for vault in vaults:
        setup.vaults.create(setup.tenant, vault)
    with pytest.raises(CredentialError) as refused:
        setup.strategy.grant(session_request(setup.tenant, attach, agent))
    assert refused.value.field == "credentials.vaults"
    assert message in refused.value.message
    assert REAL not in refused.value.message


def test_placeholder_is_bound_at_grant_and_dies_at_release(setup: VaultSetup, redis_client: redis_lib.Redis) -> None:
    """The grant (with an MCP vault riding along) gives a random placeholder and the proxy URL for the vault's
    host, Redis keeps only its digest with the session's ttl, and release kills it."""
    setup.vaults.create(setup.tenant, llm_vault())
    setup.vaults.create(setup.tenant, MCP_VAULT)
    request = session_request(setup.tenant, ["github", "llm"])

    grant = setup.strategy.grant(request)
    placeholder = grant.env["ANTHROPIC_API_KEY"].get_secret_value()

    assert placeholder.startswith("swph-") and len(placeholder) > 40
    assert grant.env["CLAUDE_API_KEY"].get_secret_value() == placeholder
    assert grant.plain_env == {"ANTHROPIC_BASE_URL": "http://proxy.test:8089/api.anthropic.com"}
    assert REAL not in repr(grant) and REAL not in grant.secret_values()
    binding = setup.strategy.placeholders.lookup(placeholder)
    assert binding is not None and (binding.request_id, binding.vault) == (request.request_id, "llm")
    stored = [f"{key}={redis_client.get(key)}" for key in redis_client.scan_iter("sw:egress*")]
    assert stored and all(placeholder not in item for item in stored)
    assert 3600 < redis_client.ttl(f"sw:egress-request:{request.request_id}") <= 3660
    again = setup.strategy.grant(request).env["ANTHROPIC_API_KEY"].get_secret_value()
    assert setup.strategy.placeholders.lookup(placeholder) is None  # a retried grant replaces it
    setup.strategy.release(request)
    assert setup.strategy.placeholders.lookup(again) is None
    setup.strategy.release(request)  # idempotent


# -- the proxy, in process ----------------------------------------------------------------------------------
def test_masker_masks_across_chunks_and_holds_back_only_a_prefix() -> None:
    """A secret split across chunks is masked; only a tail that could start the secret is held back."""
    masker = Masker("SECRET-123")
    assert masker.feed(b"data: a\n\n") == b"data: a\n\n"
    assert masker.feed(b"xx SECR") == b"xx "
    assert masker.feed(b"ET-123 yy") == MASK.encode() + b" yy"
    assert masker.feed(b"SEC") == b""
    assert masker.flush() == b"SEC"


@dataclass
class Proxy:
    url: str
    upstream: LLMUpstream
    upstream_host: str
    placeholder: str
    request: SessionRequest
    setup: VaultSetup

    def post(self, path: str, *, host: str | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/{host or self.upstream_host}{path}", timeout=10, **kwargs)

    def raw(self, method: str, path: str) -> tuple[int, str]:
        """``method path`` sent exactly as written (httpx would resolve dot segments), with the placeholder."""
        connection = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=10)
        try:
            body = b"{}" if method in ("POST", "PUT", "PATCH") else None
            connection.request(
                method, f"/{self.upstream_host}{path}", body=body, headers={"x-api-key": self.placeholder}
            )
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def proxy_process(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EgressProxyProcess]:
    """The real ``sandbox-worker egress-proxy`` process on loopback, for the upstreams below (plain http allowed)."""
    env = {
        **base_env,
        "SANDBOX_WORKER_CREDENTIALS__EGRESS__ALLOW_HTTP_UPSTREAMS": "true",
        "SANDBOX_WORKER_METRICS_PORT": str(free_port()),
        "SANDBOX_WORKER_METRICS_HOST": "127.0.0.1",
    }
    process = EgressProxyProcess(env, "127.0.0.1", tmp_path_factory.mktemp("proxy") / "proxy.log").start()
    yield process
    process.stop()


def _proxy(setup: VaultSetup, proxy_process: EgressProxyProcess, engine: str, base_path: str) -> Iterator[Proxy]:
    """A recording loopback upstream behind the proxy process, a vault of ``engine`` pointing at it, and a live
    placeholder for it."""
    upstream = LLMUpstream(accepted={REAL})
    with ThreadedServer(upstream.app()) as upstream_server:
        setup.vaults.create(setup.tenant, llm_vault(engine, engine=engine, url=upstream_server.url + base_path))
        request = session_request(setup.tenant, [engine], agent=engine)
        grant = setup.strategy.grant(request)
        placeholder = next(iter(grant.env.values())).get_secret_value()
        host = upstream_server.url.removeprefix("http://")
        yield Proxy(proxy_process.url, upstream, host, placeholder, request, setup)


@pytest.fixture
def proxy(setup: VaultSetup, proxy_process: EgressProxyProcess) -> Iterator[Proxy]:
    """A claude vault's placeholder (Anthropic API at the upstream's root) through the real proxy process."""
    setup.strategy.egress = setup.strategy.egress.model_copy(update={"allow_http_upstreams": True})
    yield from _proxy(setup, proxy_process, "claude", "")


@pytest.fixture
def codex_proxy(setup: VaultSetup, proxy_process: EgressProxyProcess) -> Iterator[Proxy]:
    """A codex vault's placeholder (an OpenAI-compatible API under /api/v1, as OpenRouter serves it)."""
    setup.strategy.egress = setup.strategy.egress.model_copy(update={"allow_http_upstreams": True})
    yield from _proxy(setup, proxy_process, "codex", "/api/v1")


def test_proxy_swaps_in_the_real_credential(proxy: Proxy) -> None:
    """x-api-key and bearer placeholders both reach the upstream as the real credential, query intact."""
    by_key = proxy.post("/v1/messages?beta=true", headers={"x-api-key": proxy.placeholder}, json={"m": 1})
    by_bearer = proxy.post("/v1/messages", headers={"Authorization": f"Bearer {proxy.placeholder}"}, json={})
    assert (by_key.status_code, by_bearer.status_code) == (200, 200)
    assert [(c.credential, c.scheme) for c in proxy.upstream.calls] == [(REAL, "x-api-key"), (REAL, "bearer")]
    assert (proxy.upstream.calls[0].body, proxy.upstream.calls[0].query) == ({"m": 1}, "beta=true")
    assert "pong" in by_key.text


def test_proxy_streams_sse_unbuffered(proxy: Proxy) -> None:
    """SSE events come through as the upstream sends them, not when its stream ends."""
    started = time.monotonic()
    arrivals = []
    with httpx.stream(
        "POST",
        f"{proxy.url}/{proxy.upstream_host}/v1/messages?stream=3&pause=0.6",
        headers={"x-api-key": proxy.placeholder},
        json={},
        timeout=10,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                arrivals.append((line, time.monotonic() - started))
    assert [name for name, _ in arrivals] == ["event: delta"] * 3 + ["event: done"]
    assert arrivals[0][1] < 0.5  # the first event arrived well before the 1.8 s stream ended
    assert arrivals[-1][1] > 1.5


def test_proxy_masks_an_upstream_echo_of_the_credential(proxy: Proxy) -> None:
    """An upstream that echoes the credential back has it masked in body and headers."""
    response = proxy.post("/v1/messages?echo=1", headers={"x-api-key": proxy.placeholder}, json={})
    assert response.json() == {"you_sent": MASK}
    assert response.headers["x-echo"] == MASK


def test_proxy_refuses_other_hosts_dead_and_missing_placeholders(proxy: Proxy) -> None:
    """Another host, no placeholder, an unknown one, a released one and a deleted vault are all refused,
    and the upstream never sees a request."""
    headers = {"x-api-key": proxy.placeholder}
    other = proxy.post("/v1/messages", host="api.openai.com", headers=headers, json={})
    other_port = proxy.post("/v1/messages", host=proxy.upstream_host.replace(":", ":1"), headers=headers, json={})
    missing = proxy.post("/v1/messages", json={})
    unknown = proxy.post("/v1/messages", headers={"x-api-key": "swph-" + "z" * 43}, json={})
    assert (other.status_code, other_port.status_code, missing.status_code, unknown.status_code) == (403, 403, 401, 403)
    assert "valid for" in other.json()["error"]["message"]
    proxy.setup.vaults.delete(proxy.setup.tenant, "claude")
    assert proxy.post("/v1/messages", headers=headers, json={}).status_code == 403
    proxy.setup.vaults.create(proxy.setup.tenant, llm_vault("claude", url=f"http://{proxy.upstream_host}"))
    assert proxy.post("/v1/messages", headers=headers, json={}).status_code == 200
    proxy.setup.strategy.placeholders.release(proxy.request.request_id)
    assert proxy.post("/v1/messages", headers=headers, json={}).status_code == 403
    assert len(proxy.upstream.calls) == 1


NOT_MODEL_API = [
    ("GET", "/v1/messages"),
    ("GET", "/v1/models"),
    ("DELETE", "/v1/messages"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/file_1/content"),
    ("POST", "/v1/messages/batches"),
    ("GET", "/v1/organizations/api_keys"),
    ("POST", "/v1/organizations/invites"),
    ("POST", "/v1/messages/../files"),
    ("POST", "/v1/messages/%2e%2e/files"),
    ("POST", "/v1/messages%2F..%2Ffiles"),
    ("POST", "/v1/%6Dessages"),
    ("POST", "/v1//messages"),
    ("POST", "/v1/messages/"),
    ("POST", "/./v1/messages"),
    ("POST", "/v1/messages;/files"),
    ("POST", "/v1/files?to=/v1/messages"),
    ("POST", "/v1/messages%3F/../../v1/files"),
    ("POST", "/v1/responses"),  # another engine's route
]


def _egress_requests(proxy_process: EgressProxyProcess, outcome: str, status: str) -> float:
    port = proxy_process.env["SANDBOX_WORKER_METRICS_PORT"]
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    line = f'sandbox_worker_egress_requests_total{{outcome="{outcome}",status="{status}"}} '
    return next((float(row.removeprefix(line)) for row in scraped.splitlines() if row.startswith(line)), 0.0)


def test_the_proxy_counts_its_requests_on_its_own_endpoint(proxy: Proxy, proxy_process: EgressProxyProcess) -> None:
    """The proxy process serves its metrics on a port of its own: a forwarded request and a refused one each add one
    to their outcome."""
    before = (_egress_requests(proxy_process, "forwarded", "200"), _egress_requests(proxy_process, "refused", "401"))
    assert proxy.post("/v1/messages", headers={"x-api-key": proxy.placeholder}, json={}).status_code == 200
    assert proxy.post("/v1/messages", json={}).status_code == 401

    after = (_egress_requests(proxy_process, "forwarded", "200"), _egress_requests(proxy_process, "refused", "401"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_proxy_forwards_only_the_model_api(proxy: Proxy, codex_proxy: Proxy) -> None:
    """Each engine's model routes go through; any other method or path (files, batches, admin routes, dot segments,
    encoded traversal, query tricks) is refused with 403 naming what is served, and never reaches the upstream."""
    for method, path in NOT_MODEL_API:
        status, body = proxy.raw(method, path)
        assert status == 403, (method, path, body)
        assert "is not a model API route" in body and "POST /v1/messages" in body, body
    assert proxy.upstream.calls == []
    assert proxy.raw("POST", "/v1/messages/count_tokens")[0] == 404  # reached the upstream (no such stand-in route)
    assert [(c.method, c.path, c.credential) for c in proxy.upstream.calls] == [
        ("POST", "/v1/messages/count_tokens", REAL)
    ]

    for method, path in [("POST", "/api/v1/files"), ("POST", "/v1/chat/completions"), ("POST", "/api/v1/messages")]:
        assert codex_proxy.raw(method, path)[0] == 403, (method, path)
    assert codex_proxy.upstream.calls == []
    for method, path in [
        ("POST", "/api/v1/responses"),
        ("POST", "/api/v1/chat/completions"),
        ("GET", "/api/v1/models"),
    ]:
        codex_proxy.raw(method, path)
    assert [(c.method, c.path) for c in codex_proxy.upstream.calls] == [
        ("POST", "/api/v1/responses"),
        ("POST", "/api/v1/chat/completions"),
        ("GET", "/api/v1/models"),
    ]


# -- end to end ---------------------------------------------------------------------------------------------
def _holds(stream: Iterator[bytes], needle: bytes) -> bool:
    tail = b""
    for chunk in stream:
        if needle in tail + chunk:
            return True
        tail = (tail + chunk)[-len(needle) :]
    return False


def _placeholder(container: Any) -> str:
    """The placeholder in the environment of the sandbox's daemon."""
    environ = container.exec_run(["sh", "-c", "cat /proc/*/environ"]).output
    found = next(part for part in environ.split(b"\0") if part.startswith(b"ANTHROPIC_API_KEY="))
    placeholder = found.split(b"=", 1)[1].decode()
    assert placeholder.startswith("swph-")
    return placeholder


def _post_from_container(client: docker.DockerClient, image: str, url: str, placeholder: str) -> str:
    """POST ``url`` with ``placeholder`` from a fresh container (another sandbox's address): "<status> <body>"."""
    script = (
        "import urllib.error, urllib.request\n"
        f"request = urllib.request.Request({url!r}, data=b'{{}}', headers={{'x-api-key': {placeholder!r}}})\n"
        "try:\n"
        "    response = urllib.request.urlopen(request, timeout=10)\n"
        "    print(response.status, response.read().decode())\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(error.code, error.read().decode())\n"
    )
    output: bytes = client.containers.run(image, entrypoint=["python3", "-c", script], remove=True)
    return output.decode()


@pytest.mark.integration
def test_sandbox_reaches_its_llm_through_the_proxy_without_the_credential(
    credential_stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """The agent's LLM call goes through the egress proxy with its placeholder and the upstream sees the real
    key, while the container's inspect data, process environments, command lines and files hold no trace of it;
    the placeholder is refused for another host, and dead once the session ends."""
    stack = credential_stack
    request = stack.request("claude", {"strategy": "vault", "vaults": ["anthropic"]})
    vault = llm_vault("anthropic", url=stack.urls["vault_api"], token=stack.values["vault"])
    VaultStore(stack.secret_store()).create(request["tenant_id"], vault)
    real = stack.values["vault"].encode()

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    env = session.env_report()
    upstream_host = stack.urls["vault_api"].removeprefix("http://")
    assert env["credential_vars"] == ["ANTHROPIC_API_KEY", "CLAUDE_API_KEY"]
    assert stack.proxy is not None
    assert env["base_urls"] == {"ANTHROPIC_BASE_URL": f"{stack.proxy.url}/{upstream_host}"}
    llm = session.llm("anthropic")
    assert (llm["status"], llm["auth"]) == (200, "x-api-key")
    assert stack.vault_api.calls[-1].credential == stack.values["vault"]

    container = docker_client.containers.get(session.result.sandbox_id)
    environ = container.exec_run(["sh", "-c", "cat /proc/*/environ"]).output
    cmdlines = container.exec_run(["sh", "-c", "cat /proc/*/cmdline"]).output
    placeholder = _placeholder(container)
    assert real not in environ and real not in cmdlines
    assert real not in repr(container.attrs).encode()
    assert not _holds(container.export(chunk_size=1 << 20), real)

    # Bound to its sandbox: the same placeholder, for the same model route, from the host or another container
    # is refused without reaching the upstream.
    calls = len(stack.vault_api.calls)
    model_url = f"{stack.proxy.url}/{upstream_host}/v1/messages"
    from_host = httpx.post(model_url, headers={"x-api-key": placeholder}, json={})
    assert from_host.status_code == 403
    assert "only from the sandbox it was issued to" in from_host.json()["error"]["message"]
    assert _post_from_container(docker_client, stack.image, model_url, placeholder).startswith("403 ")
    other = httpx.post(f"{stack.proxy.url}/api.anthropic.com/v1/messages", headers={"x-api-key": placeholder}, json={})
    assert other.status_code == 403
    assert len(stack.vault_api.calls) == calls
    session_client.terminate(request["request_id"])
    dead = httpx.post(f"{stack.proxy.url}/{upstream_host}/v1/messages", headers={"x-api-key": placeholder}, json={})
    assert dead.status_code == 403
    assert len(stack.vault_api.calls) == calls


@pytest.mark.integration
def test_a_placeholder_dies_with_its_sandbox(
    credential_stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """A ready vault session whose container is removed behind the worker's back: one reaper pass (the real `reap`
    command) ends it failed with sandbox_gone and releases its placeholder, which the proxy then refuses as dead."""
    stack = credential_stack
    assert stack.proxy is not None
    request = stack.request("claude", {"strategy": "vault", "vaults": ["anthropic"]})
    vault = llm_vault("anthropic", url=stack.urls["vault_api"], token=stack.values["vault"])
    VaultStore(stack.secret_store()).create(request["tenant_id"], vault)
    session = bring_up(session_client, request)
    placeholder = _placeholder(docker_client.containers.get(session.result.sandbox_id))
    placeholders = Placeholders(stack.secret_store())
    assert placeholders.lookup(placeholder) is not None

    docker_client.containers.get(session.result.sandbox_id).remove(force=True)
    reap = subprocess.run(
        [str(VENV_BIN / "sandbox-worker"), "reap", "--json"],
        env={**os.environ, **stack.base_env, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    done = {(item["action"], item["request_id"], item["done"]) for item in json.loads(reap.stdout)}
    assert ("end", request["request_id"], True) in done, reap.stdout
    result = session_client.status(request["request_id"])
    assert result.state is SessionState.failed and result.error is not None
    assert result.error.code == "sandbox_gone" and session.result.sandbox_id in result.error.message
    assert placeholders.lookup(placeholder) is None
    upstream_host = stack.urls["vault_api"].removeprefix("http://")
    dead = httpx.post(f"{stack.proxy.url}/{upstream_host}/v1/messages", headers={"x-api-key": placeholder}, json={})
    assert dead.status_code == 403 and "its session has ended" in dead.json()["error"]["message"]


@pytest.mark.integration
def test_vault_session_with_the_wrong_engine_fails_clearly(
    credential_stack: CredentialStack, session_client: Any
) -> None:
    """A claude session attaching a codex LLM vault fails at the credentials stage with the engine mismatch."""
    stack = credential_stack
    request = stack.request("claude", {"strategy": "vault", "vaults": ["openai"]})
    vault = llm_vault("openai", engine="codex", url=f"{stack.urls['vault_api']}/v1", token=stack.values["vault"])
    VaultStore(stack.secret_store()).create(request["tenant_id"], vault)

    error = fail(session_client, request)

    assert (error.code, error.field) == ("credentials", "credentials.vaults")
    assert "engine mismatch" in error.message
