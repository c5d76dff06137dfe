"""Prometheus metrics of the worker (``sandbox_worker_`` prefix), defined once per process and updated where things
happen, and their one endpoint per worker.

A Celery worker is a main process and a prefork pool of children, each counting in its own memory: the worker
command (``sandbox-worker worker``) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory *before*
prometheus-client is imported, so every process writes its samples to files there; :func:`serve` (the main
process) aggregates them on each scrape; :func:`child_exited` drops a dead child's live gauges; the command
removes the directory when the worker stops. Celery's own task
metrics are Flower's ``/metrics`` or celery-exporter's (docs/operations.md, "Metrics").
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

SESSIONS = Counter(
    "sandbox_worker_sessions",
    "Bring-ups that ended (outcome: ready, failed, terminated, retried; warm: true when from a warm pool).",
    ["outcome", "provider", "agent", "strategy", "warm", "code"],
)
STAGE_SECONDS = Histogram(
    "sandbox_worker_stage_duration_seconds",
    "Duration of each bring-up stage (claim, credentials, environment, sandbox, daemon, session, ready).",
    ["stage", "provider", "warm"],
    buckets=STAGE_BUCKETS,
)
SESSION_SECONDS = Histogram(
    "sandbox_worker_session_duration_seconds",
    "Duration of a whole bring-up attempt, by outcome.",
    ["outcome", "provider", "warm"],
    buckets=STAGE_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "sandbox_worker_queue_wait_seconds",
    "From a request's send (the sender's clock) to a worker starting it, first deliveries only.",
    ["queue"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0),
)
LIMIT_WAIT_SECONDS = Histogram(
    "sandbox_worker_limit_wait_seconds",
    "Time waiting for a fleet limit's slot (limit: tenant, provider, sandboxes), whether it was granted or not.",
    ["limit", "granted"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0),
)
REAPED = Counter(
    "sandbox_worker_reaped",
    "Reaper actions carried out (action: remove, terminate, end, requeue).",
    ["action", "provider"],
)
GATEWAY_MINTS = Counter(
    "sandbox_worker_gateway_mints", "Tenant keys minted at an LLM gateway (strategy 'gateway').", ["backend"]
)
EGRESS_REQUESTS = Counter(
    "sandbox_worker_egress_requests",
    "Requests to the vault strategy's egress proxy (outcome: forwarded, refused, unreachable), by HTTP status. "
    "Served by the proxy's own process.",
    ["outcome", "status"],
)

POOL_SIZE = Gauge(
    "sandbox_worker_pool_size",
    "Warm sandboxes ready to be claimed, as last seen.",
    ["pool"],
    multiprocess_mode="mostrecent",
)
POOL_HITS = Counter("sandbox_worker_pool_hits", "Requests served by a warm sandbox.", ["pool"])
POOL_MISSES = Counter(
    "sandbox_worker_pool_misses",
    "Requests eligible for a pool that started cold (reason: empty, expired, dead).",
    ["pool", "reason"],
)
POOL_CLAIM_SECONDS = Histogram(
    "sandbox_worker_pool_claim_seconds",
    "Time to claim a warm sandbox (Redis claim, daemon check, quota hand-over), hits and misses.",
    ["pool"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
POOL_FILLS = Counter(
    "sandbox_worker_pool_fills", "Warm sandboxes started (outcome: ready, failed).", ["pool", "outcome"]
)
POOL_RECYCLED = Counter(
    "sandbox_worker_pool_recycled", "Warm sandboxes removed unclaimed past their max age.", ["pool"]
)


def serve(host: str, port: int) -> bool:
    """Serve ``/metrics`` of every process of this worker on ``host:port`` from a thread of this process; False
    (nothing served) when the samples directory is not set up."""
    if not os.environ.get(MULTIPROC_ENV):
        return False
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)
    return True


def child_exited(pid: int) -> None:
    """A pool process ended: its live gauges go (its counters stay: they are counts of what happened)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
