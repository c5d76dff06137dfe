"""Shared limits: counting semaphores in Redis whose slots are leases, so a cap holds across every worker and a
holder that dies frees its slot when its lease runs out.

A caller that finds no free slot takes a ticket and waits in line; slots go to the oldest tickets first. A waiter
keeps its place only while it keeps polling, so a waiter that died stops blocking the line within seconds. All
times come from the Redis server's clock, never from a worker's.

Keys for a semaphore ``<name>`` (hash-tagged, so a Redis Cluster keeps them in one slot):

* ``sw:sem:{<name>}:holders`` — zset, holder → lease expiry (ms)
* ``sw:sem:{<name>}:line`` — zset, waiter → ticket number
* ``sw:sem:{<name>}:alive`` — zset, waiter → expiry of its place in line (ms)
* ``sw:sem:{<name>}:tickets`` — the ticket counter
* ``sw:sem:{<name>}:peak`` — the most holders ever seen at once: the record that shows a cap held

The pipeline's semaphores, for one request:

* ``tenant:<tenant_id>`` then ``provider:<provider>`` — bring-ups in progress (sandbox, daemon and session
  stages); the holder is the request id, its lease renewed by the pipeline's heartbeat.
* ``sandboxes:<provider>`` — live sandboxes (a provider quota); held from the sandbox stage until the session is
  torn down, with a lease that runs to the sandbox's expiry. A warm pool's sandbox holds one too (holder
  ``pool:<entry_id>``), handed to the request that claims it (:meth:`Semaphore.hand_over`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator

import redis
import structlog

from worker import metrics
from worker.errors import CapacityTimeout
from worker.fleet import FleetConfig
from worker.models import ProviderName, SessionRequest

log = structlog.get_logger(__name__)

PREFIX = "sw:sem:"
WAITER_TTL_MS = 5_000  # a waiter that has not polled for this long loses its place in line
POLL_SECONDS = 0.2  # mean pause between two polls of a waiter (jittered)

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "

# KEYS: holders, line, alive, tickets, peak. ARGV: holder, limit, lease_ms. Returns 1 when the slot is held.
_ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do redis.call('ZREM', KEYS[2], gone) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local holder, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  return 1
end
if not redis.call('ZSCORE', KEYS[2], holder) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), holder)
end
local free = limit - redis.call('ZCARD', KEYS[1])
if free > 0 and redis.call('ZRANK', KEYS[2], holder) < free then
  redis.call('ZREM', KEYS[2], holder)
  redis.call('ZREM', KEYS[3], holder)
  redis.call('ZADD', KEYS[1], now + lease, holder)
  local held = redis.call('ZCARD', KEYS[1])
  if held > tonumber(redis.call('GET', KEYS[5]) or '0') then redis.call('SET', KEYS[5], held) end
  return 1
end
redis.call('ZADD', KEYS[3], now + """
    + str(WAITER_TTL_MS)
    + """, holder)
return 0
"""
)
# KEYS: holders. ARGV: holder, lease_ms. Extends a lease that has not run out yet; returns 0 when it has.
_RENEW = (
    _NOW
    + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) > now then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""
)


