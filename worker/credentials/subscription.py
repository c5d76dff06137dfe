"""Personal subscription: the credentials an agent CLI logged in with on the worker host.

The files read are the ones the daemon's own ``credentials extract`` reads (docs/credentials.md has the
formats), in the daemon's order; the first usable credential of the session's provider wins:

    anthropic  ~/.amp/config.json → ~/.claude.json (sk-ant- keys) → ~/.claude/.credentials.json (OAuth)
               → ~/.local/share/opencode/auth.json
    openai     ~/.codex/auth.json (API key, then OAuth) → ~/.local/share/opencode/auth.json

How each kind reaches the agent:

* an API key goes in the provider's API-key variables, as a key;
* an Anthropic OAuth access token goes in ``CLAUDE_CODE_OAUTH_TOKEN``, never in ``ANTHROPIC_API_KEY`` (the
  daemon's ``credentials extract-env`` does that; we do not);
* an OpenAI OAuth login (ChatGPT) has no variable: the agent gets its own credentials file, rewritten.

Rotating refresh tokens: a refresh token is single use; whoever refreshes first invalidates every other copy.
So **no refresh token ever leaves the host**: sessions get the access token only (credential files are
rewritten without it), and the worker never refreshes either. The agent CLI on the host stays the one party
that refreshes, and every grant re-reads the files, so a session started after a refresh gets the new token.
An access token that expires within ``min_validity_seconds`` is refused with a clear error rather than handed
to a session that would lose it mid-turn; a session that outlives its token's expiry loses LLM access then.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pydantic import Field, SecretStr

from worker.credentials.agents import KeyAuth, session_provider, token_grant
from worker.credentials.base import CredentialGrant, RegisteredStrategy
from worker.credentials.settings import ProviderURLs, TenantAllowList
from worker.errors import CredentialError
from worker.models import LLMProvider, SessionRequest, Strategy

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store

AMP_CONFIG = ".amp/config.json"
CLAUDE_JSON = ".claude.json"
CLAUDE_CREDENTIALS = ".claude/.credentials.json"
CODEX_AUTH = ".codex/auth.json"
OPENCODE_AUTH = ".local/share/opencode/auth.json"


class SubscriptionSettings(TenantAllowList):
    """A personal subscription logged in on the worker host (the agents' own config files), for the tenants
    listed: it is one person's login, so no tenant gets it until the operator lists it."""

    home: Path | None = Field(
        None, description="HOME on the worker host whose agent config files are read (~/.claude, ~/.codex, ...)."
    )
    min_validity_seconds: int = Field(
        300,
        ge=0,
        description="An OAuth access token that expires sooner than this is refused (refresh it on the host).",
    )


@dataclass(frozen=True, slots=True)
class HostCredential:
    """One credential found on the host. ``files`` are written under the sandbox HOME instead of env."""

    provider: LLMProvider
    source: str
    auth: KeyAuth
    token: SecretStr
    expires_at: float | None = None
    files: Mapping[str, SecretStr] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"HostCredential({self.provider.value}, source={self.source!r}, auth={self.auth.value!r})"


Reader = Callable[[Path], Iterator[HostCredential]]


def _load(home: Path, relative: str) -> dict[str, Any]:
    """The JSON object in ``home/relative``; empty when missing or unreadable (the daemon skips those too)."""
    try:
        data = json.loads((home / relative).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None


def _millis(value: Any) -> float | None:
    return float(value) / 1000 if isinstance(value, int | float) and not isinstance(value, bool) else None


def _jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (signature not checked: we only decide whether to hand it out)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


def _without(entry: dict[str, Any], secret_key: str) -> dict[str, Any]:
    """An agent's token entry minus its refresh token (see the module docstring)."""
    return {k: v for k, v in entry.items() if k != secret_key}


def _amp(home: Path) -> Iterator[HostCredential]:
    config = _load(home, AMP_CONFIG)
    for key in ("anthropicApiKey", "apiKey"):
        if value := _text(config, key):
            yield HostCredential(LLMProvider.anthropic, f"~/{AMP_CONFIG}", KeyAuth.api_key, SecretStr(value))


def _claude_json(home: Path) -> Iterator[HostCredential]:
    config = _load(home, CLAUDE_JSON)
    for key in ("primaryApiKey", "apiKey", "anthropicApiKey", "customApiKey"):
        value = _text(config, key)
        if value and value.startswith("sk-ant-"):
            yield HostCredential(LLMProvider.anthropic, f"~/{CLAUDE_JSON}", KeyAuth.api_key, SecretStr(value))


def _claude_oauth(home: Path) -> Iterator[HostCredential]:
    oauth = _object(_load(home, CLAUDE_CREDENTIALS), "claudeAiOauth")
    if token := _text(oauth, "accessToken"):
        expires = _millis(oauth.get("expiresAt"))
        yield HostCredential(LLMProvider.anthropic, f"~/{CLAUDE_CREDENTIALS}", KeyAuth.oauth, SecretStr(token), expires)


def _codex(home: Path) -> Iterator[HostCredential]:
    auth = _load(home, CODEX_AUTH)
    source = f"~/{CODEX_AUTH}"
    if key := _text(auth, "OPENAI_API_KEY"):
        yield HostCredential(LLMProvider.openai, source, KeyAuth.api_key, SecretStr(key))
    tokens = _object(auth, "tokens")
    if access := _text(tokens, "access_token"):
        rewritten = {
            "OPENAI_API_KEY": None,
            "tokens": _without(tokens, "refresh_token"),
            "last_refresh": auth.get("last_refresh"),
        }
        files = {CODEX_AUTH: SecretStr(json.dumps(rewritten))}
        yield HostCredential(LLMProvider.openai, source, KeyAuth.oauth, SecretStr(access), _jwt_expiry(access), files)


def _opencode(provider: LLMProvider) -> Reader:
    def read(home: Path) -> Iterator[HostCredential]:
        entry = _object(_load(home, OPENCODE_AUTH), provider.value)
        source = f"~/{OPENCODE_AUTH}"
        kind = _text(entry, "type")
        if kind == "api" and (key := _text(entry, "key")):
            yield HostCredential(provider, source, KeyAuth.api_key, SecretStr(key))
        elif kind == "oauth" and (access := _text(entry, "access")):
            files = {}
            if provider is LLMProvider.openai:  # no variable for it: opencode's own file
                files = {OPENCODE_AUTH: SecretStr(json.dumps({provider.value: _without(entry, "refresh")}))}
            yield HostCredential(
                provider, source, KeyAuth.oauth, SecretStr(access), _millis(entry.get("expires")), files
            )

    return read


READERS: dict[LLMProvider, tuple[Reader, ...]] = {
    LLMProvider.anthropic: (_amp, _claude_json, _claude_oauth, _opencode(LLMProvider.anthropic)),
    LLMProvider.openai: (_codex, _opencode(LLMProvider.openai)),
}


def discover(home: Path, provider: LLMProvider, *, min_validity: float = 0) -> HostCredential:
    """The first usable credential of ``provider`` under ``home``; a clear CredentialError otherwise."""
    now = time.time()
    expired: list[HostCredential] = []
    for reader in READERS[provider]:
        for credential in reader(home):
            if credential.expires_at is not None and credential.expires_at - now < min_validity:
                expired.append(credential)
                continue
            return credential
    if expired:
        first = expired[0]
        assert first.expires_at is not None
        when = datetime.fromtimestamp(first.expires_at, UTC).isoformat(timespec="seconds")
        state = "expired" if first.expires_at <= now else f"expires within {min_validity:g}s"
        raise CredentialError(
            f"the {provider.value} subscription token in {first.source} on the worker host {state} ({when}); "
            "log in again with the agent CLI on the host: the worker never refreshes it",
            field="credentials.strategy",
        )
    raise CredentialError(
        f"no {provider.value} credential in the agents' config files on the worker host "
        f"(credentials.subscription.home = {home})",
        field="credentials.strategy",
    )


class PersonalSubscription(RegisteredStrategy):
    name = Strategy("subscription")
    settings_model = SubscriptionSettings

    def __init__(self, home: Path, settings: SubscriptionSettings, provider_urls: ProviderURLs) -> None:
        self.home = home
        self.settings = settings
        self.provider_urls = provider_urls

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self | None:
        """Offered when a host HOME is set."""
        subscription = settings.credentials.strategy_settings(cls.name, SubscriptionSettings)
        if subscription.home is None:
            return None
        return cls(subscription.home, subscription, settings.credentials.provider_urls)

    def grant(self, request: SessionRequest) -> CredentialGrant:
        self.settings.admit(request, "the worker host's subscription", "credentials.subscription.tenants")
        provider = session_provider(request)
        found = discover(self.home, provider, min_validity=self.settings.min_validity_seconds)
        if found.files:
            return CredentialGrant(strategy=self.name, files=found.files)
        return token_grant(
            self.name, provider, found.token, auth=found.auth, base_url=self.provider_urls.for_provider(provider)
        )

    def release(self, request: SessionRequest) -> None:
        return None
