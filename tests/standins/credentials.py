"""Test support for the credential strategies (its fixtures: :mod:`tests.standins.credential_fixtures`).

A :class:`CredentialStack` brings up, once per test module, everything every strategy needs and one
real Celery worker configured for all of them:

* stand-in OpenRouter, LiteLLM and Portkey gateways and a stand-in provider API, listening on the Docker
  bridge gateway address so sandboxes reach them (never 0.0.0.0);
* a stand-in upstream for the vault's LLM on loopback: only the egress proxy reaches it;
* the real egress proxy (``sandbox-worker egress-proxy``) as a process on the bridge address;
* a fake worker-host HOME with a Claude OAuth login and a Codex ChatGPT login (refresh tokens included);
* an image in which the ``claude`` and ``codex`` agents are the stand-in ACP agent, so sessions run the
  real agent ids (the daemon's ``credentialsAvailable`` for them is meaningful).

Every secret is random per stack and listed in ``stack.secret_values()`` for the leak search.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import secrets
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from providers.base import Endpoint
from tests.conftest import ROOT, VENV_BIN, WorkerProcess, wait_for
from tests.standins.gateways import GatewayStandIn, LiteLLMStandIn, OpenRouterStandIn, PortkeyStandIn
from tests.standins.llm_upstream import LLMUpstream
from tests.standins.server import ThreadedServer, free_port
from worker import pins
from worker.acp import AcpConnection
from worker.daemon import DaemonClient, mock_agent_script
from worker.models import SessionState
from worker.secret_store import SecretStore
from worker.store import Store

AGENT_DATA = "/root/.local/share/sandbox-agent/bin"
# The tenants the stack's worker lists for the strategies that hand out the operator's own credential.
SHARED_TENANT = "internal-tools"
SUBSCRIPTION_TENANT = "host-owner"
STUB_AGENTS = ("claude", "codex")


def bridge_address(client: docker.DockerClient) -> str:
    """The host's address on Docker's default bridge: sandboxes reach host servers listening there."""
    for config in client.networks.get("bridge").attrs["IPAM"]["Config"]:
        if config.get("Gateway"):
            return str(config["Gateway"])
        if config.get("Subnet"):
            return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
    raise AssertionError("the Docker bridge network has no subnet")


class BridgeServer(ThreadedServer):
    """A ThreadedServer listening on ``host`` (the bridge address) instead of loopback."""

    def __init__(self, app: Any, host: str) -> None:
        super().__init__(app)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"standin-{host}-{self.port}", daemon=True)
        self.url = f"http://{host}:{self.port}"


def build_agent_image(client: docker.DockerClient, tag: str) -> str:
    """The sandbox image with ``claude`` and ``codex`` installed as the stand-in ACP agent (stub CLIs)."""
    files: dict[str, tuple[bytes, int]] = {"mock-acp": (mock_agent_script(), 0o755)}
    lines = [f"FROM {pins.SANDBOX_IMAGE}"]
    for agent in STUB_AGENTS:
        # The stub CLI reports the pinned version: the daemon stage checks it.
        files[f"stub-{agent}"] = (f"#!/bin/sh\necho '{pins.AGENT_VERSIONS[agent]}'\n".encode(), 0o755)
        lines += [
            f"COPY mock-acp {AGENT_DATA}/agent_processes/{agent}-acp",
            f"COPY stub-{agent} {AGENT_DATA}/{agent}",
        ]
    files["Dockerfile"] = ("\n".join(lines).encode() + b"\n", 0o644)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    return tag


def fake_jwt(expires_at: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': int(expires_at), 'sub': 'user-standin'})}.{secrets.token_hex(16)}"


def write_subscription_home(home: Path, values: dict[str, str]) -> None:
    """A worker-host HOME logged in to Claude (OAuth) and Codex (ChatGPT), as the agent CLIs leave it."""
    claude = home / ".claude" / ".credentials.json"
    claude.parent.mkdir(parents=True, exist_ok=True)
    claude.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": values["claude_access"],
                    "refreshToken": values["claude_refresh"],
                    "expiresAt": int((time.time() + 3600) * 1000),
                    "scopes": ["user:inference"],
                    "subscriptionType": "max",
                }
            }
        )
    )
    codex = home / ".codex" / "auth.json"
    codex.parent.mkdir(parents=True, exist_ok=True)
    codex.write_text(
        json.dumps(
            {
                "OPENAI_API_KEY": None,
                "tokens": {
                    "id_token": fake_jwt(time.time() + 3600),
                    "access_token": values["codex_access"],
                    "refresh_token": values["codex_refresh"],
                    "account_id": "acct-standin",
                },
                "last_refresh": "2026-11-24T00:00:00Z",
            }
        )
    )


class EgressProxyProcess:
    """The real ``sandbox-worker egress-proxy`` in its own process, its log captured to a file."""

    def __init__(self, env: dict[str, str], host: str, log_path: Path) -> None:
        self.port = free_port()
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> EgressProxyProcess:
        argv = [str(VENV_BIN / "sandbox-worker"), "egress-proxy", "--host", self.host, "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        wait_for(self._healthy, 20, 0.1, "egress proxy")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"egress proxy exited: {self.log()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class CredentialStack:
    """Everything the strategies need, started together; see the module docstring."""

    base_env: dict[str, str]
    workdir: Path
    bridge: str
    image: str
    values: dict[str, str] = field(default_factory=dict)
    gateways: dict[str, GatewayStandIn] = field(default_factory=dict)
    provider_api: LLMUpstream = field(default_factory=LLMUpstream)
    vault_api: LLMUpstream = field(default_factory=LLMUpstream)
    servers: list[ThreadedServer] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    proxy: EgressProxyProcess | None = None
    worker: WorkerProcess | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> CredentialStack:
        token = secrets.token_hex
        self.values = {
            "byok": f"sk-ant-byok-{token(20)}",
            "shared_anthropic": f"sk-ant-shared-{token(20)}",
            "shared_openai": f"sk-proj-shared-{token(20)}",
            "claude_access": f"sk-ant-oat01-{token(20)}",
            "claude_refresh": f"sk-ant-ort01-{token(20)}",
            "codex_access": fake_jwt(time.time() + 3600),
            "codex_refresh": f"rt-{token(20)}",
            "vault": f"sk-ant-vault-{token(20)}",
            **{f"management_{name}": f"mgmt-{name}-{token(20)}" for name in ("openrouter", "litellm", "portkey")},
        }
        self.gateways = {
            "openrouter": OpenRouterStandIn(self.values["management_openrouter"]),
            "litellm": LiteLLMStandIn(self.values["management_litellm"]),
            "portkey": PortkeyStandIn(self.values["management_portkey"]),
        }
        provider_keys = {self.values[k] for k in ("byok", "shared_anthropic", "shared_openai", "claude_access")}
        self.provider_api.accepted = provider_keys
        self.vault_api.accepted = {self.values["vault"]}
        for name, app in [(n, g.app()) for n, g in self.gateways.items()] + [("provider_api", self.provider_api.app())]:
            self.urls[name] = self._serve(BridgeServer(app, self.bridge))
        self.urls["vault_api"] = self._serve(ThreadedServer(self.vault_api.app()))
        home = self.workdir / "host-home"
        write_subscription_home(home, self.values)
        gw = "SANDBOX_WORKER_CREDENTIALS__GATEWAY__"
        proxy_port_env = {"SANDBOX_WORKER_CREDENTIALS__EGRESS__ALLOW_HTTP_UPSTREAMS": "true"}
        self.proxy = EgressProxyProcess({**self.base_env, **proxy_port_env}, self.bridge, self.workdir / "proxy.log")
        self.proxy.start()
        reached = [self.proxy.url, *(self.urls[name] for name in [*self.gateways, "provider_api"])]
        self.env = {
            **proxy_port_env,
            # The sandboxes connect to these host services on the bridge address; every other host port is closed.
            "SANDBOX_WORKER_DOCKER__ALLOWED_HOST_PORTS": json.dumps([urlsplit(url).port for url in reached]),
            "SANDBOX_WORKER_CREDENTIALS__EGRESS__PUBLIC_URL": self.proxy.url,
            "SANDBOX_WORKER_CREDENTIALS__PROVIDER_URLS__ANTHROPIC": self.urls["provider_api"],
            "SANDBOX_WORKER_CREDENTIALS__PROVIDER_URLS__OPENAI": f"{self.urls['provider_api']}/v1",
            "SANDBOX_WORKER_CREDENTIALS__SHARED__ANTHROPIC": self.values["shared_anthropic"],
            "SANDBOX_WORKER_CREDENTIALS__SHARED__OPENAI": self.values["shared_openai"],
            "SANDBOX_WORKER_CREDENTIALS__SHARED__TENANTS": json.dumps([SHARED_TENANT]),
            "SANDBOX_WORKER_CREDENTIALS__SUBSCRIPTION__HOME": str(home),
            "SANDBOX_WORKER_CREDENTIALS__SUBSCRIPTION__TENANTS": json.dumps([SUBSCRIPTION_TENANT]),
            f"{gw}OPENROUTER__URL": f"{self.urls['openrouter']}/api/v1",
            f"{gw}OPENROUTER__MANAGEMENT_KEY": self.values["management_openrouter"],
            f"{gw}OPENROUTER__BUDGET_USD": "12.5",
            f"{gw}LITELLM__URL": f"{self.urls['litellm']}/v1",
            f"{gw}LITELLM__MANAGEMENT_KEY": self.values["management_litellm"],
            f"{gw}LITELLM__BUDGET_PERIOD": "weekly",
            f"{gw}PORTKEY__URL": f"{self.urls['portkey']}/v1",
            f"{gw}PORTKEY__MANAGEMENT_KEY": self.values["management_portkey"],
            f"{gw}PORTKEY__WORKSPACE_ID": "ws-standin",
            f"{gw}DEFAULT": "openrouter",
        }
        self.worker = self.start_worker("worker-0")
        return self

    def _serve(self, server: ThreadedServer) -> str:
        self.servers.append(server)
        return server.start()

    def start_worker(self, name: str, **kwargs: Any) -> WorkerProcess:
        return WorkerProcess({**self.base_env, **self.env}, self.workdir / f"{name}.log", **kwargs).start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.proxy is not None:
            self.proxy.stop()
        for server in self.servers:
            server.stop()

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """This process sees the worker's settings (for the Python and CLI management APIs)."""
        from worker.config import get_settings

        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    def secret_store(self) -> SecretStore:
        """The secret store of this test session's Redis."""
        from worker.config import get_settings

        return SecretStore.from_store(Store.from_settings(get_settings()))

    def secret_values(self) -> dict[str, str]:
        """Every secret the stack made, plus every key the gateways minted: none may show up where it should not."""
        minted = {f"minted_{g}_{i}": m.key for g, s in self.gateways.items() for i, m in enumerate(s.minted)}
        return {**self.values, **minted, "fernet": self.base_env["SANDBOX_WORKER_FERNET_KEY"]}

    def request(
        self, agent: str, credentials: dict[str, Any], *, tenant: str | None = None, prompt: str = "/env"
    ) -> dict[str, Any]:
        return {
            "request_id": f"cred-{uuid.uuid4().hex[:12]}",
            "tenant_id": tenant or f"t-{uuid.uuid4().hex[:8]}",
            "agent": agent,
            "provider": "docker",
            "credentials": credentials,
            "sandbox": {"image": self.image},
            "session": {"prompt": prompt},
        }


