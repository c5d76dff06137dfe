"""The data at the edges: what a session request is, and what comes back.

A :class:`SessionRequest` carries no secret value: secrets travel as references (``secret_ref``, vault
names) resolved on the worker. ``docs/session-request.schema.json`` is generated from this module
(``sandbox-worker schema``) and a test keeps the two in sync.
"""

from __future__ import annotations

import fnmatch
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from providers import REGISTRY as PROVIDERS
from worker.credentials import REGISTRY as STRATEGIES
from worker.errors import InvalidRequest

# Ids end up in sandbox labels and E2B metadata filters, which only survive a small alphabet.
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# Variables a request may not set, by why (shell patterns, matched case-insensitively: curl and others read the
# lowercase proxy variables). The requester is not trusted with what runs in the sandbox beside its prompt, where
# the agent's traffic goes, which servers it trusts, or how the agent finds its credentials: under `shared` or
# `subscription` any of these could redirect or intercept a key the organisation pays for.
ENV_DENIED: dict[str, tuple[str, ...]] = {
    "a loader, runtime or shell variable changes what code runs": (
        "LD_*", "DYLD_*", "GLIBC_TUNABLES", "GCONV_PATH", "NODE_OPTIONS", "NODE_PATH", "NODE_EXTRA_CA_CERTS",
        "NODE_TLS_REJECT_UNAUTHORIZED", "NODE_REPL_EXTERNAL_MODULE", "NPM_CONFIG_*", "BUN_*", "DENO_*", "PYTHON*",
        "PERL*", "RUBY*", "GEM_*", "BUNDLE_*", "LUA_*", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
        "BASH_ENV", "BASH_FUNC_*", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH",
        "ZDOTDIR", "PATH", "HOME", "SHELL", "USER", "LOGNAME", "PWD", "XDG_*",
    ),
    "a proxy variable routes the agent's traffic, credentials included": ("*_PROXY",),
    "a CA or TLS variable changes which servers are trusted": (
        "SSL_*", "OPENSSL_*", "SSLKEYLOGFILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_*",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    ),
    "the agents' and LLM providers' settings come from the worker and the credentials strategy": (
        "CLAUDE_*", "ANTHROPIC_*", "OPENAI_*", "CODEX_*", "OPENCODE_*", "AMP_*", "OPENROUTER_*", "LITELLM_*",
        "PORTKEY_*", "AWS_*", "GOOGLE_*", "GCLOUD_*", "CLOUDSDK_*", "VERTEX*", "AZURE_*", "DISABLE_TELEMETRY",
        "DISABLE_ERROR_REPORTING", "IS_SANDBOX",
    ),
    "a git or ssh variable runs commands or rewrites remotes": (
        "GIT_SSH*", "GIT_CONFIG*", "GIT_ASKPASS", "SSH_ASKPASS", "GIT_EXEC_PATH", "GIT_PROXY_COMMAND",
        "GIT_TEMPLATE_DIR", "SSH_AUTH_SOCK",
    ),
    "the worker and the daemon set their own variables": ("SANDBOX_AGENT_*", "SANDBOX_WORKER_*"),
}  # fmt: skip


def env_denied(name: str) -> str | None:
    """Why a request may not set the variable ``name``; None when it may."""
    upper = name.upper()
    for reason, patterns in ENV_DENIED.items():
        if any(fnmatch.fnmatchcase(upper, pattern) for pattern in patterns):
            return reason
    return None


def _allowed_env_name(name: str) -> str:
    if reason := env_denied(name):
        raise ValueError(f"{name} may not be set: {reason}")
    return name


EnvName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"), AfterValidator(_allowed_env_name)
]
# host, *.domain or an IPv4 address/CIDR, with an optional :port.
EgressEntry = Annotated[
    str, StringConstraints(pattern=r"^(\*\.)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}(/[0-9]{1,2})?(:[0-9]{1,5})?$")
]
EGRESS_MAX = 32


# Bounds on what a request may carry, so that an oversized one is refused at claim naming its field instead of
# reaching a provider (an engine or an API limit) or filling Redis. The prompt's bound is on SessionOptions.
ENV_ENTRIES_MAX = 256
ENV_VALUE_MAX = 32 * 1024
ENV_TOTAL_MAX = 128 * 1024
LABELS_MAX = 32
# The kept reply is cut at this many characters (with REPLY_CUT_MARKER after it): records and task results stay
# small whatever the agent says.
REPLY_MAX = 64 * 1024
REPLY_CUT_MARKER = f"\n[sandbox-worker: reply cut after {REPLY_MAX} characters]"


