"""Building the environments of a session: the sandbox's (non-secret) and the daemon's (with credentials).

The daemon gives its own environment to the agent, so everything the agent needs is set when it starts. A request's
variables that would shadow credentials or the worker's and the daemon's own were refused when it was parsed
(``worker.models.ENV_DENIED``, which covers every variable the worker sets: tests/test_models.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import SecretStr

from worker.agents import AgentSetup
from worker.credentials.base import CredentialGrant
from worker.models import SessionRequest


@dataclass(frozen=True, slots=True)
class SessionEnvironment:
    sandbox_env: dict[str, str] = field(default_factory=dict)
    daemon_env: dict[str, SecretStr | str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SessionEnvironment(sandbox_env={sorted(self.sandbox_env)!r}, daemon_env={sorted(self.daemon_env)!r})"


def daemon_environment(
    grant: CredentialGrant, agent: AgentSetup, user_env: dict[str, str] | None = None
) -> dict[str, SecretStr | str]:
    """The daemon's variables: the user's, then the agent's switches, then the credentials (which win)."""
    return {**(user_env or {}), **agent.env, **grant.plain_env, **grant.env}


def build_environment(request: SessionRequest, grant: CredentialGrant, agent: AgentSetup) -> SessionEnvironment:
    user_env = dict(request.sandbox.env)
    return SessionEnvironment(sandbox_env=user_env, daemon_env=daemon_environment(grant, agent, user_env))
