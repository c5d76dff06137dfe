"""Docker driver (docker SDK): one container per sandbox on a local or remote engine.

The container runs the image's idle command for the sandbox's ttl, then stops and is removed; the daemon is started with ``exec`` so its environment
(which may hold credentials) lives only in that process, never in the container's ``Config.Env``.
The daemon port is published on ``publish_host`` (loopback by default) at a random host port.

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

from pydantic import Field

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
    network: str | None = Field(None, description="Docker network to attach sandboxes to.")
    idle_command: tuple[str, ...] = Field(
        ("sleep", "infinity"),
        description="Entrypoint that keeps the sandbox alive; the daemon is started beside it, so images whose "
        "entrypoint is the daemon itself (or a shell that exits) work unchanged.",
    )
    # The engine runs the daemon as the image's default user; keep sandboxes off the host's privileges.
    pids_limit: int = Field(512, gt=0, description="Process limit per sandbox container.")


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
        return Sandbox(
            provider="docker", sandbox_id=container.id, labels=dict(container.labels), state=container.status
        )

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
            "environment": dict(spec.env),
            "ports": {f"{port}/tcp": (self.config.publish_host, None) for port in spec.ports},
            "pids_limit": self.config.pids_limit,
        }
        if spec.cpu:
            options["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory_mb:
            options["mem_limit"] = f"{spec.memory_mb}m"
        if self.config.network:
            options["network"] = self.config.network
        image = spec.image or self.config.image
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
        # The engine API has no exec timeout: coreutils' timeout enforces it inside the sandbox.
        command = ["timeout", "-s", "KILL", f"{timeout:g}", *argv]
        container = self._container(sandbox.sandbox_id)
        with _map_docker_errors(sandbox.sandbox_id):
            exit_code, (stdout, stderr) = container.exec_run(
                command, environment=dict(env or {}), workdir=cwd, demux=True
            )
        return ExecResult(
            int(exit_code), (stdout or b"").decode(errors="replace"), (stderr or b"").decode(errors="replace")
        )

    def upload(self, sandbox: Sandbox, path: str, data: bytes, *, mode: int = 0o644) -> None:
        parent, _, name = path.rpartition("/")
        parent = parent or "/"
        if not self.exec(sandbox, ["mkdir", "-p", parent], timeout=30):
            raise ProviderError(
                f"cannot create {parent} in the sandbox", provider="docker", sandbox_id=sandbox.sandbox_id
            )
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        container = self._container(sandbox.sandbox_id)
        with _map_docker_errors(sandbox.sandbox_id):
            container.put_archive(parent, archive.getvalue())

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
