"""Scheduled batches: a YAML file names a schedule, session templates, a concurrency and a deadline.

    name: nightly-triage            # [A-Za-z0-9_-], up to 32 characters
    schedule: "0 2 * * *"           # cron (croniter); a sixth field counts seconds; optional for `batch run`
    concurrency: 4                  # requests of one run in flight at once
    deadline_seconds: 1800          # then unstarted requests are skipped and unfinished ones terminated
    defaults: {tenant_id: acme, agent: claude, provider: e2b, credentials: {strategy: gateway}}
    sessions:                       # each one a SessionRequest without request_id, over the defaults
      - session: {prompt: "triage issue 1"}
      - session: {prompt: "triage issue 2"}
        count: 3                    # three requests from this template

**Firing, once per tick.** Beat sends ``batches.tick`` every ``fleet.batch_tick_seconds`` from any number of
replicas. A tick looks for each scheduled batch's latest due time; the run id is derived from that time, and the
run record is created with SET NX, so whichever tick comes first fires the run and every other one finds it.

**Running.** Request ids are ``<run_id>-<n>``, so re-submitting is idempotent. A run submits up to ``concurrency``
requests, then advances — counts the states, submits more, enforces the deadline — whenever one of its sessions
finishes and on every tick, under the run's lock.

Keys: ``sw:batchrun:<run_id>`` (the :class:`BatchRun`), ``sw:batchruns`` (zset of run ids by start),
``sw:batchruns:active`` (the runs not finished), ``sw:batchrun:<run_id>:lock``.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import structlog
import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from worker.errors import InvalidRequest
from worker.models import SessionRequest, SessionState, parse_request
from worker.store import PREFIX, Store

log = structlog.get_logger(__name__)

BatchName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
_UNFINISHED = (SessionState.queued.value, SessionState.starting.value)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class BatchSpec(BaseModel):
    """One batch file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: BatchName
    schedule: str | None = Field(None, description="Cron expression (croniter); none for on-demand batches.")
    concurrency: int = Field(4, ge=1, le=1000)
    deadline_seconds: int = Field(3600, gt=0, le=7 * 24 * 3600)
    defaults: dict[str, Any] = Field(default_factory=dict)
    sessions: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression: {value!r}")
        return value

    @model_validator(mode="after")
    def _templates(self) -> BatchSpec:
        self.requests("check")  # every template must make a valid request
        return self

    def requests(self, run_id: str) -> list[SessionRequest]:
        """The run's requests: each template over the defaults, ``count`` times, numbered in order."""
        requests: list[SessionRequest] = []
        for index, template in enumerate(self.sessions):
            body = {key: value for key, value in template.items() if key != "count"}
            count = template.get("count", 1)
            if not isinstance(count, int) or not 1 <= count <= 1000:
                raise ValueError(f"sessions[{index}].count: an integer from 1 to 1000")
            for _ in range(count):
                payload = {**_merge(self.defaults, body), "request_id": f"{run_id}-{len(requests):04d}"}
                try:
                    requests.append(parse_request(payload))
                except InvalidRequest as exc:
                    raise ValueError(f"sessions[{index}]: {exc.message}") from None
        return requests

    def due(self, now: float, misfire_seconds: float) -> float | None:
        """The latest scheduled time at or before ``now`` if it is at most ``misfire_seconds`` old."""
        if self.schedule is None:
            return None
        # Ticks fall on whole seconds and get_prev is strictly before its start: start one second on.
        tick = float(croniter(self.schedule, int(now) + 1).get_prev(float))
        return tick if now - tick <= misfire_seconds else None


def load_batch(path: Path) -> BatchSpec:
    """Read and validate a batch file; problems become an InvalidRequest naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
        return BatchSpec.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"{path}: {exc}", field="batch") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"{path}: {where + ': ' if where else ''}{first['msg']}", field="batch") from None


def load_dir(directory: Path) -> list[tuple[Path, BatchSpec]]:
    """Every valid batch file in ``directory``; a broken one is logged and skipped, not fatal to the others."""
    batches = []
    for path in sorted(directory.glob("*.y*ml")):
        try:
            batches.append((path, load_batch(path)))
        except InvalidRequest as exc:
            log.warning("batch file skipped", path=str(path), error=exc.message)
    return batches


class RunState(StrEnum):
    running = "running"
    finished = "finished"
    expired = "expired"  # the deadline came first


class BatchRun(BaseModel):
    """The record of one run: its requests, how far it got, counts by state and durations."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    batch: str
    source: str
    scheduled_for: float | None = None
    started_at: float
    deadline_at: float
    finished_at: float | None = None
    state: RunState = RunState.running
    concurrency: int
    requests: list[SessionRequest]
    submitted: int = 0
    counts: dict[str, int] = Field(default_factory=dict)
    durations_ms: dict[str, float] = Field(
        default_factory=dict, description="Request wall time (submit → end) p50 and max of ended requests; run."
    )


def manual_run_id(name: str, now: float) -> str:
    return f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{uuid.uuid4().hex[:4]}"


