"""Gateway clients: one scoped key per tenant on OpenRouter, a LiteLLM proxy or Portkey.

Each client speaks its gateway's documented management API with the management key (which never leaves
the worker) and knows the gateway's LLM endpoints. ``url`` in the settings is the gateway's OpenAI-compatible
base URL (ending in /v1); the Anthropic-compatible endpoint is the same URL without /v1.

    OpenRouter  POST/GET/DELETE {url}/keys[/{hash}]                      (provisioning key, Bearer)
                key: name, limit (USD), limit_reset (daily|weekly|monthly)
    LiteLLM     POST {root}/team/new, /key/generate, /key/delete, /team/delete; GET /team/info   (master key)
                a team per tenant with max_budget + budget_duration; the tenant's key in that team
    Portkey     POST {url}/api-keys/workspace/service, DELETE {url}/api-keys/{id},             (admin key,
                GET {url}/analytics/graphs/cost                                                 x-portkey-api-key)
                key: usage_limits {credit_limit, periodic_reset, alert_threshold}, metadata _user = tenant

Errors: 401/403 → ConfigurationError (the management key is wrong); 429, 5xx and transport errors →
GatewayUnavailable (transient, retried); any other refusal → CredentialError. Messages carry no key.
"""

from __future__ import annotations

import math
import time
import uuid
from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr

from worker.credentials.settings import BudgetPeriod, GatewayBackendSettings, PortkeySettings
from worker.errors import ConfigurationError, CredentialError
from worker.models import GatewayBackend, LLMProvider
from worker.redaction import MASK
from worker.secret_store import SealedStr

_LITELLM_DURATION = {BudgetPeriod.daily: "1d", BudgetPeriod.weekly: "7d", BudgetPeriod.monthly: "30d"}


class GatewayUnavailable(CredentialError):
    """The gateway could not be reached or answered 429/5xx: worth retrying."""

    code = "gateway_unavailable"
    transient = True


class TenantKey(BaseModel):
    """The key a gateway minted for one tenant; sealed in the secret store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: GatewayBackend
    key: SealedStr
    key_id: str
    name: str
    team_id: str | None = None
    created_at: float


class Spend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: GatewayBackend
    key_name: str
    spent_usd: float
    limit_usd: float | None
    period: str | None


def period_start(period: BudgetPeriod | None, since: float) -> datetime:
    """Where the current budget window began (UTC): the day, the Monday, the 1st; key creation without reset."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period is BudgetPeriod.daily:
        return day
    if period is BudgetPeriod.weekly:
        return day - timedelta(days=day.weekday())
    if period is BudgetPeriod.monthly:
        return day.replace(day=1)
    return datetime.fromtimestamp(since, UTC)


def _detail(response: httpx.Response, secrets: list[str]) -> str:
    """The gateway's own reason for a refusal, short, with every key we know of masked."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        error = body.get("error")
        body = (error.get("message") if isinstance(error, dict) else error) or body.get("detail") or body.get("message")
    text = str(body or "")
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text[:200]


class GatewayClient(ABC):
    backend: ClassVar[GatewayBackend]

    def __init__(self, settings: GatewayBackendSettings, *, prefix: str) -> None:
        if not settings.url or settings.management_key is None:
            raise ConfigurationError(f"gateway {self.backend.value} needs url and management_key")
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.prefix = prefix
        self._management_key = settings.management_key
        self.http = httpx.Client(
            headers=self._auth_headers(settings.management_key.get_secret_value()),
            timeout=settings.timeout,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @staticmethod
    def _auth_headers(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def base_url(self, provider: LLMProvider) -> str:
        """Where agents of ``provider`` send their calls: the OpenAI- or Anthropic-compatible endpoint."""
        return self.url if provider is LLMProvider.openai else self.root

    def key_name(self, tenant: str) -> str:
        return f"{self.prefix}-{tenant}"

    def _call(self, method: str, url: str, op: str, *, secrets: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """One management call; errors mapped, response JSON returned (None when empty)."""
        backend = self.backend.value
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise GatewayUnavailable(f"gateway {backend} unreachable during {op}: {type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise ConfigurationError(
                f"gateway {backend} rejected the management key during {op} ({response.status_code})"
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise GatewayUnavailable(f"gateway {backend} answered {response.status_code} during {op}")
        if response.status_code >= 400:
            detail = _detail(response, [self._management_key.get_secret_value(), *secrets])
            raise CredentialError(f"gateway {backend} refused {op} ({response.status_code}): {detail}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise CredentialError(f"gateway {backend} answered {op} with something other than JSON") from None

    def _required(self, data: Any, op: str, *path: str) -> str:
        for part in path:
            data = data.get(part) if isinstance(data, dict) else None
        if not isinstance(data, str) or not data:
            raise CredentialError(f"gateway {self.backend.value} answered {op} without {'.'.join(path)}")
        return data

    def _tenant_key(self, key: str, key_id: str, name: str, team_id: str | None = None) -> TenantKey:
        return TenantKey(
            backend=self.backend, key=SecretStr(key), key_id=key_id, name=name, team_id=team_id, created_at=time.time()
        )

    def _spend(self, key: TenantKey, spent: Any, limit: Any, period: Any) -> Spend:
        return Spend(
            backend=self.backend, key_name=key.name, spent_usd=float(spent or 0.0), limit_usd=limit, period=period
        )

    @abstractmethod
    def mint(self, tenant: str, previous: TenantKey | None = None) -> TenantKey:
        """A new key for ``tenant`` with the configured budget (``previous``: the key it will replace)."""

    @abstractmethod
    def revoke(self, key: TenantKey, *, tenant_removed: bool = False) -> None:
        """Delete ``key`` at the gateway (and what was made for the tenant alone, once it is removed)."""

    @abstractmethod
    def spend(self, key: TenantKey) -> Spend:
        """What the tenant's key has spent in its current budget window."""


