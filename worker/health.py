"""Health of a worker's surroundings, for probes (``sandbox-worker check``), and the liveness heartbeat.

* :func:`readiness`: can this worker do its job — the broker and the store answer a PING, each provider of
  ``settings.providers`` answers a listing of the fleet's sandboxes (a real call, with the worker's credentials).
* :class:`Heartbeat`: a thread of the worker's main process touching a file (``settings.heartbeat_file``) every
  ``heartbeat_seconds``; :func:`heartbeat_age` reads its age. A liveness probe reads the file alone, so a broker
  outage does not get every worker restarted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from providers import load_provider
from providers.base import LABEL_OWNER
from worker.config import Settings
from worker.redaction import REDACTOR

PING_TIMEOUT = 5.0  # s: a probe answers well within a kubelet's default timeout


@dataclass(frozen=True)
class Check:
    """One thing checked: its name (``broker``, ``store``, ``provider:<name>``, ``heartbeat``), whether it is fine,
    and why not."""

    name: str
    ok: bool
    detail: str = ""


def _ping(name: str, url: str) -> Check:
    try:
        with redis.Redis.from_url(url, socket_timeout=PING_TIMEOUT, socket_connect_timeout=PING_TIMEOUT) as client:
            client.ping()
    except redis.RedisError as exc:
        # The URL may hold a password: the message is masked like a log line.
        return Check(name, False, REDACTOR.redact(f"{type(exc).__name__}: {exc}"))
    return Check(name, True)


def _provider(settings: Settings, name: str) -> Check:
    try:
        driver = load_provider(name, settings.provider_config(name))
        try:
            count = len(driver.list_owned({LABEL_OWNER: settings.owner}))
        finally:
            driver.close()
    except Exception as exc:  # any failure of the driver is the probe's answer, not a crash of the probe
        return Check(f"provider:{name}", False, REDACTOR.redact(f"{type(exc).__name__}: {exc}"))
    return Check(f"provider:{name}", True, f"{count} sandboxes of this fleet")


def readiness(settings: Settings) -> list[Check]:
    """The broker, the store, then each provider the settings name."""
    checks = [_ping("broker", settings.broker_url), _ping("store", settings.redis_url)]
    return checks + [_provider(settings, provider.value) for provider in settings.providers]


def heartbeat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the heartbeat file was last touched; None when there is none."""
    try:
        return (now if now is not None else time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return None


def liveness(path: Path, max_age: float) -> Check:
    age = heartbeat_age(path)
    if age is None:
        return Check("heartbeat", False, f"no heartbeat file at {path}")
    return Check("heartbeat", age <= max_age, f"touched {age:.1f}s ago (max {max_age:g}s)")


class Heartbeat(threading.Thread):
    """Touches ``path`` every ``interval`` seconds until :meth:`stop`. Runs in the worker's main process, whose
    death or hang is what a liveness probe must see: the file then ages."""

    def __init__(self, path: Path, interval: float) -> None:
        super().__init__(name="sandbox-worker-heartbeat", daemon=True)
        self.path, self.interval = path, interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            self.path.touch()
            if self._stopped.wait(self.interval):
                return

    def stop(self) -> None:
        self._stopped.set()
