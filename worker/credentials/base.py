"""What every credential strategy produces, and the interface they share.

A strategy turns a request into a :class:`CredentialGrant`: environment variables and files for the daemon
(values as ``SecretStr``) and the values to redact from anything we print. ``release`` undoes whatever the
grant created for that request (a vault placeholder) when the session ends or its bring-up fails; it is keyed
by the request, so a worker other than the one that granted can release.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import SecretStr

from worker.models import SessionRequest, Strategy


@dataclass(frozen=True, slots=True)
class CredentialGrant:
    """Credentials for one session. ``env`` goes into the daemon's environment (the agent inherits it);
    ``files`` are written under the sandbox user's HOME (paths relative to it) with mode 0600."""

    strategy: Strategy
    env: Mapping[str, SecretStr] = field(default_factory=dict)
    plain_env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, SecretStr] = field(default_factory=dict)

    def secret_values(self) -> list[str]:
        """Every secret value this grant holds, for redaction."""
        values = [v.get_secret_value() for v in (*self.env.values(), *self.files.values())]
        return [v for v in values if v]

    def __repr__(self) -> str:
        return (
            f"CredentialGrant(strategy={self.strategy.value!r}, env={sorted(self.env)!r}, "
            f"plain_env={sorted(self.plain_env)!r}, files={sorted(self.files)!r})"
        )


class CredentialStrategy(Protocol):
    """One way of giving an agent its LLM credentials."""

    name: Strategy

    def grant(self, request: SessionRequest) -> CredentialGrant:
        """Credentials for this request; raises CredentialError (naming the field) when it cannot."""
        ...

    def release(self, request: SessionRequest) -> None:
        """Undo what ``grant`` created for this request. Idempotent."""
        ...


NO_CREDENTIALS = CredentialGrant(strategy=Strategy.none)
