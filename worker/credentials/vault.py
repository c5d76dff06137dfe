"""Vaults with egress injection: the sandbox gets a placeholder, our egress proxy swaps in the real credential.

A vault is a named set of credentials with metadata, kept sealed per tenant in the secret store (kind
``vault``). An LLM vault carries the reserved metadata keys ``role=llm``, ``engine`` (``claude``, or ``codex``
for OpenAI engines) and ``llm_base_url`` (default: the engine's public API). A session of strategy ``vault``
attaches vaults by name; exactly one must be an LLM vault, and its active credential must be a static
bearer token for an endpoint of the right kind. Then:

* the grant binds a fresh random placeholder to the session in Redis (``sw:egress:<sha256>`` → request,
  tenant, vault; ``sw:egress-request:<request_id>`` → that digest; both expire with the session's ttl);
* the sandbox gets the placeholder as its API key and ``<egress public_url>/<llm host><llm path>`` as its
  base URL (:mod:`worker.egress_proxy` forwards to that host only, and only the engine's model API routes
  (:data:`MODEL_ROUTES`), with the real credential);
* once the sandbox exists, :meth:`VaultStrategy.bind` records its private address (Docker) beside the
  binding, and the proxy refuses the placeholder from any other source address;
* release deletes the binding: the placeholder is dead from then on (terminate, compensation, and the
  reaper when the sandbox of a ready session vanishes).

**Warm pools** (:mod:`worker.pool`, a target with ``strategy: vault``) start their agents with a placeholder made
by :func:`new_placeholder` and bound to nothing: the proxy refuses it (403, unknown) until a claim adopts it
(:meth:`VaultStrategy.adopt`): the session's binding (tenant, vault, expiry, the sandbox's address) moves to that
placeholder in one transaction, and the one the grant made, which no sandbox ever saw, dies. From then on it is the
session's placeholder like any other: released at terminate, with its sandbox, or when its binding expires.

Redis never holds a placeholder, only its SHA-256; the real credential exists only sealed in the vault.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from enum import StrEnum
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from worker.credentials.agents import AGENT_PROVIDERS, token_grant
from worker.credentials.base import CredentialGrant, RegisteredStrategy
from worker.credentials.settings import EgressSettings
from worker.errors import ConfigurationError, CredentialError, InvalidRequest
from worker.models import Identifier, LLMProvider, SessionRequest, Strategy
from worker.secret_store import SealedStr, SecretStore
from worker.store import PREFIX, Store

if TYPE_CHECKING:
    from worker.config import Settings

KIND = "vault"
PLACEHOLDER_PREFIX = "swph-"


class Engine(StrEnum):
    claude = "claude"
    codex = "codex"


ENGINE_PROVIDERS = {Engine.claude: LLMProvider.anthropic, Engine.codex: LLMProvider.openai}
DEFAULT_LLM_BASE_URLS = {Engine.claude: "https://api.anthropic.com", Engine.codex: "https://api.openai.com/v1"}
# What the egress proxy forwards, per engine: (method, path relative to the vault's llm_base_url), matched
# exactly against the raw request path, so no percent-encoding or dot segment reaches anything else. Claude: the
# Anthropic Messages API as Claude Code and OpenCode call it (messages, and the token count); Claude Code's HEAD
# probe of the base URL carries no key and gets 401. Codex: the OpenAI API under a base URL ending in /v1, as
# Codex (Responses) and OpenAI-compatible gateways (Chat Completions) serve it, and the model list. Files,
# batches, admin and organisation routes are not model calls and stay out.
MODEL_ROUTES: dict[Engine, frozenset[tuple[str, str]]] = {
    Engine.claude: frozenset({("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")}),
    Engine.codex: frozenset({("POST", "/responses"), ("POST", "/chat/completions"), ("GET", "/models")}),
}


class CredentialKind(StrEnum):
    static_bearer = "static_bearer"
    oauth2 = "oauth2"
    basic = "basic"


class VaultCredential(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    kind: CredentialKind = CredentialKind.static_bearer
    token: SealedStr
    mcp_server_url: str | None = None
    active: bool = True


def _check_url(url: str, field: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{field} must be an http(s) URL with a host, not {url!r}", field=field)
    return url


class Vault(BaseModel):
    """A named set of credentials with metadata. Reprs and dumps mask the tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    metadata: dict[str, str] = Field(default_factory=dict)
    credentials: list[VaultCredential] = Field(default_factory=list)

    @field_validator("metadata")
    @classmethod
    def _reserved(cls, metadata: dict[str, str]) -> dict[str, str]:
        if "engine" in metadata and metadata["engine"] not in {e.value for e in Engine}:
            raise InvalidRequest(
                f"metadata.engine must be claude or codex, not {metadata['engine']!r}", field="metadata.engine"
            )
        if "llm_base_url" in metadata:
            _check_url(metadata["llm_base_url"], "metadata.llm_base_url")
        if metadata.get("role") == "llm" and "engine" not in metadata:
            raise InvalidRequest("an LLM vault (role=llm) needs metadata.engine", field="metadata.engine")
        return metadata

    @property
    def is_llm(self) -> bool:
        return self.metadata.get("role") == "llm"

    @property
    def engine(self) -> Engine:
        return Engine(self.metadata["engine"])

    @property
    def llm_base_url(self) -> str:
        return self.metadata.get("llm_base_url") or DEFAULT_LLM_BASE_URLS[self.engine]

    def model_route(self, method: str, path: str) -> bool:
        """Whether ``method path`` (the raw path the sandbox asked for on the LLM host) is one of the engine's model
        API routes under ``llm_base_url``."""
        base = urlsplit(self.llm_base_url).path.rstrip("/")
        return path.startswith(base) and (method, path[len(base) :]) in MODEL_ROUTES[self.engine]

    def active_credential(self) -> VaultCredential:
        """The LLM credential: the one active credential, a static bearer token, not an MCP server's."""
        active = [c for c in self.credentials if c.active]
        if len(active) != 1:
            state = "no active credential" if not active else f"{len(active)} active credentials"
            raise CredentialError(
                f"LLM vault {self.name} has {state}: it needs exactly one", field="credentials.vaults"
            )
        credential = active[0]
        if credential.mcp_server_url:
            raise CredentialError(
                f"the active credential {credential.name} of LLM vault {self.name} carries an mcp_server_url: "
                "it belongs to an MCP server, not to the LLM",
                field="credentials.vaults",
            )
        if credential.kind is not CredentialKind.static_bearer:
            raise CredentialError(
                f"the active credential {credential.name} of LLM vault {self.name} is {credential.kind.value}; "
                "an LLM vault needs a static bearer token",
                field="credentials.vaults",
            )
        return credential


