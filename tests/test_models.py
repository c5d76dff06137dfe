"""Unit tests of the request/result models and the published JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.agents import AGENT_VARIABLES
from worker.credentials.agents import CREDENTIAL_VARIABLES
from worker.errors import InvalidRequest
from worker.models import SessionRequest, SessionResult, SessionState, env_denied, parse_request

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "session-request.schema.json"


def test_schema_file_matches_the_model() -> None:
    """docs/session-request.schema.json is exactly what the model generates (`sandbox-worker schema --write`)."""
    assert json.loads(SCHEMA.read_text()) == SessionRequest.model_json_schema()


def test_minimal_request_gets_defaults() -> None:
    """Only tenant, agent and provider are required; request_id is generated and defaults are safe."""
    request = SessionRequest.model_validate({"tenant_id": "acme", "agent": "mock", "provider": "docker"})
    assert len(request.request_id) == 32
    assert request.session.cwd == "/workspace"
    assert request.sandbox.ttl_seconds == 3600


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"tenant_id": "acme", "agent": "mock"}, "provider"),
        ({"tenant_id": "a b", "agent": "mock", "provider": "docker"}, "tenant_id"),
        ({"tenant_id": "acme", "agent": "mock", "provider": "docker", "request_id": "x/y"}, "request_id"),
        ({"tenant_id": "acme", "agent": "mock", "provider": "docker", "session": {"cwd": "relative"}}, "session.cwd"),
        (
            {"tenant_id": "acme", "agent": "mock", "provider": "docker", "sandbox": {"memory_mb": 1}},
            "sandbox.memory_mb",
        ),
        (
            {"tenant_id": "acme", "agent": "mock", "provider": "docker", "sandbox": {"env": {"1BAD": "x"}}},
            "sandbox.env.1BAD",
        ),
        ("not an object", "request"),
    ],
)
def test_invalid_requests_name_their_field(payload: object, field: str) -> None:
    """parse_request turns the first validation problem into InvalidRequest naming the field."""
    with pytest.raises(InvalidRequest) as caught:
        parse_request(payload)
    assert caught.value.field.startswith(field)
    assert caught.value.code == "invalid_request"


def test_terminal_states() -> None:
    """ready, failed and terminated are terminal; queued and starting are not."""
    assert {s for s in SessionState if s.terminal} == {SessionState.ready, SessionState.failed, SessionState.terminated}


def test_result_round_trips_as_json() -> None:
    """A result survives the JSON serializer Celery uses."""
    result = SessionResult(request_id="r1", state=SessionState.ready, timings_ms={"sandbox": 1.5})
    assert SessionResult.model_validate(json.loads(result.model_dump_json())) == result


def test_configuration_reference_matches_the_settings() -> None:
    """docs/configuration.md is exactly what the settings generate (`sandbox-worker settings --write`)."""
    from worker.config import settings_reference

    assert (SCHEMA.parent / "configuration.md").read_text() == settings_reference()


DENIED_ENV = [
    *("LD_PRELOAD", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "NODE_OPTIONS", "NODE_PATH", "NODE_EXTRA_CA_CERTS"),
    *("PYTHONPATH", "PYTHONSTARTUP", "PERL5OPT", "RUBYOPT", "BASH_ENV", "ENV", "SHELLOPTS", "PROMPT_COMMAND"),
    *("PATH", "HOME", "SHELL", "IFS", "XDG_CONFIG_HOME"),
    *("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"),
    *("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_NO_VERIFY", "SSLKEYLOGFILE"),
    *("CLAUDE_CONFIG_DIR", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "ANTHROPIC_BASE_URL"),
    *("ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "CODEX_HOME", "OPENCODE_CONFIG", "AWS_REGION", "GOOGLE_CLOUD_PROJECT"),
    *("VERTEXAI_PROJECT", "AZURE_OPENAI_ENDPOINT", "SANDBOX_AGENT_TOKEN", "SANDBOX_WORKER_FERNET_KEY"),
    *("GIT_SSH_COMMAND", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_PARAMETERS"),
]


@pytest.mark.parametrize("name", DENIED_ENV)
def test_user_env_refuses_loader_proxy_ca_and_agent_variables(name: str) -> None:
    """A variable that could change what runs, where traffic goes, what is trusted or how the agent finds its
    credentials is refused, naming the variable and why."""
    payload = {"tenant_id": "acme", "agent": "mock", "provider": "docker", "sandbox": {"env": {name: "x"}}}
    with pytest.raises(InvalidRequest) as caught:
        parse_request(payload)
    assert caught.value.field == f"sandbox.env.{name}"
    assert f"{name} may not be set: " in caught.value.message
    reason = env_denied(name)
    assert reason is not None and reason in caught.value.message


def test_every_variable_the_worker_sets_is_denied_to_requests() -> None:
    """One rule, one list: the credentials' and the agents' variables, and the daemon's own, are all in ENV_DENIED, so
    a request can never shadow one of them (in the sandbox's environment either)."""
    ours = CREDENTIAL_VARIABLES | AGENT_VARIABLES | {"SANDBOX_AGENT_LOG_STDOUT", "SANDBOX_AGENT_REQUIRE_PREINSTALL"}
    assert [name for name in sorted(ours) if env_denied(name) is None] == []


@pytest.mark.parametrize("name", ["SW_TEST_COLOUR", "NODE_ENV", "GREETING", "APP_TOKEN", "LANG", "TZ", "CI"])
def test_user_env_accepts_ordinary_variables(name: str) -> None:
    payload = {"tenant_id": "acme", "agent": "mock", "provider": "docker", "sandbox": {"env": {name: "x"}}}
    assert parse_request(payload).sandbox.env == {name: "x"}
