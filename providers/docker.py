"""Docker driver (docker SDK): one container per sandbox on a local or remote engine.

The container runs the image's idle command for the sandbox's ttl, then stops and is removed; the daemon is started with ``exec`` so its environment
(which may hold credentials) lives only in that process, never in the container's ``Config.Env``.
The daemon port is published on ``publish_host`` (loopback by default) at a random host port.

Isolation (providers/docker_isolation.py): sandboxes run on their own bridge network with inter-container
traffic off and host rules that let them reach only the allowed host ports and destinations; every
capability is dropped (``cap_add`` gives some back), ``no-new-privileges`` is set, and memory, CPU and process
limits always apply (the request may ask for less or more, up to the configured maxima).

The docker SDK (and its transport, requests) is imported where it is called, so :class:`DockerConfig` loads
without it.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from providers import docker_egress, docker_isolation
from providers.base import Endpoint, ExecResult, Provider, ProviderConfig, Sandbox, SandboxSpec
from worker import pins
from worker.errors import (
    InvalidRequest,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
    SandboxGone,
)

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

_GONE_STATES = frozenset({"removing", "exited", "dead"})

# An engine behind an authorising proxy (or a TLS-protected remote engine) answers these.
_BY_STATUS: dict[int, type[ProviderError]] = {401: ProviderAuthError, 403: ProviderAuthError, 429: ProviderRateLimited}


class DockerConfig(ProviderConfig):
    """The local Docker engine (docker SDK)."""

    base_url: str | None = Field(None, description="Docker engine URL; DOCKER_HOST or the local socket when unset.")
    image: str = Field(
        pins.SANDBOX_IMAGE, description="Default image; it must contain bash (and the daemon when preinstalled)."
    )
    publish_host: str = Field("127.0.0.1", description="Host address the daemon port is published on.")
    network: str | None = Field(
        "sandbox-worker",
        description="Docker network sandboxes run on. The driver creates it (bridge, inter-container traffic off) "
        "and installs its host rules when `isolate` is on; unset: the engine's default bridge, no isolation.",
    )
    isolate: bool = Field(
        True,
        description="Create `network` with inter-container traffic off and install the engine host's packet "
        "filter for it (see docs/operations.md, Sandbox network isolation) before the first sandbox starts.",
    )
    allowed_host_ports: list[int] = Field(
        default_factory=list,
        description="TCP ports of the engine host that sandboxes may connect to (on any host address): the "
        "egress proxy's, a local LLM endpoint's. Every other host port is closed to them.",
    )
    allowed_destinations: list[str] = Field(
        default_factory=list,
        description="Destinations beyond the host that sandboxes may reach directly, as CIDR or CIDR:port (TCP), "
        "e.g. 0.0.0.0/0:443. None by default; link-local addresses (cloud metadata) and other sandboxes never.",
    )
    forward_proxy_url: str | None = Field(
        None,
        description="URL sandboxes reach `sandbox-worker forward-proxy` at, e.g. http://172.17.0.1:8090: the way "
        "out to `egress_always` and a request's `sandbox.egress` (HTTPS_PROXY). Its port is opened to sandboxes. "
        "Unset: a request with `sandbox.egress` is refused.",
    )
    forward_proxy_key: SecretStr | None = Field(
        None, description="Fernet key sealing the sandboxes' passes to the forward proxy (`sandbox-worker keygen`)."
    )
    egress_always: list[str] = Field(
        default_factory=lambda: ["api.anthropic.com", "api.openai.com"],
        description="Hosts every sandbox may reach through the forward proxy (the LLM endpoints): host, *.domain, "
        "either with :port (443 and 80 without).",
    )
    no_proxy: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"],
        description="NO_PROXY of sandboxes when the forward proxy is set: hosts they reach directly (host services "
        "on `allowed_host_ports`, e.g. the egress proxy's address).",
    )
    cap_add: list[str] = Field(
        default_factory=list, description="Capabilities given back to sandboxes (every one is dropped)."
    )
    idle_command: tuple[str, ...] = Field(
        ("sleep", "infinity"),
        description="Entrypoint that keeps the sandbox alive; the daemon is started beside it, so images whose "
        "entrypoint is the daemon itself (or a shell that exits) work unchanged.",
    )
    # The engine runs the daemon as the image's default user; keep sandboxes off the host's privileges.
    pids_limit: int = Field(512, gt=0, description="Process limit per sandbox container.")
    cpu: float = Field(2.0, gt=0, description="CPU cores of a sandbox whose request names none.")
    memory_mb: int = Field(4096, ge=128, description="Memory limit (MiB) of a sandbox whose request names none.")
    max_cpu: float = Field(8.0, gt=0, description="Most CPU cores a request may ask for.")
    max_memory_mb: int = Field(16384, ge=128, description="Most memory (MiB) a request may ask for.")

    @field_validator("allowed_destinations")
    @classmethod
    def _destinations(cls, values: list[str]) -> list[str]:
        for value in values:
            docker_isolation.parse_destination(value)
        return values

    @model_validator(mode="after")
    def _forward_proxy(self) -> DockerConfig:
        if self.forward_proxy_url and self.forward_proxy_key is None:
            raise ValueError("forward_proxy_url needs forward_proxy_key")
        return self

    def host_ports(self) -> list[int]:
        """The host ports sandboxes may connect to: the allowed ones and the forward proxy's."""
        proxy_port = urlsplit(self.forward_proxy_url).port if self.forward_proxy_url else None
        return sorted({*self.allowed_host_ports, *([proxy_port] if proxy_port else [])})


