"""Bring your own key, shared org key, personal subscription and tenant defaults, end to end: a request on
the queue, a real Celery worker, a real Docker sandbox, the real daemon and the stand-in agent, which must
find its credential where it looks for it (the daemon's ``credentialsAvailable``, the agent's ``/env`` and a
real call to its LLM base URL with its key)."""

from __future__ import annotations

import json
from typing import Any

import docker
import pytest
from pydantic import SecretStr

from tests.standins.credentials import SUBSCRIPTION_TENANT, CredentialStack, bring_up, fail
from worker.models import CredentialsSpec, Strategy

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.standins.credential_fixtures"]


def test_byok_key_reaches_the_agent(credential_stack: CredentialStack, session_client: Any) -> None:
    """A claude session with the tenant's own key: the daemon sees it, the agent names it and uses it."""
    stack = credential_stack
    request = stack.request("claude", {"strategy": "byok", "secret_ref": "anthropic"})
    stack.secret_store().put(request["tenant_id"], "anthropic", SecretStr(stack.values["byok"]))

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    env = session.env_report()
    assert env["credential_vars"] == ["ANTHROPIC_API_KEY", "CLAUDE_API_KEY"]
    assert env["base_urls"] == {"ANTHROPIC_BASE_URL": stack.urls["provider_api"]}
    llm = session.llm("anthropic")
    assert (llm["status"], llm["auth"]) == (200, "x-api-key")
    assert stack.provider_api.calls[-1].credential == stack.values["byok"]
    session_client.terminate(request["request_id"])


def test_byok_without_the_secret_fails_clearly(credential_stack: CredentialStack, session_client: Any) -> None:
    """A byok request naming a secret the tenant does not have fails at the credentials stage, naming the field."""
    error = fail(session_client, credential_stack.request("claude", {"strategy": "byok", "secret_ref": "missing"}))
    assert (error.code, error.field) == ("credentials", "credentials.secret_ref")
    assert "missing" in error.message


def test_shared_key_for_an_allowed_tenant(credential_stack: CredentialStack, session_client: Any) -> None:
    """An internal tenant's codex session gets the shared OpenAI key, seen by the daemon and used by the agent."""
    stack = credential_stack
    request = stack.request("codex", {"strategy": "shared"}, tenant="internal-tools")

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    assert session.env_report()["credential_vars"] == ["CODEX_API_KEY", "OPENAI_API_KEY"]
    llm = session.llm("openai")
    assert (llm["status"], llm["auth"]) == (200, "bearer")
    assert stack.provider_api.calls[-1].credential == stack.values["shared_openai"]
    session_client.terminate(request["request_id"])


@pytest.mark.parametrize(
    ("strategy", "what"),
    [("shared", "the shared org key"), ("subscription", "the worker host's subscription")],
)
def test_operator_credentials_refused_for_unlisted_tenants(
    credential_stack: CredentialStack, session_client: Any, strategy: str, what: str
) -> None:
    """A tenant not listed in the settings cannot use the org key or the host owner's login: a clear credentials
    error naming the tenant and the setting, no sandbox."""
    request = credential_stack.request("claude", {"strategy": strategy}, tenant="customer-1")
    error = fail(session_client, request)
    assert (error.code, error.field) == ("credentials", "credentials.strategy")
    assert f"customer-1 may not use {what} (only the tenants in credentials.{strategy}.tenants may)" in error.message
    assert session_client.status(request["request_id"]).sandbox_id is None


def test_subscription_oauth_goes_as_an_oauth_token(credential_stack: CredentialStack, session_client: Any) -> None:
    """The host's Claude login reaches the agent as CLAUDE_CODE_OAUTH_TOKEN, never as an API key, and works."""
    stack = credential_stack
    request = stack.request("claude", {"strategy": "subscription"}, tenant=SUBSCRIPTION_TENANT)

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    env = session.env_report()
    assert env["credential_vars"] == ["CLAUDE_CODE_OAUTH_TOKEN"]
    llm = session.llm("anthropic")
    assert (llm["status"], llm["auth"]) == (200, "bearer")
    assert stack.provider_api.calls[-1].credential == stack.values["claude_access"]
    session_client.terminate(request["request_id"])


def test_subscription_chatgpt_login_goes_as_the_agents_file(
    credential_stack: CredentialStack, session_client: Any, docker_client: docker.DockerClient
) -> None:
    """The host's Codex login reaches the sandbox as ~/.codex/auth.json, mode 0600, without its refresh token."""
    stack = credential_stack
    request = stack.request("codex", {"strategy": "subscription"}, tenant=SUBSCRIPTION_TENANT)

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    env = session.env_report()
    assert env["credential_vars"] == []
    assert env["config_files"] == ["~/.codex/auth.json"]
    container = docker_client.containers.get(session.result.sandbox_id)
    mode = container.exec_run(["stat", "-c", "%a", "/root/.codex/auth.json"]).output.decode().strip()
    written = json.loads(container.exec_run(["cat", "/root/.codex/auth.json"]).output)
    assert mode == "600"
    assert written["tokens"]["access_token"] == stack.values["codex_access"]
    assert "refresh_token" not in written["tokens"]
    assert stack.values["codex_refresh"] not in json.dumps(written)
    session_client.terminate(request["request_id"])


def test_tenant_default_serves_a_bare_request(credential_stack: CredentialStack, session_client: Any) -> None:
    """A request with only its tenant gets the tenant's default strategy and references (here byok)."""
    stack = credential_stack
    request = stack.request("claude", {})
    tenant = request["tenant_id"]
    store = stack.secret_store()
    store.put(tenant, "team-key", SecretStr(stack.values["byok"]))
    store.set_default(tenant, CredentialsSpec(strategy=Strategy.byok, secret_ref="team-key"))

    session = bring_up(session_client, request)

    assert session.agent_entry()["credentialsAvailable"] is True
    assert session.env_report()["credential_vars"] == ["ANTHROPIC_API_KEY", "CLAUDE_API_KEY"]
    session_client.terminate(request["request_id"])


def test_no_strategy_means_no_credential(credential_stack: CredentialStack, session_client: Any) -> None:
    """Strategy none gives the agent nothing: the daemon reports no credentials for claude (the control case)."""
    session = bring_up(session_client, credential_stack.request("claude", {"strategy": "none"}))

    assert session.agent_entry()["credentialsAvailable"] is False
    assert session.env_report()["credential_vars"] == []
    session_client.terminate(session.result.request_id)


def test_a_request_without_strategy_or_default_is_refused(
    credential_stack: CredentialStack, session_client: Any
) -> None:
    """A claude request naming no strategy, for a tenant without a default, fails naming credentials.strategy."""
    error = fail(session_client, credential_stack.request("claude", {}))
    assert (error.code, error.field) == ("credentials", "credentials.strategy")
