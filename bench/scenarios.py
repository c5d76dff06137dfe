"""The benchmark's scenarios, side by side in one run.

Adding one is a function and a line: write ``def my_scenario(bench: Bench) -> Row`` (bring sessions up, with
``bench.worker()`` for a Celery worker and ``bench.bring_up(row, bench.request("mock"))`` for one session through
the queue, or anything else that fills ``row.latencies_ms``), then add ``"my-scenario": my_scenario`` to
:data:`SCENARIOS`. Its p50/p95/p99, the ratio to the baseline's p50 and its stage timings then appear in the table
and in bench/results.json; ``row.extra`` holds figures of its own.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

from bench.ceiling import measure
from bench.harness import ROOT, Bench, Row
from tests.standins.credentials import CredentialStack, bridge_address
from tests.standins.llm_api import LLMApi
from worker import pins
from worker.credentials.vault import Vault, VaultCredential, VaultStore
from worker.limits import Semaphore
from worker.secret_store import SecretStore

Scenario = Callable[[Bench], Row]

# The burst's fleet: one worker of BURST_PROCESSES processes, under a cap of BURST_CAP bring-ups in progress on
# Docker (SANDBOX_WORKER_FLEET__PROVIDER_CONCURRENCY). The fleet sets no cap by default; this is the one an operator
# of a 2-core host would set, and the burst shows it holds.
BURST_PROCESSES = 6
BURST_CAP = 4
# On the burst's sandboxes, so that its count of running sandboxes is of its own sessions alone.
BURST_LABEL = {"sandbox-worker-bench": "burst"}


def _timed_runs(bench: Bench, row: Row, once: Callable[[bool], None]) -> Row:
    """One untimed warm-up, then up to ``bench.runs`` timed runs while the time budget lasts."""
    once(False)
    for i in range(bench.runs):
        if bench.out_of_time():
            row.skipped = bench.runs - i
            break
        once(True)
    return row


def baseline(bench: Bench) -> Row:
    """bench/baseline.sh: docker run, the daemon, health, initialize, session/new, a prompt answered, by hand."""
    row = Row("baseline", "by hand: docker run + daemon + curl health, session/new, prompt (bench/baseline.sh)")

    def once(timed: bool) -> None:
        done = subprocess.run(
            [str(ROOT / "bench" / "baseline.sh"), pins.SANDBOX_IMAGE],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            row.errors.append(f"baseline.sh exited {done.returncode}: {done.stderr.strip()[-200:]}")
            return
        measured = json.loads(done.stdout.splitlines()[-1])
        if timed:
            row.latencies_ms.append(float(measured["ms"]))

    return _timed_runs(bench, row, once)


def _cold(bench: Bench, agent: str) -> Row:
    """Cold bring-ups of ``agent`` through the queue: a new sandbox, daemon and agent process each time."""
    row = Row(f"cold-{agent}", f"submit -> ready through a Celery worker, agent {agent}, new sandbox each")
    with bench.worker(concurrency=1):
        return _timed_runs(bench, row, lambda timed: bench.bring_up(row, bench.request(agent), timed=timed))


def cold_mock(bench: Bench) -> Row:
    return _cold(bench, "mock")


def cold_claude(bench: Bench) -> Row:
    return _cold(bench, "claude")


def cold_codex(bench: Bench) -> Row:
    return _cold(bench, "codex")


# Warm pools: POOL_SIZE ready sandboxes, refilled by the worker between claims; each timed claim waits for a full
# pool so it measures a claim, not a refill.
POOL_SIZE = 2


def _warm(
    bench: Bench,
    agent: str,
    name: str,
    binding: str,
    *,
    target: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    request: dict[str, Any] | None = None,
    **session: Any,
) -> Row:
    """Warm claims of ``agent`` through the queue: claim -> ready, the late binding ``binding`` describes; ``target``
    adds to the pool's target, ``env`` to the worker's, ``request`` to each request."""
    row = Row(name, f"warm pool claim -> ready, agent {agent}: {binding}")
    pool = {"provider": "docker", "agent": agent, "size": POOL_SIZE, **(target or {})}
    worker_env = {
        **(env or {}),
        "SANDBOX_WORKER_POOL__TARGETS": json.dumps([pool]),
        "SANDBOX_WORKER_POOL__REFILL_INTERVAL_SECONDS": "0.5",
    }

    def once(timed: bool) -> None:
        bench.wait_for_pool(pool)
        bench.bring_up(row, bench.request(agent, **session) | (request or {}), timed=timed, from_claim=True)

    try:
        with bench.worker(concurrency=1, **worker_env):
            _timed_runs(bench, row, once)
            bench.wait_for_pool(pool)  # no fill in progress when the worker stops: its sandbox would be left behind
            return row
    finally:
        bench.drain_pool(pool)


def warm_mock(bench: Bench) -> Row:
    return _warm(bench, "mock", "warm-mock", "nothing to bind: the pooled daemon and its initialized agent as they are")


def warm_mock_env(bench: Bench) -> Row:
    return _warm(bench, "mock", "warm-mock-cwd", "another cwd: the daemon replaced with the session's", cwd="/tmp")


def warm_claude(bench: Bench) -> Row:
    """Claude Code for sessions with a key in env (here the shared key): the pooled agent and its session run
    pointed at the daemon front's LLM relay with nobody's key; the claim gives the relay the session's key."""
    return _warm(
        bench,
        "claude",
        "warm-claude",
        "shared key bound at the front's LLM relay: pooled agent and session as they are, no restart",
        target={"binding": "llm-relay"},
    )


