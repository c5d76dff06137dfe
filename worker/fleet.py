"""Fleet settings: shared limits, attempts, the reaper, scheduled batches and the fault-injection hook.

One ``SANDBOX_WORKER_FLEET__*`` block of :class:`worker.config.Settings` (``SANDBOX_WORKER_FLEET__PROVIDER_CONCURRENCY=
'{"docker": 5}'``), free of Redis and Celery imports like the rest of the configuration. Every worker of a fleet must
run with the same values: the caps are enforced in Redis, but each worker passes its own copy of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from worker.models import Identifier, ProviderName

# The pipeline's stages, in order.
StageName = Literal["claim", "credentials", "environment", "sandbox", "daemon", "session", "ready"]
STAGES: tuple[StageName, ...] = get_args(StageName)


class FleetConfig(BaseModel):
    """Settings that only make sense across a fleet of workers sharing one Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider_concurrency: dict[ProviderName, PositiveInt] = Field(
        default_factory=dict,
        description="Bring-ups in progress at once per provider across all workers (the sandbox, daemon and "
        "session stages); a provider without an entry has no cap.",
    )
    tenant_concurrency: PositiveInt | None = Field(
        None, description="Bring-ups in progress at once per tenant across all workers; no cap when unset."
    )
    tenant_concurrency_overrides: dict[Identifier, PositiveInt] = Field(
        default_factory=dict, description="Per-tenant exceptions to tenant_concurrency."
    )
    provider_sandboxes: dict[ProviderName, PositiveInt] = Field(
        default_factory=dict,
        description="Live sandboxes per provider (a quota such as E2B's concurrent-sandbox limit), held from the "
        "sandbox stage until the session ends or expires; a provider without an entry has no quota.",
    )
    slot_wait_seconds: float = Field(
        600.0,
        gt=0,
        description="How long a request waits in line (first come, first served) for a slot under a cap or quota "
        "before it fails with capacity_timeout; keep it below the task soft time limit.",
    )
    max_attempts: PositiveInt = Field(
        6,
        description="Bring-up attempts of one request (task retries, redeliveries and takeovers together) before "
        "it fails for good; keep it above the task's retries.",
    )
    stage_attempts: PositiveInt = Field(
        3,
        le=10,
        description="Tries of a transient failure within one stage (jittered backoff) before the bring-up is "
        "compensated and left to the next attempt; see worker/retries.py for how the layers multiply.",
    )
    failover: dict[ProviderName, list[ProviderName]] = Field(
        default_factory=dict,
        description='Providers to fail over to, in order, per first-choice provider (\'{"e2b": ["daytona", '
        '"docker"]}\'), for requests that name no fallback_providers; a worker serving a provider must be '
        "configured for its fallbacks too.",
    )
    breaker_failures: PositiveInt = Field(
        5,
        description="Consecutive provider-side failures of a provider (within breaker_window_seconds, across all "
        "workers) that open its circuit breaker.",
    )
    breaker_window_seconds: float = Field(
        120.0, gt=0, description="Window in which breaker_failures must fall; an older failure streak is forgotten."
    )
    breaker_cooldown_seconds: float = Field(
        60.0,
        gt=0,
        description="How long an open breaker makes requests skip its provider before one probe request is let "
        "through (half-open); a successful probe closes it, a failed one opens it for another cool-down.",
    )
    reap_interval_seconds: float = Field(60.0, gt=0, description="How often beat runs the reaper.")
    sandbox_check_seconds: float = Field(
        15.0,
        gt=0,
        description="How often beat checks that each ready session's sandbox still exists; one that vanished ends "
        "failed (sandbox_gone) and its credentials (a vault placeholder) are released.",
    )
    reap_grace_seconds: float = Field(
        300.0,
        ge=0,
        description="Age after which the reaper removes an owned sandbox that has no record, and requeues a "
        "request left unfinished without a live lease (at most once per grace period).",
    )
    batch_dir: Path | None = Field(
        None, description="Directory of batch files (*.yaml) that beat fires on their schedules; none when unset."
    )
    batch_tick_seconds: float = Field(
        15.0, gt=0, description="How often beat checks batch schedules and advances the running batches."
    )
    batch_misfire_seconds: float = Field(
        300.0, gt=0, description="A schedule tick that no beat tick saw in time still fires, once, within this."
    )
    fault_pause: dict[StageName, float] = Field(
        default_factory=dict,
        description="Fault-injection hook for crash drills: seconds to pause at the end of each named stage "
        "('{\"sandbox\": 60}'), while the lease is held, so a worker can be killed there. Empty in production.",
    )
