"""Bring-up speed: the full pipeline against the floor of what Docker and the daemon cost, in the same run.

Baseline: `docker run` of the sandbox image, `exec` of the daemon, poll /v1/health until it answers — the
least any orchestrator must do. Measured: `Pipeline.create` of a mock-agent session (claim … ready, with
Redis records, labels, token, ACP initialize + session/new + a prompt), then terminate.
Prints medians and the ratio; nothing is asserted (these machines are shared and noisy).

    .venv/bin/python -m bench.bringup [--runs N]
"""

from __future__ import annotations

import argparse
import logging
import secrets
import statistics
import time
import uuid

import docker
import httpx
import redis
from cryptography.fernet import Fernet

from providers.docker import DockerProvider
from worker import pins
from worker.config import Settings
from worker.credentials.broker import build_broker
from worker.logs import configure_logging
from worker.models import ProviderName
from worker.pipeline import Pipeline
from worker.store import Store


def baseline_once(client: docker.DockerClient) -> float:
    token = secrets.token_urlsafe(16)
    started = time.perf_counter()
    container = client.containers.run(
        pins.SANDBOX_IMAGE,
        entrypoint=["sleep", "infinity"],
        detach=True,
        init=True,
        ports={"2468/tcp": ("127.0.0.1", None)},
    )
    try:
        container.exec_run(
            ["sh", "-c", f"nohup sandbox-agent server --no-telemetry -H 0.0.0.0 -p 2468 -t {token} >/dev/null 2>&1 &"],
            detach=True,
        )
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["2468/tcp"][0]["HostPort"]
        while True:
            try:
                if (
                    httpx.get(
                        f"http://127.0.0.1:{port}/v1/health", headers={"Authorization": f"Bearer {token}"}
                    ).status_code
                    == 200
                ):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        container.remove(force=True)


def pipeline_once(pipeline: Pipeline) -> tuple[float, dict[str, float]]:
    request = {"request_id": f"bench-{uuid.uuid4().hex[:10]}", "tenant_id": "bench", "agent": "mock", "provider": "docker",
               "session": {"prompt": "hi"}}  # fmt: skip
    started = time.perf_counter()
    result = pipeline.create(request)
    elapsed = time.perf_counter() - started
    if result.state != "ready":
        raise SystemExit(f"bring-up failed: {result.error}")
    pipeline.teardown.terminate(result.request_id)
    return elapsed, result.timings_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    configure_logging("console", level=logging.WARNING)

    settings = Settings(redis_url=args.redis, fernet_key=Fernet.generate_key().decode(), owner="sw-bench")
    store = Store.from_settings(settings)
    driver = DockerProvider(settings.docker)
    pipeline = Pipeline(settings, store, lambda _name: driver, build_broker(settings, store))
    client = docker.from_env()

    baseline_once(client)  # warm the image cache and the engine
    pipeline_once(pipeline)
    base = [baseline_once(client) for _ in range(args.runs)]
    runs = [pipeline_once(pipeline) for _ in range(args.runs)]
    full = [elapsed for elapsed, _ in runs]
    stages = {stage: statistics.median(t[stage] for _, t in runs) for stage in runs[0][1]}
    redis.Redis.from_url(args.redis).flushdb()
    driver.close()

    print(f"runs: {args.runs} each ({ProviderName.docker.value}, image {pins.SANDBOX_IMAGE})")
    print(f"baseline  docker run + daemon healthy : median {statistics.median(base) * 1000:7.1f} ms")
    print(f"pipeline  claim … ready (with prompt): median {statistics.median(full) * 1000:7.1f} ms")
    print("stages (median ms): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print(f"ratio pipeline / baseline: {statistics.median(full) / statistics.median(base):.2f}")


if __name__ == "__main__":
    main()
