"""Bring-up speed: the full pipeline per agent against the floor of what Docker and the daemon cost, in the same run.

Baseline: `docker run` of the sandbox image, `exec` of the daemon, poll /v1/health until it answers — the
least any orchestrator must do. Measured: `Pipeline.create` of a session per agent (claim … ready, with Redis
records, labels, token, ACP initialize + session/new + a first prompt "hi"), then terminate. Every bring-up is
cold: a new sandbox, a new daemon, a new agent process. The real agents (claude, codex, opencode) talk to the
stand-in LLM API (tests/standins/llm_api.py, `text` scenario: it answers at once) on the Docker bridge, with
the `shared` strategy and a made-up key: the figures are the orchestration and agent start-up, not an LLM.

Prints per agent the median of each stage and of the whole, and the ratio to the baseline; writes the same to
bench/results.json. Nothing is asserted (these machines are shared and noisy). Bounded: --runs per agent
(after one untimed warm-up each) and --max-seconds in all (runs not started in time are skipped).

    .venv/bin/python -m bench.bringup [--runs N] [--agents mock,claude,codex[,opencode]] [--max-seconds S]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import socket
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import redis
from cryptography.fernet import Fernet

from providers.docker import DockerProvider
from tests.standins.llm_api import LLMApiStandIn
from worker import pins
from worker.config import Settings
from worker.credentials.broker import build_broker
from worker.logs import configure_logging
from worker.models import Agent, ProviderName
from worker.pipeline import Pipeline
from worker.store import Store

RESULTS = Path(__file__).with_name("results.json")
TENANT = "bench"
STAGES = ("claim", "credentials", "environment", "sandbox", "daemon", "session", "ready")
LABELS = {"credentials": "creds", "environment": "env"}


@dataclass
class AgentRuns:
    agent: str
    totals_ms: list[float] = field(default_factory=list)
    stages_ms: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0

    def medians(self) -> dict[str, float]:
        return {
            stage: statistics.median(t[stage] for t in self.stages_ms)
            for stage in STAGES
            if self.stages_ms and all(stage in t for t in self.stages_ms)
        }

    def total(self) -> float | None:
        return statistics.median(self.totals_ms) if self.totals_ms else None


def bridge_address(client: docker.DockerClient) -> str:
    """The Docker bridge gateway: the one host address a sandbox reaches (never bind 0.0.0.0)."""
    try:
        gateway = client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
        return str(gateway)
    except (docker.errors.DockerException, KeyError, IndexError):
        return "172.17.0.1"


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


def pipeline_once(pipeline: Pipeline, agent: str) -> tuple[float, dict[str, float], str | None]:
    """(seconds, stage timings, error code or None) of one bring-up, torn down afterwards."""
    request: dict[str, Any] = {
        "request_id": f"bench-{agent}-{uuid.uuid4().hex[:10]}",
        "tenant_id": TENANT,
        "agent": agent,
        "provider": "docker",
        "session": {"prompt": "hi"},
    }
    if agent != Agent.mock.value:
        request["credentials"] = {"strategy": "shared"}
    started = time.perf_counter()
    result = pipeline.create(request)
    elapsed = time.perf_counter() - started
    pipeline.teardown.terminate(result.request_id)
    if result.state != "ready":
        error = result.error
        return elapsed, result.timings_ms, f"{error.code} at {error.stage}: {error.message}" if error else "failed"
    return elapsed, result.timings_ms, None


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def print_table(base_ms: float, runs: list[AgentRuns]) -> None:
    head = (
        f"{'agent':<9} {'ok':>5} " + " ".join(f"{LABELS.get(s, s):>8}" for s in STAGES) + f" {'whole':>8} {'/base':>6}"
    )
    print(head)
    print("-" * len(head))
    print(f"{'baseline':<9} {'':>5} " + " ".join(f"{'':>8}" for _ in STAGES) + f" {base_ms:8.0f} {1:6.2f}")
    for r in runs:
        done = f"{len(r.totals_ms)}/{len(r.totals_ms) + len(r.errors) + r.skipped}"
        medians, total = r.medians(), r.total()
        cells = " ".join(f"{medians[s]:8.0f}" if s in medians else f"{'-':>8}" for s in STAGES)
        whole = f"{total:8.0f} {total / base_ms:6.2f}" if total is not None else f"{'-':>8} {'-':>6}"
        print(f"{r.agent:<9} {done:>5} {cells} {whole}")
    for r in runs:
        for error in sorted(set(r.errors)):
            print(f"  {r.agent} failed {r.errors.count(error)}x: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed bring-ups per agent and of the baseline")
    parser.add_argument("--agents", default="mock,claude,codex", help="comma-separated; opencode is slow to start")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="no new run starts after this")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--llm-host", default=None, help="address of the stand-in LLM API (the Docker bridge)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    agents = [Agent(name.strip()).value for name in args.agents.split(",") if name.strip()]
    configure_logging("console", level=logging.WARNING)
    deadline = time.monotonic() + args.max_seconds

    client = docker.from_env()
    host = args.llm_host or bridge_address(client)
    key = f"sk-bench-not-a-real-key-{secrets.token_hex(4)}"
    with LLMApiStandIn("text", host=host, port=free_port(host), accepted=[key]) as llm:
        settings = Settings(
            redis_url=args.redis,
            fernet_key=Fernet.generate_key().decode(),
            owner="sw-bench",
            credentials={
                "shared": {"anthropic": key, "openai": key, "tenants": [TENANT]},
                "provider_urls": {"anthropic": llm.url, "openai": f"{llm.url}/v1"},
            },
        )
        store = Store.from_settings(settings)
        driver = DockerProvider(settings.docker)
        pipeline = Pipeline(settings, store, lambda _name: driver, build_broker(settings, store))
        print(f"runs: {args.runs} per agent, cold ({ProviderName.docker.value}, image {pins.SANDBOX_IMAGE})")
        print(f"LLM: stand-in API at {llm.url} (tests/standins/llm_api.py, answers at once), not a real API")

        try:
            baseline_once(client)  # warm the image cache and the engine
            base = [baseline_once(client) * 1000 for _ in range(args.runs)]
            runs: list[AgentRuns] = []
            for agent in agents:
                record = AgentRuns(agent)
                runs.append(record)
                if time.monotonic() > deadline:
                    record.skipped = args.runs
                    continue
                pipeline_once(pipeline, agent)  # warm-up: the agent's files in the page cache
                for i in range(args.runs):
                    if time.monotonic() > deadline:
                        record.skipped = args.runs - i
                        break
                    elapsed, timings, error = pipeline_once(pipeline, agent)
                    if error:
                        record.errors.append(error)
                    else:
                        record.totals_ms.append(elapsed * 1000)
                        record.stages_ms.append(timings)
                print(f"  {agent}: {len(record.totals_ms)} ok, {len(record.errors)} failed", flush=True)
            model_calls = len(llm.model_requests())
        finally:
            redis.Redis.from_url(args.redis).flushdb()
            driver.close()

    base_ms = statistics.median(base)
    print()
    print("median ms per stage and of the whole bring-up (Pipeline.create); /base = whole / baseline")
    print_table(base_ms, runs)
    print(f"baseline = docker run + daemon healthy; the stand-in LLM API answered {model_calls} model calls")
    mock_ms = next((r.total() for r in runs if r.agent == Agent.mock.value), None)
    if mock_ms is not None:
        print(f"ratio pipeline (mock) / baseline: {mock_ms / base_ms:.2f}")

    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "image": pins.SANDBOX_IMAGE,
        "runs": args.runs,
        "llm": "stand-in (tests/standins/llm_api.py, text scenario)",
        "baseline_ms": {"median": round(base_ms, 1), "runs": [round(b, 1) for b in base]},
        "agents": {
            r.agent: {
                "ok": len(r.totals_ms),
                "failed": len(r.errors),
                "skipped": r.skipped,
                "median_ms": {k: round(v, 1) for k, v in r.medians().items()}
                | ({"whole": round(total, 1)} if (total := r.total()) is not None else {}),
                "ratio_to_baseline": round(total / base_ms, 2) if total is not None else None,
                "runs_ms": [
                    {**{k: round(v, 1) for k, v in t.items()}, "whole": round(w, 1)}
                    for t, w in zip(r.stages_ms, r.totals_ms, strict=True)
                ],
                "errors": r.errors,
            }
            for r in runs
        },
    }
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