def warm_claude_restart(bench: Bench) -> Row:
    """The same sessions from a target without a binding: what they cost without the relay."""
    return _warm(
        bench, "claude", "warm-claude-restart", "shared key: the daemon replaced with the session's environment"
    )


def warm_claude_vault(bench: Bench) -> Row:
    """Claude Code for vault sessions: the pooled agent runs against the egress proxy with a placeholder bound to no
    tenant and its session made; the claim binds the placeholder to the tenant's vault (tests/standins/credentials.py
    runs the proxy and the vault's stand-in LLM API)."""
    stack = CredentialStack(
        base_env=bench.env(),
        workdir=bench.workdir / "vault",
        bridge=bridge_address(bench.docker),
        image=pins.SANDBOX_IMAGE,
        vault_api=LLMApi(),  # type: ignore[arg-type]
    ).start()
    try:
        if stack.worker is not None:
            stack.worker.stop()  # the bench's own worker, with the pool, serves
        tenant = f"bench-vault-{uuid.uuid4().hex[:6]}"
        metadata = {"role": "llm", "engine": "claude", "llm_base_url": stack.urls["vault_api"]}
        vault = Vault(
            name="anthropic",
            metadata=metadata,
            credentials=[VaultCredential(name="key", token=SecretStr(stack.values["vault"]))],
        )
        VaultStore(SecretStore.from_store(bench.client.store)).create(tenant, vault)
        return _warm(
            bench,
            "claude",
            "warm-claude-vault",
            "vault: the pooled placeholder bound to the tenant's vault at claim, no restart, session made at fill",
            target={"strategy": "vault", "llm_base_url": stack.urls["vault_api"]},
            env=stack.env,
            request={"tenant_id": tenant, "credentials": {"strategy": "vault", "vaults": ["anthropic"]}},
        )
    finally:
        stack.stop()


def warm_codex(bench: Bench) -> Row:
    return _warm(bench, "codex", "warm-codex", "shared key: the daemon replaced with the session's environment")


