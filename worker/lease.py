"""The lease on a request: which worker brings it up, held in Redis and renewed by a heartbeat.

Delivery is at least once and workers die anywhere, so exactly one worker at a time may work on a request. The
lease is a redis-py :class:`~redis.lock.Lock` whose token is the worker's id: it expires unless renewed, so a
worker that died frees the request within ``lease_seconds`` and a redelivery takes it over. A heartbeat, the
process's one renewal thread, renews it (and whatever else the bring-up holds, through ``on_beat``) a few times per
lease period; a renewal that finds the lease gone sets :attr:`Lease.lost`, and the pipeline stops at its next
checkpoint and touches nothing.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis
import structlog
from redis.exceptions import LockError
from redis.lock import Lock

from worker.store import SessionRecord, Store

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class _Held:
    """One lock held in this process, renewed by :class:`_Renewals` while its holder is at work."""

    lock: Lock
    period: float
    lost: threading.Event
    on_beat: Callable[[], None]
    name: str
    dropped: bool = False
    guard: threading.Lock = field(default_factory=threading.Lock)  # a renewal in progress holds it

    def beat(self) -> bool:
        """Renew the lock (and ``on_beat``) once; whether to go on renewing it."""
        with self.guard:
            if self.dropped:
                return False
            try:
                self.lock.reacquire()
            except LockError:  # expired, or someone else holds it now
                self.lost.set()
                return False
            except redis.RedisError as exc:  # Redis away beyond its retries: keep beating while the lock may hold
                log.warning("lock renewal failed", lock=self.name, error=type(exc).__name__)
                return True
            try:
                self.on_beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed", lock=self.name, error=type(exc).__name__)
            return True

    def drop(self) -> None:
        """No renewal after this returns (one in progress ends first)."""
        with self.guard:
            self.dropped = True


class _Renewals:
    """The process's one thread renewing the locks held in it, each every third of its lease: a bring-up starts no
    thread for its lease. A renewal slowed down by Redis delays the next ones by as much, a few seconds at worst
    (Redis's reconnect budget), well inside a lease."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Held]] = []  # a heap: when each is next renewed
        self._order = itertools.count()  # ties broken in the order they were added
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, held: _Held) -> None:
        with self._wake:
            self._schedule(held)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lock-renewals", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _next(self) -> _Held:
        """Wait for the next lock due for renewal; dropped ones leave the heap as they come due."""
        with self._wake:
            while True:
                now = time.monotonic()
                if self._due and self._due[0][0] <= now:
                    held = heapq.heappop(self._due)[2]
                    if not held.dropped:
                        return held
                    continue
                self._wake.wait(self._due[0][0] - now if self._due else None)

    def _run(self) -> None:
        while True:
            held = self._next()
            try:
                again = held.beat()
            except Exception:  # one holder's failure must not end the renewal of every other lock in the process
                log.exception("lock renewal failed unexpectedly", lock=held.name)
                again = True
            if again:
                with self._wake:
                    self._schedule(held)

    def _schedule(self, held: _Held) -> None:
        """With the lock held: ``held`` due a period from now."""
        heapq.heappush(self._due, (time.monotonic() + held.period, next(self._order), held))


@functools.cache
def _renewals() -> _Renewals:
    return _Renewals()


# A forked worker process (Celery's prefork children) starts its own thread.
os.register_at_fork(after_in_child=_renewals.cache_clear)


@contextlib.contextmanager
def renewed(
    lock: Lock, seconds: float, lost: threading.Event, *, on_beat: Callable[[], None] = lambda: None, name: str = "lock"
) -> Iterator[None]:
    """Renew ``lock`` (and ``on_beat``) every third of ``seconds`` while the block runs, so a holder still at work
    never loses it to expiry; a renewal that finds the lock gone sets ``lost`` and stops."""
    held = _Held(lock, seconds / 3, lost, on_beat, name)
    _renewals().add(held)
    try:
        yield
    finally:
        held.drop()


class Lease:
    def __init__(
        self,
        store: Store,
        request_id: str,
        holder: str,
        seconds: float,
        *,
        on_beat: Callable[[], None] = lambda: None,
        create: SessionRecord | None = None,
    ) -> None:
        """``create``: the request's record, written as the lease is taken if the request has none yet."""
        self.request_id = request_id
        self.seconds = seconds
        self.lost = threading.Event()
        self._lock = store.lease(request_id, seconds, create=create)
        self._holder = holder
        self._on_beat = on_beat

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; never waits."""
        return bool(self._lock.acquire(blocking=False, token=self._holder))

    @property
    def record(self) -> SessionRecord | None:
        """The request's record as it was when the lease was taken, or found held (read in the same round trip)."""
        return self._lock.record

    def release(self) -> None:
        """Give the lease back if we still hold it (one that ran out and was taken over stays with its taker; one
        :meth:`given_back` already asks nothing of Redis)."""
        with contextlib.suppress(LockError):
            self._lock.release()

    def given_back(self) -> None:
        """The lease was deleted in Redis by a write that checked it was ours (Store.advance's ``release``)."""
        self._lock.local.token = None

    def held(self) -> bool:
        """Whether the lease is still ours, asked of Redis: false once it ran out, even if nobody took it yet, and
        false when another worker holds it. Checked before anything that the new owner may hold is touched."""
        if self.lost.is_set():
            return False
        if not self._lock.owned():
            self.lost.set()
            return False
        return True

    def heartbeat(self) -> contextlib.AbstractContextManager[None]:
        """Renew the lease (and ``on_beat``) while the block runs, so a live bring-up is never taken over."""
        return renewed(self._lock, self.seconds, self.lost, on_beat=self._on_beat, name=f"lease-{self.request_id}")
