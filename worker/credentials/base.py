"""What every credential strategy produces, and the interface they share.

A strategy turns a request into a :class:`CredentialGrant`: environment variables and files for the daemon
(values as ``SecretStr``) and the values to redact from anything we print. ``release`` undoes whatever the
grant created for that request (a vault placeholder) when the session ends or its bring-up fails; it is keyed
by the request, so a worker other than the one that granted can release. ``bind`` tells the strategy where the
sandbox that got the grant lives, once it exists, so a credential that can be tied to it is.

Every strategy of the registry (:mod:`worker.credentials`) subclasses :class:`RegisteredStrategy`: besides
``grant`` and ``release``, it names its settings block (``settings_model``) and builds itself from the worker's
settings (``from_settings``), or declines when they do not configure it.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, Self

from pydantic import BaseModel, SecretStr

from worker.models import SessionRequest, Strategy

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store


@dataclass(frozen=True, slots=True)
class CredentialGrant:
    """Credentials for one session. ``env`` goes into the daemon's environment (the agent inherits it);
    ``files`` are written under the sandbox user's HOME (paths relative to it) with mode 0600."""

    strategy: Strategy
    env: Mapping[str, SecretStr] = field(default_factory=dict)
    plain_env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, SecretStr] = field(default_factory=dict)

    def secret_values(self) -> list[str]:
        """Every secret value this grant holds, for redaction: the variables (keys, tokens, a vault's placeholder),
        the files, and the tokens inside a file (an agent may print one field of its credentials file)."""
        values = [v.get_secret_value() for v in (*self.env.values(), *self.files.values())]
        for content in self.files.values():
            values += _tokens_in(content.get_secret_value())
        return [v for v in values if v]

    def __repr__(self) -> str:
        return (
            f"CredentialGrant(strategy={self.strategy.value!r}, env={sorted(self.env)!r}, "
            f"plain_env={sorted(self.plain_env)!r}, files={sorted(self.files)!r})"
        )


_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")  # a key, token or JWT; not a date, a word or a URL


def _tokens_in(content: str) -> list[str]:
    """The token-like strings of a JSON credentials file, at any depth."""
    try:
        data = json.loads(content)
    except ValueError:
        return []
    found: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str) and _TOKEN.fullmatch(item):
            found.append(item)
    return found


class CredentialStrategy(Protocol):
    """One way of giving an agent its LLM credentials."""

    name: Strategy
    # Whether ``grant`` creates something outside the worker that ``release`` undoes (a placeholder bound in Redis, a
    # minted key): the bring-up's record names the credentials stage before such a grant runs.
    creates: bool

    def grant(self, request: SessionRequest) -> CredentialGrant:
        """Credentials for this request; raises CredentialError (naming the field) when it cannot."""
        ...

    def bind(self, request: SessionRequest, source: str) -> None:
        """The sandbox the grant went to is at ``source`` (its private address): restrict the credential to it
        where the strategy can (the vault's placeholder)."""
        ...

    def adopt(
        self, request: SessionRequest, grant: CredentialGrant, placeholder: SecretStr, source: str | None
    ) -> CredentialGrant | None:
        """``grant`` with ``placeholder`` (already in a warm sandbox, bound to nothing) as its credential, bound to
        this request in place of the grant's own; None where the strategy cannot (the caller rebinds instead)."""
        ...

    def release(self, request: SessionRequest) -> None:
        """Undo what ``grant`` created for this request. Idempotent."""
        ...


class RegisteredStrategy(ABC):
    """A strategy of the registry. ``name`` is its registry key; ``settings_model``, when set, is its block of
    the settings, ``SANDBOX_WORKER_CREDENTIALS__<NAME>__*`` (read it with
    ``settings.credentials.strategy_settings(name, model)``)."""

    name: Strategy
    creates: bool = False  # as CredentialStrategy.creates
    settings_model: ClassVar[type[BaseModel] | None] = None

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self | None:
        """The strategy as these settings configure it; None when they do not (the worker does not offer it)."""

    @abstractmethod
    def grant(self, request: SessionRequest) -> CredentialGrant:
        """Credentials for this request; raises CredentialError (naming the field) when it cannot."""

    def bind(self, request: SessionRequest, source: str) -> None:
        """Restrict the grant to the sandbox at ``source`` where the strategy can; most hand out a key as is."""
        return None

    def adopt(
        self, request: SessionRequest, grant: CredentialGrant, placeholder: SecretStr, source: str | None
    ) -> CredentialGrant | None:
        """Take a warm sandbox's unbound placeholder as this grant's credential; only a proxied credential can."""
        return None

    @abstractmethod
    def release(self, request: SessionRequest) -> None:
        """Undo what ``grant`` created for this request. Idempotent."""


NO_CREDENTIALS = CredentialGrant(strategy=Strategy("none"))
