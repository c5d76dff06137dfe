"""Worker settings: one ``SANDBOX_WORKER_`` prefix, nested blocks with ``__`` (``SANDBOX_WORKER_E2B__API_KEY``).

Each registered provider (``providers.REGISTRY``) adds one block named after it, typed by its driver's config
model; each registered credential strategy (``worker.credentials.REGISTRY``) that has settings adds one block
named after it to ``credentials``, typed by its ``settings_model``. Nothing happens at import time beyond
building the models; :func:`get_settings` reads the environment once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers import config_models
from providers.base import ProviderConfig
from worker import credentials, pins
from worker.auth import AuthSettings
from worker.credentials.settings import EgressSettings, ProviderURLs, SettingsBlock
from worker.fleet import FleetConfig
from worker.models import Agent, InstallMode, ProviderName, Strategy

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_OWNER = "sandbox-worker"  # shared by every fleet that keeps it: the reaper does not trust it alone


def _default_binary() -> Path:
    return Path.home() / ".cache" / "sandbox-worker" / "sandbox-agent" / pins.SANDBOX_AGENT_VERSION / "sandbox-agent"


_ModelT = TypeVar("_ModelT", bound=BaseModel)


def _with_blocks(models: Mapping[str, type[BaseModel]], what: str) -> Callable[[type[_ModelT]], type[_ModelT]]:
    """A class decorator: the class plus one field per entry of ``models``, named after it and typed by its
    model (so a provider's variables are ``SANDBOX_WORKER_<NAME>__*``). The fields follow the class's own, in
    the order of ``models``; ``what`` names the entries in the error when one clashes with a field."""

    def add_blocks(cls: type[_ModelT]) -> type[_ModelT]:
        blocks: dict[str, Any] = {name: (model, Field(default_factory=model)) for name, model in models.items()}
        if clashes := sorted(blocks.keys() & cls.model_fields.keys()):
            raise TypeError(f"{what} names {clashes} clash with settings of {cls.__name__}")
        return create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **blocks)

    return add_blocks


@_with_blocks(credentials.settings_models(), "credential strategy")
class CredentialsSettings(SettingsBlock):
    """The ``SANDBOX_WORKER_CREDENTIALS__*`` block: the pieces several strategies share, then one block per
    registered strategy that has settings, named after it and typed by its ``settings_model``."""

    provider_urls: ProviderURLs = Field(default_factory=ProviderURLs)
    egress: EgressSettings = Field(default_factory=EgressSettings)

    def strategy_settings(self, name: str, model: type[_ModelT]) -> _ModelT:
        """The settings block of the registered strategy ``name``, which is a ``model``."""
        block = getattr(self, Strategy(name).value)  # a field _with_blocks added
        if not isinstance(block, model):
            raise TypeError(f"the settings of strategy {name} are a {type(block).__name__}, not a {model.__name__}")
        return block


PoolBinding = Literal["llm-relay"]  # how a pool target's sessions bind a credential, besides its strategy


class PoolTarget(BaseModel):
    """One warm pool: sandboxes of ``provider`` started from ``image`` with a healthy daemon, for ``agent``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderName
    agent: Agent
    image: str | None = Field(None, description="The image, template or snapshot; the provider's default when unset.")
    size: int = Field(ge=0, le=200, description="Sandboxes kept ready.")
    strategy: Strategy | None = Field(
        None,
        description="vault: the pool serves vault sessions with no daemon restart: its daemon runs pointed at the "
        "egress proxy with a placeholder bound to no tenant until the claim binds it (worker/pool.py). Unset: a "
        "session adding nothing to the empty pooled daemon (mock) uses it as is, any other replaces it (or see "
        "binding).",
    )
    binding: PoolBinding | None = Field(
        None,
        description="llm-relay (agent claude, no strategy): the pooled Claude Code, its session made, talks to its LLM "
        "through the daemon front's relay on the sandbox's loopback, with a key that is nobody's; a session whose "
        "grant is an API key or bearer token in env (shared, byok, gateway, a subscription's API key) binds it at "
        "the claim by giving the relay its endpoint and headers, with no daemon restart (worker/pool.py).",
    )
    llm_base_url: str | None = Field(
        None,
        description="With strategy vault: the LLM endpoint the pool's agents reach through the egress proxy; a "
        "session's LLM vault must have the same llm_base_url to bind as is. The engine's public API when unset.",
    )

    @field_validator("strategy")
    @classmethod
    def _bindable(cls, strategy: Strategy | None) -> Strategy | None:
        if strategy is not None and strategy.value != "vault":
            raise ValueError("only the vault strategy binds a credential outside the sandbox (or leave it unset)")
        return strategy

    @model_validator(mode="after")
    def _relay_binding(self) -> PoolTarget:
        if self.binding is not None and (self.agent is not Agent.claude or self.strategy is not None):
            raise ValueError("binding llm-relay is Claude Code's (agent claude) and takes no strategy")
        return self


class PoolSettings(BaseModel):
    """The ``SANDBOX_WORKER_POOL__*`` block: warm pools (worker/pool.py, docs/operations.md). Off without targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[PoolTarget] = Field(
        default_factory=list,
        description='Pools to keep filled, a JSON list: [{"provider": "docker", "agent": "mock", "size": 4}] '
        "(image optional). Every worker refills them; any worker claims from them.",
    )
    max_age_seconds: int = Field(
        1800, gt=0, description="A ready sandbox older than this is never handed out: it is removed and replaced."
    )
    session_ttl_seconds: int = Field(
        3600,
        gt=0,
        description="The longest session ttl a warm sandbox serves (its hard lifetime is this plus max_age_seconds); "
        "a request asking for more starts cold.",
    )
    refill_interval_seconds: float = Field(
        2.0, gt=0, description="Seconds between two refill passes of a worker process's refill thread."
    )
    fill_timeout_seconds: int = Field(
        300,
        gt=0,
        description="How long a fill in progress counts towards its pool; after that it is taken for dead (its "
        "worker died) and its sandbox is the reaper's.",
    )


@_with_blocks(config_models(), "provider")
class Settings(BaseSettings):
    """Everything a worker reads from its environment (see docs/configuration.md)."""

    model_config = SettingsConfigDict(
        env_prefix="SANDBOX_WORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True
    )

    broker_url: str = Field(DEFAULT_REDIS, description="Celery broker.")
    result_backend: str = Field(DEFAULT_REDIS, description="Celery result backend.")
    redis_url: str = Field(DEFAULT_REDIS, description="Session records, leases, limits and the secret store.")
    fernet_key: SecretStr | None = Field(
        None,
        description="Fernet key encrypting secrets at rest in Redis (`sandbox-worker keygen`). Several keys, "
        "comma-separated, newest first: the first encrypts, every one decrypts (rotate with `sandbox-worker secrets "
        "rekey`, docs/credentials.md).",
    )
    owner: str = Field(
        DEFAULT_OWNER,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Owner label value: the reaper only touches sandboxes carrying it, and with the default only "
        "once Redis holds the fleet marker (give each fleet its own label).",
    )

    daemon_install: InstallMode = Field(InstallMode.preinstalled, description="How the daemon gets into the sandbox.")
    daemon_binary: Path = Field(
        default_factory=_default_binary, description="Static sandbox-agent binary for 'upload'."
    )
    daemon_port: int = Field(2468, ge=1, le=65535, description="Port the daemon listens on inside the sandbox.")
    health_timeout: float = Field(
        20.0,
        gt=0,
        description="Seconds for a daemon just started to answer its first request (the session's initialize, or /v1/health).",
    )
    session_timeout: float = Field(60.0, gt=0, description="Seconds for initialize and session/new.")
    prompt_timeout: float = Field(300.0, gt=0, description="Seconds for the first prompt's turn.")
    llm_retries: int = Field(
        1,
        ge=0,
        le=10,
        description="Retries an agent makes of a failed LLM API call (Claude Code's CLAUDE_CODE_MAX_RETRIES, Codex's "
        "request/stream retries), so a bad key or an outage surfaces in seconds rather than minutes.",
    )

    task_soft_time_limit: int = Field(900, gt=0, description="Celery soft time limit of one bring-up (s).")
    task_time_limit: int = Field(960, gt=0, description="Celery hard time limit of one bring-up (s).")
    record_retention_seconds: int = Field(
        7 * 24 * 3600,
        gt=0,
        description="How long a failed or terminated request's record is kept (and a duplicate submit answered from it).",
    )
    lease_seconds: int = Field(
        30, ge=5, description="Lease on a request while a worker brings it up; renewed by a heartbeat."
    )

    log_format: str = Field("auto", pattern=r"^(auto|json|console)$", description="Log renderer.")
    metrics_port: int = Field(
        9808,
        ge=0,
        le=65535,
        description="Port of the worker's Prometheus endpoint (`/metrics`, every pool process's samples); 0: off.",
    )
    metrics_host: str = Field("0.0.0.0", description="Address the Prometheus endpoint listens on.")  # noqa: S104
    heartbeat_file: Path = Field(
        Path("/tmp/sandbox-worker.heartbeat"),  # noqa: S108 - a liveness marker, holds nothing
        description="File the worker's main process touches while it runs (`sandbox-worker check --liveness`).",
    )
    heartbeat_seconds: float = Field(10.0, gt=0, description="Seconds between two touches of the heartbeat file.")

    providers: list[ProviderName] = Field(
        default_factory=lambda: [ProviderName("docker")], description="Providers the reaper sweeps (JSON list)."
    )
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    credentials: CredentialsSettings = Field(default_factory=CredentialsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    remote_control: bool = Field(
        False,
        description="Let Celery remote control (shutdown, pool changes, rate limits: anyone on the broker) reach the "
        "workers.",
    )

    def provider_config(self, name: str) -> ProviderConfig:
        """The settings block of the registered provider ``name``."""
        config = getattr(self, ProviderName(name).value)  # a field _with_blocks added
        assert isinstance(config, ProviderConfig)
        return config


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        env = f"{prefix}{name.upper()}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{env}__")
            continue
        default = "(computed)" if info.default_factory is not None else info.default
        if isinstance(default, SecretStr) or (default is None and "SecretStr" in str(annotation)):
            default = "(secret, unset)"
        rows.append(f"| `{env}` | `{default}` | {info.description or ''} |")
    return rows


def settings_reference() -> str:
    """docs/configuration.md, generated from the settings models (a test keeps the file in sync)."""
    header = [
        "# Configuration",
        "",
        "Every setting is an environment variable (or a line in `.env`). Nested blocks use `__`.",
        "Generated by `sandbox-worker settings --write` from `worker/config.py`; do not edit by hand.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    return "\n".join([*header, *_rows(Settings, "SANDBOX_WORKER_")]) + "\n"
