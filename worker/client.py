"""The Python API for web apps and scripts: submit requests, follow them, read results, end sessions.

client = SessionClient()
client.submit(SessionRequest(tenant_id="acme", agent="mock", provider="docker", session={"prompt": "hi"}))
result = client.wait(request_id)            # SessionResult
token = client.token(request_id)            # SecretStr: the daemon's bearer token, only on request

Configured with an app id and key (``SANDBOX_WORKER_AUTH__APP_ID`` / ``__APP_KEY``), the client signs every task it
sends and reads nothing from the workers' records: it follows its own create tasks' results and asks a worker for
the rest (a signed ``sessions.status``), so it can run as a Redis user that may only enqueue and read results
(``sandbox-worker redis-acl``). Without them it reads the records directly (open mode, operators' tools).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from pydantic import SecretStr

from worker.access import DaemonAccess, access_for
from worker.celery_app import create_app
from worker.config import Settings, get_settings
from worker.errors import InvalidRequest
from worker.models import SessionRequest, SessionResult, parse_request
from worker.queueing import send_access, send_create, send_status, send_terminate
from worker.store import Store

ProgressCallback = Callable[[str], None]


class SessionClient:
    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        self.app = app or create_app(self.settings)
        self.store = Store.from_settings(self.settings)
        self.signer = self.settings.auth.signer()
        self._sent: dict[str, AsyncResult] = {}  # a signed client's own create tasks, by request_id

    def submit(self, request: SessionRequest | dict[str, Any], *, validate: bool = True) -> str:
        """Queue a request; returns its request_id. ``validate=False`` leaves validation to the worker."""
        payload = request.model_dump(mode="json") if isinstance(request, SessionRequest) else dict(request)
        if validate:
            parsed = parse_request(payload)
            payload = parsed.model_dump(mode="json")
            record = self.store.get(parsed.request_id) if self.signer is None else None
            if record is not None and record.request != parsed:
                raise InvalidRequest("request_id is already used by a different request", field="request_id")
        request_id = str(payload.get("request_id") or "")
        if not request_id:
            raise InvalidRequest("request_id is required when validation is off", field="request_id")
        task = send_create(payload, app=self.app, signer=self.signer)
        if self.signer is not None:  # followed by wait; an open client reads the record instead
            self._sent[request_id] = task
        return request_id

    def status(self, request_id: str, *, timeout: float = 30.0) -> SessionResult | None:
        """The latest known result, from the session record (the one source of truth), or the answer to a request
        rejected before it had one; None when nothing is known yet (still queued, or never sent). A signed client
        asks a worker, which answers only for a tenant the app may act for."""
        if self.signer is None:
            return self.store.result(request_id)
        answer = send_status(request_id, app=self.app, signer=self.signer).get(timeout=timeout)
        return SessionResult.model_validate(answer) if answer is not None else None

    def _latest(self, request_id: str, timeout: float) -> tuple[SessionResult | None, str | None]:
        """The result as it stands and the stage in progress. A signed client follows its own create task (its
        progress, then its result: a refusal is answered only there), else asks a worker."""
        task = self._sent.get(request_id)
        if task is None:
            result = self.status(request_id, timeout=timeout)
            return result, result.stage if result else None
        if task.failed():
            raise RuntimeError(f"request {request_id}: the create task failed: {type(task.result).__name__}")
        if task.successful():
            return SessionResult.model_validate(task.result), None
        meta = task.info
        return None, meta.get("stage") if task.state == "PROGRESS" and isinstance(meta, dict) else None

    @contextlib.contextmanager
    def _changes(self, request_id: str) -> Iterator[Callable[[float], object]]:
        """A wait for the next change: the next write of the record for a client that reads the store (woken by
        it), a short pause for a signed client (it cannot subscribe to worker state: it polls its own task)."""
        if self.signer is not None:
            yield lambda seconds: time.sleep(min(seconds, 0.1))
            return
        with self.store.updates(request_id) as changed:
            yield changed

    def wait(
        self, request_id: str, *, timeout: float = 900.0, on_progress: ProgressCallback | None = None
    ) -> SessionResult:
        """Block until the request is ready, failed or terminated, reading the session record each time it is
        written (woken by the store, not polling); ``on_progress`` gets each stage name the record shows."""
        deadline = time.monotonic() + timeout
        last_stage = None
        with self._changes(request_id) as changed:
            while (left := deadline - time.monotonic()) > 0:
                result, stage = self._latest(request_id, left)
                if result is not None and result.state.terminal:
                    self._sent.pop(request_id, None)  # answered: no longer followed (nor subscribed to)
                    return result
                if stage and stage != last_stage and on_progress:
                    on_progress(stage)
                last_stage = stage or last_stage
                changed(min(1.0, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"request {request_id} did not finish within {timeout:g}s")

    def token(self, request_id: str) -> SecretStr | None:
        """The daemon's bearer token of a ready session."""
        access = self.access(request_id)
        return access.token if access else None

    def access(self, request_id: str) -> DaemonAccess | None:
        """How to reach a ready session's daemon: its URL, token and any header the provider's edge needs
        (``access.http_headers()`` for an HTTP client). A signed client gets them from a worker, sealed for its app."""
        if self.signer is None:
            return access_for(self.store, request_id)
        answer = send_access(request_id, app=self.app, signer=self.signer).get(timeout=30.0)
        if answer is None:
            return None
        unseal = self.signer.unseal
        headers = {name: unseal(value) for name, value in answer["headers"].items()}
        return DaemonAccess(answer["url"], unseal(answer["token"]), headers)

    def terminate(self, request_id: str, *, wait: bool = True, timeout: float = 300.0) -> SessionResult | None:
        known = self.store.result(request_id) if self.signer is None else self.status(request_id)
        provider = known.provider.value if known is not None and known.provider else None
        task = send_terminate(request_id, provider, app=self.app, signer=self.signer)
        if not wait:
            return None
        return SessionResult.model_validate(task.get(timeout=timeout))
