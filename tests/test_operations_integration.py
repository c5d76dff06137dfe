"""What operators probe and scrape, against real parts: ``sandbox-worker check`` on a Redis that is up then down, and
a real ``sandbox-worker worker`` (prefork, two pool processes) whose one metrics endpoint shows a real mock session
on Docker, whose log has the session's summary line, and whose heartbeat file ages once it has stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT, VENV_BIN, RedisServer, wait_for
from tests.standins.server import free_port
from worker import cli
from worker.config import Settings
from worker.models import SessionState, parse_request
from worker.store import Store

pytestmark = pytest.mark.integration
CLI = str(VENV_BIN / "sandbox-worker")


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def _samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def test_check_follows_redis_up_and_down(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    """``check --json`` passes (exit 0) while the broker and store answer, and fails (exit 1) naming them once the
    Redis server is stopped; the provider is still checked, and passes."""
    server = RedisServer(tmp_path)
    server.start()
    env = {"SANDBOX_WORKER_BROKER_URL": server.url, "SANDBOX_WORKER_REDIS_URL": server.url}
    try:
        up = _cli("check", "--json", **env)
        server.stop()
        down = _cli("check", "--json", **env)
    finally:
        server.stop()

    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout) == {
        "ok": True,
        "checks": [
            {"name": "broker", "ok": True, "detail": ""},
            {"name": "store", "ok": True, "detail": ""},
            {"name": "provider:docker", "ok": True, "detail": "0 sandboxes of this fleet"},
        ],
    }
    assert down.returncode == 1, down.stderr
    document = json.loads(down.stdout)
    assert document["ok"] is False
    verdicts = {check["name"]: check["ok"] for check in document["checks"]}
    assert verdicts == {"broker": False, "store": False, "provider:docker": True}
    assert "ConnectionError" in document["checks"][0]["detail"]


class _Worker:
    """``sandbox-worker worker`` as an operator runs it: the command sets up the metrics' samples directory."""

    def __init__(self, tmp_path: Path, base_env: dict[str, str]) -> None:
        self.port = free_port()
        self.heartbeat = tmp_path / "heartbeat"
        self.log_path = tmp_path / "worker.log"
        self.tmp = tmp_path / "tmp"  # where the command makes its samples directory
        self.tmp.mkdir()
        self.env = {
            **os.environ,
            **base_env,
            "SANDBOX_WORKER_METRICS_PORT": str(self.port),
            "SANDBOX_WORKER_METRICS_HOST": "127.0.0.1",
            "SANDBOX_WORKER_HEARTBEAT_FILE": str(self.heartbeat),
            "SANDBOX_WORKER_HEARTBEAT_SECONDS": "0.2",
            "TMPDIR": str(self.tmp),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [CLI, "worker", "--concurrency=2", "--providers=docker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        wait_for(lambda: b"ready." in self.log_path.read_bytes() or self.process.poll() is not None, 60, 0.1, "worker")
        assert self.process.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture
def ops_worker(tmp_path: Path, base_env: dict[str, str], docker_client: docker.DockerClient) -> Iterator[_Worker]:
    worker = _Worker(tmp_path, base_env)
    yield worker
    worker.stop()


def test_a_worker_serves_its_sessions_metrics_logs_them_and_beats(ops_worker: _Worker, session_client: Any) -> None:
    """A mock session brought up by a pool process shows in the main process's endpoint (session counter, stage
    histograms, queue wait) and in one JSON summary line bound to its request; the heartbeat file is touched while
    the worker runs and ages once it stopped, when ``check --liveness`` fails; the samples directory goes."""
    request_id = f"ops-{uuid.uuid4().hex[:12]}"
    session_client.submit(
        {"request_id": request_id, "tenant_id": "ops", "agent": "mock", "provider": "docker", "session": {}}
    )
    result = session_client.wait(request_id, timeout=120)
    assert result.state is SessionState.ready, result.error

    scraped = ops_worker.scrape()
    ready = {"outcome": "ready", "provider": "docker", "agent": "mock", "warm": "false"}
    assert _samples(scraped, "sandbox_worker_sessions_total", **ready) == 1
    for stage in ("claim", "credentials", "environment", "sandbox", "daemon", "session", "ready"):
        assert _samples(scraped, "sandbox_worker_stage_duration_seconds_count", stage=stage) == 1, stage
    assert _samples(scraped, "sandbox_worker_queue_wait_seconds_count", queue="sessions.docker") == 1

    summaries = [
        json.loads(line)
        for line in ops_worker.log().splitlines()
        if line.startswith("{") and '"session summary"' in line
    ]
    (summary,) = [s for s in summaries if s.get("request_id") == request_id]
    assert (summary["outcome"], summary["tenant_id"], summary["provider"]) == ("ready", "ops", "docker")
    assert summary["sandbox_id"] == result.sandbox_id
    assert set(summary["stages_ms"]) == set(result.timings_ms)

    assert _cli("check", "--liveness", **ops_worker.env).returncode == 0
    first = ops_worker.heartbeat.stat().st_mtime
    wait_for(lambda: ops_worker.heartbeat.stat().st_mtime > first, 10, 0.05, "a heartbeat")
    (samples_dir,) = ops_worker.tmp.glob("sandbox-worker-metrics-*")
    assert any(samples_dir.iterdir())

    session_client.terminate(request_id)
    ops_worker.stop()
    stopped = ops_worker.heartbeat.stat().st_mtime
    time.sleep(1.0)  # five heartbeat intervals: a running worker would have touched the file meanwhile
    assert ops_worker.heartbeat.stat().st_mtime == stopped
    stale = _cli("check", "--liveness", "--max-age", "0.5", "--json", **ops_worker.env)
    assert stale.returncode == 1
    assert json.loads(stale.stdout)["checks"][0]["name"] == "heartbeat"
    assert not samples_dir.exists()


def test_sessions_list_filters_the_records(settings: Settings) -> None:
    """``sessions list --json`` is one JSON list of the records in Redis, filtered by tenant and state, the latest
    updated first."""
    store = Store.from_settings(settings)
    run = uuid.uuid4().hex[:8]
    for index, (tenant, state) in enumerate([("a", "ready"), ("a", "failed"), ("b", "ready"), ("a", "ready")]):
        request = parse_request(
            {"request_id": f"list-{run}-{index}", "tenant_id": f"{tenant}-{run}", "agent": "mock", "provider": "docker"}
        )
        record = store.create(request)
        record.result.state = SessionState(state)
        store.put(record)

    shown = CliRunner().invoke(cli.app, ["sessions", "list", "--tenant", f"a-{run}", "--state", "ready", "--json"])

    assert shown.exit_code == 0, shown.output
    assert [r["request_id"] for r in json.loads(shown.stdout)] == [f"list-{run}-3", f"list-{run}-0"]
