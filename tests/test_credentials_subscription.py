"""Personal subscription: discovering the host's agent logins in the formats the daemon reads, refusing
expired tokens clearly, passing OAuth as OAuth, and never letting a refresh token leave the host."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.standins.credentials import fake_jwt
from worker.credentials.settings import ProviderURLs
from worker.credentials.subscription import PersonalSubscription, SubscriptionSettings, discover
from worker.errors import CredentialError
from worker.models import LLMProvider, SessionRequest

HOUR = 3600


def write(home: Path, relative: str, data: Any) -> None:
    path = home / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def claude_login(home: Path, expires_in: float = HOUR) -> None:
    oauth = {
        "accessToken": "oat-access",
        "refreshToken": "ort-refresh",
        "expiresAt": int((time.time() + expires_in) * 1000),
    }
    write(home, ".claude/.credentials.json", {"claudeAiOauth": oauth})


def grant(
    home: Path, agent: str, *, urls: ProviderURLs | None = None, min_validity: int = 300, tenant: str = "me"
) -> Any:
    settings = SubscriptionSettings(home=home, min_validity_seconds=min_validity, tenants=frozenset({"me"}))
    strategy = PersonalSubscription(home, settings, urls or ProviderURLs())
    request = SessionRequest(tenant_id=tenant, agent=agent, provider="docker", credentials={"strategy": "subscription"})
    return strategy.grant(request)


def test_only_listed_tenants_get_the_host_login(tmp_path: Path) -> None:
    """The host owner's login goes to the tenants the operator lists, none by default: another tenant is refused
    naming it and the setting, before any file is read."""
    claude_login(tmp_path)
    with pytest.raises(CredentialError) as refused:
        grant(tmp_path, "claude", tenant="acme")
    assert refused.value.field == "credentials.strategy"
    assert "tenant acme may not use the worker host's subscription" in refused.value.message
    assert "credentials.subscription.tenants" in refused.value.message
    assert SubscriptionSettings().tenants == frozenset()


def test_claude_oauth_goes_as_oauth_token_with_the_base_url(tmp_path: Path) -> None:
    """A Claude login becomes CLAUDE_CODE_OAUTH_TOKEN (and the configured base URL), never an API-key variable."""
    claude_login(tmp_path)
    granted = grant(tmp_path, "claude", urls=ProviderURLs(anthropic="https://llm.corp/anthropic"))
    assert {k: v.get_secret_value() for k, v in granted.env.items()} == {"CLAUDE_CODE_OAUTH_TOKEN": "oat-access"}
    assert granted.plain_env == {"ANTHROPIC_BASE_URL": "https://llm.corp/anthropic"}
    assert "ort-refresh" not in json.dumps(granted.secret_values())


def test_expired_and_expiring_tokens_are_refused_clearly(tmp_path: Path) -> None:
    """An expired login, or one expiring within the margin, is refused naming the file and what to do."""
    claude_login(tmp_path, expires_in=-60)
    with pytest.raises(CredentialError) as expired:
        grant(tmp_path, "claude")
    assert "~/.claude/.credentials.json" in expired.value.message
    assert "expired" in expired.value.message and "log in again" in expired.value.message
    assert expired.value.field == "credentials.strategy"
    claude_login(tmp_path, expires_in=120)
    with pytest.raises(CredentialError, match="expires within 300s"):
        grant(tmp_path, "claude")
    assert grant(tmp_path, "claude", min_validity=60).env


def test_the_daemons_order_is_followed(tmp_path: Path) -> None:
    """Amp's config comes first, then ~/.claude.json (only sk-ant- keys), then the OAuth login."""
    claude_login(tmp_path)
    write(tmp_path, ".claude.json", {"primaryApiKey": "not-an-anthropic-key"})
    assert discover(tmp_path, LLMProvider.anthropic).source == "~/.claude/.credentials.json"
    write(tmp_path, ".claude.json", {"primaryApiKey": "sk-ant-api-1"})
    assert discover(tmp_path, LLMProvider.anthropic).source == "~/.claude.json"
    write(tmp_path, ".amp/config.json", {"anthropicApiKey": "sk-ant-amp-1"})
    found = discover(tmp_path, LLMProvider.anthropic)
    assert (found.source, found.token.get_secret_value(), found.auth.value) == (
        "~/.amp/config.json",
        "sk-ant-amp-1",
        "api_key",
    )