def scheduled_run_id(name: str, tick: float) -> str:
    return f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(tick))}"


Submit = Callable[[SessionRequest, str], None]  # (request, run_id): queue it, advancing the run when it ends


class Batches:
    """Starting, advancing and reading batch runs. ``submit`` and ``terminate`` reach the task queue."""

    def __init__(self, store: Store, submit: Submit, terminate: Callable[[SessionRequest], None]) -> None:
        self.store = store
        self.redis = store.redis
        self.submit = submit
        self.terminate = terminate

    def get(self, run_id: str) -> BatchRun | None:
        raw = self.redis.get(f"{PREFIX}batchrun:{run_id}")
        return BatchRun.model_validate_json(raw) if raw else None

    def _save(self, run: BatchRun) -> None:
        self.redis.set(f"{PREFIX}batchrun:{run.run_id}", run.model_dump_json())

    def runs(self, batch: str | None = None) -> list[BatchRun]:
        """Every run, oldest first (of one batch when ``batch`` is given)."""
        runs = (self.get(str(run_id)) for run_id in self.redis.zrange(f"{PREFIX}batchruns", 0, -1))
        return [run for run in runs if run is not None and batch in (None, run.batch)]

    def active(self) -> list[str]:
        return [str(run_id) for run_id in self.redis.zrange(f"{PREFIX}batchruns:active", 0, -1)]

    def start(
        self, spec: BatchSpec, source: str, run_id: str, *, scheduled_for: float | None = None
    ) -> BatchRun | None:
        """Create the run and submit its first requests; None when a run with this id exists (already fired)."""
        now = time.time()
        run = BatchRun(
            run_id=run_id,
            batch=spec.name,
            source=source,
            scheduled_for=scheduled_for,
            started_at=now,
            deadline_at=now + spec.deadline_seconds,
            concurrency=spec.concurrency,
            requests=spec.requests(run_id),
        )
        if not self.redis.set(f"{PREFIX}batchrun:{run_id}", run.model_dump_json(), nx=True):
            return None
        pipe = self.redis.pipeline()
        pipe.zadd(f"{PREFIX}batchruns", {run_id: now})
        pipe.zadd(f"{PREFIX}batchruns:active", {run_id: now})
        pipe.execute()
        log.info("batch run started", run_id=run_id, batch=spec.name, requests=len(run.requests))
        return self.advance(run_id)

    def fire_due(self, batches: Iterable[tuple[Path, BatchSpec]], now: float, misfire_seconds: float) -> list[BatchRun]:
        """Start the run of every scheduled batch whose tick is due and not fired yet."""
        fired = []
        for path, spec in batches:
            tick = spec.due(now, misfire_seconds)
            if tick is None:
                continue
            run = self.start(spec, str(path), scheduled_run_id(spec.name, tick), scheduled_for=tick)
            if run is not None:
                log.info("batch fired", run_id=run.run_id, batch=spec.name, tick=tick)
                fired.append(run)
        return fired

    def advance(self, run_id: str) -> BatchRun:
        """Count the run's states, submit what its concurrency allows, end it when done or past its deadline."""
        with self.redis.lock(f"{PREFIX}batchrun:{run_id}:lock", timeout=60, blocking_timeout=30):
            run = self.get(run_id)
            if run is None:
                raise InvalidRequest(f"no batch run {run_id}", field="run_id")
            if run.finished_at is None:
                self._advance(run, time.time())
                self._save(run)
                if run.finished_at is not None:
                    self.redis.zrem(f"{PREFIX}batchruns:active", run_id)
                    log.info("batch run ended", run_id=run_id, state=run.state.value, counts=run.counts)
            return run

    def _advance(self, run: BatchRun, now: float) -> None:
        records = [self.store.get(request.request_id) for request in run.requests[: run.submitted]]
        states = [record.result.state.value if record else SessionState.queued.value for record in records]
        if now >= run.deadline_at:
            for index, (request, state) in enumerate(zip(run.requests, states, strict=False)):
                if state in _UNFINISHED:
                    self.terminate(request)
                    states[index] = SessionState.terminated.value
            run.state, run.finished_at = RunState.expired, now
        else:
            room = run.concurrency - sum(state in _UNFINISHED for state in states)
            for request in run.requests[run.submitted : run.submitted + max(room, 0)]:
                # The record exists before the message: a deadline can terminate a request still in the queue.
                self.store.create(request)
                self.submit(request, run.run_id)
                states.append(SessionState.queued.value)
            run.submitted = len(states)
            if run.submitted == len(run.requests) and not any(state in _UNFINISHED for state in states):
                run.state, run.finished_at = RunState.finished, now
        run.counts = dict(Counter(states))
        run.counts["pending"] = len(run.requests) - run.submitted
        ended = [r.result.updated_at - r.created_at for r in records if r and r.result.state.value not in _UNFINISHED]
        run.durations_ms = {"run": round(((run.finished_at or now) - run.started_at) * 1000)}
        if ended:
            run.durations_ms |= {"p50": round(statistics.median(ended) * 1000), "max": round(max(ended) * 1000)}