def burst(bench: Bench) -> Row:
    """``bench.burst`` mock sessions submitted at once: all ready, the cap never exceeded."""
    row = Row("burst", f"{bench.burst} mock sessions at once, {BURST_PROCESSES} worker processes, cap {BURST_CAP}")
    store = bench.client.store
    semaphore = Semaphore(store.redis, "provider:docker", BURST_CAP)
    running: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            with contextlib.suppress(Exception):
                running.append(bench.running_sandboxes(**BURST_LABEL))

    caps = {"SANDBOX_WORKER_FLEET__PROVIDER_CONCURRENCY": json.dumps({"docker": BURST_CAP})}
    with bench.worker(concurrency=BURST_PROCESSES, **caps):
        bench.bring_up(row, bench.request("mock"), timed=False)  # warm the processes' imports
        store.redis.delete(f"sw:sem:{{{semaphore.name}}}:peak")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        submitted = {}
        for _ in range(bench.burst):
            payload = bench.request("mock") | {"sandbox": {"labels": BURST_LABEL}}
            submitted[payload["request_id"]] = time.time()
            bench.client.submit(payload)
        pending = dict(submitted)
        deadline = time.monotonic() + max(120.0, 3.0 * bench.burst)
        while pending and time.monotonic() < deadline:
            for request_id in list(pending):
                result = store.result(request_id)
                if result is not None and result.state.terminal:
                    row.add_result(result, pending.pop(request_id))
            time.sleep(0.2)
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
    row.skipped = len(pending)
    peak = semaphore.peak()
    row.extra = {
        "cap": BURST_CAP,
        "peak_bring_ups": peak,
        "cap_held": peak <= BURST_CAP,
        "peak_running_sandboxes": max(running, default=0),
        "all_ready": not pending and not row.errors,
        "wall_s": round(wall, 1),
    }
    removed = bench.remove_sandboxes()
    row.extra["removed_after"] = removed
    return row


def ceiling(bench: Bench) -> Row:
    """The orchestration alone (bench/ceiling.py): Pipeline.create in ``bench.ceiling_processes`` worker processes with
    a null provider, stand-in daemons in a process of their own, and real Redis; against the daemon protocol alone in
    the same processes."""
    sessions, processes = bench.ceiling_sessions, bench.ceiling_processes
    row = Row(
        "ceiling",
        f"{sessions} sessions over {processes} worker processes, each one session at a time: null provider, stand-in "
        "daemons in their own process, real Redis; sessions/s over the wall clock, CPU of the worker processes only",
    )
    row.comparable = False
    measured = measure(bench, sessions, processes)
    for share in measured.shares:
        row.latencies_ms += share.latencies_ms
        row.stages_ms += share.stages_ms
        row.errors += share.errors
    worker_cpu = sum(share.cpu_s for share in measured.shares)
    protocol_cpu = sum(share.protocol_cpu_s for share in measured.shares)
    protocol_ms = protocol_cpu * 1000 / sum(share.protocol_sessions for share in measured.shares)
    worker_ms = worker_cpu * 1000 / sessions
    row.extra = {
        "processes": processes,
        "sessions_per_s": round(sessions / measured.wall_s, 1),
        "worker_cpu_ms_per_session": round(worker_ms, 2),
        "stand_in_daemon_cpu_ms_per_session": round(measured.stand_in_cpu_s * 1000 / sessions, 2),
        # The same run's baseline (bench/ceiling.py): the daemon protocol alone, and what the orchestration adds.
        "protocol_cpu_ms_per_session": round(protocol_ms, 2),
        "worker_cpu_over_protocol": round(worker_ms / protocol_ms, 2),
    }
    return row


SCENARIOS: dict[str, Scenario] = {
    "baseline": baseline,
    "cold-mock": cold_mock,
    "cold-claude": cold_claude,
    "cold-codex": cold_codex,
    "warm-mock": warm_mock,
    "warm-mock-cwd": warm_mock_env,
    "warm-claude": warm_claude,
    "warm-claude-restart": warm_claude_restart,
    "warm-claude-vault": warm_claude_vault,
    "warm-codex": warm_codex,
    "burst": burst,
    "ceiling": ceiling,
}
