"""Helpers of the fleet-reliability tests: a private Redis and owner label per test (so reapers, semaphores and
batches see only that test's requests and sandboxes), beat processes, and waiting on records through a Redis that
may be restarting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
import redis as redis_lib

from providers.base import LABEL_OWNER, LABEL_REQUEST_ID
from tests.conftest import OWNER, ROOT, VENV_BIN, RedisServer, wait_for
from worker import runtime
from worker.config import Settings, get_settings
from worker.models import SessionRequest, SessionResult
from worker.pipeline import Pipeline
from worker.reaper import Reaper
from worker.store import SessionRecord, Store

# Short leases make a dead worker's request free within seconds.
FAST_LEASE = {"SANDBOX_WORKER_LEASE_SECONDS": "5"}


class Fleet:
    """One test's Redis and owner label, and the settings that point workers, beats and in-process objects at them."""

    def __init__(self, server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = server
        self.owner = f"{OWNER}-{uuid.uuid4().hex[:6]}"
        self.env = {
            "SANDBOX_WORKER_BROKER_URL": server.url,
            "SANDBOX_WORKER_RESULT_BACKEND": server.url,
            "SANDBOX_WORKER_REDIS_URL": server.url,
            "SANDBOX_WORKER_OWNER": self.owner,
        }
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        runtime.close()
        runtime.store.cache_clear()
        runtime.credentials.cache_clear()
        from worker.client import SessionClient

        self.client = SessionClient()
        self.store: Store = self.client.store
        self.redis: redis_lib.Redis = self.store.redis

    @property
    def settings(self) -> Settings:
        return get_settings()

    def request(self, prefix: str = "fleet", **overrides: Any) -> SessionRequest:
        payload: dict[str, Any] = {
            "request_id": f"{prefix}-{uuid.uuid4().hex[:10]}",
            "tenant_id": "acme",
            "agent": "mock",
            "provider": "docker",
            "sandbox": {"ttl_seconds": 600},
        }
        payload.update(overrides)
        return SessionRequest.model_validate(payload)

    def record(self, request_id: str) -> SessionRecord | None:
        """The record, or None while Redis is unreachable (a restart in progress)."""
        try:
            return self.store.get(request_id)
        except redis_lib.ConnectionError:
            return None

    def wait_stage(self, request_id: str, stage: str, timeout: float = 60) -> SessionRecord:
        return wait_for(
            lambda: (record := self.record(request_id)) is not None and record.result.stage == stage and record,
            timeout,
            0.05,
            f"{request_id} in stage {stage}",
        )

    def wait_ended(self, request_ids: list[str], timeout: float) -> dict[str, SessionResult]:
        """Wait until every request is ready, failed or terminated; their results."""

        def ended() -> dict[str, SessionResult] | None:
            records = [self.record(request_id) for request_id in request_ids]
            if all(record is not None and record.result.state.terminal for record in records):
                return {record.request.request_id: record.result for record in records if record}
            return None

        results: dict[str, SessionResult] = wait_for(ended, timeout, 0.2, f"{len(request_ids)} requests to end")
        return results

    def pipeline(self) -> Pipeline:
        return runtime.pipeline()

    def reaper(self, **fleet: Any) -> Reaper:
        """A reaper on this Redis and the local Docker engine, requeueing through the broker."""
        settings = self.settings.model_copy(update={"fleet": self.settings.fleet.model_copy(update=fleet)})
        teardown = self.pipeline().teardown
        return Reaper(settings, self.store, runtime.provider, teardown.terminate, self.client.submit, teardown.limits)

    def containers(self, client: docker.DockerClient, request_id: str | None = None) -> list[Any]:
        """The containers of this test (of one request)."""
        labels = [f"{LABEL_OWNER}={self.owner}", *([f"{LABEL_REQUEST_ID}={request_id}"] if request_id else [])]
        return list(client.containers.list(all=True, filters={"label": labels}))

    def close(self, client: docker.DockerClient) -> None:
        """Remove whatever sandboxes the test left, close the client."""
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda container: container.remove(force=True), self.containers(client)))
        self.redis.close()


@pytest.fixture(name="fleet")
def fleet_fixture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient
) -> Iterator[Fleet]:
    """A Fleet on a fresh Redis server of its own."""
    server = RedisServer(tmp_path / "fleet-redis")
    server.start()
    fleet = Fleet(server, monkeypatch)
    yield fleet
    fleet.close(docker_client)
    server.stop()


class BeatProcess:
    """A real ``celery beat`` process with its own schedule file, its log captured."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.log_path = workdir / "beat.log"
        self.argv = [
            str(VENV_BIN / "celery"), "-A", "worker.celery_app", "beat", "--loglevel=INFO",
            f"--schedule={workdir / 'schedule'}", f"--pidfile={workdir / 'beat.pid'}",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BeatProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        wait_for(lambda: b"beat: Starting" in self.log_path.read_bytes(), 30, 0.1, "beat")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def pool_children(pid: int) -> list[int]:
    """The pids of a process's direct children (a Celery worker's pool processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children
