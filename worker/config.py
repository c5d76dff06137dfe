"""Worker settings: one ``SANDBOX_WORKER_`` prefix, nested blocks with ``__`` (``SANDBOX_WORKER_E2B__API_KEY``).

Nothing happens at import time; :func:`get_settings` builds the settings once per process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers.config import DaytonaConfig, DockerConfig, E2BConfig
from worker import pins
from worker.models import InstallMode

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _default_binary() -> Path:
    return Path.home() / ".cache" / "sandbox-worker" / "sandbox-agent" / pins.SANDBOX_AGENT_VERSION / "sandbox-agent"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SANDBOX_WORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True
    )

    broker_url: str = Field(DEFAULT_REDIS, description="Celery broker.")
    result_backend: str = Field(DEFAULT_REDIS, description="Celery result backend.")
    redis_url: str = Field(DEFAULT_REDIS, description="Session records, leases, limits and the secret store.")
    fernet_key: SecretStr | None = Field(
        None, description="Fernet key encrypting secrets at rest in Redis (`sandbox-worker keygen`)."
    )
    owner: str = Field(
        "sandbox-worker",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Owner label value: the reaper only touches sandboxes carrying it.",
    )

    daemon_install: InstallMode = Field(InstallMode.preinstalled, description="How the daemon gets into the sandbox.")
    daemon_binary: Path = Field(
        default_factory=_default_binary, description="Static sandbox-agent binary for 'upload'."
    )
    daemon_port: int = Field(2468, ge=1, le=65535, description="Port the daemon listens on inside the sandbox.")
    health_timeout: float = Field(20.0, gt=0, description="Seconds for the daemon to answer /v1/health.")
    session_timeout: float = Field(60.0, gt=0, description="Seconds for initialize and session/new.")
    prompt_timeout: float = Field(300.0, gt=0, description="Seconds for the first prompt's turn.")

    task_soft_time_limit: int = Field(900, gt=0, description="Celery soft time limit of one bring-up (s).")
    task_time_limit: int = Field(960, gt=0, description="Celery hard time limit of one bring-up (s).")
    lease_seconds: int = Field(
        30, ge=5, description="Lease on a request while a worker brings it up; renewed by a heartbeat."
    )

    log_format: str = Field("auto", pattern=r"^(auto|json|console)$", description="Log renderer.")

    docker: DockerConfig = Field(default_factory=DockerConfig)
    e2b: E2BConfig = Field(default_factory=E2BConfig)
    daytona: DaytonaConfig = Field(default_factory=DaytonaConfig)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
