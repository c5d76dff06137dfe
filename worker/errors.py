"""The project's exception tree.

Every failure a session bring-up can meet ends as one of these, so the pipeline can decide in one place
whether to retry, and the result can name a stable ``code``::

    SandboxWorkerError                 code            transient
    ├── InvalidRequest                 invalid_request   no   (names the field)
    ├── ConfigurationError             configuration     no
    ├── CredentialError                credentials       no   (names the field when one is at fault)
    ├── ProviderError                  provider_error    no
    │   ├── ProviderAuthError          provider_auth     no
    │   ├── SandboxGone                sandbox_gone      no
    │   └── ProviderUnavailable        provider_unavailable  yes
    │       └── ProviderRateLimited    provider_rate_limited yes
    ├── DaemonError                    daemon_error      no
    │   ├── DaemonUnhealthy            daemon_unhealthy  no
    │   └── DaemonUnreachable          daemon_unreachable yes
    ├── AgentError                     agent_error       no
    │   ├── LLMAuthFailed              llm_auth_failed   no   (the LLM API refused the key)
    │   └── LLMRateLimited             llm_rate_limited  no   (429 through the agent's own retries)
    ├── CapacityTimeout                capacity_timeout  no   (waited its whole allowance for a slot)
    ├── TooManyAttempts                too_many_attempts no   (retries, redeliveries and takeovers, together)
    ├── StoreUnavailable               store_unavailable yes  (Redis unreachable through reconnects)
    ├── Busy                           busy              yes  (another worker holds the request)
    └── Terminated                     terminated        no

Messages never carry secret values: callers put names, ids and statuses in them, never env values.
"""

from __future__ import annotations


class SandboxWorkerError(Exception):
    """Base of every error the worker raises on purpose."""

    code = "internal_error"
    transient = False

    def __init__(self, message: str, *, field: str | None = None, stage: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.stage = stage

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r}, stage={self.stage!r})"


class InvalidRequest(SandboxWorkerError):
    """The request itself is wrong; retrying cannot help."""

    code = "invalid_request"


class ConfigurationError(SandboxWorkerError):
    """The worker's settings cannot serve this request (missing key, unknown provider setting)."""

    code = "configuration"


class CredentialError(SandboxWorkerError):
    """A credential strategy cannot produce a grant for this request."""

    code = "credentials"


class ProviderError(SandboxWorkerError):
    """A sandbox provider refused or failed an operation."""

    code = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        sandbox_id: str | None = None,
        status: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.provider = provider
        self.sandbox_id = sandbox_id
        self.status = status


class ProviderAuthError(ProviderError):
    """The provider rejected our credentials (401/403): a configuration problem, not a passing one."""

    code = "provider_auth"


class SandboxGone(ProviderError):
    """The sandbox no longer exists (killed, expired, removed behind our back)."""

    code = "sandbox_gone"


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or answered 5xx; worth retrying."""

    code = "provider_unavailable"
    transient = True


class ProviderRateLimited(ProviderUnavailable):
    """The provider asked us to slow down (429 or a quota)."""

    code = "provider_rate_limited"


class DaemonError(SandboxWorkerError):
    """The sandbox-agent daemon misbehaved."""

    code = "daemon_error"


class DaemonUnhealthy(DaemonError):
    """The daemon did not become healthy before its deadline."""

    code = "daemon_unhealthy"


class DaemonUnreachable(DaemonError):
    """A request to a running daemon failed at the transport level."""

    code = "daemon_unreachable"
    transient = True


class AgentError(SandboxWorkerError):
    """The agent behind the daemon failed (install, crash, JSON-RPC error)."""

    code = "agent_error"


class LLMAuthFailed(AgentError):
    """The LLM API refused the session's credential (a wrong, revoked or expired key)."""

    code = "llm_auth_failed"


class LLMRateLimited(AgentError):
    """The LLM API kept answering 429 (rate limit or quota) through the agent's own retries."""

    code = "llm_rate_limited"


class CapacityTimeout(SandboxWorkerError):
    """A request waited its whole allowance for a slot under a cap or quota."""

    code = "capacity_timeout"


class TooManyAttempts(SandboxWorkerError):
    """The request has been attempted ``fleet.max_attempts`` times (retries, redeliveries, takeovers)."""

    code = "too_many_attempts"


class StoreUnavailable(SandboxWorkerError):
    """Redis stayed unreachable through the client's reconnect attempts: an infrastructure failure."""

    code = "store_unavailable"
    transient = True


class Busy(SandboxWorkerError):
    """Another worker is still bringing this request up."""

    code = "busy"
    transient = True


class Terminated(SandboxWorkerError):
    """The session was terminated while it was being brought up."""

    code = "terminated"
