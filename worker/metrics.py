"""Prometheus metrics of the worker (``sandbox_worker_`` prefix), defined once per process and updated where things
happen. Serving them over HTTP is the operator's job (prometheus-client's own ``start_http_server`` or a
multiprocess collector), not this module's."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

POOL_SIZE = Gauge("sandbox_worker_pool_size", "Warm sandboxes ready to be claimed, as last seen.", ["pool"])
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