class OpenRouterClient(GatewayClient):
    backend = GatewayBackend.openrouter

    def mint(self, tenant: str, previous: TenantKey | None = None) -> TenantKey:
        body: dict[str, Any] = {"name": self.key_name(tenant), "limit": self.settings.budget_usd}
        if self.settings.budget_period:
            body["limit_reset"] = self.settings.budget_period.value
        data = self._call("POST", f"{self.url}/keys", "create key", json=body)
        key_id = self._required(data, "create key", "data", "hash")
        return self._tenant_key(self._required(data, "create key", "key"), key_id, body["name"])

    def revoke(self, key: TenantKey, *, tenant_removed: bool = False) -> None:
        self._call("DELETE", f"{self.url}/keys/{key.key_id}", "delete key")

    def spend(self, key: TenantKey) -> Spend:
        data = (self._call("GET", f"{self.url}/keys/{key.key_id}", "get key") or {}).get("data") or {}
        return self._spend(key, data.get("usage"), data.get("limit"), data.get("limit_reset"))


class LiteLLMClient(GatewayClient):
    backend = GatewayBackend.litellm

    def mint(self, tenant: str, previous: TenantKey | None = None) -> TenantKey:
        name = self.key_name(tenant)
        team_id = previous.team_id if previous and previous.team_id else self._new_team(tenant, name)
        alias = f"{name}-{uuid.uuid4().hex[:8]}"  # aliases are unique: one per rotation
        body = {"team_id": team_id, "key_alias": alias, "metadata": {"tenant_id": tenant, "created_by": self.prefix}}
        data = self._call("POST", f"{self.root}/key/generate", "generate key", json=body)
        return self._tenant_key(self._required(data, "generate key", "key"), alias, name, team_id)

    def _new_team(self, tenant: str, name: str) -> str:
        body: dict[str, Any] = {
            "team_alias": name,
            "max_budget": self.settings.budget_usd,
            "metadata": {"tenant_id": tenant, "created_by": self.prefix},
        }
        if self.settings.budget_period:
            body["budget_duration"] = _LITELLM_DURATION[self.settings.budget_period]
        return self._required(
            self._call("POST", f"{self.root}/team/new", "create team", json=body), "create team", "team_id"
        )

    def revoke(self, key: TenantKey, *, tenant_removed: bool = False) -> None:
        secret = key.key.get_secret_value()
        self._call("POST", f"{self.root}/key/delete", "delete key", json={"keys": [secret]}, secrets=(secret,))
        if tenant_removed and key.team_id:
            self._call("POST", f"{self.root}/team/delete", "delete team", json={"team_ids": [key.team_id]})

    def spend(self, key: TenantKey) -> Spend:
        data = self._call("GET", f"{self.root}/team/info", "get team", params={"team_id": key.team_id}) or {}
        info = data.get("team_info") or {}
        return self._spend(key, info.get("spend"), info.get("max_budget"), info.get("budget_duration"))


class PortkeyClient(GatewayClient):
    backend = GatewayBackend.portkey

    def __init__(self, settings: GatewayBackendSettings, *, prefix: str) -> None:
        super().__init__(settings, prefix=prefix)
        self.workspace_id = settings.workspace_id if isinstance(settings, PortkeySettings) else None

    @staticmethod
    def _auth_headers(key: str) -> dict[str, str]:
        return {"x-portkey-api-key": key}

    def mint(self, tenant: str, previous: TenantKey | None = None) -> TenantKey:
        settings = self.settings
        if not self.workspace_id:
            raise ConfigurationError("gateway portkey needs credentials.gateway.portkey.workspace_id")
        if settings.budget_period not in (None, BudgetPeriod.monthly):
            raise ConfigurationError("Portkey usage limits reset monthly or never: set budget_period monthly or null")
        limits: dict[str, Any] = {"credit_limit": max(1, math.ceil(settings.budget_usd))}
        if limits["credit_limit"] > 1:
            limits["alert_threshold"] = max(1, math.floor(limits["credit_limit"] * 0.8))
        if settings.budget_period:
            limits["periodic_reset"] = settings.budget_period.value
        name = self.key_name(tenant)
        body = {
            "name": name,
            "description": f"{self.prefix}: LLM access of tenant {tenant}",
            "workspace_id": self.workspace_id,
            "scopes": ["completions.write"],
            "usage_limits": limits,
            "defaults": {"metadata": {"_user": tenant, "tenant_id": tenant}},
        }
        data = self._call("POST", f"{self.url}/api-keys/workspace/service", "create api key", json=body)
        key_id = self._required(data, "create api key", "id")
        return self._tenant_key(self._required(data, "create api key", "key"), key_id, name)

    def revoke(self, key: TenantKey, *, tenant_removed: bool = False) -> None:
        self._call("DELETE", f"{self.url}/api-keys/{key.key_id}", "delete api key")

    def spend(self, key: TenantKey) -> Spend:
        period = self.settings.budget_period
        params = {
            "time_of_generation_min": period_start(period, key.created_at).isoformat(),
            "time_of_generation_max": datetime.now(UTC).isoformat(),
            "api_key_ids": key.key_id,
        }
        data = self._call("GET", f"{self.url}/analytics/graphs/cost", "read cost analytics", params=params) or {}
        cents = (data.get("summary") or {}).get("total_cost") or 0.0
        return self._spend(key, float(cents) / 100, self.settings.budget_usd, period.value if period else None)


CLIENTS: dict[GatewayBackend, type[GatewayClient]] = {
    client.backend: client for client in (OpenRouterClient, LiteLLMClient, PortkeyClient)
}
