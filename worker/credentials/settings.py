"""Settings of the credential strategies: the ``SANDBOX_WORKER_CREDENTIALS__*`` block of the worker settings.

Every secret here is a ``SecretStr``. A strategy is available on a worker only when its block is configured:
a gateway backend needs its management key, ``shared`` needs a key, ``subscription`` a host HOME, ``vault`` the
egress proxy's public URL. ``byok`` needs only the Fernet key of the secret store.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from worker.models import GatewayBackend, LLMProvider


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderURLs(_Block):
    """Where each LLM provider's API lives, when not at its public address (a corporate egress, a regional
    endpoint). Applies to the strategies that hand out a provider key as is: byok, shared, subscription."""

    anthropic: str | None = Field(
        None, description="Anthropic API base URL (ANTHROPIC_BASE_URL), e.g. https://llm.corp/anthropic."
    )
    openai: str | None = Field(None, description="OpenAI API base URL (OPENAI_BASE_URL), ending in /v1.")

    def for_provider(self, provider: LLMProvider) -> str | None:
        url: str | None = getattr(self, provider.value)
        return url


class SharedSettings(_Block):
    """The organisation's own provider keys, for internal tenants only."""

    anthropic: SecretStr | None = Field(None, description="Shared Anthropic API key.")
    openai: SecretStr | None = Field(None, description="Shared OpenAI API key.")
    tenants: frozenset[str] = Field(
        frozenset(), description="Tenants allowed to use the shared keys (JSON list); every other tenant is refused."
    )

    def key_for(self, provider: LLMProvider) -> SecretStr | None:
        key: SecretStr | None = getattr(self, provider.value)
        return key

    @property
    def enabled(self) -> bool:
        return bool(self.anthropic or self.openai)


class SubscriptionSettings(_Block):
    """A personal subscription logged in on the worker host (the agents' own config files)."""

    home: Path | None = Field(
        None, description="HOME on the worker host whose agent config files are read (~/.claude, ~/.codex, ...)."
    )
    min_validity_seconds: int = Field(
        300,
        ge=0,
        description="An OAuth access token that expires sooner than this is refused (refresh it on the host).",
    )


class BudgetPeriod(StrEnum):
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"


class GatewayBackendSettings(_Block):
    """One gateway backend. ``url`` is its OpenAI-compatible base URL (ending in /v1); the Anthropic-compatible
    endpoint and the management API are derived from it (see docs/credentials.md)."""

    url: str | None = Field(None, description="OpenAI-compatible base URL of the gateway, ending in /v1.")
    management_key: SecretStr | None = Field(
        None, description="Provisioning/master/admin key: mints tenant keys; never enters a sandbox."
    )
    budget_usd: float = Field(25.0, gt=0, description="Spend limit of each tenant key, in USD.")
    budget_period: BudgetPeriod | None = Field(
        BudgetPeriod.monthly, description="How often the spend limit resets; never when null."
    )
    timeout: float = Field(30.0, gt=0, description="Seconds allowed for one management call.")

    @property
    def enabled(self) -> bool:
        return bool(self.url and self.management_key)


class OpenRouterSettings(GatewayBackendSettings):
    url: str | None = Field("https://openrouter.ai/api/v1", description="OpenRouter's OpenAI-compatible base URL.")


class PortkeySettings(GatewayBackendSettings):
    url: str | None = Field("https://api.portkey.ai/v1", description="Portkey's OpenAI-compatible base URL.")
    workspace_id: str | None = Field(None, description="Workspace the tenant keys are created in (required).")


class GatewaySettings(_Block):
    default: GatewayBackend | None = Field(
        None, description="Backend for requests that name none; the only enabled one when unset."
    )
    key_prefix: str = Field(
        "sandbox-worker", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Prefix of key, team and alias names."
    )
    lock_seconds: float = Field(60.0, gt=0, description="How long a worker may hold a tenant's mint/rotate lock.")
    openrouter: OpenRouterSettings = Field(default_factory=OpenRouterSettings)
    litellm: GatewayBackendSettings = Field(default_factory=GatewayBackendSettings)
    portkey: PortkeySettings = Field(default_factory=PortkeySettings)

    def backend(self, backend: GatewayBackend) -> GatewayBackendSettings:
        settings: GatewayBackendSettings = getattr(self, backend.value)
        return settings

    def enabled(self) -> list[GatewayBackend]:
        return [backend for backend in GatewayBackend if self.backend(backend).enabled]


class EgressSettings(_Block):
    """The egress proxy of the vault strategy (``sandbox-worker egress-proxy``)."""

    public_url: str | None = Field(
        None,
        description="URL sandboxes reach the proxy at, e.g. http://172.17.0.1:8089 (the Docker bridge gateway) or "
        "http://host.docker.internal:8089. The vault strategy is enabled when set.",
    )
    listen_host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    listen_port: int = Field(8089, ge=1, le=65535, description="Port the proxy listens on.")
    allow_http_upstreams: bool = Field(
        False, description="Allow vaults whose llm_base_url is plain http (a gateway on a private network)."
    )
    upstream_timeout: float = Field(600.0, gt=0, description="Seconds an upstream call may stay silent.")
    placeholder_grace_seconds: int = Field(
        300, ge=0, description="A placeholder outlives its session's ttl by this much if it is never released."
    )


class CredentialsSettings(_Block):
    provider_urls: ProviderURLs = Field(default_factory=ProviderURLs)
    shared: SharedSettings = Field(default_factory=SharedSettings)
    subscription: SubscriptionSettings = Field(default_factory=SubscriptionSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    egress: EgressSettings = Field(default_factory=EgressSettings)
