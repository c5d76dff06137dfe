"""Shared fixtures: a private Redis server per test session, real Celery worker processes, Docker clean-up.

Every pytest session gets its own redis-server on a free loopback port and its own owner label, so
concurrent runs on one machine never see each other's queues, records or sandboxes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis as redis_lib
from cryptography.fernet import Fernet

from providers import docker_isolation
from tests.standins.server import free_port
from worker import pins
from worker.config import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
OWNER = f"swtest-{uuid.uuid4().hex[:10]}"
# Each test session's Docker sandboxes get a network (and host rules) of their own: the rules are rebuilt from the
# worker's settings, so sessions run side by side must not share them. Removed at the end of the session.
SANDBOX_NETWORK = f"sw-{OWNER}"
FERNET_KEY = Fernet.generate_key().decode()

# Variables a developer's shell may carry that would change what the tests see.
_LEAKY_ENV = ("ANTHROPIC_API_KEY", "CLAUDE_API_KEY", "OPENAI_API_KEY", "CODEX_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")


def run_fresh(script: str, **env: str) -> Any:
    """Run ``script`` in a fresh interpreter on this checkout (no SANDBOX_WORKER_ variables but ``env``) and
    return the JSON of its last line: for what is decided when a module is imported (the registries)."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_WORKER_")},
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A throw-away redis-server; ``restart()`` keeps its data when started with append-only persistence."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test` (scripts/setup.sh installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir)]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_lib.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, what=f"redis on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def base_env(redis_server: RedisServer) -> dict[str, str]:
    """The environment every worker process and in-process client of this session shares."""
    return {
        "SANDBOX_WORKER_BROKER_URL": redis_server.url,
        "SANDBOX_WORKER_RESULT_BACKEND": redis_server.url,
        "SANDBOX_WORKER_REDIS_URL": redis_server.url,
        "SANDBOX_WORKER_FERNET_KEY": FERNET_KEY,
        "SANDBOX_WORKER_OWNER": OWNER,
        "SANDBOX_WORKER_LOG_FORMAT": "json",
        "SANDBOX_WORKER_HEALTH_TIMEOUT": "15",
        # One trusted sender: tests of signed requests set their apps themselves (tests/test_auth_integration.py).
        "SANDBOX_WORKER_AUTH__MODE": "open",
        "SANDBOX_WORKER_DOCKER__NETWORK": SANDBOX_NETWORK,
        # No metrics endpoint on the shared default port (parallel test runs); tests of it pick a free port.
        "SANDBOX_WORKER_METRICS_PORT": "0",
    }


# Unit tests get a Redis address where nothing listens, so one that reaches for Redis fails at once instead of
# quietly needing a server: `make unit` runs on a bare machine.
_NO_REDIS = "redis://127.0.0.1:9/0"


def _unit_env() -> dict[str, str]:
    return {
        "SANDBOX_WORKER_BROKER_URL": _NO_REDIS,
        "SANDBOX_WORKER_RESULT_BACKEND": _NO_REDIS,
        "SANDBOX_WORKER_REDIS_URL": _NO_REDIS,
        "SANDBOX_WORKER_FERNET_KEY": FERNET_KEY,
        "SANDBOX_WORKER_OWNER": OWNER,
        "SANDBOX_WORKER_LOG_FORMAT": "json",
        "SANDBOX_WORKER_AUTH__MODE": "open",
        "SANDBOX_WORKER_METRICS_PORT": "0",
    }


@pytest.fixture(autouse=True)
def _environ(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    integration = request.node.get_closest_marker("integration") is not None
    base_env: dict[str, str] = request.getfixturevalue("base_env") if integration else _unit_env()
    for name in _LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("SANDBOX_WORKER_"):
            monkeypatch.delenv(name)
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env file is read
    get_settings.cache_clear()
    _reset_runtime()
    yield
    get_settings.cache_clear()
    _reset_runtime()


def _reset_runtime() -> None:
    from worker import runtime

    runtime.close()
    runtime.store.cache_clear()
    runtime.credentials.cache_clear()


@pytest.fixture
def settings() -> Settings:
    return get_settings()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_server.url, decode_responses=True)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine: run `make test` (scripts/setup.sh starts dockerd): {exc}")
    for image in (pins.SANDBOX_IMAGE, pins.LOCAL_BASE_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"image {image} is missing: run `make test` (scripts/build-image.sh builds it)")
    yield client
    for container in client.containers.list(all=True, filters={"label": f"sandbox-worker-owner={OWNER}"}):
        container.remove(force=True)
    docker_isolation.remove(client, pins.SANDBOX_IMAGE, SANDBOX_NETWORK)
    client.close()


def owned_containers(client: docker.DockerClient, **labels: str) -> list[Any]:
    filters = [
        f"sandbox-worker-owner={OWNER}",
        *(f"sandbox-worker-{k.replace('_', '-')}={v}" for k, v in labels.items()),
    ]
    return list(client.containers.list(all=True, filters={"label": filters}))


class WorkerProcess:
    """A real ``sandbox-worker worker`` process (Celery prefork) with its log captured to a file."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, concurrency: int = 2, providers: str = "docker,e2b,daytona"
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.providers = providers
        self.process: subprocess.Popen[bytes] | None = None
        self.name = f"w{uuid.uuid4().hex[:8]}@%h"

    def start(self, timeout: float = 60) -> WorkerProcess:
        argv = [
            str(VENV_BIN / "celery"), "-A", "worker.celery_app", "worker", "--pool=prefork",
            f"--concurrency={self.concurrency}", "--loglevel=INFO", "-n", self.name, "--without-gossip",
            "--without-mingle", f"--queues=sessions,{','.join(f'sessions.{p}' for p in self.providers.split(','))}",
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        wait_for(
            lambda: b"ready." in self.log_path.read_bytes() or self.process.poll() is not None, timeout, 0.1, "worker"
        )  # type: ignore[union-attr]
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def worker_factory(base_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**kwargs: Any) -> WorkerProcess:
        env = {**base_env, **{k: str(v) for k, v in kwargs.pop("env", {}).items()}}
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log", **kwargs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def celery_worker(worker_factory: Callable[..., WorkerProcess], docker_client: docker.DockerClient) -> WorkerProcess:
    """One running worker serving every provider."""
    return worker_factory()


@pytest.fixture
def session_client() -> Any:
    from worker.client import SessionClient

    return SessionClient()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the Redis server is an integration test, whether or not its module says so."""
    for item in items:
        if "redis_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
