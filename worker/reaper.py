"""The reaper: finds what crashed workers, lost messages and expired sessions left behind, and deals with it.

Provider-agnostic. One pass (:meth:`Reaper.run`):

1. **Sandboxes**, on every configured provider (``settings.providers``): those carrying our owner label. A sandbox
   is left alone when it has no request label (we cannot prove whose it is) or its request has a live lease (a
   bring-up is working on it). Otherwise it is

   * removed when its record is failed or terminated, when its record is missing and it is older than the grace
     period, or when its record is ready with another sandbox (a stray from an earlier attempt);
   * terminated through the pipeline (its session with it) when it is past its ttl.

   A warm pool's sandbox (:mod:`worker.pool`) carries no request label: once claimed, its request is the one the
   pool noted, and it is judged as that request's. Unclaimed, it is left alone while ready or while its fill is in
   progress, and removed otherwise (its fill's worker died, or its entry is gone from Redis); ready entries past
   the pool's max age are recycled at the start of the pass.

2. **Ready sessions whose sandbox vanished** (removed behind the worker's back, killed by its provider): the
   record ends ``failed`` with ``sandbox_gone``, its credentials are released (a vault placeholder dies with
   its sandbox) and its quota slot freed. A ready record whose sandbox is missing from its provider's listing is
   confirmed with ``find`` before anything is done. This part needs no fleet identity (a record and the provider's
   own answer are the evidence) and also runs alone, more often (:meth:`Reaper.end_vanished`, every
   ``fleet.sandbox_check_seconds``).

3. **Records**: a request past its ttl that is not failed or terminated is terminated through the pipeline; an
   unfinished request without a live lease whose record has not changed for the grace period lost its worker and
   its message (a whole worker died: the broker only redelivers after the visibility timeout), so it is sent
   again, at most once per grace period. The pipeline adopts or removes what the dead attempt left.

Every action is idempotent; a dry run reports what it would do.

**Identity.** The reaper acts only with a fleet identity it can trust, because "no record" is only evidence when
the records are this fleet's and intact: an owner label other than the default ``sandbox-worker`` (which another
fleet sharing the engine or account may also use), or the fleet marker in Redis (:data:`worker.store.FLEET_MARKER`,
written with the first record, gone after a data loss). Without either it refuses the whole pass and says why
(:meth:`Reaper.refusal`). With the default owner and the marker, a sandbox without a record is removed only when it
was created after the marker: one older than the Redis's records may belong to records that were lost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from providers.base import LABEL_CREATED_AT, LABEL_EXPIRES_AT, LABEL_OWNER, LABEL_REQUEST_ID, Provider, Sandbox
from worker import metrics
from worker.config import DEFAULT_OWNER, Settings
from worker.errors import SandboxGone, SandboxWorkerError
from worker.limits import Limits
from worker.models import ProviderName, SessionRequest, SessionState
from worker.pool import LABEL_POOL, LABEL_POOL_ENTRY, Pools, slot_holder
from worker.store import SessionRecord, Store

log = structlog.get_logger(__name__)

Action = Literal["remove", "terminate", "requeue", "end"]


@dataclass(frozen=True, slots=True)
class Reaped:
    """One thing the reaper did (or, in a dry run, would do)."""

    action: Action
    reason: str
    request_id: str
    provider: str | None = None
    sandbox_id: str | None = None
    done: bool = False


def _label_time(sandbox: Sandbox, label: str) -> float | None:
    try:
        return float(sandbox.labels[label])
    except (KeyError, ValueError):
        return None


@dataclass
class Reaper:
    settings: Settings
    store: Store
    providers: Callable[[ProviderName], Provider]
    terminate: Callable[..., Any]  # worker.teardown.Teardown.terminate
    requeue: Callable[[SessionRequest], None]  # back on the request's provider queue
    limits: Limits
    pools: Pools = field(init=False)

    def __post_init__(self) -> None:
        self.pools = Pools(self.settings, self.store, self.providers, self.limits)

    def refusal(self) -> str | None:
        """Why the reaper must not act, or None when it has a fleet identity it can trust."""
        if self.settings.owner != DEFAULT_OWNER or self.store.fleet_since() is not None:
            return None
        return (
            f"refusing to reap: the owner label is the default {DEFAULT_OWNER!r} (another fleet may share it) and "
            "Redis has no fleet marker (it is new or lost its data), so a sandbox without a record may not be an "
            "orphan; set SANDBOX_WORKER_OWNER to this fleet's own label"
        )

    def run(self, *, dry_run: bool = False) -> list[Reaped]:
        """One pass; nothing at all when :meth:`refusal` says the reaper cannot trust its records."""
        if (why := self.refusal()) is not None:
            log.warning("reaper refused", reason=why)
            return []
        if not dry_run:
            self.pools.recycle_all()
        now = time.time()
        plan: list[Reaped] = []
        listed = self._list()
        for sandboxes in listed.values():
            plan += [verdict for sandbox in sandboxes if (verdict := self._judge_sandbox(sandbox, now))]
        plan += self._judge_records(now, {r.request_id for r in plan if r.action == "terminate"})
        plan += self._judge_vanished(listed, {r.request_id for r in plan})
        if dry_run:
            return plan
        if len(listed) == len(
            self.settings.providers
        ):  # a complete listing: claim notes of sandboxes not in it are stale
            self.pools.forget_claims({s.sandbox_id for sandboxes in listed.values() for s in sandboxes}, now)
        return [self._apply(item) for item in plan]

    def end_vanished(self, *, dry_run: bool = False) -> list[Reaped]:
        """Only step 2 of a pass: the ready sessions whose sandbox is gone."""
        plan = self._judge_vanished(self._list(), set())
        return plan if dry_run else [self._apply(item) for item in plan]

    def _list(self) -> dict[ProviderName, list[Sandbox]]:
        """Our sandboxes on each provider that could be listed."""
        listed: dict[ProviderName, list[Sandbox]] = {}
        for name in self.settings.providers:
            try:
                listed[name] = self.providers(name).list_owned({LABEL_OWNER: self.settings.owner})
            except SandboxWorkerError as exc:
                log.warning("reaper cannot list sandboxes", provider=name.value, error=exc.message)
        return listed

    # -- deciding ---------------------------------------------------------------------------------------
    def _judge_sandbox(self, sandbox: Sandbox, now: float) -> Reaped | None:
        if sandbox.labels.get(LABEL_OWNER) != self.settings.owner:
            return None  # not provably ours
        request_id = sandbox.labels.get(LABEL_REQUEST_ID) or self.pools.claimed_by(sandbox)
        if not request_id:
            return self._judge_pooled(sandbox)
        if self.store.lease_holder(request_id) is not None:
            return None  # a bring-up is working on it
        verdict = self._sandbox_verdict(sandbox, self.store.get(request_id), now)
        if verdict is None:
            return None
        return Reaped(verdict[0], verdict[1], request_id, sandbox.provider, sandbox.sandbox_id)

    def _judge_pooled(self, sandbox: Sandbox) -> Reaped | None:
        """An unclaimed warm pool sandbox: removed (its quota slot freed) once it is no longer its pool's."""
        entry_id = sandbox.labels.get(LABEL_POOL_ENTRY)
        if not entry_id or not sandbox.labels.get(LABEL_POOL) or self.pools.in_use(sandbox):
            return None
        if self.settings.owner == DEFAULT_OWNER:  # trusted by the marker alone: not what predates it
            since, created = self.store.fleet_since(), _label_time(sandbox, LABEL_CREATED_AT)
            if since is None or created is None or created < since:
                return None
        return Reaped("remove", "pool entry gone", slot_holder(entry_id), sandbox.provider, sandbox.sandbox_id)

    def _sandbox_verdict(self, sandbox: Sandbox, record: SessionRecord | None, now: float) -> tuple[Action, str] | None:
        """What to do with an owned sandbox no bring-up is working on, given its request's record."""
        if record is None:
            created = _label_time(sandbox, LABEL_CREATED_AT)
            past_grace = created is not None and now - created > self.settings.fleet.reap_grace_seconds
            if self.settings.owner == DEFAULT_OWNER:  # trusted by the marker alone: not what predates it
                since = self.store.fleet_since()
                if since is None or created is None or created < since:
                    return None
            return ("remove", "no record") if past_grace else None
        state = record.result.state
        expires = _label_time(sandbox, LABEL_EXPIRES_AT)
        if state in (SessionState.failed, SessionState.terminated):
            return "remove", f"request {state.value}"
        if expires is not None and expires <= now:
            return "terminate", "past its ttl"
        if state is SessionState.ready and record.result.sandbox_id != sandbox.sandbox_id:
            return "remove", "not the ready session's sandbox"
        return None

    def _judge_records(self, now: float, terminating: set[str]) -> list[Reaped]:
        plan: list[Reaped] = []
        for request_id in self.store.expired(now):
            record = self._unleased(request_id)
            if record is not None and request_id not in terminating:
                plan.append(Reaped("terminate", "past its ttl", request_id, record.request.provider.value))
                terminating.add(request_id)
        for request_id in self.store.stalled(now - self.settings.fleet.reap_grace_seconds):
            record = self._unleased(request_id)
            if record is not None and not record.result.state.terminal and request_id not in terminating:
                idle = now - record.result.updated_at
                plan.append(Reaped("requeue", f"no worker for {idle:.0f}s", request_id, record.request.provider.value))
        return plan

    def _judge_vanished(self, listed: dict[ProviderName, list[Sandbox]], planned: set[str]) -> list[Reaped]:
        """Ready sessions whose sandbox is not in its provider's listing (a listing that failed proves nothing)."""
        present = {name: {s.sandbox_id for s in sandboxes} for name, sandboxes in listed.items()}
        plan: list[Reaped] = []
        for request_id in self.store.expired(math.inf):  # the live index: every request not failed or terminated
            record = None if request_id in planned else self._unleased(request_id)
            if record is None or record.result.state is not SessionState.ready or not record.result.sandbox_id:
                continue
            served = record.result.provider or record.request.provider
            if served in present and record.result.sandbox_id not in present[served]:
                plan.append(Reaped("end", "its sandbox is gone", request_id, served.value, record.result.sandbox_id))
        return plan

    def _unleased(self, request_id: str) -> SessionRecord | None:
        """The record of ``request_id`` when no bring-up holds its lease."""
        if self.store.lease_holder(request_id) is not None:
            return None
        return self.store.get(request_id)

    # -- acting -----------------------------------------------------------------------------------------
    def _apply(self, item: Reaped) -> Reaped:
        try:
            done = self._act(item)
        except Exception as exc:  # one stubborn sandbox must not stop the pass
            reason = exc.message if isinstance(exc, SandboxWorkerError) else type(exc).__name__
            log.warning("reaper action failed", action=item.action, request_id=item.request_id, error=reason)
            return item
        if done:
            metrics.REAPED.labels(item.action, item.provider or "").inc()
            log.info("reaped", action=item.action, reason=item.reason, request_id=item.request_id)
        return Reaped(item.action, item.reason, item.request_id, item.provider, item.sandbox_id, done)

    def _act(self, item: Reaped) -> bool:
        if self.store.lease_holder(item.request_id) is not None:
            return False  # a bring-up started since we looked
        if item.action == "terminate":
            self.terminate(item.request_id)
            return True
        record = self.store.get(item.request_id)
        if item.action == "end":
            return self._end_vanished(item, record)
        if item.action == "requeue":
            if record is None or not self.store.claim_once(
                f"requeue:{item.request_id}", self.settings.fleet.reap_grace_seconds
            ):
                return False
            self.requeue(record.request)
            return True
        assert item.provider is not None and item.sandbox_id is not None
        removed = self.providers(ProviderName(item.provider)).stop(item.sandbox_id)
        if record is None or record.result.state is not SessionState.ready:  # a stray holds no slot of its own
            self.limits.release_sandbox(ProviderName(item.provider), item.request_id)
        return removed

    def _end_vanished(self, item: Reaped, record: SessionRecord | None) -> bool:
        """End a ready session whose sandbox is gone: confirmed with ``find`` first (it may have started after the
        listing)."""
        assert item.provider is not None and item.sandbox_id is not None
        if (
            record is None
            or record.result.state is not SessionState.ready
            or record.result.sandbox_id != item.sandbox_id
        ):
            return False
        if self.providers(ProviderName(item.provider)).find(item.sandbox_id) is not None:
            return False
        gone = SandboxGone(
            f"the sandbox {item.sandbox_id} of this ready session is gone (removed outside the worker, or by its "
            "provider); its credentials are released",
            provider=item.provider,
            sandbox_id=item.sandbox_id,
        )
        self.terminate(item.request_id, gone=gone)
        return True


def build_reaper(requeue: Callable[[SessionRequest], None]) -> Reaper:
    """The reaper of this process, wired to its runtime objects; ``requeue`` sends a request back to the queue."""
    from worker import runtime
    from worker.config import get_settings

    teardown = runtime.teardown()
    return Reaper(get_settings(), runtime.store(), runtime.provider, teardown.terminate, requeue, teardown.limits)
