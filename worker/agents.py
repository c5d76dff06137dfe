"""What each real agent needs from the worker to run headless in a sandbox against the configured LLM endpoint.

The credential strategies put a key (and the endpoint's base URL) where agents of an LLM provider look for it:
``ANTHROPIC_API_KEY`` / ``ANTHROPIC_BASE_URL``, ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``. Not every agent reads
those; this module turns them into what each one does read (verified against the pinned versions, see
../shared/reference/agents.md and docs/providers.md):

* **claude** (claude-agent-acp): reads the Anthropic variables, but sends the key to api.anthropic.com for
  "non-essential" calls unless three switches are set; retries an LLM error for minutes unless bounded; runs
  tools without asking only in ``bypassPermissions``, which as root it offers only with ``IS_SANDBOX=1``.
* **codex** (codex-acp): ignores ``OPENAI_BASE_URL``: the endpoint goes in ``$CODEX_HOME/config.toml`` as a model
  provider reading its key from ``OPENAI_API_KEY``; it needs ACP ``authenticate`` before ``session/new``; tools
  run only in ``full-access`` (its own Linux sandbox does not work in a container).
* **opencode**: reads its endpoint from ``~/.config/opencode/opencode.json`` and must not fetch its model list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import SecretStr

from worker.credentials.agents import BASE_URL_VARIABLES
from worker.credentials.base import CredentialGrant
from worker.models import Agent, LLMProvider, PermissionPolicy

HOME = "/root"  # the sandbox user's HOME: config files go under it
CODEX_HOME = f"{HOME}/.codex"
DEFAULT_BASE_URLS: dict[LLMProvider, str] = {
    LLMProvider.anthropic: "https://api.anthropic.com",
    LLMProvider.openai: "https://api.openai.com/v1",
}
CODEX_MODEL = "gpt-5.4"  # a model codex knows: an unknown name makes its first chunk a warning
OPENCODE_MODELS: dict[LLMProvider, str] = {
    LLMProvider.anthropic: "anthropic/claude-sonnet-4-5",
    LLMProvider.openai: "openai/gpt-5.4",
}

# Variables the worker sets for the agents: user env must not override them.
AGENT_VARIABLES = frozenset(
    {
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
        "DISABLE_TELEMETRY",
        "DISABLE_ERROR_REPORTING",
        "CLAUDE_CODE_MAX_RETRIES",
        "IS_SANDBOX",
        "CODEX_HOME",
        "OPENCODE_DISABLE_MODELS_FETCH",
    }
)


@dataclass(frozen=True, slots=True)
class AgentSetup:
    """The daemon variables, config files (paths under HOME) and ACP steps one session's agent needs."""

    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    auth_method: str | None = None  # ACP `authenticate` methodId, sent after `initialize`
    mode: str | None = None  # the session mode to set after `session/new`


def _codex_config(base_url: str, retries: int) -> str:
    # TOML by hand: a handful of scalar keys, values JSON-quoted (a TOML basic string is a JSON string).
    lines = [
        f"model = {json.dumps(CODEX_MODEL)}",
        'model_provider = "sandbox-worker"',
        "",
        "[model_providers.sandbox-worker]",
        'name = "sandbox-worker"',
        f"base_url = {json.dumps(base_url)}",
        'env_key = "OPENAI_API_KEY"',
        'wire_api = "responses"',
        f"request_max_retries = {retries}",
        f"stream_max_retries = {retries}",
    ]
    return "\n".join(lines) + "\n"


def _opencode_config(provider: LLMProvider, base_url: str) -> str:
    # OpenCode's Anthropic provider wants the /v1 suffix that ANTHROPIC_BASE_URL leaves out.
    url = base_url.rstrip("/") + ("/v1" if provider is LLMProvider.anthropic else "")
    config = {
        "$schema": "https://opencode.ai/config.json",
        "model": OPENCODE_MODELS[provider],
        "autoupdate": False,
        "share": "disabled",
        "provider": {provider.value: {"options": {"baseURL": url}}},
    }
    return json.dumps(config, indent=2) + "\n"


def agent_setup(
    agent: Agent,
    provider: LLMProvider | None,
    plain_env: dict[str, str],
    *,
    permissions: PermissionPolicy,
    llm_retries: int,
) -> AgentSetup:
    """The setup of ``agent`` talking to ``provider`` at the base URL the grant set (``plain_env``), or the
    provider's public API when it set none."""
    base_url = plain_env.get(BASE_URL_VARIABLES[provider], DEFAULT_BASE_URLS[provider]) if provider else ""
    headless = permissions is PermissionPolicy.approve
    if agent is Agent.claude:
        env = {
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "CLAUDE_CODE_MAX_RETRIES": str(llm_retries),
            "IS_SANDBOX": "1",
        }
        # With `reject`, the default mode asks before each tool and the worker answers no.
        return AgentSetup(env=env, mode="bypassPermissions" if headless else "default")
    if agent is Agent.codex:
        return AgentSetup(
            env={"CODEX_HOME": CODEX_HOME},
            files={".codex/config.toml": _codex_config(base_url, llm_retries)},
            auth_method="openai-api-key",
            mode="full-access" if headless else "read-only",
        )
    if agent is Agent.opencode and provider is not None:
        return AgentSetup(
            env={"OPENCODE_DISABLE_MODELS_FETCH": "1"},
            files={".config/opencode/opencode.json": _opencode_config(provider, base_url)},
        )
    return AgentSetup()


# The header Claude Code presents each credential variable of an Anthropic grant in (name, value prefix). Not
# CLAUDE_CODE_OAUTH_TOKEN: Claude Code sends a subscription's OAuth token with its own beta header and account checks,
# which a relay's header would skip, so such a grant keeps the token in env.
_RELAY_HEADERS: dict[str, tuple[str, str]] = {
    "ANTHROPIC_API_KEY": ("x-api-key", ""),
    "CLAUDE_API_KEY": ("x-api-key", ""),
    "ANTHROPIC_AUTH_TOKEN": ("Authorization", "Bearer "),
}


@dataclass(frozen=True, slots=True)
class RelayBinding:
    """A Claude Code session's credential given to the daemon front's LLM relay instead of in env
    (:meth:`worker.daemon.DaemonClient.bind_llm`): the endpoint and the headers its model requests carry."""

    base_url: str
    headers: dict[str, SecretStr]

    def __repr__(self) -> str:
        return f"RelayBinding(base_url={self.base_url!r}, headers={sorted(self.headers)!r})"


def relay_binding(grant: CredentialGrant) -> RelayBinding | None:
    """``grant`` as the relay takes it: the endpoint, and the headers Claude Code would have sent from env; None when
    the grant holds anything else (files, an OAuth token, another variable)."""
    base_url_variable = BASE_URL_VARIABLES[LLMProvider.anthropic]
    if grant.files or not grant.env or set(grant.plain_env) - {base_url_variable}:
        return None
    headers: dict[str, SecretStr] = {}
    for name, value in grant.env.items():
        if name not in _RELAY_HEADERS:
            return None
        header, prefix = _RELAY_HEADERS[name]
        headers[header] = SecretStr(prefix + value.get_secret_value())
    base_url = grant.plain_env.get(base_url_variable, DEFAULT_BASE_URLS[LLMProvider.anthropic])
    return RelayBinding(base_url, headers)