def cap_reply(text: str) -> str:
    """The agent's reply as it is kept: at most REPLY_MAX characters, then a marker saying it was cut."""
    return text if len(text) <= REPLY_MAX else text[:REPLY_MAX] + REPLY_CUT_MARKER


class Agent(StrEnum):
    claude = "claude"
    codex = "codex"
    opencode = "opencode"
    amp = "amp"
    mock = "mock"


# One member per entry of the provider registry (providers/__init__.py), so adding a provider needs no edit
# here. Members are only known at run time: code names them by value, ProviderName("docker").
ProviderName = StrEnum("ProviderName", [(name, name) for name in PROVIDERS], module=__name__)  # type: ignore[misc]

# Likewise one member per entry of the credential strategy registry (worker/credentials/__init__.py), in its
# order: Strategy("byok").
Strategy = StrEnum("Strategy", [(name, name) for name in STRATEGIES], module=__name__)  # type: ignore[misc]


class LLMProvider(StrEnum):
    anthropic = "anthropic"
    openai = "openai"


class GatewayBackend(StrEnum):
    openrouter = "openrouter"
    litellm = "litellm"
    portkey = "portkey"


class SessionState(StrEnum):
    queued = "queued"
    starting = "starting"
    ready = "ready"
    failed = "failed"
    terminated = "terminated"

    @property
    def terminal(self) -> bool:
        return self in (SessionState.ready, SessionState.failed, SessionState.terminated)


class PermissionPolicy(StrEnum):
    """How the worker answers an agent's permission requests (a tool about to run) while it drives the session."""

    approve = "approve"  # run tools without asking: the sandbox is the boundary (headless default)
    reject = "reject"  # refuse every tool the agent asks about; the turn still ends


class InstallMode(StrEnum):
    preinstalled = "preinstalled"
    upload = "upload"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CredentialsSpec(_Strict):
    """How the agent gets its LLM credentials. References only, never values."""

    strategy: Strategy | None = Field(
        None, description="Credential strategy; the tenant's default (or 'none' for the mock agent) when absent."
    )
    secret_ref: str | None = Field(
        None, max_length=128, description="Name of the tenant's secret in the secret store (strategy 'byok')."
    )
    gateway: GatewayBackend | None = Field(None, description="Gateway backend (strategy 'gateway').")
    llm_provider: LLMProvider | None = Field(
        None, description="LLM provider for agents that accept several (opencode); the agent's own otherwise."
    )
    vaults: list[Identifier] = Field(
        default_factory=list, max_length=16, description="Vaults attached to the session (strategy 'vault')."
    )


class SandboxOptions(_Strict):
    image: str | None = Field(
        None,
        max_length=512,
        description="Image (docker), template (e2b) or snapshot (daytona); the provider default when absent.",
    )
    cpu: float | None = Field(None, gt=0, le=64, description="CPU cores.")
    memory_mb: int | None = Field(None, ge=128, le=262144, description="Memory limit in MiB.")
    ttl_seconds: int = Field(3600, gt=0, le=7 * 24 * 3600, description="Hard lifetime of the sandbox and session.")
    env: dict[EnvName, Annotated[str, StringConstraints(max_length=ENV_VALUE_MAX)]] = Field(
        default_factory=dict,
        max_length=ENV_ENTRIES_MAX,
        description=f"Non-secret environment for the sandbox and the agent: up to {ENV_ENTRIES_MAX} entries, each "
        f"value up to {ENV_VALUE_MAX} characters, {ENV_TOTAL_MAX} bytes in all (names and values, UTF-8). "
        "Loader, runtime, shell, proxy, CA/TLS, git/ssh, agent, LLM provider and cloud variables are refused "
        "(docs/credentials.md, 'User environment').",
    )
    labels: dict[Identifier, Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=dict, max_length=LABELS_MAX, description=f"Extra labels on the sandbox (up to {LABELS_MAX})."
    )
    egress: list[EgressEntry] = Field(
        default_factory=list,
        max_length=EGRESS_MAX,
        description="Destinations the sandbox may reach besides the LLM endpoint and what the operator allows "
        "every sandbox: host, *.domain or an IPv4 address/CIDR, each with an optional :port. Empty (the default): "
        "nothing else. What each provider can enforce differs (docs/providers.md); one that cannot enforce an "
        "entry refuses the request.",
    )

    @field_validator("env")
    @classmethod
    def _env_size(cls, env: dict[str, str]) -> dict[str, str]:
        total = sum(len(name.encode()) + len(value.encode()) for name, value in env.items())
        if total > ENV_TOTAL_MAX:
            raise ValueError(f"the environment is {total} bytes, more than {ENV_TOTAL_MAX}")
        return env


