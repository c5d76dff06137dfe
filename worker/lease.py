"""The lease on a request: which worker brings it up, held in Redis and renewed by a heartbeat thread.

Delivery is at least once and workers die anywhere, so exactly one worker at a time may work on a request. The
lease is a redis-py :class:`~redis.lock.Lock` whose token is the worker's id: it expires unless renewed, so a
worker that died frees the request within ``lease_seconds`` and a redelivery takes it over. A heartbeat renews it
(and whatever else the bring-up holds, through ``on_beat``) a few times per lease period; a renewal that finds the
lease gone sets :attr:`Lease.lost`, and the pipeline stops at its next checkpoint and touches nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import redis
import structlog
from redis.exceptions import LockError
from redis.lock import Lock

from worker.store import Store

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def renewed(
    lock: Lock, seconds: float, lost: threading.Event, *, on_beat: Callable[[], None] = lambda: None, name: str = "lock"
) -> Iterator[None]:
    """Renew ``lock`` (and ``on_beat``) every third of ``seconds`` while the block runs, so a holder still at work
    never loses it to expiry; a renewal that finds the lock gone sets ``lost`` and stops."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(seconds / 3):
            try:
                lock.reacquire()
            except LockError:  # expired, or someone else holds it now
                lost.set()
                return
            except redis.RedisError as exc:  # Redis away beyond its retries: keep beating while the lock may hold
                log.warning("lock renewal failed", lock=name, error=type(exc).__name__)
                continue
            try:
                on_beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed", lock=name, error=type(exc).__name__)

    thread = threading.Thread(target=beat, name=f"renew-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


class Lease:
    def __init__(
        self,
        store: Store,
        request_id: str,
        holder: str,
        seconds: float,
        *,
        on_beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.request_id = request_id
        self.seconds = seconds
        self.lost = threading.Event()
        self._lock = store.lease(request_id, seconds)
        self._holder = holder
        self._on_beat = on_beat

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; never waits."""
        return bool(self._lock.acquire(blocking=False, token=self._holder))

    def release(self) -> None:
        """Give the lease back if we still hold it (one that ran out and was taken over stays with its taker)."""
        with contextlib.suppress(LockError):
            self._lock.release()

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
