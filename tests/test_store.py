"""The session store against a real Redis: records, retention of finished ones, encryption at rest."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import redis as redis_lib
from pydantic import SecretStr

from worker.config import Settings
from worker.errors import ConfigurationError, InvalidRequest
from worker.lease import Lease
from worker.models import SessionRequest, SessionState, invalid_result
from worker.store import PREFIX, Advance, Cipher, Store

# Every test here uses Redis (the store, the secret store, the gateways' mint locks).
pytestmark = pytest.mark.integration


def _request(request_id: str) -> SessionRequest:
    return SessionRequest(request_id=request_id, tenant_id="acme", agent="mock", provider="docker")  # type: ignore[arg-type]


def test_finished_records_expire_after_retention_and_live_ones_do_not(
    settings: Settings, redis_client: redis_lib.Redis
) -> None:
    """A ready record stays; a failed or terminated one expires after the retention window."""
    store = Store(Store.from_settings(settings).redis, Cipher(settings.fernet_key), retention_seconds=120)
    for request_id, state in (("keep-ready", SessionState.ready), ("drop-failed", SessionState.failed)):
        record = store.create(_request(request_id))
        record.result.state = state
        store.put(record)
    assert redis_client.ttl(f"{PREFIX}session:keep-ready") == -1
    assert 0 < redis_client.ttl(f"{PREFIX}session:drop-failed") <= 120

    record = store.get("keep-ready")
    assert record is not None
    record.result.state = SessionState.terminated
    store.put(record)
    assert 0 < redis_client.ttl(f"{PREFIX}session:keep-ready") <= 120


def test_advance_writes_only_for_the_lease_holder_and_never_once_terminate_is_asked(
    settings: Settings, redis_client: redis_lib.Redis
) -> None:
    """A stage's checkpoint and write in one step: the holder's write lands, indexed; another worker's or one after a
    terminate request leaves the record as it was."""
    store = Store.from_settings(settings)
    record = store.create(_request("advancing"))
    assert store.lease("advancing", 30).acquire(blocking=False, token="worker-a")
    record.result.state, record.result.stage = SessionState.starting, "claim"
    assert store.advance(record, "worker-b") is Advance.lease_lost
    assert store.get("advancing").result.state is SessionState.queued  # type: ignore[union-attr]
    assert store.advance(record, "worker-a") is Advance.written
    assert store.get("advancing").result.stage == "claim"  # type: ignore[union-attr]
    assert redis_client.zscore(f"{PREFIX}active", "advancing") == pytest.approx(record.result.updated_at)
    store.request_terminate("advancing")
    record.result.stage = "credentials"
    assert store.advance(record, "worker-a", release=True) is Advance.terminating
    assert store.get("advancing").result.stage == "claim"  # type: ignore[union-attr]
    assert store.lease_holder("advancing") == "worker-a"  # a write that did not land gives nothing back


def test_the_last_write_gives_the_lease_back_only_when_it_lands(
    settings: Settings, redis_client: redis_lib.Redis
) -> None:
    """A bring-up's ready write gives its lease back in the same step; another worker's write with ``release`` lands
    nothing and leaves the holder's lease alone."""
    store = Store.from_settings(settings)
    record = store.create(_request("done"))
    assert store.lease("done", 30).acquire(blocking=False, token="worker-a")
    record.result.state = SessionState.ready
    assert store.advance(record, "worker-b", release=True) is Advance.lease_lost
    assert store.lease_holder("done") == "worker-a"
    assert store.advance(record, "worker-a", release=True) is Advance.written
    assert store.lease_holder("done") is None
    assert store.get("done").result.state is SessionState.ready  # type: ignore[union-attr]


def test_taking_a_lease_reads_the_record_as_it_is_then(settings: Settings, redis_client: redis_lib.Redis) -> None:
    """The lease's taking reads the request's record in the same step: a worker that takes it after another finished
    the request sees it finished; one that cannot take it sees it too (and answers from it); a request without a record
    reads None."""
    store = Store.from_settings(settings)
    record = store.create(_request("taken"))
    record.result.state = SessionState.ready
    store.put(record)  # another worker finished it between this worker's submit and its taking the lease
    lease = store.lease("taken", 30)
    assert lease.acquire(blocking=False, token="worker-a")
    assert lease.record is not None and lease.record.result.state is SessionState.ready
    assert redis_client.pttl(f"{PREFIX}lease:taken") > 25_000 and lease.owned()
    held = store.lease("taken", 30)
    assert not held.acquire(blocking=False, token="worker-b")
    assert held.record is not None and held.record.result.state is SessionState.ready
    lease.release()
    bare = store.lease("no-record", 30)
    assert bare.acquire(blocking=False, token="worker-a") and bare.record is None
    assert redis_client.get(f"{PREFIX}session:no-record") is None


