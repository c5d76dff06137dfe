"""A stand-in LLM API (Anthropic Messages and OpenAI Chat Completions) that records the credential it got.

    POST /v1/messages            Anthropic: key in x-api-key or Authorization: Bearer; with ``?stream=N`` an SSE
                                 stream of N events ``pause`` seconds apart (a streaming turn); with ``?echo=1``
                                 the credential it got, in a header and the body (what a careless upstream might
                                 do; the egress proxy must mask it)
    POST /v1/chat/completions    OpenAI: key in Authorization: Bearer (also /chat/completions)
    anything else                404, recorded too: what reached the upstream is all in ``calls``

Replies never contain the credential except with ``echo``. ``accepted`` restricts the keys it takes (401 else).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class UpstreamCall:
    path: str
    credential: str | None
    scheme: str | None  # "x-api-key" or "bearer"
    body: dict[str, object]
    method: str = "POST"
    query: str = ""


def credential_of(request: Request) -> tuple[str | None, str | None]:
    """(credential, scheme) from x-api-key or a bearer Authorization header."""
    if key := request.headers.get("x-api-key"):
        return key, "x-api-key"
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token, "bearer"
    return None, None


@dataclass
class LLMUpstream:
    accepted: set[str] | None = None
    calls: list[UpstreamCall] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/chat/completions", self.chat, methods=["POST"]),
                Route("/{path:path}", self.other, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
            ]
        )

    def credentials(self) -> list[str | None]:
        return [call.credential for call in self.calls]

    async def _record(self, request: Request) -> Response | None:
        credential, scheme = credential_of(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"raw": raw.decode(errors="replace")}
        call = UpstreamCall(request.url.path, credential, scheme, body, request.method, request.url.query)
        self.calls.append(call)
        if credential is None or (self.accepted is not None and credential not in self.accepted):
            return JSONResponse(
                {"type": "error", "error": {"type": "authentication_error", "message": "invalid key"}}, 401
            )
        return None

    async def messages(self, request: Request) -> Response:
        if refused := await self._record(request):
            return refused
        if "stream" in request.query_params:
            return self.stream(request)
        if "echo" in request.query_params:
            credential, _ = credential_of(request)
            return JSONResponse({"you_sent": credential}, headers={"x-echo": credential or ""})
        return JSONResponse(
            {
                "id": "msg_standin",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "pong from the anthropic stand-in"}],
                "stop_reason": "end_turn",
            }
        )

    async def chat(self, request: Request) -> Response:
        if refused := await self._record(request):
            return refused
        return JSONResponse(
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong from the openai stand-in"}}],
            }
        )

    def stream(self, request: Request) -> Response:
        count = int(request.query_params["stream"])
        pause = float(request.query_params.get("pause", "0.5"))

        async def events() -> AsyncIterator[bytes]:
            for n in range(count):
                yield f"event: delta\ndata: {json.dumps({'n': n})}\n\n".encode()
                await asyncio.sleep(pause)
            yield b"event: done\ndata: {}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def other(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"type": "error", "error": {"type": "not_found_error", "message": "no such route"}}, 404)
