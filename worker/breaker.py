"""A circuit breaker per provider, shared by every worker of a fleet through Redis.

Closed, a provider takes every request. Each provider-side failure of a create (an outage or quota after the
stage's retries, never a bad request or a rejected key) counts; ``fleet.breaker_failures`` of them in a row within
``fleet.breaker_window_seconds`` open the breaker. Open, requests skip the provider without calling it for
``fleet.breaker_cooldown_seconds``. Then it is half-open: one request at a time is let through as a probe; the
probe's success closes the breaker, its failure opens it for another cool-down. Any success resets the count.

Keys for provider ``<p>`` (hash-tagged, so a Redis Cluster keeps them in one slot), all expiring on their own:

* ``sw:breaker:{<p>}:failures`` — the current streak of failures; expires ``window`` after the first
* ``sw:breaker:{<p>}:open`` — present while open; expires after the cool-down
* ``sw:breaker:{<p>}:tripped`` — present from opening until a success: with ``open`` gone, the breaker is half-open
* ``sw:breaker:{<p>}:probe`` — the request probing a half-open breaker; expires after the cool-down (a probe
  whose worker died does not block the next one)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis
import structlog

from worker.fleet import FleetConfig
from worker.models import ProviderName

log = structlog.get_logger(__name__)

PREFIX = "sw:breaker:"
State = Literal["closed", "open", "half_open"]

# KEYS: failures, open, tripped, probe. ARGV: threshold, window_ms, cooldown_ms, tripped_ttl_ms.
# Returns 1 when this failure opened the breaker.
_FAILURE = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[4])
  return 1
end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a request may call a provider now; ``reason`` says why not."""

    allowed: bool
    probe: bool = False
    reason: str = ""
    streak: bool = False  # failures were counted when it was admitted: its success resets them

    def __bool__(self) -> bool:
        return self.allowed


class Breaker:
    """The fleet's circuit breakers, one per provider, on the settings of :class:`worker.fleet.FleetConfig`."""

    def __init__(self, client: redis.Redis, config: FleetConfig) -> None:
        self.redis = client
        self.config = config
        self._failure = client.register_script(_FAILURE)

    @staticmethod
    def _keys(provider: ProviderName) -> list[str]:
        base = f"{PREFIX}{{{provider.value}}}:"
        return [f"{base}failures", f"{base}open", f"{base}tripped", f"{base}probe"]

    def state(self, provider: ProviderName) -> State:
        _, opened, tripped, _ = self._keys(provider)
        if self.redis.exists(opened):
            return "open"
        return "half_open" if self.redis.exists(tripped) else "closed"

    def admit(self, provider: ProviderName, holder: str) -> Admission:
        """May ``holder`` (a request id) call ``provider`` now? In half-open state only one holder at a time, the
        probe, may."""
        failures, opened, tripped, probe = self._keys(provider)
        pipe = self.redis.pipeline(transaction=False)  # all asked in one round trip
        pipe.exists(opened)
        pipe.exists(tripped)
        pipe.exists(failures)
        is_open, was_tripped, streak = pipe.execute()
        if is_open:
            return Admission(False, reason="circuit breaker open")
        if not was_tripped:
            return Admission(True, streak=bool(streak))
        cooldown_ms = int(self.config.breaker_cooldown_seconds * 1000)
        if self.redis.set(probe, holder, nx=True, px=cooldown_ms) or self.redis.get(probe) == holder:
            log.info("circuit breaker half-open: probing", provider=provider.value)
            return Admission(True, probe=True)
        return Admission(False, reason="circuit breaker half-open, another request is probing")

    def failure(self, provider: ProviderName) -> bool:
        """Count a provider-side failure; True when it opened the breaker."""
        config = self.config
        cooldown_ms = int(config.breaker_cooldown_seconds * 1000)
        # ``tripped`` outlives the cool-down so the breaker half-opens; it is forgotten a window after that.
        tripped_ms = cooldown_ms + int(config.breaker_window_seconds * 1000) + cooldown_ms
        args = [config.breaker_failures, int(config.breaker_window_seconds * 1000), cooldown_ms, tripped_ms]
        opened = bool(self._failure(keys=self._keys(provider), args=args))
        if opened:
            log.warning("circuit breaker opened", provider=provider.value, cooldown_s=config.breaker_cooldown_seconds)
        return opened

    def success(self, provider: ProviderName, admission: Admission) -> None:
        """A create ``admission`` let through succeeded: the breaker closes and the failure streak is forgotten. With
        neither a streak nor a trip when it was admitted there is nothing to forget, and nothing is written: failures
        counted since then came after it."""
        if not (admission.probe or admission.streak):
            return
        keys = self._keys(provider)
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        pipe.exists(keys[2])
        pipe.delete(*keys)
        was_tripped, _ = pipe.execute()
        if was_tripped:
            log.info("circuit breaker closed", provider=provider.value)
