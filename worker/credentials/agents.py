"""Which LLM provider each agent talks to, and the variables it reads its key from."""

from __future__ import annotations

from enum import StrEnum

from pydantic import SecretStr

from worker.credentials.base import CredentialGrant
from worker.errors import CredentialError, InvalidRequest
from worker.models import Agent, LLMProvider, SessionRequest, Strategy

AGENT_PROVIDERS: dict[Agent, tuple[LLMProvider, ...]] = {
    Agent.claude: (LLMProvider.anthropic,),
    Agent.amp: (LLMProvider.anthropic,),
    Agent.codex: (LLMProvider.openai,),
    Agent.opencode: (LLMProvider.anthropic, LLMProvider.openai),
    Agent.mock: (),
}

KEY_VARIABLES: dict[LLMProvider, tuple[str, ...]] = {
    LLMProvider.anthropic: ("ANTHROPIC_API_KEY", "CLAUDE_API_KEY"),
    LLMProvider.openai: ("OPENAI_API_KEY", "CODEX_API_KEY"),
}

BASE_URL_VARIABLES: dict[LLMProvider, str] = {
    LLMProvider.anthropic: "ANTHROPIC_BASE_URL",
    LLMProvider.openai: "OPENAI_BASE_URL",
}

OAUTH_VARIABLES = ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN")


class KeyAuth(StrEnum):
    """How a token is presented to the provider's API, which decides the variables it goes in."""

    api_key = "api_key"  # a provider API key: x-api-key for Anthropic, Bearer for OpenAI
    bearer = "bearer"  # a gateway token on an Anthropic- or OpenAI-compatible endpoint: Authorization: Bearer
    oauth = "oauth"  # a subscription's OAuth access token: never presented as an API key


TOKEN_VARIABLES: dict[tuple[LLMProvider, KeyAuth], tuple[str, ...]] = {
    (LLMProvider.anthropic, KeyAuth.api_key): KEY_VARIABLES[LLMProvider.anthropic],
    (LLMProvider.anthropic, KeyAuth.bearer): ("ANTHROPIC_AUTH_TOKEN",),
    (LLMProvider.anthropic, KeyAuth.oauth): ("CLAUDE_CODE_OAUTH_TOKEN",),
    (LLMProvider.openai, KeyAuth.api_key): KEY_VARIABLES[LLMProvider.openai],
    (LLMProvider.openai, KeyAuth.bearer): KEY_VARIABLES[LLMProvider.openai],
    # OpenAI OAuth (a ChatGPT login) has no variable: codex reads it from ~/.codex/auth.json.
}

# Every variable a credential strategy may set: user env must not shadow them.
CREDENTIAL_VARIABLES = frozenset(
    {name for names in KEY_VARIABLES.values() for name in names}
    | set(BASE_URL_VARIABLES.values())
    | set(OAUTH_VARIABLES)
    | {"OPENROUTER_API_KEY"}
)


def llm_provider_for(agent: Agent, requested: LLMProvider | None) -> LLMProvider | None:
    """The LLM provider a session of ``agent`` uses; ``requested`` chooses among several."""
    choices = AGENT_PROVIDERS[agent]
    if not choices:
        return None
    if requested is None:
        return choices[0]
    if requested not in choices:
        allowed = ", ".join(c.value for c in choices)
        raise InvalidRequest(
            f"agent {agent.value} cannot use {requested.value} (allowed: {allowed})", field="credentials.llm_provider"
        )
    return requested


def session_provider(request: SessionRequest) -> LLMProvider:
    """The LLM provider a strategy must give this session a credential for."""
    provider = llm_provider_for(request.agent, request.credentials.llm_provider)
    if provider is None:
        raise CredentialError(
            f"agent {request.agent.value} uses no LLM credential: use credentials strategy none",
            field="credentials.strategy",
        )
    return provider


def token_grant(
    strategy: Strategy,
    provider: LLMProvider,
    token: SecretStr,
    *,
    auth: KeyAuth = KeyAuth.api_key,
    base_url: str | None = None,
) -> CredentialGrant:
    """A grant putting ``token`` where agents of ``provider`` look for it, with the base URL if one is given."""
    try:
        names = TOKEN_VARIABLES[provider, auth]
    except KeyError:
        raise CredentialError(f"a {provider.value} {auth.value} token cannot be passed in the environment") from None
    plain_env = {BASE_URL_VARIABLES[provider]: base_url} if base_url else {}
    return CredentialGrant(strategy=strategy, env=dict.fromkeys(names, token), plain_env=plain_env)
