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
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import redis
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import BaseModel, ConfigDict, SecretStr
from redis.backoff import ExponentialWithJitterBackoff
from redis.lock import Lock
from redis.retry import Retry

from worker.errors import ConfigurationError
from worker.models import ErrorInfo, SessionRequest, SessionResult, SessionState
from worker.redaction import REDACTOR

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
    """Fernet encryption of secret values at rest. The key setting may hold several keys, comma-separated, newest
    first (as Airflow's ``fernet_key``): the first encrypts, every one decrypts (``MultiFernet``), so the key can
    be rotated without losing what the old one sealed (:meth:`rotated`, ``sandbox-worker secrets rekey``)."""

    def __init__(self, key: SecretStr | None) -> None:
        keys = [k.strip() for k in key.get_secret_value().split(",") if k.strip()] if key else []
        fernets = [Fernet(k.encode()) for k in keys]
        self._primary = fernets[0] if fernets else None
        self._fernet = MultiFernet(fernets) if fernets else None

    def _require(self) -> MultiFernet:
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

    def rotated(self, token: str) -> str | None:
        """``token`` encrypted with the first key; None when it already is (re-running a rotation writes nothing).
        ConfigurationError when no configured key opens it."""
        fernet = self._require()
        assert self._primary is not None
        try:
            self._primary.decrypt(token.encode())
            return None
        except InvalidToken:
            pass
        try:
            return fernet.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise ConfigurationError("a stored secret cannot be decrypted with the configured Fernet key") from exc


# Compare-and-set, so a re-encryption never overwrites what a worker wrote meanwhile.
_HSET_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end
return 0
"""
_SET_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') return 1 end
return 0
"""


@dataclass
class Rekey:
    """One pass re-encrypting what is sealed in Redis with the first Fernet key; safe while workers run (each
    value is replaced only if it did not change meanwhile) and to run again."""

    client: redis.Redis
    cipher: Cipher
    rotated: int = 0  # re-encrypted with the first key
    current: int = 0  # already under it
    raced: int = 0  # changed by a worker meanwhile (which sealed it with the first key): left alone
    unreadable: list[str] = field(default_factory=list)  # no configured key opens them: where they are

    def rotate(self, token: str, where: str) -> str | None:
        """The re-encrypted token, or None (already current, or unreadable: counted)."""
        try:
            new = self.cipher.rotated(token)
        except ConfigurationError:
            self.unreadable.append(where)
            return None
        if new is None:
            self.current += 1
        return new

    def hash_fields(self, pattern: str) -> None:
        """Every field of every hash whose key matches ``pattern`` is a Fernet token."""
        for key in self.client.scan_iter(match=pattern, count=500):
            for name, token in self.client.hgetall(key).items():
                new = self.rotate(str(token), f"{key!s} {name!s}")
                if new is not None:
                    self._count(self.client.eval(_HSET_IF, 1, key, name, token, new))

    def set_if_unchanged(self, key: str, old: str, new: str, values: int = 1) -> None:
        """Replace the string ``key`` (keeping its expiry) unless it changed; it holds ``values`` rotated values."""
        self._count(self.client.eval(_SET_IF, 1, key, old, new), values)

    def _count(self, written: object, values: int = 1) -> None:
        if written:
            self.rotated += values
        else:
            self.raced += values


# A record's write with its indexes and the wake-up of its waiters, in one round trip; with a holder, only while it
# holds the request's lease and no client asked to end it (a bring-up's checkpoint). KEYS: session, active, live,
# lease, terminate. ARGV: record, expiry (s; 0: none), request id, updated_at, deadline ('' once over: off the live
# index), '1' when unfinished (on the active index), channel, holder ('': no check), '1' to give the holder's lease
# back once written.
_WRITE = """
if ARGV[8] ~= '' then
  if redis.call('GET', KEYS[4]) ~= ARGV[8] then return 1 end
  if redis.call('EXISTS', KEYS[5]) == 1 then return 2 end
end
if ARGV[2] ~= '0' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) else redis.call('SET', KEYS[1], ARGV[1]) end
if ARGV[6] == '1' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3]) else redis.call('ZREM', KEYS[2], ARGV[3]) end
if ARGV[5] == '' then redis.call('ZREM', KEYS[3], ARGV[3]) else redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3]) end
redis.call('PUBLISH', ARGV[7], '')
if ARGV[9] == '1' then redis.call('DEL', KEYS[4]) end
return 0
"""


