"""Real Docker containers behind the stand-in E2B and Daytona servers.

Each stand-in sandbox is one container of the project's sandbox image, kept alive by the image's idle
command, with its ports published on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Mapping, Sequence

import docker
import docker.errors
from docker.models.containers import Container

STANDIN_LABEL = "sandbox-worker-standin"


class ContainerSandboxes:
    """The containers of one stand-in server, addressed by sandbox id."""

    def __init__(self, image: str, *, standin: str, ports: Sequence[int] = (2468,)) -> None:
        self.image = image
        self.standin = standin
        self.ports = tuple(ports)
        self.client = docker.from_env(timeout=60)

    def _name(self, sandbox_id: str) -> str:
        return f"sw-standin-{self.standin}-{sandbox_id}"

    def create(self, sandbox_id: str, *, env: Mapping[str, str], labels: Mapping[str, str]) -> None:
        self.client.containers.run(
            self.image,
            name=self._name(sandbox_id),
            detach=True,
            init=True,
            environment=dict(env),
            labels={**labels, STANDIN_LABEL: self.standin},
            ports={f"{port}/tcp": ("127.0.0.1", None) for port in self.ports},
        )

    def container(self, sandbox_id: str) -> Container:
        try:
            return self.client.containers.get(self._name(sandbox_id))
        except docker.errors.NotFound as exc:
            raise KeyError(sandbox_id) from exc

    def exists(self, sandbox_id: str) -> bool:
        try:
            return self.container(sandbox_id).status == "running"
        except KeyError:
            return False

    def ids(self) -> list[str]:
        prefix = self._name("")
        found = self.client.containers.list(
            all=True, filters={"label": f"{STANDIN_LABEL}={self.standin}"}, ignore_removed=True
        )
        return [c.name.removeprefix(prefix) for c in found if c.name.startswith(prefix)]

    def remove(self, sandbox_id: str) -> bool:
        try:
            self.container(sandbox_id).remove(force=True)
        except (KeyError, docker.errors.NotFound):
            return False
        return True

    def remove_all(self) -> None:
        for sandbox_id in self.ids():
            self.remove(sandbox_id)

    def published_port(self, sandbox_id: str, port: int) -> int:
        container = self.container(sandbox_id)
        deadline = time.monotonic() + 5
        while True:
            bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp")
            if bindings:
                return int(bindings[0]["HostPort"])
            if time.monotonic() > deadline:
                raise KeyError(f"port {port} of {sandbox_id} is not published")
            time.sleep(0.05)
            container.reload()

    def run(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run to completion; ``timeout`` kills the command (exit code 137) after that many seconds."""
        command = list(argv)
        if timeout:
            command = ["timeout", "-s", "KILL", f"{timeout:g}", *command]
        exit_code, (stdout, stderr) = self.container(sandbox_id).exec_run(
            command, environment=dict(env or {}), workdir=cwd, demux=True
        )
        return int(exit_code), stdout or b"", stderr or b""

    def write_file(self, sandbox_id: str, path: str, data: bytes, mode: int = 0o644) -> None:
        parent = path.rsplit("/", 1)[0] or "/"
        self.run(sandbox_id, ["mkdir", "-p", parent])
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(path.rsplit("/", 1)[-1])
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        self.container(sandbox_id).put_archive(parent, buffer.getvalue())

    def read_file(self, sandbox_id: str, path: str) -> bytes | None:
        try:
            stream, _ = self.container(sandbox_id).get_archive(path)
        except docker.errors.NotFound:
            return None
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            extracted = tar.extractfile(member) if member else None
            return extracted.read() if extracted else None