@dataclass
class Session:
    """A ready session and what the tests ask it."""

    result: Any
    token: str
    agent: str

    def agent_entry(self) -> dict[str, Any]:
        """This agent's entry in the daemon's own ``GET /v1/agents``."""
        response = httpx.get(
            f"{self.result.daemon_url}/v1/agents", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        response.raise_for_status()
        return next(a for a in response.json()["agents"] if a["id"] == self.agent)

    def ask(self, text: str) -> str:
        """Prompt the agent again, on a fresh ACP server of the same daemon (same environment)."""
        client = DaemonClient(Endpoint(self.result.daemon_url), SecretStr(self.token), timeout=30)
        try:
            with AcpConnection(client, f"probe-{uuid.uuid4().hex[:8]}", self.agent) as acp:
                acp.initialize(timeout=30)
                session_id = acp.new_session("/workspace", timeout=30)
                return acp.prompt(session_id, text, timeout=60).text
        finally:
            client.close()

    def env_report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.result.reply)
        return report

    def llm(self, provider: str) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.ask(f"/llm {provider}"))
        return report


def bring_up(session_client: Any, request: dict[str, Any], timeout: float = 120) -> Session:
    """Submit ``request``, wait until it is ready, and return the session."""
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=timeout)
    assert result.state is SessionState.ready, result.error
    token = session_client.token(request["request_id"])
    assert token is not None
    return Session(result, token.get_secret_value(), request["agent"])


def fail(session_client: Any, request: dict[str, Any], timeout: float = 60) -> Any:
    """Submit ``request`` and return its error, asserting it failed at the credentials stage."""
    session_client.submit(request)
    result = session_client.wait(request["request_id"], timeout=timeout)
    assert result.state is SessionState.failed, result
    assert result.error is not None and result.error.stage == "credentials", result.error
    return result.error