# A request's record created queued if it does not exist yet (with its indexes and the fleet marker), and its lease
# taken if a holder is given and nobody holds it: one round trip for a bring-up's claim. KEYS: session, fleet marker,
# active, live, lease. ARGV: record ('': create none), created_at (s), request id, updated_at, deadline, holder ('':
# take no lease), lease (ms). Returns {1 if the lease was taken else 0, the record there before (false: none)}.
_CLAIM = """
local existing = redis.call('GET', KEYS[1])
if not existing and ARGV[1] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2], 'NX')
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
end
local taken = 0
if ARGV[6] ~= '' and redis.call('SET', KEYS[5], ARGV[6], 'NX', 'PX', ARGV[7]) then taken = 1 end
return {taken, existing}
"""

# Store._claim: (request id, holder, lease ms, record to create) -> (lease taken, the record there before).
Claim = Callable[[str, str | bytes, int, SessionRecord | None], tuple[bool, SessionRecord | None]]


class LeaseLock(Lock):
    """A request's lease (redis-py's Lock) whose taking also reads the request's record, and creates it first when
    given one to create, in the same round trip (:data:`_CLAIM`): a worker works from the record as it is when it
    takes the lease (another may have finished the request between its submit and the taking), and one that cannot
    take it answers from that record at once; both in :attr:`record`."""

    def __init__(
        self, client: redis.Redis, request_id: str, seconds: float, claim: Claim, create: SessionRecord | None
    ) -> None:
        super().__init__(client, f"{PREFIX}lease:{request_id}", timeout=seconds, thread_local=False)
        self._claim = claim
        self._request_id = request_id
        self._create = create
        self.record: SessionRecord | None = None

    def do_acquire(self, token: str | bytes) -> bool:
        assert self.timeout is not None
        taken, existing = self._claim(self._request_id, token, int(self.timeout * 1000), self._create)
        self.record = existing if existing is not None else self._create
        return taken


class Advance(IntEnum):
    """What :meth:`Store.advance` found."""

    written = 0
    lease_lost = 1  # the holder no longer holds the lease: nothing written
    terminating = 2  # a client asked to end the request: nothing written