def openai_compatible(url: str) -> bool:
    """An OpenAI-style base URL: api.openai.com, or a path ending in /v1 (OpenAI clients append
    /chat/completions to it; Anthropic clients append /v1/messages to a base without it)."""
    parts = urlsplit(url)
    return parts.hostname == "api.openai.com" or parts.path.rstrip("/").endswith("/v1")


def check_endpoint(vault: Vault, egress: EgressSettings) -> None:
    """The LLM endpoint must suit the engine, and carry credentials over https unless allowed otherwise."""
    url = vault.llm_base_url
    if vault.engine is Engine.claude and openai_compatible(url):
        raise CredentialError(
            f"LLM vault {vault.name} points the claude engine at an OpenAI-compatible endpoint ({url}); "
            "the claude engine speaks the Anthropic Messages API",
            field="credentials.vaults",
        )
    if urlsplit(url).scheme != "https" and not egress.allow_http_upstreams:
        raise CredentialError(
            f"LLM vault {vault.name} has a plain http llm_base_url; the egress proxy sends credentials "
            "over https only (credentials.egress.allow_http_upstreams allows http)",
            field="credentials.vaults",
        )


class VaultStore:
    """The tenant's vaults, sealed in the secret store."""

    def __init__(self, secrets: SecretStore) -> None:
        self.secrets = secrets

    def create(self, tenant: str, vault: Vault, *, replace: bool = False) -> None:
        if not replace and self.get(tenant, vault.name) is not None:
            raise InvalidRequest(f"tenant {tenant} already has a vault named {vault.name}", field="name")
        self.secrets.seal(KIND, tenant, vault.name, vault)

    def get(self, tenant: str, name: str) -> Vault | None:
        return self.secrets.unseal(KIND, tenant, name, Vault)

    def list(self, tenant: str) -> list[Vault]:
        return [v for name in self.secrets.sealed_names(KIND, tenant) if (v := self.get(tenant, name)) is not None]

    def delete(self, tenant: str, name: str) -> bool:
        return self.secrets.drop(KIND, tenant, name)