@contextmanager
def _map_docker_errors(sandbox_id: str | None = None) -> Iterator[None]:
    """Translate docker SDK and transport errors into the project's tree."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise InvalidRequest(f"image not found on the Docker engine: {exc.explanation}", field="sandbox.image") from exc
    except docker.errors.NotFound as exc:
        raise SandboxGone(f"container not found: {exc.explanation}", provider="docker", sandbox_id=sandbox_id) from exc
    except docker.errors.APIError as exc:
        status = exc.status_code
        error_cls = _BY_STATUS.get(status or 0) or (
            ProviderUnavailable if status is None or status >= 500 else ProviderError
        )
        raise error_cls(
            f"docker engine error {status}: {exc.explanation}", provider="docker", sandbox_id=sandbox_id, status=status
        ) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, docker.errors.DockerException) as exc:
        raise ProviderUnavailable(
            f"docker engine unreachable: {type(exc).__name__}", provider="docker", sandbox_id=sandbox_id
        ) from exc


class DockerProvider(Provider):
    name = "docker"
    config_model: ClassVar[type[ProviderConfig]] = DockerConfig
    config: DockerConfig

    def __init__(self, config: DockerConfig) -> None:
        self.config = config
        self._client: docker.DockerClient | None = None
        self._isolated = False

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            import docker

            with _map_docker_errors():
                self._client = (
                    docker.DockerClient(base_url=self.config.base_url, timeout=int(self.config.request_timeout))
                    if self.config.base_url
                    else docker.from_env(timeout=int(self.config.request_timeout))
                )
        return self._client

    def _container(self, sandbox_id: str) -> Container:
        with _map_docker_errors(sandbox_id):
            return self.client.containers.get(sandbox_id)

    @staticmethod
    def _sandbox(container: Container) -> Sandbox:
        networks = (container.attrs.get("NetworkSettings") or {}).get("Networks") or {}
        address = next((n["IPAddress"] for n in networks.values() if n.get("IPAddress")), None)
        return Sandbox(
            provider="docker",
            sandbox_id=container.id,
            labels=dict(container.labels),
            state=container.status,
            private_address=address,
        )

    def _isolate(self) -> None:
        """The sandbox network and its host rules, once per driver (idempotent across workers)."""
        config = self.config
        if self._isolated or not (config.isolate and config.network):
            return
        with _map_docker_errors():
            docker_isolation.install(
                self.client, config.image, config.network, config.host_ports(), config.allowed_destinations
            )
        self._isolated = True

    def _egress_env(self, spec: SandboxSpec) -> dict[str, str]:
        """The proxy variables that send the sandbox's traffic through the forward proxy with its pass."""
        config = self.config
        if not (config.forward_proxy_url and config.forward_proxy_key):
            if spec.egress:
                raise InvalidRequest(
                    "sandbox.egress: this worker has no forward proxy for Docker sandboxes (docker.forward_proxy_url)",
                    field="sandbox.egress",
                )
            return {}
        allow = [*config.egress_always, *spec.egress]
        token = docker_egress.mint(config.forward_proxy_key, allow, time.time() + spec.ttl_seconds)
        url = docker_egress.proxy_url(config.forward_proxy_url, token)
        no_proxy = ",".join(config.no_proxy)
        return {"HTTPS_PROXY": url, "HTTP_PROXY": url, "https_proxy": url, "http_proxy": url, "NO_PROXY": no_proxy,
                "no_proxy": no_proxy}  # fmt: skip

    def _limits(self, spec: SandboxSpec) -> dict[str, Any]:
        config = self.config
        cpu, memory_mb = spec.cpu or config.cpu, spec.memory_mb or config.memory_mb
        if cpu > config.max_cpu:
            raise InvalidRequest(f"sandbox.cpu: at most {config.max_cpu:g} on docker", field="sandbox.cpu")
        if memory_mb > config.max_memory_mb:
            raise InvalidRequest(
                f"sandbox.memory_mb: at most {config.max_memory_mb} on docker", field="sandbox.memory_mb"
            )
        return {
            "nano_cpus": int(cpu * 1e9),
            "mem_limit": f"{memory_mb}m",
            "memswap_limit": f"{memory_mb}m",  # no swap beyond the limit
            "pids_limit": config.pids_limit,
            "cap_drop": ["ALL"],
            "cap_add": list(config.cap_add),
            "security_opt": ["no-new-privileges:true"],
        }

    def start(self, spec: SandboxSpec) -> Sandbox:
        options: dict[str, Any] = {
            "detach": True,
            "init": True,
            # The ttl is the sandbox's hard lifetime even with every worker and the reaper gone: the idle command
            # ends then (coreutils timeout; KILL 10 s after TERM), tini (--init) exits with it, the container stops
            # and the engine removes it (auto_remove), daemon and agents included.
            "entrypoint": ["timeout", "-k", "10", str(spec.ttl_seconds), *self.config.idle_command],
            "auto_remove": True,
            "command": [],
            "labels": dict(spec.labels),
            "environment": {**spec.env, **self._egress_env(spec)},
            "ports": {f"{port}/tcp": (self.config.publish_host, None) for port in spec.ports},
            **self._limits(spec),
        }
        if self.config.network:
            options["network"] = self.config.network
        image = spec.image or self.config.image
        self._isolate()
        with _map_docker_errors():
            container = self.client.containers.run(image, **options)
        deadline = time.monotonic() + self.config.start_timeout
        # run() returns the container as created; the engine has started it by then, so look before waiting.
        with _map_docker_errors(container.id):
            container.reload()
        while container.status != "running":
            if container.status in ("exited", "dead") or time.monotonic() > deadline:
                self.stop(container.id)
                raise ProviderError(
                    f"container did not start (status {container.status})", provider="docker", sandbox_id=container.id
                )
            time.sleep(0.05)
            with _map_docker_errors(container.id):
                container.reload()
        return self._sandbox(container)

    def find(self, sandbox_id: str) -> Sandbox | None:
        try:
            container = self._container(sandbox_id)
        except SandboxGone:
            return None
        # Sandboxes are only ever removed, never stopped: one that is not running is on its way out.
        return None if container.status in _GONE_STATES else self._sandbox(container)

    def exec(
        self,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 60.0,
    ) -> ExecResult:
        # The engine API has no exec timeout: coreutils' timeout enforces it inside the sandbox. The low-level calls
        # of Container.exec_run, by id: no inspect of the container first (one engine round trip less per command).
        command = ["timeout", "-s", "KILL", f"{timeout:g}", *argv]
        api = self.client.api
        with _map_docker_errors(sandbox.sandbox_id):
            exec_id = api.exec_create(sandbox.sandbox_id, command, environment=dict(env or {}), workdir=cwd)["Id"]
            stdout, stderr = api.exec_start(exec_id, demux=True)
            exit_code = api.exec_inspect(exec_id)["ExitCode"]
        return ExecResult(
            int(exit_code), (stdout or b"").decode(errors="replace"), (stderr or b"").decode(errors="replace")
        )

    def upload(self, sandbox: Sandbox, path: str, data: bytes, *, mode: int = 0o644) -> None:
        # Extracted at the root: the engine creates the missing parent directories (0755), so no `mkdir -p` first.
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        with _map_docker_errors(sandbox.sandbox_id):
            self.client.api.put_archive(sandbox.sandbox_id, "/", archive.getvalue())

    def endpoint(self, sandbox: Sandbox, port: int) -> Endpoint:
        container = self._container(sandbox.sandbox_id)
        bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp")
        if not bindings:
            raise ProviderError(
                f"port {port} is not published on this sandbox", provider="docker", sandbox_id=sandbox.sandbox_id
            )
        host = bindings[0]["HostIp"] or self.config.publish_host
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached through loopback
            host = "127.0.0.1"
        return Endpoint(f"http://{host}:{bindings[0]['HostPort']}")

    def stop(self, sandbox_id: str) -> bool:
        try:
            container = self._container(sandbox_id)
        except SandboxGone:
            return False
        try:
            with _map_docker_errors(sandbox_id):
                container.remove(force=True)
        except SandboxGone:
            return False
        except ProviderError as exc:
            if exc.status != 409:  # 409: a removal is already in progress, which is what we asked for
                raise
        return True

    def list_owned(self, labels: Mapping[str, str]) -> list[Sandbox]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        with _map_docker_errors():
            return [self._sandbox(c) for c in self.client.containers.list(all=True, filters=filters)]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