# KEYS: holders, peak. ARGV: old holder, new holder, lease_ms. Moves a slot to another holder in one step, so a
# warm sandbox's quota slot passes from its pool entry to the request that claimed it without a gap.
_HAND_OVER = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
local held = redis.call('ZCARD', KEYS[1])
if held > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], held) end
return 1
"""
)


class Semaphore:
    """A counting semaphore of ``limit`` slots named ``name``, shared by every client of one Redis."""

    def __init__(self, client: redis.Redis, name: str, limit: int) -> None:
        self.redis = client
        self.name = name
        self.limit = limit
        base = f"{PREFIX}{{{name}}}:"
        self._holders, self._line, self._alive = f"{base}holders", f"{base}line", f"{base}alive"
        self._keys = [self._holders, self._line, self._alive, f"{base}tickets", f"{base}peak"]
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._hand_over = client.register_script(_HAND_OVER)

    def __repr__(self) -> str:
        return f"Semaphore({self.name!r}, limit={self.limit})"

    def try_acquire(self, holder: str, lease_seconds: float) -> bool:
        """Take a slot if one is free for us (first in line); otherwise take or keep our place in line."""
        return bool(self._acquire(keys=self._keys, args=[holder, self.limit, int(lease_seconds * 1000)]))

    def acquire(
        self,
        holder: str,
        *,
        lease_seconds: float,
        deadline: float,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> float:
        """Wait in line for a slot until ``deadline`` (``time.monotonic()``); returns the seconds waited.
        ``checkpoint`` runs between polls and may raise to give up (the place in line is then left)."""
        started, granted = time.monotonic(), False
        try:
            while not self.try_acquire(holder, lease_seconds):
                if time.monotonic() >= deadline:
                    raise CapacityTimeout(
                        f"no {self.name} slot (cap {self.limit}) came free within "
                        f"{time.monotonic() - started:.0f}s of waiting"
                    )
                checkpoint()
                time.sleep(random.uniform(POLL_SECONDS / 2, POLL_SECONDS * 1.5))  # noqa: S311 - jitter, not crypto
            granted = True
        except BaseException:
            self.leave_line(holder)
            raise
        finally:
            kind = self.name.partition(":")[0]  # tenant, provider, sandboxes: not the tenant's id (cardinality)
            metrics.LIMIT_WAIT_SECONDS.labels(kind, str(granted).lower()).observe(time.monotonic() - started)
        return time.monotonic() - started

    def renew(self, holder: str, lease_seconds: float) -> bool:
        """Extend ``holder``'s lease; False when it had already run out (the slot may be someone else's now)."""
        return bool(self._renew(keys=[self._holders], args=[holder, int(lease_seconds * 1000)]))

    def try_take(self, holder: str, lease_seconds: float) -> bool:
        """Take a slot only if one is free without waiting; never keeps a place in line (a background job must not
        hold up the requests waiting)."""
        if self.try_acquire(holder, lease_seconds):
            return True
        self.leave_line(holder)
        return False

    def hand_over(self, holder: str, to: str, lease_seconds: float) -> None:
        """Give ``holder``'s slot to ``to`` in one step."""
        self._hand_over(keys=[self._holders, self._keys[4]], args=[holder, to, int(lease_seconds * 1000)])

    def release(self, holder: str) -> None:
        pipe = self.redis.pipeline()
        for key in (self._holders, self._line, self._alive):
            pipe.zrem(key, holder)
        pipe.execute()

    def leave_line(self, holder: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(self._line, holder)
        pipe.zrem(self._alive, holder)
        pipe.execute()

    def holders(self) -> list[str]:
        """Current holders whose lease has not run out (by this machine's clock)."""
        now_ms = time.time() * 1000
        return [str(m) for m in self.redis.zrangebyscore(self._holders, now_ms, "+inf")]

    def waiting(self) -> int:
        return int(self.redis.zcard(self._line))

    def peak(self) -> int:
        """The most holders ever seen at once (never decreases; delete the key to start a new record)."""
        return int(self.redis.get(self._keys[4]) or 0)


class Limits:
    """The fleet's caps and quotas for session bring-ups, built from :class:`worker.fleet.FleetConfig`."""

    def __init__(self, client: redis.Redis, config: FleetConfig, lease_seconds: float) -> None:
        self.redis = client
        self.config = config
        self.lease_seconds = lease_seconds

    def _tenant_semaphore(self, request: SessionRequest) -> Semaphore | None:
        tenant_cap = self.config.tenant_concurrency_overrides.get(request.tenant_id, self.config.tenant_concurrency)
        return Semaphore(self.redis, f"tenant:{request.tenant_id}", tenant_cap) if tenant_cap is not None else None

    def _provider_semaphore(self, provider: ProviderName) -> Semaphore | None:
        provider_cap = self.config.provider_concurrency.get(provider)
        return Semaphore(self.redis, f"provider:{provider.value}", provider_cap) if provider_cap is not None else None

    def _bring_up_semaphores(self, request: SessionRequest, provider: ProviderName | None = None) -> list[Semaphore]:
        """Tenant first, then provider: a request queues for a provider slot only once its tenant allows it,
        so one tenant at its cap never holds up the others' line."""
        found = (self._tenant_semaphore(request), self._provider_semaphore(provider or request.provider))
        return [semaphore for semaphore in found if semaphore is not None]

    def _quota(self, provider: ProviderName) -> Semaphore | None:
        quota = self.config.provider_sandboxes.get(provider)
        return Semaphore(self.redis, f"sandboxes:{provider.value}", quota) if quota is not None else None

    @contextlib.contextmanager
    def _holding(
        self, semaphores: list[Semaphore], holder: str, deadline: float, checkpoint: Callable[[], None]
    ) -> Iterator[None]:
        with contextlib.ExitStack() as held:
            for semaphore in semaphores:
                waited = semaphore.acquire(
                    holder, lease_seconds=self.lease_seconds, deadline=deadline, checkpoint=checkpoint
                )
                held.callback(semaphore.release, holder)
                if waited >= POLL_SECONDS:
                    log.info("slot acquired", semaphore=semaphore.name, waited_ms=round(waited * 1000))
            yield

    def bring_up(
        self, request: SessionRequest, deadline: float, checkpoint: Callable[[], None] = lambda: None
    ) -> contextlib.AbstractContextManager[None]:
        """Hold a bring-up slot under every cap that applies to ``request`` for the duration of the block."""
        return self._holding(self._bring_up_semaphores(request), request.request_id, deadline, checkpoint)

    def tenant_slot(
        self, request: SessionRequest, deadline: float, checkpoint: Callable[[], None] = lambda: None
    ) -> contextlib.AbstractContextManager[None]:
        """The tenant's part of :meth:`bring_up` alone (failover holds it once, and a provider slot per try)."""
        semaphores = [s for s in (self._tenant_semaphore(request),) if s is not None]
        return self._holding(semaphores, request.request_id, deadline, checkpoint)

    def provider_slot(
        self,
        request: SessionRequest,
        provider: ProviderName,
        deadline: float,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> contextlib.AbstractContextManager[None]:
        """The provider's part of :meth:`bring_up`, for the provider the request is tried on."""
        semaphores = [s for s in (self._provider_semaphore(provider),) if s is not None]
        return self._holding(semaphores, request.request_id, deadline, checkpoint)

    def renew(self, request: SessionRequest) -> None:
        """Extend the bring-up slots ``request`` holds (a heartbeat): its tenant's, and whichever provider's it is
        being tried on (a failover moves it), so every provider cap is asked; a slot not held is left alone."""
        providers = (self._provider_semaphore(ProviderName(name)) for name in self.config.provider_concurrency)
        for semaphore in [self._tenant_semaphore(request), *providers]:
            if semaphore is not None and not semaphore.renew(request.request_id, self.lease_seconds):
                log.debug("no bring-up slot to renew", semaphore=semaphore.name)

    def reserve_sandbox(
        self,
        request: SessionRequest,
        *,
        until: float,
        deadline: float,
        checkpoint: Callable[[], None] = lambda: None,
        provider: ProviderName | None = None,
    ) -> None:
        """Hold a live-sandbox slot of the quota of ``provider`` (the request's own by default) until the epoch
        time ``until`` (the sandbox's expiry), or until :meth:`release_sandbox`."""
        quota = self._quota(provider or request.provider)
        if quota is not None:
            lease = max(until - time.time(), self.lease_seconds)
            quota.acquire(request.request_id, lease_seconds=lease, deadline=deadline, checkpoint=checkpoint)

    def reserve_pool_sandbox(self, provider: ProviderName, holder: str, until: float) -> bool:
        """A live-sandbox slot of ``provider``'s quota for a warm pool entry, only if one is free now: a pool counts
        against the quota but never waits for it, nor makes a request wait behind it."""
        quota = self._quota(provider)
        return quota is None or quota.try_take(holder, max(until - time.time(), self.lease_seconds))

    def hand_over_sandbox(self, provider: ProviderName, holder: str, request: SessionRequest, until: float) -> None:
        """The live-sandbox slot a pool entry ``holder`` held becomes ``request``'s (it claimed the sandbox)."""
        quota = self._quota(provider)
        if quota is not None:
            quota.hand_over(holder, request.request_id, max(until - time.time(), self.lease_seconds))

    def release_sandbox(self, provider: ProviderName, request_id: str) -> None:
        quota = self._quota(provider)
        if quota is not None:
            quota.release(request_id)

    def release_sandboxes(self, request_id: str) -> None:
        """Release ``request_id``'s live-sandbox slot on whichever provider holds it (failover may have moved the
        request off its first choice); a request holds at most one at a time."""
        for provider in self.config.provider_sandboxes:
            self.release_sandbox(ProviderName(provider), request_id)
