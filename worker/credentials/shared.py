"""Shared org key: the organisation's own provider key from the worker settings, for the tenants they list."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import Field, SecretStr

from worker.credentials.agents import session_provider, token_grant
from worker.credentials.base import CredentialGrant, RegisteredStrategy
from worker.credentials.settings import ProviderURLs, TenantAllowList
from worker.errors import CredentialError
from worker.models import LLMProvider, SessionRequest, Strategy

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store


class SharedSettings(TenantAllowList):
    """The organisation's own provider keys, for internal tenants only."""

    anthropic: SecretStr | None = Field(None, description="Shared Anthropic API key.")
    openai: SecretStr | None = Field(None, description="Shared OpenAI API key.")

    def key_for(self, provider: LLMProvider) -> SecretStr | None:
        key: SecretStr | None = getattr(self, provider.value)
        return key

    @property
    def enabled(self) -> bool:
        return bool(self.anthropic or self.openai)


class SharedOrgKey(RegisteredStrategy):
    name = Strategy("shared")
    settings_model = SharedSettings

    def __init__(self, settings: SharedSettings, provider_urls: ProviderURLs) -> None:
        self.settings = settings
        self.provider_urls = provider_urls

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self | None:
        """Offered when a shared key is set."""
        shared = settings.credentials.strategy_settings(cls.name, SharedSettings)
        return cls(shared, settings.credentials.provider_urls) if shared.enabled else None

    def grant(self, request: SessionRequest) -> CredentialGrant:
        self.settings.admit(request, "the shared org key", "credentials.shared.tenants")
        provider = session_provider(request)
        key = self.settings.key_for(provider)
        if key is None:
            raise CredentialError(
                f"no shared {provider.value} key is configured on this worker (credentials.shared.{provider.value})",
                field="credentials.llm_provider",
            )
        return token_grant(self.name, provider, key, base_url=self.provider_urls.for_provider(provider))

    def release(self, request: SessionRequest) -> None:
        return None
