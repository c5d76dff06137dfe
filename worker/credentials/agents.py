"""Which LLM provider each agent talks to, and the variables it reads its key from."""

from __future__ import annotations

from worker.errors import InvalidRequest
from worker.models import Agent, LLMProvider

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
