"""Building the environments of a session: the sandbox's (non-secret) and the daemon's (with credentials).

The daemon gives its own environment to the agent, so everything the agent needs is set when it starts.
User variables are refused where they would shadow credentials or the daemon's own knobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import SecretStr

from worker.agents import AGENT_VARIABLES, AgentSetup
from worker.credentials.agents import CREDENTIAL_VARIABLES
from worker.credentials.base import CredentialGrant
from worker.errors import InvalidRequest
from worker.models import SessionRequest

RESERVED_NAMES = CREDENTIAL_VARIABLES | AGENT_VARIABLES | {"HOME", "PATH", "USER", "XDG_DATA_HOME", "PWD"}
RESERVED_PREFIXES = ("SANDBOX_AGENT_", "SANDBOX_WORKER_")


@dataclass(frozen=True, slots=True)
class SessionEnvironment:
    sandbox_env: dict[str, str] = field(default_factory=dict)
    daemon_env: dict[str, SecretStr | str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SessionEnvironment(sandbox_env={sorted(self.sandbox_env)!r}, daemon_env={sorted(self.daemon_env)!r})"


def check_user_env(request: SessionRequest) -> None:
    for name in request.sandbox.env:
        if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
            raise InvalidRequest(
                f"{name} is reserved: credentials come from the credentials strategy and the worker sets "
                "the daemon's own variables",
                field=f"sandbox.env.{name}",
            )


def daemon_environment(
    grant: CredentialGrant, agent: AgentSetup, user_env: dict[str, str] | None = None
) -> dict[str, SecretStr | str]:
    """The daemon's variables: the user's, then the agent's switches, then the credentials (which win)."""
    return {**(user_env or {}), **agent.env, **grant.plain_env, **grant.env}


def build_environment(request: SessionRequest, grant: CredentialGrant, agent: AgentSetup) -> SessionEnvironment:
    check_user_env(request)
    user_env = dict(request.sandbox.env)
    return SessionEnvironment(sandbox_env=user_env, daemon_env=daemon_environment(grant, agent, user_env))
