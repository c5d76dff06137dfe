"""Session records in Redis: one record per request_id, a lease while a worker brings it up.

Keys (prefix ``sw:``):

* ``sw:session:<request_id>`` — the :class:`SessionRecord` as JSON (request, result, encrypted daemon token).
  Once failed or terminated it expires after ``record_retention_seconds``: the window in which a duplicate
  submit still gets the old result instead of a new session.
* ``sw:lease:<request_id>`` — the id of the worker bringing the request up; expires unless renewed.
* ``sw:active`` — sorted set of the unfinished (queued, starting) request ids by last update: the reaper's view of
  bring-ups that may have lost their worker.
* ``sw:live`` — sorted set of the request ids not failed or terminated, by expiry (sandbox ttl): the reaper
  terminates those past it.
* ``sw:terminate:<request_id>`` — a client asked to end the request while it was coming up. A key of its own,
  not a record field: the record is written only by the worker bringing the request up, which would overwrite
  a flag set in between.
* ``sw:once:<name>`` — a marker that something happened recently (:meth:`Store.claim_once`).
* ``sw:updated:<request_id>`` — a pub/sub channel: a message each time the record (or the rejection) is written, so
  a client waiting on the request wakes at once instead of polling (:meth:`Store.updates`).
* ``sw:rejected:<request_id>`` — the answer to a request refused before it had a record (it did not parse), kept
  for ``record_retention_seconds`` and only when no record holds the id: with the record, the one place clients
  read a request's state from.

Secret values are stored only Fernet-encrypted; without a key the worker refuses to store them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import redis
from cryptography.fernet import Fernet, InvalidToken
from pydantic import BaseModel, ConfigDict, SecretStr
from redis.backoff import ExponentialWithJitterBackoff
from redis.lock import Lock
from redis.retry import Retry

from worker.errors import ConfigurationError
from worker.models import ErrorInfo, SessionRequest, SessionResult, SessionState

if TYPE_CHECKING:
    from worker.config import Settings  # at run time worker.config imports the strategies, which import us

PREFIX = "sw:"
# Written with the first record (SET NX) and never removed: a Redis without it has lost its data (or is new), so
# "no record" proves nothing about a sandbox older than it (worker.reaper).
FLEET_MARKER = f"{PREFIX}fleet:since"

# A Redis restart or failover is ridden out command by command: up to about 30 s of reconnecting with backoff.
_RETRY = Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), retries=20)
_UNFINISHED = (SessionState.queued, SessionState.starting)
_OVER = (SessionState.failed, SessionState.terminated)


class SessionRecord(BaseModel):
    """Everything the worker keeps about one request."""

    model_config = ConfigDict(extra="forbid")

    request: SessionRequest
    result: SessionResult
    daemon_token: str | None = None  # Fernet ciphertext
    # Headers the provider's edge needs besides the token (a preview or traffic token, a Host), as encrypted JSON.
    daemon_headers: str | None = None
    attempts: int = 0
    created_at: float
    expires_at: float | None = None  # the sandbox's expiry once one exists

    @property
    def deadline(self) -> float:
        """When the session ends by its ttl: the sandbox's expiry, or the request's ttl counted from its creation."""
        return self.expires_at or self.created_at + self.request.sandbox.ttl_seconds

    def forget_daemon(self) -> None:
        """Drop what reaches the daemon: it is gone, or about to be."""
        self.daemon_token = None
        self.daemon_headers = None

    def __repr__(self) -> str:
        return f"SessionRecord(request_id={self.request.request_id!r}, state={self.result.state.value!r})"


class Cipher:
    """Fernet encryption of secret values at rest."""

    def __init__(self, key: SecretStr | None) -> None:
        self._fernet = Fernet(key.get_secret_value().encode()) if key else None

    def _require(self) -> Fernet:
        if self._fernet is None:
            raise ConfigurationError(
                "SANDBOX_WORKER_FERNET_KEY is not set: the worker will not store secrets unencrypted "
                "(create one with `sandbox-worker keygen`)"
            )
        return self._fernet

    def encrypt(self, value: SecretStr) -> str:
        return self._require().encrypt(value.get_secret_value().encode()).decode()

    def decrypt(self, token: str) -> SecretStr:
        try:
            return SecretStr(self._require().decrypt(token.encode()).decode())
        except InvalidToken as exc:
            raise ConfigurationError("a stored secret cannot be decrypted with the configured Fernet key") from exc


class Store:
    def __init__(self, client: redis.Redis, cipher: Cipher, *, retention_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.cipher = cipher
        self.retention_seconds = retention_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
            retry=_RETRY,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, Cipher(settings.fernet_key), retention_seconds=settings.record_retention_seconds)

    # -- records ----------------------------------------------------------------------------------------
    def get(self, request_id: str) -> SessionRecord | None:
        raw = self.redis.get(f"{PREFIX}session:{request_id}")
        return SessionRecord.model_validate_json(raw) if raw else None

    def put(self, record: SessionRecord) -> None:
        record.result.updated_at = time.time()
        request_id = record.request.request_id
        expiry = self.retention_seconds if record.result.state in _OVER else None
        pipe = self.redis.pipeline()
        pipe.set(f"{PREFIX}session:{request_id}", record.model_dump_json(), ex=expiry)
        self._index(pipe, record)
        pipe.publish(f"{PREFIX}updated:{request_id}", "")
        pipe.execute()

    @staticmethod
    def _index(pipe: redis.client.Pipeline, record: SessionRecord) -> None:
        request_id, state = record.request.request_id, record.result.state
        if state in _UNFINISHED:
            pipe.zadd(f"{PREFIX}active", {request_id: record.result.updated_at})
        else:
            pipe.zrem(f"{PREFIX}active", request_id)
        if state in _OVER:
            pipe.zrem(f"{PREFIX}live", request_id)
        else:
            pipe.zadd(f"{PREFIX}live", {request_id: record.deadline})

    def fleet_since(self) -> float | None:
        """When this Redis began keeping the fleet's records (the marker's time); None when it has lost them, or
        has never kept any."""
        since = self.redis.get(FLEET_MARKER)
        return float(since) if since is not None else None

    def create(self, request: SessionRequest) -> SessionRecord:
        """The record for ``request``, created queued if it does not exist yet (SET NX: one winner)."""
        record = SessionRecord(
            request=request,
            result=SessionResult(
                request_id=request.request_id,
                tenant_id=request.tenant_id,
                state=SessionState.queued,
                provider=request.provider,
                agent=request.agent,
            ),
            created_at=time.time(),
        )
        key = f"{PREFIX}session:{request.request_id}"
        if self.redis.set(key, record.model_dump_json(), nx=True):
            pipe = self.redis.pipeline()
            pipe.set(FLEET_MARKER, str(int(record.created_at)), nx=True)
            self._index(pipe, record)
            pipe.execute()
            return record
        existing = self.get(request.request_id)
        assert existing is not None
        return existing

    def reject(self, result: SessionResult) -> None:
        """Keep the answer to a request refused before it had a record, unless a record holds its id (a valid
        request's record is never shadowed by a malformed copy)."""
        request_id = result.request_id
        if not request_id or len(request_id) > 256 or self.redis.exists(f"{PREFIX}session:{request_id}"):
            return
        pipe = self.redis.pipeline()
        pipe.set(f"{PREFIX}rejected:{request_id}", result.model_dump_json(), ex=self.retention_seconds)
        pipe.publish(f"{PREFIX}updated:{request_id}", "")
        pipe.execute()

    @contextlib.contextmanager
    def updates(self, request_id: str) -> Iterator[Callable[[float], bool]]:
        """A function that waits up to its argument (seconds) for the next write of ``request_id``'s record or
        rejection and says whether one came. Subscribed before it is handed out, so a write made after the caller's
        next read of the record is never missed."""
        pubsub = self.redis.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(f"{PREFIX}updated:{request_id}")
            pubsub.get_message(timeout=5.0)  # the subscription's confirmation: from here on nothing is missed

            def changed(seconds: float) -> bool:
                return pubsub.get_message(ignore_subscribe_messages=True, timeout=seconds) is not None

            yield changed
        finally:
            pubsub.close()

    def result(self, request_id: str) -> SessionResult | None:
        """What a client is told about ``request_id``: its record's result, else the answer to its rejection."""
        record = self.get(request_id)
        if record is not None:
            return record.result
        raw = self.redis.get(f"{PREFIX}rejected:{request_id}")
        return SessionResult.model_validate_json(raw) if raw else None

    def give_up(self, request_id: str, error: ErrorInfo) -> SessionResult | None:
        """Record a request failed when its task gave up retrying: only if it is unfinished and no worker holds its
        lease (one that does is bringing it up and will record the outcome). Returns the result as it stands."""
        session, lease = f"{PREFIX}session:{request_id}", f"{PREFIX}lease:{request_id}"
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(session, lease)  # type: ignore[no-untyped-call]
                    raw = pipe.get(session)
                    if not raw:
                        return None
                    record = SessionRecord.model_validate_json(raw)
                    if record.result.state.terminal or pipe.exists(lease):
                        return record.result
                    record.result.state = SessionState.failed
                    record.result.error = error
                    record.result.updated_at = time.time()
                    pipe.multi()
                    pipe.set(session, record.model_dump_json(), ex=self.retention_seconds)
                    self._index(pipe, record)
                    pipe.publish(f"{PREFIX}updated:{request_id}", "")
                    pipe.execute()
                    return record.result
                except redis.WatchError:
                    continue

    def stalled(self, idle_since: float) -> list[str]:
        """Unfinished requests whose record has not changed since the epoch time ``idle_since``."""
        return [str(m) for m in self.redis.zrangebyscore(f"{PREFIX}active", "-inf", idle_since)]

    def expired(self, now: float) -> list[str]:
        """Requests not failed or terminated whose ttl has run out by ``now``."""
        return [str(m) for m in self.redis.zrangebyscore(f"{PREFIX}live", "-inf", now)]

    def request_terminate(self, request_id: str) -> None:
        self.redis.set(f"{PREFIX}terminate:{request_id}", "1", ex=self.retention_seconds)

    def terminate_requested(self, request_id: str) -> bool:
        return bool(self.redis.exists(f"{PREFIX}terminate:{request_id}"))

    def checkpoint(self, request_id: str) -> tuple[str | None, bool]:
        """Who holds the lease on ``request_id`` and whether a client asked to end it: the two questions a bring-up
        asks before each stage, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(f"{PREFIX}lease:{request_id}")
        pipe.exists(f"{PREFIX}terminate:{request_id}")
        holder, terminating = pipe.execute()
        return (str(holder) if holder is not None else None), bool(terminating)

    def token_of(self, record: SessionRecord) -> SecretStr | None:
        return self.cipher.decrypt(record.daemon_token) if record.daemon_token else None

    def headers_of(self, record: SessionRecord) -> dict[str, SecretStr]:
        if not record.daemon_headers:
            return {}
        headers: dict[str, str] = json.loads(self.cipher.decrypt(record.daemon_headers).get_secret_value())
        return {name: SecretStr(value) for name, value in headers.items()}

    def seal_headers(self, headers: Mapping[str, str]) -> str | None:
        return self.cipher.encrypt(SecretStr(json.dumps(dict(headers)))) if headers else None

    # -- leases -----------------------------------------------------------------------------------------
    def lease(self, request_id: str, seconds: float) -> Lock:
        """The lease on ``request_id`` (:mod:`worker.lease`): a lock whose token names the worker holding it.
        Not thread-local: the heartbeat thread renews what the bring-up thread acquired."""
        lock: Lock = self.redis.lock(f"{PREFIX}lease:{request_id}", timeout=seconds, thread_local=False)
        return lock

    def lease_holder(self, request_id: str) -> str | None:
        holder = self.redis.get(f"{PREFIX}lease:{request_id}")
        return str(holder) if holder is not None else None

    def claim_once(self, name: str, seconds: float) -> bool:
        """True for the first caller in ``seconds`` across all workers (a periodic job's single leader per tick)."""
        return bool(self.redis.set(f"{PREFIX}once:{name}", "1", nx=True, px=max(1, int(seconds * 1000))))
