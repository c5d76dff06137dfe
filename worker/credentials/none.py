"""No credentials: the agent gets no LLM credential from us (the mock agent, or an image that brings its own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from worker.credentials.base import NO_CREDENTIALS, CredentialGrant, RegisteredStrategy
from worker.models import SessionRequest, Strategy

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store import Store


class NoCredentials(RegisteredStrategy):
    name = Strategy("none")

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> Self:
        """Always offered."""
        return cls()

    def grant(self, request: SessionRequest) -> CredentialGrant:
        return NO_CREDENTIALS

    def release(self, request: SessionRequest) -> None:
        return None
