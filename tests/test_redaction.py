"""Unit tests of the redactor: registered secret values never survive into text or log events."""

from __future__ import annotations

from pydantic import SecretStr

from worker.credentials.base import CredentialGrant
from worker.models import Strategy
from worker.redaction import MASK, Redactor


def test_registered_values_are_masked_everywhere() -> None:
    """A registered value is masked in text and in every string field of a log event, until forgotten."""
    redactor = Redactor()
    redactor.register(["sk-ant-secret-123"])
    assert redactor.redact("key=sk-ant-secret-123;") == f"key={MASK};"
    event = redactor.processor(None, "info", {"event": "x sk-ant-secret-123", "n": 1})
    assert event == {"event": f"x {MASK}", "n": 1}
    redactor.forget(["sk-ant-secret-123"])
    assert redactor.redact("sk-ant-secret-123") == "sk-ant-secret-123"


def test_short_values_are_not_registered() -> None:
    """Values too short to be secrets would mask ordinary words, so they are ignored."""
    redactor = Redactor()
    redactor.register(["abc"])
    assert redactor.redact("abc") == "abc"


def test_grant_repr_names_variables_but_not_values() -> None:
    """A CredentialGrant's repr lists variable names and never their values."""
    grant = CredentialGrant(strategy=Strategy.byok, env={"ANTHROPIC_API_KEY": SecretStr("sk-ant-xyz-789")})
    assert "ANTHROPIC_API_KEY" in repr(grant)
    assert "sk-ant-xyz-789" not in repr(grant)
    assert grant.secret_values() == ["sk-ant-xyz-789"]
