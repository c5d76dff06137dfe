"""Shared org key: the organisation's own provider key from the worker settings, for the tenants they list."""

from __future__ import annotations

from worker.credentials.agents import session_provider, token_grant
from worker.credentials.base import CredentialGrant
from worker.credentials.settings import ProviderURLs, SharedSettings
from worker.errors import CredentialError
from worker.models import SessionRequest, Strategy


class SharedOrgKey:
    name = Strategy.shared

    def __init__(self, settings: SharedSettings, provider_urls: ProviderURLs) -> None:
        self.settings = settings
        self.provider_urls = provider_urls

    def grant(self, request: SessionRequest) -> CredentialGrant:
        if request.tenant_id not in self.settings.tenants:
            raise CredentialError(
                f"tenant {request.tenant_id} may not use the shared org key "
                "(only the tenants in credentials.shared.tenants may)",
                field="credentials.strategy",
            )
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
