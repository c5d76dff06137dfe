"""Settings pieces the credential strategies share, in the ``SANDBOX_WORKER_CREDENTIALS__*`` block.

A strategy's own block (``shared``, ``subscription``, ``gateway``) lives in its module as its
``settings_model``; :class:`worker.config.CredentialsSettings` puts those together with the pieces here: where
the LLM providers' APIs live (``provider_urls``), one gateway backend's settings (the gateway strategy's block
holds one per backend) and the egress proxy of the vault strategy (``egress``, read by the proxy as well).
Every secret is a ``SecretStr``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from worker.errors import CredentialError
from worker.models import LLMProvider, SessionRequest


class SettingsBlock(BaseModel):
    """A block of the credentials settings: frozen, and unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantAllowList(SettingsBlock):
    """The tenants a strategy that hands out the operator's own credential (``shared``, ``subscription``) serves:
    none until the operator lists them."""

    tenants: frozenset[str] = Field(
        frozenset(),
        description="Tenants allowed to use this strategy (JSON list); empty by default: every tenant not listed "
        "is refused.",
    )

    def admit(self, request: SessionRequest, what: str, setting: str) -> None:
        """Refuse a tenant the operator has not listed, naming it and the setting that would list it."""
        if request.tenant_id not in self.tenants:
            raise CredentialError(
                f"tenant {request.tenant_id} may not use {what} (only the tenants in {setting} may)",
                field="credentials.strategy",
            )


class ProviderURLs(SettingsBlock):
    """Where each LLM provider's API lives, when not at its public address (a corporate egress, a regional
    endpoint). Applies to the strategies that hand out a provider key as is: byok, shared, subscription."""

    anthropic: str | None = Field(
        None, description="Anthropic API base URL (ANTHROPIC_BASE_URL), e.g. https://llm.corp/anthropic."
    )
    openai: str | None = Field(None, description="OpenAI API base URL (OPENAI_BASE_URL), ending in /v1.")

    def for_provider(self, provider: LLMProvider) -> str | None:
        url: str | None = getattr(self, provider.value)
        return url


class BudgetPeriod(StrEnum):
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"


class GatewayBackendSettings(SettingsBlock):
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


class EgressSettings(SettingsBlock):
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
    bind_to_source: bool = Field(
        True,
        description="Accept a placeholder only from the private address of the sandbox it was issued to, where the "
        "provider reports one (Docker). Turn off when the proxy does not see sandboxes' own addresses (NAT, a load "
        "balancer in between).",
    )
    placeholder_grace_seconds: int = Field(
        300, ge=0, description="A placeholder outlives its session's ttl by this much if it is never released."
    )
