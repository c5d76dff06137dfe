"""Ending what a request holds: its sandboxes, its live-sandbox slot and its credentials.

One piece of code for the three ways a request ends: ``terminate`` (a client asked), compensation (a bring-up
failed and undoes what it made) and the reaper (a sandbox outlived its ttl or its worker). Sandboxes are found by
label as well as by the id the record names, so one that a retried create made behind a failed call goes too.
Removing a sandbox ends its daemon and agents with it: no ACP close is needed first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import structlog
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from providers.base import LABEL_OWNER, LABEL_REQUEST_ID, Provider
from worker.config import Settings
from worker.credentials.broker import CredentialBroker
from worker.errors import InvalidRequest, SandboxGone, SandboxWorkerError, Terminated
from worker.limits import Limits
from worker.models import ErrorInfo, ProviderName, SessionRequest, SessionResult, SessionState
from worker.retries import RetryLater
from worker.store import SessionRecord, Store

log = structlog.get_logger(__name__)


def poll(check: Callable[[], SessionResult | None], seconds: float, interval: float = 0.25) -> SessionResult | None:
    """Call ``check`` every ``interval`` seconds until it returns a result; None when ``seconds`` ran out."""
    try:
        return Retrying(
            retry=retry_if_result(lambda result: result is None),
            wait=wait_fixed(interval),
            stop=stop_after_delay(seconds),
        )(check)
    except RetryError:
        return None


class Teardown:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Callable[[ProviderName], Provider],
        credentials: CredentialBroker,
        limits: Limits,
    ) -> None:
        self.settings = settings
        self.store = store
        self.providers = providers
        self.credentials = credentials
        self.limits = limits

    def remove_sandboxes(self, provider: Provider, request: SessionRequest, known: str | None) -> int:
        """Remove every sandbox of ``request`` on ``provider`` (by label, plus ``known``) and free its live-sandbox
        slot, whichever provider's quota it is on."""
        labels = {LABEL_OWNER: self.settings.owner, LABEL_REQUEST_ID: request.request_id}
        ids = {s.sandbox_id for s in provider.list_owned(labels)}
        if known:
            ids.add(known)
        for sandbox_id in ids:
            provider.stop(sandbox_id)
        self.limits.release_sandboxes(request.request_id)
        return len(ids)

    def compensate(self, request: SessionRequest, provider: Provider | None, known: str | None, granted: bool) -> None:
        """Undo a failed bring-up in reverse order; each step is best effort and logged, none masks the error that
        caused it."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if provider is not None:
            steps.append(("remove sandboxes", lambda: self.remove_sandboxes(provider, request, known)))
        if granted:
            steps.append(("release credentials", lambda: self.credentials.release(request)))
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                log.warning("compensation step failed", step=name, error=type(exc).__name__)

    def terminate(self, request_id: str, *, gone: SandboxGone | None = None) -> SessionResult:
        """End a session: remove its sandbox, release its credentials. Idempotent. ``gone``: the reaper found the
        sandbox of the ready session gone; the record ends failed with that error."""
        record = self.store.get(request_id)
        if record is None:
            raise InvalidRequest(f"no session with request_id {request_id}", field="request_id")
        if record.result.state is SessionState.terminated:
            return record.result
        if gone is not None and record.result.state is SessionState.ready:
            self.end(record, gone)
            return record.result
        if not record.result.state.terminal:
            # A bring-up is in flight: flag it; the pipeline stops at its next stage and compensates.
            self.store.request_terminate(request_id)
            if self.store.lease_holder(request_id) is not None:
                return self._wait_terminated(request_id)
        self.end(record)
        return record.result

    def _wait_terminated(self, request_id: str) -> SessionResult:
        def settled() -> SessionResult | None:
            record = self.store.get(request_id)
            assert record is not None
            if record.result.state.terminal:
                if record.result.state is not SessionState.terminated:
                    self.end(record)
                return record.result
            if self.store.lease_holder(request_id) is None:
                self.end(record)
                return record.result
            return None

        result = poll(settled, self.settings.task_soft_time_limit)
        if result is None:
            current = self.store.get(request_id)
            assert current is not None
            raise RetryLater(Terminated("the bring-up did not stop in time"), current.result)
        return result

    def end(self, record: SessionRecord, gone: SandboxGone | None = None) -> None:
        """Remove the request's sandboxes, release its credentials and record it terminated (failed with ``gone``
        when its sandbox vanished under it)."""
        request = record.request
        served = record.result.provider or request.provider  # failover may have moved it off its first choice
        removed = self.remove_sandboxes(self.providers(served), request, record.result.sandbox_id)
        with contextlib.suppress(SandboxWorkerError):
            self.credentials.release(request)
        if gone is None:
            record.result.state = SessionState.terminated
            record.result.stage = "terminated"
        else:
            record.result.state = SessionState.failed
            record.result.error = ErrorInfo(code=gone.code, stage=record.result.stage, message=gone.message)
        record.forget_daemon()
        self.store.put(record)
        log.info("session ended" if gone else "session terminated", request_id=request.request_id, sandboxes=removed)