def test_an_expired_login_falls_through_to_a_valid_key(tmp_path: Path) -> None:
    """An expired OAuth login is skipped when a later source holds a usable credential."""
    claude_login(tmp_path, expires_in=-60)
    write(tmp_path, ".local/share/opencode/auth.json", {"anthropic": {"type": "api", "key": "sk-ant-oc"}})
    granted = grant(tmp_path, "claude")
    assert {k: v.get_secret_value() for k, v in granted.env.items()} == {
        "ANTHROPIC_API_KEY": "sk-ant-oc",
        "CLAUDE_API_KEY": "sk-ant-oc",
    }


def test_codex_api_key_and_chatgpt_login(tmp_path: Path) -> None:
    """Codex's API key goes as OPENAI_API_KEY; its ChatGPT login as ~/.codex/auth.json without the refresh token;
    an expired login is refused."""
    access = fake_jwt(time.time() + HOUR)
    tokens = {"access_token": access, "refresh_token": "rt-secret", "id_token": "id", "account_id": "acct"}
    write(
        tmp_path, ".codex/auth.json", {"OPENAI_API_KEY": None, "tokens": tokens, "last_refresh": "2026-11-01T00:00:00Z"}
    )
    granted = grant(tmp_path, "codex")
    assert dict(granted.env) == {}
    written = json.loads(granted.files[".codex/auth.json"].get_secret_value())
    assert written["tokens"] == {"access_token": access, "id_token": "id", "account_id": "acct"}
    assert written["OPENAI_API_KEY"] is None and written["last_refresh"] == "2026-11-01T00:00:00Z"

    write(tmp_path, ".codex/auth.json", {"OPENAI_API_KEY": "sk-proj-1", "tokens": tokens})
    assert grant(tmp_path, "codex").env["OPENAI_API_KEY"].get_secret_value() == "sk-proj-1"

    tokens["access_token"] = fake_jwt(time.time() - 10)
    write(tmp_path, ".codex/auth.json", {"tokens": tokens})
    with pytest.raises(CredentialError, match=r"openai subscription token in ~/.codex/auth.json .* expired"):
        grant(tmp_path, "codex")


def test_opencode_logins(tmp_path: Path) -> None:
    """opencode's Anthropic OAuth goes as CLAUDE_CODE_OAUTH_TOKEN; its OpenAI OAuth as opencode's own file,
    without the refresh token."""
    later = int((time.time() + HOUR) * 1000)
    write(
        tmp_path,
        ".local/share/opencode/auth.json",
        {
            "anthropic": {"type": "oauth", "access": "oc-a", "refresh": "oc-r", "expires": later},
            "openai": {"type": "oauth", "access": "oc-o", "refresh": "oc-r2", "expires": later},
        },
    )
    assert grant(tmp_path, "claude").env["CLAUDE_CODE_OAUTH_TOKEN"].get_secret_value() == "oc-a"
    files = grant(tmp_path, "codex").files
    assert json.loads(files[".local/share/opencode/auth.json"].get_secret_value()) == {
        "openai": {"type": "oauth", "access": "oc-o", "expires": later}
    }


def test_nothing_found_is_a_clear_error(tmp_path: Path) -> None:
    """A host without any login fails naming the provider and the HOME that was searched; junk files are skipped."""
    write(tmp_path, ".claude.json", ["not", "an", "object"])
    (tmp_path / ".codex").mkdir()
    (tmp_path / ".codex" / "auth.json").write_text("{not json")
    with pytest.raises(CredentialError) as missing:
        grant(tmp_path, "claude")
    assert "no anthropic credential" in missing.value.message and str(tmp_path) in missing.value.message
    with pytest.raises(CredentialError, match="no openai credential"):
        grant(tmp_path, "codex")