class Store:
    def __init__(self, client: redis.Redis, cipher: Cipher, *, retention_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.cipher = cipher
        self.retention_seconds = retention_seconds
        self._write_script = client.register_script(_WRITE)
        self._claim_script = client.register_script(_CLAIM)

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

    def results(self, batch: int = 500) -> Iterator[SessionResult]:
        """Every record's result, in no order (SCAN: no blocking of Redis however many there are). An operator's
        listing: it reads the records directly, which a signed client's Redis user may not."""
        keys: list[str] = []
        for key in self.redis.scan_iter(match=f"{PREFIX}session:*", count=batch):
            keys.append(key)
            if len(keys) >= batch:
                yield from self._results_of(keys)
                keys = []
        yield from self._results_of(keys)

    def _results_of(self, keys: list[str]) -> Iterator[SessionResult]:
        for raw in self.redis.mget(keys) if keys else []:
            if raw:  # gone between the scan and the read
                yield SessionRecord.model_validate_json(raw).result

    def put(self, record: SessionRecord) -> None:
        """Write ``record``. Its result holds what the sandbox sent (a reply, tool calls, session id, errors): it
        is redacted here, in place, so the record and whatever returns ``record.result`` are masked alike."""
        self._write(record, holder="")

    def advance(self, record: SessionRecord, holder: str, *, release: bool = False) -> Advance:
        """A bring-up's checkpoint and its record's write in one step (one round trip, atomic): :meth:`put` only if
        ``holder`` holds the lease on the request and no client asked to end it; otherwise nothing is written. With
        ``release`` the lease is given back once written (the bring-up's last write)."""
        return self._write(record, holder=holder, release=release)

    def _write(self, record: SessionRecord, *, holder: str, release: bool = False) -> Advance:
        record.result.updated_at = time.time()
        document = record.model_dump_json()
        if REDACTOR.found_in_json(document):
            record.result = SessionResult.model_validate(REDACTOR.redact_data(record.result.model_dump(mode="json")))
            document = record.model_dump_json()
        request_id, state = record.request.request_id, record.result.state
        keys = [f"{PREFIX}session:{request_id}", f"{PREFIX}active", f"{PREFIX}live"]
        keys += [f"{PREFIX}lease:{request_id}", f"{PREFIX}terminate:{request_id}"]
        args: list[str | int] = [
            document,
            self.retention_seconds if state in _OVER else 0,
            request_id,
            repr(record.result.updated_at),
            "" if state in _OVER else repr(record.deadline),
            "1" if state in _UNFINISHED else "0",
            f"{PREFIX}updated:{request_id}",
            holder,
            "1" if release else "0",
        ]
        return Advance(int(self._write_script(keys=keys, args=args)))

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
        """The record for ``request``, created queued if it does not exist yet (one winner), else the one there; with
        its indexes in the same round trip. A bring-up creates it as it takes the lease (:meth:`lease`)."""
        record = self.new_record(request)
        return self._claim(request.request_id, "", 0, record)[1] or record

    @staticmethod
    def new_record(request: SessionRequest) -> SessionRecord:
        """A queued record of ``request``, not written yet."""
        return SessionRecord(
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

    def _claim(
        self, request_id: str, holder: str | bytes, lease_ms: int, create: SessionRecord | None
    ) -> tuple[bool, SessionRecord | None]:
        """:data:`_CLAIM`: whether the lease was taken (none asked without ``holder``), and the record there before."""
        keys = [f"{PREFIX}session:{request_id}", FLEET_MARKER, f"{PREFIX}active", f"{PREFIX}live"]
        keys.append(f"{PREFIX}lease:{request_id}")
        args: list[str | bytes | int] = ["", 0, request_id, "", ""]
        if create is not None:
            args = [
                create.model_dump_json(),
                int(create.created_at),
                request_id,
                repr(create.result.updated_at),
                repr(create.deadline),
            ]
        taken, existing = self._claim_script(keys=keys, args=[*args, holder, lease_ms])
        return bool(taken), SessionRecord.model_validate_json(existing) if existing else None

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

    def rekey(self, rekey: Rekey) -> None:
        """Re-encrypt the daemon token and edge headers of every session record with the first key."""
        for key in self.redis.scan_iter(match=f"{PREFIX}session:*", count=500):
            raw = self.redis.get(key)
            if raw is None:
                continue
            raw = str(raw)
            record = SessionRecord.model_validate_json(raw)
            changed = 0
            for name in ("daemon_token", "daemon_headers"):
                token = getattr(record, name)
                if token and (new := rekey.rotate(token, f"{key} {name}")) is not None:
                    setattr(record, name, new)
                    changed += 1
            if changed:
                rekey.set_if_unchanged(key, raw, record.model_dump_json(), changed)

    # -- leases -----------------------------------------------------------------------------------------
    def lease(self, request_id: str, seconds: float, *, create: SessionRecord | None = None) -> LeaseLock:
        """The lease on ``request_id`` (:mod:`worker.lease`): a lock whose token names the worker holding it, and
        whose taking reads the request's record, creating ``create`` first if there is none. Not thread-local: the
        heartbeat renews what the bring-up acquired."""
        return LeaseLock(self.redis, request_id, seconds, self._claim, create)

    def lease_holder(self, request_id: str) -> str | None:
        holder = self.redis.get(f"{PREFIX}lease:{request_id}")
        return str(holder) if holder is not None else None

    def claim_once(self, name: str, seconds: float) -> bool:
        """True for the first caller in ``seconds`` across all workers (a periodic job's single leader per tick)."""
        return bool(self.redis.set(f"{PREFIX}once:{name}", "1", nx=True, px=max(1, int(seconds * 1000))))
