"""What every scenario of the benchmark shares: a private Redis, the stand-in LLM API, Celery worker processes,
a client, and the figures (percentiles, stage timings) written to bench/results.json and printed as a table.

A scenario is a function ``(Bench) -> Row`` registered in :data:`bench.scenarios.SCENARIOS`; see bench/README in
the package docstring of :mod:`bench.scenarios`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
from cryptography.fernet import Fernet

from providers import load_provider
from providers.base import LABEL_OWNER
from tests.conftest import RedisServer, wait_for
from tests.standins.llm_api import LLMApiStandIn
from tests.standins.server import free_port
from worker import pins
from worker.client import SessionClient
from worker.config import PoolTarget, Settings
from worker.fleet import STAGES
from worker.limits import Limits
from worker.models import ProviderName, SessionResult, SessionState
from worker.pool import Pools, pool_name
from worker.store import Store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
TENANT = "bench"
# The stage columns: the queue wait (submit -> a worker starts) and then the pipeline's own stages.
STAGE_COLUMNS = ("queue", *STAGES)
# A warm session's claim -> ready: the pool is claimed at the start of the sandbox stage.
CLAIM_TO_READY = ("sandbox", "daemon", "session", "ready")


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), interpolated; the value itself for a single sample."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Row:
    """One scenario's outcome: a latency per session (ms), its stage timings, errors, and figures of its own."""

    name: str
    what: str
    latencies_ms: list[float] = field(default_factory=list)
    stages_ms: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    comparable: bool = True  # does the baseline's work (a sandbox, a daemon, a session): has a ratio to it

    def add_result(self, result: SessionResult, submitted: float, *, from_claim: bool = False) -> None:
        """A session brought up through the queue, submitted at the epoch time ``submitted``: enqueue -> ready, or
        with ``from_claim`` a warm pool's claim -> ready (the sandbox, daemon, session and ready stages)."""
        if result.state is not SessionState.ready or result.ready_at is None or result.started_at is None:
            error = result.error
            self.errors.append(f"{error.code} at {error.stage}: {error.message[:200]}" if error else result.state)
            return
        if from_claim and not result.warm:
            self.errors.append("started cold: the pool had no ready sandbox")
            return
        if from_claim:
            self.latencies_ms.append(sum(result.timings_ms.get(stage, 0.0) for stage in CLAIM_TO_READY))
        else:
            self.latencies_ms.append((result.ready_at - submitted) * 1000)
        self.stages_ms.append({"queue": (result.started_at - submitted) * 1000, **result.timings_ms})

    def summary(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {}
        return {f"p{q}": round(percentile(self.latencies_ms, q), 1) for q in (50, 95, 99)}

    def stage_p50(self) -> dict[str, float]:
        return {
            stage: round(statistics.median(s[stage] for s in self.stages_ms), 1)
            for stage in STAGE_COLUMNS
            if self.stages_ms and all(stage in s for s in self.stages_ms)
        }

    def as_json(self, baseline_p50: float | None) -> dict[str, Any]:
        summary = self.summary()
        ratio = round(summary["p50"] / baseline_p50, 2) if summary and baseline_p50 and self.comparable else None
        return {
            "what": self.what,
            "ok": len(self.latencies_ms),
            "failed": len(self.errors),
            "skipped": self.skipped,
            "ms": summary,
            "ratio_p50_to_baseline_p50": ratio,
            "stage_p50_ms": self.stage_p50(),
            **self.extra,
            "runs_ms": [round(v, 1) for v in self.latencies_ms],
            "errors": self.errors,
        }


def machine() -> dict[str, Any]:
    """What the figures were taken on: they mean little without it."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


class Bench:
    """The shared set-up, built on first use and torn down by :meth:`close`."""

    def __init__(
        self, runs: int, max_seconds: float, burst: int = 100, ceiling_sessions: int = 300, ceiling_processes: int = 2
    ) -> None:
        self.runs = runs
        self.burst = burst
        self.ceiling_sessions = ceiling_sessions
        self.ceiling_processes = ceiling_processes
        self.deadline = time.monotonic() + max_seconds
        self.owner = f"sw-bench-{uuid.uuid4().hex[:8]}"
        self.key = f"sk-bench-not-a-real-key-{uuid.uuid4().hex[:8]}"
        self._resources = contextlib.ExitStack()
        self.workdir = Path(os.environ.get("TMPDIR", "/tmp")) / self.owner
        # Its Redis's files and the workers' logs, removed last: what a failing scenario needs of a log is in its error.
        self._resources.callback(shutil.rmtree, self.workdir, ignore_errors=True)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.remove_sandboxes()
        self._resources.close()

    # -- the parts ------------------------------------------------------------------------------------------
    @functools.cached_property
    def redis(self) -> RedisServer:
        server = RedisServer(self.workdir, port=free_port())
        server.start()
        self._resources.callback(server.stop)
        return server

    @functools.cached_property
    def docker(self) -> docker.DockerClient:
        client = docker.from_env()
        self._resources.callback(client.close)
        return client

    @functools.cached_property
    def llm(self) -> LLMApiStandIn:
        """The stand-in LLM API on the Docker bridge (the one host address a sandbox reaches; never 0.0.0.0)."""
        try:
            host = str(self.docker.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"])
        except (docker.errors.DockerException, KeyError, IndexError):
            host = "172.17.0.1"
        return self._resources.enter_context(
            LLMApiStandIn("text", host=host, port=free_port(host), accepted=[self.key])
        )

    def env(self) -> dict[str, str]:
        """The worker's settings, as the variables a worker process reads."""
        url = self.redis.url
        return {
            "SANDBOX_WORKER_BROKER_URL": url,
            "SANDBOX_WORKER_RESULT_BACKEND": url,
            "SANDBOX_WORKER_REDIS_URL": url,
            "SANDBOX_WORKER_FERNET_KEY": self.fernet_key,
            "SANDBOX_WORKER_OWNER": self.owner,
            "SANDBOX_WORKER_LOG_FORMAT": "json",
            "SANDBOX_WORKER_AUTH__MODE": "open",  # the bench is the one sender
            "SANDBOX_WORKER_DOCKER__ALLOWED_HOST_PORTS": f"[{urlsplit(self.llm.url).port}]",
            "SANDBOX_WORKER_CREDENTIALS__SHARED__ANTHROPIC": self.key,
            "SANDBOX_WORKER_CREDENTIALS__SHARED__OPENAI": self.key,
            "SANDBOX_WORKER_CREDENTIALS__SHARED__TENANTS": f'["{TENANT}"]',
            "SANDBOX_WORKER_CREDENTIALS__PROVIDER_URLS__ANTHROPIC": self.llm.url,
            "SANDBOX_WORKER_CREDENTIALS__PROVIDER_URLS__OPENAI": f"{self.llm.url}/v1",
        }

    @functools.cached_property
    def fernet_key(self) -> str:
        return Fernet.generate_key().decode()

    def settings(self, **overrides: Any) -> Settings:
        """In-process settings equal to the workers' (the client's, and the ceiling's pipeline)."""
        base = {
            "broker_url": self.redis.url,
            "result_backend": self.redis.url,
            "redis_url": self.redis.url,
            "fernet_key": self.fernet_key,
            "owner": self.owner,
            "auth": {"mode": "open"},
        }
        return Settings(**(base | overrides))  # type: ignore[arg-type]

    @functools.cached_property
    def client(self) -> SessionClient:
        return SessionClient(self.settings())

    @contextlib.contextmanager
    def worker(self, concurrency: int = 1, **env: str) -> Iterator[None]:
        """A real Celery worker process serving Docker (as `make demo` starts one), stopped afterwards."""
        log = self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_WORKER_")}
        environ |= self.env() | env | {"PYTHONPATH": str(ROOT)}
        argv = [str(Path(sys.executable).with_name("sandbox-worker")), "worker", f"--concurrency={concurrency}"]
        argv += ["--providers=docker", "--loglevel=INFO"]
        with log.open("w") as out:
            process = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "ready." in log.read_text() or process.poll() is not None, 60, what="the worker")
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited: {log.read_text()[-2000:]}")
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def request(self, agent: str, **session: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "request_id": f"bench-{agent}-{uuid.uuid4().hex[:10]}",
            "tenant_id": TENANT,
            "agent": agent,
            "provider": "docker",
            "session": {"prompt": "hi", **session},
        }
        if agent != "mock":
            payload["credentials"] = {"strategy": "shared"}
        return payload

    def bring_up(self, row: Row, payload: dict[str, Any], *, timed: bool = True, from_claim: bool = False) -> None:
        """Submit ``payload`` through the queue, wait for it, note enqueue -> ready (or claim -> ready) in ``row``,
        terminate it."""
        submitted = time.time()
        request_id = self.client.submit(payload)
        result = self.client.wait(request_id, timeout=300)
        if timed:
            row.add_result(result, submitted, from_claim=from_claim)
        self.client.terminate(request_id, timeout=120)

    def remove_sandboxes(self) -> int:
        """Every sandbox of this run, whatever state it was left in."""
        containers = self.docker.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={self.owner}"})
        for container in containers:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        return len(containers)

    def wait_for_pool(self, target: dict[str, Any], timeout: float = 300.0) -> None:
        """Until the warm pool of ``target`` holds its size of ready sandboxes (a claim then is warm, not a cold
        fallback); other scenarios' pools in this Redis do not count."""
        pool = PoolTarget.model_validate(target)
        key = f"sw:pool:{{{pool_name(pool)}}}:ready"
        redis = self.client.store.redis
        wait_for(lambda: int(redis.zcard(key)) >= pool.size, timeout, interval=0.05, what=f"{pool.size} warm sandboxes")

    def running_sandboxes(self, **labels: str) -> int:
        """This run's running sandboxes, those with ``labels`` only if given."""
        wanted = [f"{LABEL_OWNER}={self.owner}", *(f"{k}={v}" for k, v in labels.items())]
        return len(self.docker.containers.list(filters={"label": wanted}))

    def drain_pool(self, target: dict[str, Any]) -> int:
        """Remove the ready sandboxes of the warm pool of ``target`` (Pools.drain) once its worker has stopped: a pool
        outlives its workers by design, and its idle sandboxes and agents would otherwise run under every later
        scenario. Returns how many were removed."""
        settings = self.settings(pool={"targets": [target]})
        store = Store.from_settings(settings)
        driver = load_provider("docker", settings.provider_config(ProviderName.docker))
        limits = Limits(store.redis, settings.fleet, settings.lease_seconds)
        try:
            return Pools(settings, store, lambda _name: driver, limits).drain()
        finally:
            driver.close()
            store.redis.close()


def document(rows: list[Row], bench: Bench, started: str) -> dict[str, Any]:
    baseline = next((r for r in rows if r.name == "baseline"), None)
    base_p50 = baseline.summary().get("p50") if baseline else None
    return {
        "when": started,
        "machine": machine(),
        "image": pins.SANDBOX_IMAGE,
        "runs": bench.runs,
        "llm": "stand-in (tests/standins/llm_api.py, text scenario: answers at once)",
        "scenarios": {r.name: r.as_json(base_p50) for r in rows},
    }
