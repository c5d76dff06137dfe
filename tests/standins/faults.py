"""Fault injection for stand-in servers: answer matching requests with an error before the app sees them."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class Fault:
    """Answer ``count`` requests matching ``method`` and the ``path`` regex with ``status``.
    ``status=0`` only delays (by ``delay`` seconds) and then lets the request through. ``after=True`` lets the
    request do its work and then answers ``status`` anyway: a response lost on the way back (the case
    idempotency keys exist for)."""

    path: str
    status: int
    method: str | None = None
    count: int = 1
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    after: bool = False


class FaultQueue:
    """Queued faults, played in order, and a record of every request seen."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """Record the request and return the first live fault it matches (spending one of its count)."""
        with self._lock:
            self.requests.append((method, path))
            for fault in self._faults:
                if fault.count > 0 and (fault.method in (None, method)) and re.search(fault.path, path):
                    fault.count -= 1
                    return fault
        return None


class FaultInjector(FaultQueue):
    """ASGI middleware: records every request and plays the queued faults in order."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__()
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fault = self.take(scope["method"], scope["path"])
        if fault is None:
            await self.app(scope, receive, send)
            return
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status == 0:
            await self.app(scope, receive, send)
            return
        if fault.after:

            async def swallow(_message: MutableMapping[str, Any]) -> None:
                return None

            await self.app(scope, receive, swallow)
        body = json.dumps(fault.body or {"code": fault.status, "message": "injected fault"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in fault.headers.items()]
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