class Binding(BaseModel):
    """What Redis keeps about a live placeholder: who it belongs to, never a secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    tenant_id: str
    vault: str
    source: str | None = None  # the sandbox's private address, once bound: the only address it is accepted from


def _digest(placeholder: str) -> str:
    return hashlib.sha256(placeholder.encode()).hexdigest()


def new_placeholder() -> SecretStr:
    """A fresh random placeholder, bound to nothing: worthless until :meth:`Placeholders.bind` or ``adopt``."""
    return SecretStr(PLACEHOLDER_PREFIX + secrets.token_urlsafe(32))


def proxy_url(public_url: str, llm_base_url: str) -> str:
    """The base URL a sandbox gets for ``llm_base_url``: the proxy, then the LLM host and path it may reach."""
    parts = urlsplit(llm_base_url)
    return f"{public_url.rstrip('/')}/{parts.netloc}{parts.path.rstrip('/')}"


class Placeholders:
    """Per-session placeholders: random, bound at grant, deleted at release, expiring with the session."""

    def __init__(self, secrets: SecretStore) -> None:
        self.redis = secrets.redis

    def bind(self, request: SessionRequest, vault: str, ttl_seconds: int) -> SecretStr:
        self.release(request.request_id)  # a retried grant replaces the previous attempt's placeholder
        placeholder = new_placeholder()
        digest = _digest(placeholder.get_secret_value())
        binding = Binding(request_id=request.request_id, tenant_id=request.tenant_id, vault=vault)
        pipe = self.redis.pipeline()
        pipe.set(f"{PREFIX}egress:{digest}", binding.model_dump_json(), ex=ttl_seconds)
        pipe.set(f"{PREFIX}egress-request:{request.request_id}", digest, ex=ttl_seconds)
        pipe.execute()
        return placeholder

    def adopt(self, request_id: str, placeholder: SecretStr, source: str | None) -> bool:
        """Move the request's binding (and its expiry) to ``placeholder`` (a warm pool's, bound to nothing so far),
        accepted from ``source`` only when given; the request's previous placeholder dies in the same transaction.
        False when the request has no live binding (released meanwhile: the placeholder stays worthless)."""
        request_key = f"{PREFIX}egress-request:{request_id}"
        old = self.redis.get(request_key)
        if not old:
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"{PREFIX}egress:{old!s}")
        pipe.pttl(f"{PREFIX}egress:{old!s}")
        raw, ttl = pipe.execute()
        if not raw or ttl <= 0:
            return False
        binding = Binding.model_validate_json(raw)
        if source is not None:
            binding = binding.model_copy(update={"source": source})
        digest = _digest(placeholder.get_secret_value())
        pipe = self.redis.pipeline()  # MULTI: the new binding live and the old one dead in one step
        pipe.set(f"{PREFIX}egress:{digest}", binding.model_dump_json(), px=ttl)
        pipe.set(request_key, digest, px=ttl)
        pipe.delete(f"{PREFIX}egress:{old!s}")
        pipe.execute()
        return True

    def bind_source(self, request_id: str, source: str) -> None:
        """Accept the request's placeholder from ``source`` only (its sandbox's address); its expiry is kept."""
        digest = self.redis.get(f"{PREFIX}egress-request:{request_id}")
        raw = self.redis.get(f"{PREFIX}egress:{digest!s}") if digest else None
        if raw:
            bound = Binding.model_validate_json(raw).model_copy(update={"source": source})
            self.redis.set(f"{PREFIX}egress:{digest!s}", bound.model_dump_json(), keepttl=True, xx=True)

    def release(self, request_id: str) -> None:
        digest = self.redis.getdel(f"{PREFIX}egress-request:{request_id}")
        if digest:
            self.redis.delete(f"{PREFIX}egress:{digest!s}")

    def lookup(self, placeholder: str) -> Binding | None:
        if not placeholder.startswith(PLACEHOLDER_PREFIX):
            return None
        raw = self.redis.get(f"{PREFIX}egress:{_digest(placeholder)}")
        return Binding.model_validate_json(raw) if raw else None


class VaultStrategy(RegisteredStrategy):
    """Its settings are the egress proxy's (``credentials.egress``, shared with :mod:`worker.egress_proxy`), so it
    has no block of its own."""

    name = Strategy("vault")
    creates = True

    def __init__(self, vaults: VaultStore, placeholders: Placeholders, egress: EgressSettings) -> None:
        if not egress.public_url:
            raise ConfigurationError("the vault strategy needs credentials.egress.public_url")
        self.vaults = vaults
        self.placeholders = placeholders
        self.egress = egress
        self.public_url = egress.public_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self | None:
        """Offered when the egress proxy's public URL is set."""
        egress = settings.credentials.egress
        if not egress.public_url:
            return None
        secrets = SecretStore.from_store(store)
        return cls(VaultStore(secrets), Placeholders(secrets), egress)

    def llm_vault(self, request: SessionRequest) -> Vault:
        """The session's one LLM vault, checked against the session; every seed error is a CredentialError."""
        names = request.credentials.vaults
        attached = []
        for name in names:
            vault = self.vaults.get(request.tenant_id, name)
            if vault is None:
                raise CredentialError(
                    f"tenant {request.tenant_id} has no vault named {name}", field="credentials.vaults"
                )
            attached.append(vault)
        llm = [v for v in attached if v.is_llm]
        if not llm:
            seen = f" (none of {', '.join(names)} has role=llm)" if names else ""
            raise CredentialError(
                f"no LLM vault attached{seen}: attach one vault whose metadata has role=llm",
                field="credentials.vaults",
            )
        if len(llm) > 1:
            raise CredentialError(
                f"several LLM vaults attached ({', '.join(v.name for v in llm)}): attach exactly one",
                field="credentials.vaults",
            )
        vault = llm[0]
        provider = ENGINE_PROVIDERS[vault.engine]
        requested = request.credentials.llm_provider
        if provider not in AGENT_PROVIDERS[request.agent] or requested not in (None, provider):
            raise CredentialError(
                f"engine mismatch: LLM vault {vault.name} has engine {vault.engine.value} ({provider.value}), "
                f"which agent {request.agent.value}"
                + (f" with llm_provider {requested.value}" if requested else "")
                + " cannot use",
                field="credentials.vaults",
            )
        vault.active_credential()
        check_endpoint(vault, self.egress)
        return vault

    def proxy_url(self, vault: Vault) -> str:
        """The base URL the sandbox gets: the proxy, then the LLM host and path it may reach through it."""
        return proxy_url(self.public_url, vault.llm_base_url)

    def grant(self, request: SessionRequest) -> CredentialGrant:
        vault = self.llm_vault(request)
        ttl = request.sandbox.ttl_seconds + self.egress.placeholder_grace_seconds
        placeholder = self.placeholders.bind(request, vault.name, ttl)
        return token_grant(self.name, ENGINE_PROVIDERS[vault.engine], placeholder, base_url=self.proxy_url(vault))

    def bind(self, request: SessionRequest, source: str) -> None:
        """The sandbox that got the placeholder is at ``source`` (a Docker sandbox's private address): the proxy
        accepts the placeholder from there only, unless ``egress.bind_to_source`` is off."""
        if self.egress.bind_to_source:
            self.placeholders.bind_source(request.request_id, source)

    def adopt(
        self, request: SessionRequest, grant: CredentialGrant, placeholder: SecretStr, source: str | None
    ) -> CredentialGrant | None:
        """The grant with a warm pool's placeholder (already in the sandbox's agent) in place of the one it made: the
        session's binding moves to it, tied to ``source`` (as :meth:`bind` would) when ``egress.bind_to_source``."""
        if not self.placeholders.adopt(request.request_id, placeholder, source if self.egress.bind_to_source else None):
            return None
        return replace(grant, env=dict.fromkeys(grant.env, placeholder))

    def release(self, request: SessionRequest) -> None:
        self.placeholders.release(request.request_id)


def resolve(
    placeholder: str, *, placeholders: Placeholders, vaults: VaultStore, egress: EgressSettings
) -> tuple[Binding, Vault, SecretStr] | None:
    """For the egress proxy: the binding, vault and real credential behind a live placeholder; None when the
    placeholder is dead or the vault no longer holds a usable LLM credential."""
    binding = placeholders.lookup(placeholder)
    if binding is None:
        return None
    vault = vaults.get(binding.tenant_id, binding.vault)
    if vault is None or not vault.is_llm:
        return None
    try:
        check_endpoint(vault, egress)
        return binding, vault, vault.active_credential().token
    except CredentialError:
        return None
