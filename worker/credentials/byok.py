"""Bring your own key: the tenant's own provider key, from the secret store by reference (``secret_ref``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from worker.credentials.agents import session_provider, token_grant
from worker.credentials.base import CredentialGrant, RegisteredStrategy
from worker.credentials.settings import ProviderURLs
from worker.errors import CredentialError
from worker.models import SessionRequest, Strategy
from worker.secret_store import SecretStore

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store


class BringYourOwnKey(RegisteredStrategy):
    name = Strategy("byok")

    def __init__(self, secrets: SecretStore, provider_urls: ProviderURLs) -> None:
        self.secrets = secrets
        self.provider_urls = provider_urls

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self:
        """Always offered: it needs only the secret store (and its Fernet key, checked when a secret is read)."""
        return cls(SecretStore.from_store(store), settings.credentials.provider_urls)

    def grant(self, request: SessionRequest) -> CredentialGrant:
        ref = request.credentials.secret_ref
        if not ref:
            raise CredentialError(
                "strategy byok needs credentials.secret_ref: the name of the tenant's secret "
                "(`sandbox-worker secrets put --tenant T NAME`)",
                field="credentials.secret_ref",
            )
        provider = session_provider(request)
        key = self.secrets.get(request.tenant_id, ref, field="credentials.secret_ref")
        return token_grant(self.name, provider, key, base_url=self.provider_urls.for_provider(provider))

    def release(self, request: SessionRequest) -> None:
        return None