def test_a_lease_taken_with_a_record_to_create_creates_it_once(
    settings: Settings, redis_client: redis_lib.Redis
) -> None:
    """A bring-up creates its request's record as it takes the lease (one round trip): written with its indexes when
    the request has none; the one there is kept and read when it has, and a worker that cannot take the lease creates
    nothing either."""
    store = Store.from_settings(settings)
    new = store.new_record(_request("claimed"))
    lease = store.lease("claimed", 30, create=new)
    assert lease.acquire(blocking=False, token="worker-a") and lease.record is new
    kept = store.get("claimed")
    assert kept is not None and kept.created_at == new.created_at and kept.result.state is SessionState.queued
    assert redis_client.zscore(f"{PREFIX}active", "claimed") == pytest.approx(new.result.updated_at)
    assert redis_client.zscore(f"{PREFIX}live", "claimed") == pytest.approx(new.deadline)
    assert store.fleet_since() is not None
    again = store.new_record(_request("claimed"))
    other = store.lease("claimed", 30, create=again)
    assert not other.acquire(blocking=False, token="worker-b")
    assert other.record is not None and other.record.created_at == new.created_at
    lease.release()
    third = store.lease("claimed", 30, create=again)
    assert third.acquire(blocking=False, token="worker-b") and third.record is not None
    assert third.record.created_at == new.created_at and store.get("claimed").created_at == new.created_at  # type: ignore[union-attr]


def test_leases_held_at_once_are_renewed_by_one_thread_until_dropped(
    settings: Settings, redis_client: redis_lib.Redis
) -> None:
    """Five bring-ups' leases of 2 s, held for 3 s: one thread renews them all (and their heartbeats), none runs out;
    once their holders are done none is renewed again, and they expire."""
    store = Store.from_settings(settings)
    beats: list[str] = []
    leases = [Lease(store, f"renewed-{n}", "worker-a", 2, on_beat=lambda n=n: beats.append(n)) for n in range(5)]
    assert all(lease.acquire() for lease in leases)
    with contextlib.ExitStack() as held:
        for lease in leases:
            held.enter_context(lease.heartbeat())
        time.sleep(3)
        assert all(lease.held() for lease in leases) and set(beats) == set(range(5))
        renewing = [thread.name for thread in threading.enumerate() if "renew" in thread.name]
        assert renewing == ["lock-renewals"]
    done = len(beats)
    time.sleep(2.5)
    assert len(beats) == done
    assert not any(redis_client.exists(f"{PREFIX}lease:renewed-{n}") for n in range(5))


def test_a_failing_heartbeat_does_not_stop_the_renewal_of_other_leases(settings: Settings) -> None:
    """The renewal thread is shared: a holder whose heartbeat raises something unexpected is logged, and every other
    lease (and that one) is still renewed."""
    store = Store.from_settings(settings)
    beats: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in a heartbeat")

    failing = Lease(store, "renewed-failing", "worker-a", 1.5, on_beat=broken)
    healthy = Lease(store, "renewed-healthy", "worker-a", 1.5, on_beat=lambda: beats.append("beat"))
    assert failing.acquire() and healthy.acquire()
    with failing.heartbeat(), healthy.heartbeat():
        time.sleep(2.5)
        assert failing.held() and healthy.held() and len(beats) >= 3


def test_the_same_request_id_creates_one_record(settings: Settings, redis_client: redis_lib.Redis) -> None:
    """create() writes a new request's record with its indexes and the fleet marker; a second create of the same
    request returns the first record and writes nothing."""
    store = Store.from_settings(settings)
    first = store.create(_request("once"))
    assert redis_client.zscore(f"{PREFIX}active", "once") == pytest.approx(first.result.updated_at)
    assert redis_client.zscore(f"{PREFIX}live", "once") == pytest.approx(first.deadline)
    assert store.fleet_since() is not None
    second = store.create(_request("once"))
    assert first.created_at == second.created_at and second.result.state is SessionState.queued
    assert redis_client.zscore(f"{PREFIX}active", "once") == pytest.approx(first.result.updated_at)


def test_secrets_are_encrypted_and_need_a_key(settings: Settings, redis_client: redis_lib.Redis) -> None:
    """The daemon token is stored only as Fernet ciphertext, and nothing is stored without a key."""
    store = Store.from_settings(settings)
    record = store.create(_request("tokened"))
    record.daemon_token = store.cipher.encrypt(SecretStr("tok-value-123456"))
    store.put(record)
    assert "tok-value-123456" not in (redis_client.get(f"{PREFIX}session:tokened") or "")
    assert store.token_of(record).get_secret_value() == "tok-value-123456"  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="FERNET_KEY"):
        Cipher(None).encrypt(SecretStr("x"))


def test_a_waiter_wakes_when_the_record_is_written_and_not_before(settings: Settings) -> None:
    """Store.updates: a client waiting on a request is woken by the record's writes (and a rejection's), not polling."""
    store = Store.from_settings(settings)
    record = store.create(_request("woken"))
    with store.updates("woken") as changed:
        assert not changed(0.05)
        record.result.state = SessionState.starting
        store.put(record)
        assert changed(5.0)
        assert not changed(0.05)
    with store.updates("refused") as changed:
        store.reject(invalid_result({"request_id": "refused"}, InvalidRequest("bad", field="agent")))
        assert changed(5.0)
