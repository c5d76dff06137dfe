"""Unit tests of who may ask for what (worker/auth.py): signatures, their window, tenants and images."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import InvalidToken
from pydantic import SecretStr, ValidationError

from worker.auth import (
    WORKER_APP,
    AuthMode,
    AuthSettings,
    Operation,
    Signer,
    authenticate,
    authorize_request,
    authorize_tenant,
)
from worker.errors import InvalidRequest
from worker.models import SessionRequest

KEY = "k" * 40
NOW = 1_800_000_000.0
DEFAULTS = ["sandbox-worker/sandbox:0.4.2-agents"]


def _settings(**overrides: Any) -> AuthSettings:
    apps = {
        "web": {"key": KEY, "tenants": ["acme", "beta-*"]},
        "narrow": {"key": "n" * 40, "tenants": ["*"], "images": ["registry.example/team/*"]},
    }
    return AuthSettings.model_validate({"apps": apps, "images": ["registry.example/*"], **overrides})


def _payload(**overrides: Any) -> dict[str, Any]:
    return {"request_id": "r1", "tenant_id": "acme", "agent": "mock", "provider": "docker", **overrides}


def _refusal(call: Any) -> tuple[str | None, str]:
    with pytest.raises(InvalidRequest) as caught:
        call()
    return caught.value.field, caught.value.message


def test_a_signed_request_verifies_whatever_its_key_order() -> None:
    """The worker recomputes the signature over the request as it arrived, its keys in any order."""
    envelope = Signer("web", SecretStr(KEY)).sign(Operation.create, _payload(), now=NOW)
    reordered = dict(reversed(list(_payload().items())))
    app = authenticate(_settings(), Operation.create, reordered, envelope, now=NOW + 5)
    assert app is not None and app.may_act_for("beta-7")
    assert KEY not in str(envelope) and KEY not in repr(Signer("web", SecretStr(KEY)))


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("unsigned", "auth"),
        ("not an object", "auth"),
        ("unknown app", "auth.app_id"),
        ("wrong key", "auth.signature"),
        ("altered request", "auth.signature"),
        ("signed for terminate", "auth.signature"),
        ("expired", "auth.issued_at"),
        ("from the future", "auth.issued_at"),
    ],
)
def test_a_bad_signature_is_refused_naming_the_field(case: str, field: str) -> None:
    good = Signer("web", SecretStr(KEY))
    payload, now = _payload(), NOW
    auth: Any = good.sign(Operation.create, payload, now=NOW)
    if case == "unsigned":
        auth = None
    elif case == "not an object":
        auth = "web:signature"
    elif case == "unknown app":
        auth = Signer("other", SecretStr(KEY)).sign(Operation.create, payload, now=NOW)
    elif case == "wrong key":
        auth = Signer("web", SecretStr("x" * 40)).sign(Operation.create, payload, now=NOW)
    elif case == "altered request":
        payload = _payload(tenant_id="beta-1")
    elif case == "signed for terminate":
        auth = good.sign(Operation.terminate, payload, now=NOW)
    elif case == "expired":
        now = NOW + 3601
    elif case == "from the future":
        now = NOW - 61
    got, _ = _refusal(lambda: authenticate(_settings(), Operation.create, payload, auth, now=now))
    assert got == field


def test_open_mode_checks_nothing() -> None:
    settings = _settings(mode=AuthMode.open)
    assert authenticate(settings, Operation.create, _payload(), None) is None
    authorize_request(settings, None, SessionRequest.model_validate(_payload(tenant_id="anyone")), DEFAULTS)


def test_tenants_are_ids_or_patterns() -> None:
    app = _settings().apps["web"]
    authorize_tenant(app, "acme")
    authorize_tenant(app, "beta-42")
    assert _refusal(lambda: authorize_tenant(app, "acme2")) == ("tenant_id", "the app may not act for tenant 'acme2'")
    assert _refusal(lambda: authorize_tenant(app, None))[0] == "tenant_id"


@pytest.mark.parametrize(
    ("app_id", "image", "allowed"),
    [
        ("web", None, True),  # the provider's default
        ("web", DEFAULTS[0], True),  # named explicitly
        ("web", "registry.example/tools:1", True),  # on the operator's list
        ("web", "evil.example/miner:latest", False),
        ("narrow", "registry.example/team/x:1", True),  # on both lists
        ("narrow", "registry.example/tools:1", False),  # the operator's, not the app's
        ("narrow", DEFAULTS[0], True),
    ],
)
def test_images_are_the_defaults_or_on_the_allow_lists(app_id: str, image: str | None, allowed: bool) -> None:
    settings = _settings()
    request = SessionRequest.model_validate(_payload(sandbox={"image": image} if image else {}))
    check = lambda: authorize_request(settings, settings.apps[app_id], request, DEFAULTS)  # noqa: E731
    if allowed:
        check()
    else:
        assert _refusal(check)[0] == "sandbox.image"


def test_the_worker_key_signs_for_any_tenant_and_the_client_key_comes_first() -> None:
    settings = _settings(worker_key="w" * 40)
    signer = settings.signer()
    assert signer is not None and signer.app_id == WORKER_APP
    app = authenticate(settings, Operation.create, _payload(), signer.sign(Operation.create, _payload()))
    assert app is not None and app.may_act_for("anyone")
    client = _settings(worker_key="w" * 40, app_id="web", app_key=KEY).signer()
    assert client is not None and client.app_id == "web"
    assert _settings().signer() is None
    # Without a worker key, nobody may sign as the worker.
    forged = Signer(WORKER_APP, SecretStr("")).sign(Operation.create, _payload())
    assert _refusal(lambda: authenticate(_settings(), Operation.create, _payload(), forged))[0] == "auth.app_id"


def test_a_sealed_secret_opens_only_with_the_apps_key() -> None:
    settings = _settings()
    sealed = settings.apps["web"].seal(SecretStr("daemon-token-1"))
    assert "daemon-token-1" not in sealed
    assert Signer("web", SecretStr(KEY)).unseal(sealed).get_secret_value() == "daemon-token-1"
    with pytest.raises(InvalidToken):
        Signer("web", SecretStr("x" * 40)).unseal(sealed)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="worker_key"):
        _settings(worker_key="")
    with pytest.raises(ValidationError, match="key"):
        AuthSettings.model_validate({"apps": {"web": {"key": "short", "tenants": ["*"]}}})


def test_redis_acl_prints_the_two_users_with_hashed_passwords() -> None:
    """`sandbox-worker redis-acl`: the passwords appear only as SHA-256; the app user gets no sw: key."""
    from typer.testing import CliRunner

    from worker import cli

    env = {"SANDBOX_WORKER_ACL_APP_PASSWORD": "app-pw-123", "SANDBOX_WORKER_ACL_WORKER_PASSWORD": "worker-pw-456"}
    done = CliRunner().invoke(cli.app, ["redis-acl", "--app-user", "shop"], env=env)
    assert done.exit_code == 0, done.output
    app_line, worker_line = done.stdout.splitlines()
    assert app_line.startswith("ACL SETUSER shop reset on #") and worker_line.startswith("ACL SETUSER sandbox-worker")
    assert "pw-" not in done.stdout
    assert "%W~sessions*" in app_line and "sw:" not in app_line and "~*" not in app_line.split()