class SessionOptions(_Strict):
    cwd: str = Field(
        "/workspace", pattern=r"^/", max_length=1024, description="Absolute working directory of the session."
    )
    prompt: str | None = Field(None, max_length=100_000, description="First prompt, sent once the session exists.")
    model: str | None = Field(None, max_length=128, description="Agent model option (session/set_config_option).")
    mode: str | None = Field(None, max_length=64, description="Agent mode; a headless-safe default when absent.")
    permissions: PermissionPolicy = Field(
        PermissionPolicy.approve,
        description="How the worker answers the agent's permission requests: 'approve' runs tools without asking "
        "(the sandbox is the boundary), 'reject' refuses them. Requests are never left waiting.",
    )


class SessionRequest(_Strict):
    """A request to bring up one agent session. Safe to log and to put on the broker."""

    request_id: Identifier = Field(
        default_factory=lambda: uuid.uuid4().hex, description="Client-chosen idempotency key; generated when absent."
    )
    tenant_id: Identifier = Field(description="The tenant the session runs for.")
    agent: Agent
    provider: ProviderName
    credentials: CredentialsSpec = Field(default_factory=CredentialsSpec)
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions)
    session: SessionOptions = Field(default_factory=SessionOptions)
    fallback_providers: list[ProviderName] | None = Field(
        None,
        max_length=len(PROVIDERS),
        description="Providers to fail over to, in order, when `provider` is down, out of quota or skipped by its "
        "circuit breaker; the operator's list for `provider` (fleet.failover) when absent, none when empty. A "
        "fallback runs the request with its own default image (sandbox.image is the first choice's).",
    )

    @field_validator("request_id", "tenant_id", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value


class ErrorInfo(_Strict):
    code: str
    stage: str | None = None
    message: str
    field: str | None = None


class SkippedProvider(_Strict):
    """A provider a request did not run on, and why."""

    provider: ProviderName
    reason: str


class SessionResult(_Strict):
    """What a client gets back. Holds no secret: the daemon token is handed out only on request."""

    request_id: str
    tenant_id: str | None = None
    state: SessionState
    stage: str | None = Field(None, description="The stage in progress, or the last one reached.")
    provider: ProviderName | None = None
    agent: Agent | None = None
    sandbox_id: str | None = None
    daemon_url: str | None = None
    server_id: str | None = None
    session_id: str | None = None
    reply: str | None = Field(
        None,
        description="The agent's reply to the first prompt, when one was sent; cut after 65536 characters, with a marker saying so.",
    )

    @field_validator("reply")
    @classmethod
    def _cap_reply(cls, reply: str | None) -> str | None:
        return cap_reply(reply) if reply is not None else None

    stop_reason: str | None = Field(None, description="Why the first prompt's turn ended (ACP stopReason).")
    usage: dict[str, int] | None = Field(None, description="Token usage of the first prompt, as the agent reported it.")
    tool_calls: list[str] = Field(
        default_factory=list, description="The tool calls of the first prompt's turn (their titles), in order."
    )
    timings_ms: dict[str, float] = Field(default_factory=dict)
    warm: bool = Field(
        False, description="The sandbox came ready from a warm pool (timings_ms.pool_claim: the claim's latency)."
    )
    error: ErrorInfo | None = None
    updated_at: float = Field(default_factory=time.time)
    # The bring-up's own clock (epoch seconds): a client that noted when it submitted reads enqueue -> ready from
    # ready_at, and the queue wait from started_at (bench/ does).
    started_at: float | None = Field(None, description="When a worker began the latest bring-up attempt.")
    ready_at: float | None = Field(None, description="When the session became ready.")
    skipped: list[SkippedProvider] = Field(
        default_factory=list,
        description="Providers tried or passed over before the one that served (`provider`), with the reason.",
    )


def invalid_result(payload: Any, error: InvalidRequest) -> SessionResult:
    request_id = payload.get("request_id") if isinstance(payload, Mapping) else None
    return SessionResult(
        request_id=request_id if isinstance(request_id, str) and request_id else "invalid",
        state=SessionState.failed,
        stage="claim",
        error=ErrorInfo(code=error.code, stage="claim", message=error.message, field=error.field),
    )


def parse_request(payload: Any) -> SessionRequest:
    """Validate a raw request; the first problem becomes an InvalidRequest naming its field."""
    try:
        return SessionRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"] if part != "[key]") or "request"
        raise InvalidRequest(f"{where}: {first['msg']}", field=where) from None
