"""The Python API for web apps and scripts: submit requests, follow them, read results, end sessions.

client = SessionClient()
client.submit(SessionRequest(tenant_id="acme", agent="mock", provider="docker", session={"prompt": "hi"}))
result = client.wait(request_id)            # SessionResult
token = client.token(request_id)            # SecretStr: the daemon's bearer token, only on request
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from pydantic import SecretStr

from worker.access import DaemonAccess, access_for
from worker.celery_app import create_app
from worker.config import Settings, get_settings
from worker.errors import InvalidRequest
from worker.models import SessionRequest, SessionResult, parse_request
from worker.queueing import send_create, send_terminate
from worker.store import Store

ProgressCallback = Callable[[str], None]


class SessionClient:
    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        self.app = app or create_app(self.settings)
        self.store = Store.from_settings(self.settings)

    def submit(self, request: SessionRequest | dict[str, Any], *, validate: bool = True) -> str:
        """Queue a request; returns its request_id. ``validate=False`` leaves validation to the worker."""
        payload = request.model_dump(mode="json") if isinstance(request, SessionRequest) else dict(request)
        if validate:
            parsed = parse_request(payload)
            payload = parsed.model_dump(mode="json")
            record = self.store.get(parsed.request_id)
            if record is not None and record.request != parsed:
                raise InvalidRequest("request_id is already used by a different request", field="request_id")
        request_id = str(payload.get("request_id") or "")
        if not request_id:
            raise InvalidRequest("request_id is required when validation is off", field="request_id")
        send_create(payload, app=self.app)
        return request_id

    def status(self, request_id: str) -> SessionResult | None:
        """The latest known result, from the session record (the one source of truth), or the answer to a request
        rejected before it had one; None when nothing is known yet (still queued, or never sent)."""
        return self.store.result(request_id)

    def wait(
        self, request_id: str, *, timeout: float = 900.0, on_progress: ProgressCallback | None = None
    ) -> SessionResult:
        """Block until the request is ready, failed or terminated, reading the session record each time it is
        written (woken by the store, not polling); ``on_progress`` gets each stage name the record shows."""
        deadline = time.monotonic() + timeout
        last_stage = None
        with self.store.updates(request_id) as changed:
            while time.monotonic() < deadline:
                result = self.store.result(request_id)
                if result is not None:
                    if result.state.terminal:
                        return result
                    if result.stage and result.stage != last_stage and on_progress:
                        on_progress(result.stage)
                    last_stage = result.stage or last_stage
                changed(min(1.0, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"request {request_id} did not finish within {timeout:g}s")

    def token(self, request_id: str) -> SecretStr | None:
        """The daemon's bearer token of a ready session."""
        access = self.access(request_id)
        return access.token if access else None

    def access(self, request_id: str) -> DaemonAccess | None:
        """How to reach a ready session's daemon: its URL, token and any header the provider's edge needs
        (``access.http_headers()`` for an HTTP client)."""
        return access_for(self.store, request_id)

    def terminate(self, request_id: str, *, wait: bool = True, timeout: float = 300.0) -> SessionResult | None:
        record = self.store.get(request_id)
        task = send_terminate(request_id, record.request.provider.value if record else None, app=self.app)
        if not wait:
            return None
        return SessionResult.model_validate(task.get(timeout=timeout))
