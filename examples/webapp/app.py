"""An ASGI app showing a session to a user: submit it, watch its stages live, then chat with its agent.

    POST /sessions                       {"agent", "prompt"} -> {"request_id"}
    GET  /sessions/{id}/stages           server-sent events: "stage" per stage reached, then "result"
    POST /sessions/{id}/messages         {"text"} -> the turn's events, one JSON object a line (worker.follow)
    POST /sessions/{id}/permissions      {"id", "allow"} -> the answer to the agent's permission request
    POST /sessions/{id}/cancel           ends the turn in progress
    POST /sessions/{id}/terminate        ends the session (its sandbox)

The worker's client is synchronous (Celery, httpx), so its calls run in Starlette's thread pool. There is no login:
serve it on a private address, or behind your own authentication. Everything from the agent reaches the page as
JSON data, and the page shows it as text only.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from worker.client import SessionClient
from worker.errors import InvalidRequest
from worker.follow import SessionHandle
from worker.models import SessionRequest

PAGE = Path(__file__).parent / "static" / "index.html"


class WebappSettings(BaseSettings):
    """The app's own settings (WEBAPP_*); the worker client reads SANDBOX_WORKER_* as everywhere else."""

    model_config = SettingsConfigDict(env_prefix="WEBAPP_")

    tenant: str = "demo"  # every session of this app runs for one tenant
    provider: str = "docker"
    host: str = "127.0.0.1"
    port: int = 8000
    wait_timeout: float = 900.0


settings = WebappSettings()
client = SessionClient()
_handles: dict[str, SessionHandle] = {}  # followed sessions, by request_id: one agent connection each
_handles_lock = threading.Lock()


def _handle(request_id: str) -> SessionHandle:
    with _handles_lock:
        if request_id not in _handles:
            _handles[request_id] = client.follow(request_id)
        return _handles[request_id]


async def page(request: Request) -> Response:
    return FileResponse(PAGE)


async def submit(request: Request) -> Response:
    body = await request.json()
    try:
        session_request = SessionRequest(
            tenant_id=settings.tenant,
            agent=body.get("agent"),
            provider=settings.provider,
            session={"prompt": body.get("prompt") or None},
        )
        request_id = await run_in_threadpool(client.submit, session_request)
    except (ValidationError, InvalidRequest) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse({"request_id": request_id})


def _stage_events(request_id: str) -> Iterator[str]:
    """SSE frames: each stage as SessionClient.wait reports it, then the result (or why there is none)."""
    updates: queue.Queue[tuple[str, Any]] = queue.Queue()

    def follow() -> None:
        try:
            result = client.wait(
                request_id, timeout=settings.wait_timeout, on_progress=lambda s: updates.put(("stage", s))
            )
            shown = {"state", "stage", "reply", "stop_reason", "tool_calls", "error", "warm"}
            updates.put(("result", result.model_dump(mode="json", include=shown)))
        except Exception as exc:
            updates.put(("result", {"state": "unknown", "error": {"message": f"{type(exc).__name__}: {exc}"}}))

    threading.Thread(target=follow, name=f"stages-{request_id}", daemon=True).start()
    while True:
        kind, data = updates.get()
        yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        if kind == "result":
            return


async def stages(request: Request) -> Response:
    frames = iterate_in_threadpool(_stage_events(request.path_params["request_id"]))
    return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _turn_lines(request_id: str, text: str) -> Iterator[str]:
    try:
        for event in _handle(request_id).prompt(text):
            yield event.model_dump_json() + "\n"
    except Exception as exc:
        yield json.dumps({"type": "error", "message": f"{type(exc).__name__}: {exc}"}) + "\n"


async def message(request: Request) -> Response:
    text = str((await request.json()).get("text") or "")
    if not text.strip():
        return JSONResponse({"error": "text: empty message"}, status_code=400)
    lines = iterate_in_threadpool(_turn_lines(request.path_params["request_id"], text))
    return StreamingResponse(lines, media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})


async def permission(request: Request) -> Response:
    body = await request.json()
    handle = await run_in_threadpool(_handle, request.path_params["request_id"])
    try:
        answer = handle.answer(body.get("id"), allow=bool(body.get("allow")))
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    return JSONResponse(answer.model_dump(mode="json"))


async def cancel(request: Request) -> Response:
    handle = await run_in_threadpool(_handle, request.path_params["request_id"])
    await run_in_threadpool(handle.cancel)
    return JSONResponse({"cancelled": True})


async def terminate(request: Request) -> Response:
    request_id = request.path_params["request_id"]
    with _handles_lock:
        handle = _handles.pop(request_id, None)
    if handle is not None:
        handle.close()
    result = await run_in_threadpool(client.terminate, request_id)
    return JSONResponse({"state": result.state.value if result else None})


app = Starlette(
    routes=[
        Route("/", page),
        Route("/sessions", submit, methods=["POST"]),
        Route("/sessions/{request_id}/stages", stages),
        Route("/sessions/{request_id}/messages", message, methods=["POST"]),
        Route("/sessions/{request_id}/permissions", permission, methods=["POST"]),
        Route("/sessions/{request_id}/cancel", cancel, methods=["POST"]),
        Route("/sessions/{request_id}/terminate", terminate, methods=["POST"]),
    ]
)
