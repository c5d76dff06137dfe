"""Per-provider settings, kept free of SDK imports so configuration loads without them.

Each model is one ``SANDBOX_WORKER_<PROVIDER>__*`` block of :class:`worker.config.Settings`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from worker import pins


class _ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_timeout: float = Field(30.0, gt=0, description="Seconds allowed for one provider API call.")
    start_timeout: float = Field(120.0, gt=0, description="Seconds allowed for a sandbox to start.")


class DockerConfig(_ProviderConfig):
    """The local Docker engine (docker SDK)."""

    base_url: str | None = Field(None, description="Docker engine URL; DOCKER_HOST or the local socket when unset.")
    image: str = Field(
        pins.SANDBOX_IMAGE, description="Default image; it must contain bash (and the daemon when preinstalled)."
    )
    publish_host: str = Field("127.0.0.1", description="Host address the daemon port is published on.")
    network: str | None = Field(None, description="Docker network to attach sandboxes to.")
    idle_command: tuple[str, ...] = Field(
        ("sleep", "infinity"),
        description="Entrypoint that keeps the sandbox alive; the daemon is started beside it, so images whose "
        "entrypoint is the daemon itself (or a shell that exits) work unchanged.",
    )
    # The engine runs the daemon as the image's default user; keep sandboxes off the host's privileges.
    pids_limit: int = Field(512, gt=0, description="Process limit per sandbox container.")


class E2BConfig(_ProviderConfig):
    """E2B (e2b SDK)."""

    api_key: SecretStr | None = Field(None, description="E2B API key.")
    api_url: str | None = Field(
        None, description="Control-plane URL; the SDK default (https://api.<domain>) when unset."
    )
    sandbox_url: str | None = Field(None, description="envd URL override (self-hosted E2B or a stand-in server).")
    domain: str | None = Field(None, description="Sandbox domain; the SDK default (e2b.app) when unset.")
    template: str = Field(
        "sandbox-worker", description="Template with the daemon preinstalled (see docs/providers.md)."
    )
    port_scheme: str = Field("https", description="Scheme of the URL built from Sandbox.get_host(port).")
    port_proxy_url: str | None = Field(
        None,
        description="Reach sandbox ports through this URL with a Host header instead of DNS (stand-ins, private edges).",
    )
    public_traffic: bool = Field(
        True,
        description="When false, sandbox ports only answer requests carrying the sandbox's traffic access token "
        "(endpoint() adds it).",
    )
    retries: int = Field(
        3, ge=0, description="Control-plane retries of 429/502/503/504 answers (the SDK's own, with backoff)."
    )


class DaytonaConfig(_ProviderConfig):
    """Daytona (daytona SDK)."""

    api_key: SecretStr | None = Field(None, description="Daytona API key.")
    api_url: str = Field("https://app.daytona.io/api", description="Daytona API URL.")
    target: str | None = Field(None, description="Region; the organisation default when unset.")
    snapshot: str | None = Field("sandbox-worker", description="Snapshot with the daemon preinstalled.")
    image: str | None = Field(None, description="Image to build from instead of a snapshot.")
    auto_delete_minutes: int = Field(
        0, ge=-1, description="Minutes after stop before Daytona deletes the sandbox (0 = at once)."
    )
    create_attempts: int = Field(
        4,
        ge=1,
        le=10,
        description="Create attempts on 429/502/503/504 and connection errors (the SDK retries no statuses); "
        "each retry first adopts a sandbox the failed attempt may have created.",
    )
    create_backoff: float = Field(
        0.5, gt=0, description="Initial seconds of the jittered exponential backoff between create attempts."
    )
    create_backoff_max: float = Field(
        10.0, gt=0, description="Cap in seconds of one backoff wait (a Retry-After answer may ask for more, up to 60)."
    )
